"""TrainerGroup: the driver's handle of the trainer's ranks, created together and called together.

A group of N ranks is N `TrainerActor`s in one placement group running torch.distributed
(NCCL on GPUs, Gloo on CPU), with the environment `torchrun` would give them (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

The group calls its ranks in one declared way, `call(TrainerRank.method, ..., on=...)`: on
every rank (anything that touches sharded state is collective) or on rank 0 only. It always
gathers every called rank's result, and the first rank to fail is raised with its rank and
traceback as soon as it fails, not when the others give up waiting in a collective.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from iterft_ray.actors.placement import actor_options, actor_requests
from iterft_ray.actors.trainer_actor import TrainerActor, TrainerRank
from iterft_ray.actors.warm import take_or_start, warm_actors
from iterft_ray.config import ModelConfig, ResourcesConfig
from iterft_ray.storage import StoragePath
from iterft_ray.weights.snapshot import assemble_snapshot, weights_checksum


class TrainerRankError(RuntimeError):
    """A trainer rank failed; the message holds its rank and traceback."""


def gather(refs: list[ray.ObjectRef], timeout_s: float | None = None) -> list[Any]:
    """Every rank's result, in rank order; the first rank to fail is raised as soon as it fails.

    A rank that died is raised as Ray's own `RayActorError`, so callers that recover a
    lost trainer still recognise it. Ranks not done within `timeout_s` raise `GetTimeoutError`.
    The wait is the caller's: a Ray task doing it would start a worker process per call.
    """
    results: dict[ray.ObjectRef, Any] = {}
    pending = list(refs)
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        timeout = None if end is None else max(0.0, end - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
        if not done:
            raise ray.exceptions.GetTimeoutError(f"trainer ranks {[refs.index(p) for p in pending]} not done within "
                                                 f"{timeout_s:g} s")
        try:
            results[done[0]] = ray.get(done[0])
        except ray.exceptions.RayActorError:
            raise
        except ray.exceptions.RayTaskError as error:
            rank = refs.index(done[0])
            raise TrainerRankError(f"trainer rank {rank} failed:\n{error}") from None
    return [results[r] for r in refs]


class TrainerGroup:
    """The trainer's ranks (`resources.trainer_ranks` of them), each asking for `resources.trainer_*`."""

    def __init__(self, model: ModelConfig, trainer_args: dict[str, Any], resources: ResourcesConfig | None = None,
                 checkpoint: StoragePath | str | None = None, placement_timeout_s: float | None = None,
                 memory: float = 0):
        """`placement_timeout_s`: how long to wait for the ranks' placement group (GetTimeoutError past it).
        `memory`: the bytes each rank asks Ray for (`footprint.actor_memory`)."""
        res = resources or ResourcesConfig()
        bundle = next(q.bundle for q in actor_requests(res, memory={"trainer rank": memory}) if q.role == "trainer rank")
        self.model = model
        # One rank can be a warm one (`keep_actors_warm`), with its placement group; several always start anew.
        self._spec = ("trainer rank", bundle) if res.trainer_ranks == 1 else None
        self.placement_group, self.ranks = take_or_start(
            "trainer rank", self._spec, lambda: (placement_group([bundle] * res.trainer_ranks, strategy="PACK"), []),
            end_all_idle=True)
        try:
            if not self.ranks:
                ray.get(self.placement_group.ready(), timeout=placement_timeout_s)
                self._create_ranks(res, bundle)
            envs = self._rank_environments(len(self.ranks))
            self.restored: dict[str, Any] = self.call(TrainerRank.setup, model, trainer_args, checkpoint=checkpoint,
                                                      per_rank={"env": envs})[0]
        except BaseException:
            self.shutdown()  # a rank that failed to start leaves no rank or placement group behind
            raise

    def _create_ranks(self, res: ResourcesConfig, bundle: dict[str, float]) -> None:
        # Ray would give each rank only its own GPU; the group sets CUDA_VISIBLE_DEVICES itself.
        runtime_env = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}} if res.trainer_gpus else None
        self.ranks = [
            TrainerActor.options(
                **actor_options(bundle),
                runtime_env=runtime_env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
            ).remote(i, res.trainer_ranks)
            for i in range(res.trainer_ranks)
        ]

    def _rank_environments(self, ranks: int) -> list[dict[str, str]]:
        """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT (and the node's GPUs) of each rank."""
        placements = self.call(TrainerRank.placement)
        addr, port = self.call(TrainerRank.rendezvous_address, on="rank0")[0]
        envs = []
        for rank, (node, gpus) in enumerate(placements):
            on_node = [r for r, (n, _) in enumerate(placements) if n == node]
            # One rank gets no distributed variables: with them accelerate would start a
            # process group, whose store listens on every interface, for nothing.
            env = {"RANK": str(rank), "LOCAL_RANK": str(on_node.index(rank)), "WORLD_SIZE": str(ranks),
                   "LOCAL_WORLD_SIZE": str(len(on_node)), "MASTER_ADDR": addr, "MASTER_PORT": str(port)} if ranks > 1 else {}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for r in on_node for g in placements[r][1])
                if ranks > 1:
                    env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
            envs.append(env)
        return envs

    def call_async(self, method: Callable, *args, on: str = "all", per_rank: dict[str, list] | None = None,
                   **kwargs) -> list[ray.ObjectRef]:
        """Start `method` on every rank (`on="all"`) or on rank 0 (`on="rank0"`).

        `method` is a `TrainerRank` method (`TrainerRank.step_rollouts`), or any other function,
        called on each rank as `method(rank, *args)` with the rank's `TrainerRank` (Ray's `__ray_call__`).
        Returns one reference per called rank, in rank order; `gather` waits for them.
        `per_rank` gives keyword arguments that differ by rank (one value per rank).
        """
        if on not in ("all", "rank0"):
            raise ValueError(f"on: expected 'all' or 'rank0', got {on!r}")
        own = getattr(TrainerRank, getattr(method, "__name__", ""), None) is method
        ranks = range(len(self.ranks)) if on == "all" else [0]
        refs = []
        for i in ranks:
            rank_kwargs = {**kwargs, **{k: v[i] for k, v in (per_rank or {}).items()}}
            if own:
                refs.append(getattr(self.ranks[i], method.__name__).remote(*args, **rank_kwargs))
            else:
                refs.append(self.ranks[i].__ray_call__.remote(method, *args, **rank_kwargs))
        return refs

    gather = staticmethod(gather)

    def call(self, method: Callable, *args, on: str = "all", per_rank: dict[str, list] | None = None,
             **kwargs) -> list:
        """`call_async`, waited for here: the list of results in rank order."""
        return gather(self.call_async(method, *args, on=on, per_rank=per_rank, **kwargs))

    def step(self, **kwargs) -> dict:
        """Same arguments as `IterativeSFTTrainer.step`; the batch is sharded across ranks."""
        return self.call(TrainerRank.step, **kwargs)[0]

    def version(self, timeout_s: float | None = None) -> int:
        """The trainer's weight version (every rank asked: a dead rank raises `RayActorError`)."""
        return gather(self.call_async(TrainerRank.version), timeout_s)[0]

    def save(self, path: StoragePath | str, extra: dict[str, Any] | None = None) -> None:
        self.call(TrainerRank.save, path, extra)

    def evaluate(self) -> dict:
        return self.call(TrainerRank.evaluate)[0]

    def checksum(self) -> str:
        """`weights_checksum` of the full weights (equal to one unsharded model's); of sharded LoRA ranks,
        of the adapter alone (what they publish)."""
        if len(self.ranks) == 1:
            return self.call(TrainerRank.checksum)[0]
        refs = [r[0] for r in self.call(TrainerRank.publish)]
        if self.model.lora is not None:  # the adapter, whole on rank 0
            return weights_checksum(ray.get(refs[0]))
        return weights_checksum(assemble_snapshot(ray.get(refs)))

    def peak_memory(self) -> list[dict[str, float]]:
        return self.call(TrainerRank.peak_memory)

    def shutdown(self) -> None:
        """Stop every rank (dead or stuck ones included) and free the placement group; within
        `keep_actors_warm()`, a rank of one that releases cleanly is kept, with its group, for the next."""
        warm = warm_actors()
        if warm is not None and self._spec is not None and self.ranks:
            warm.keep(self._spec, (self.placement_group, self.ranks), self.ranks, self._end, self.placement_group)
        else:
            self._end()

    def _end(self) -> None:
        try:
            ray.get([r.shutdown.remote() for r in self.ranks], timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.RayTaskError):
            pass  # a rank stuck in a collective after another failed: killed below
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.placement_group)
