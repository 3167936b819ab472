"""RayIterativeSFTTrainer: the seed API's feel for driver scripts, with the work done by Ray actors.

    trainer = RayIterativeSFTTrainer("tiny-llama", args={"learning_rate": 1e-3})
    rollouts = trainer.generate(["12+30=", "7+5="], num_samples=4)   # references
    scored = trainer.filter(rollouts, [my_reward_fn])                 # references
    stats = trainer.step(scored)                                      # small dict
    trainer.sync_weights()                                            # generators catch up

Rollout data stays in the object store; the driver holds references and reads only
summaries, unless it asks for rows with `collect`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from iterft_ray.actors.filter_pool import FilterPool
from iterft_ray.actors.generator import GeneratorActor
from iterft_ray.actors.trainer_actor import TrainerGroup
from iterft_ray.config import VLLM_MAX_LORA_RANK, LoraConfig, ResourcesConfig, SamplingConfig
from iterft_ray.failures import (ActorRoster, Deadline, actor_options, actor_requests, check_cluster_fits, format_resources,
                       not_started, placement_timeout, round_timeout, total_request, wait_for, wait_started)
from iterft_ray.storage import StoragePath


@dataclass
class ScoredRollouts:
    """Scored rollout batches (references) and their summaries (references to small dicts)."""

    tables: list[ray.ObjectRef]
    summaries: list[ray.ObjectRef]

    def summary(self) -> dict[str, Any]:
        """Totals over the batches: rows, accepted, accept_rate, reward_mean, errors (and the first), weight_versions."""
        return combine_summaries(ray.get(self.summaries))


def combine_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """`ScoredRollouts.summary` of summaries already fetched (a driver that waited on them fetched each once)."""
    rows = sum(p["rows"] for p in parts)
    accepted = sum(p["accepted"] for p in parts)
    versions: dict[int, int] = {}
    for p in parts:
        for v, n in p["weight_versions"].items():
            versions[v] = versions.get(v, 0) + n
    return {
        "rows": rows,
        "accepted": accepted,
        "accept_rate": accepted / rows if rows else 0.0,
        "reward_mean": sum(p["score_sum"] for p in parts) / rows if rows else 0.0,
        "filter_errors": sum(p["errors"] for p in parts),
        "first_filter_error": next((p["first_error"] for p in parts if p["first_error"] is not None), None),
        "weight_versions": versions,
    }


def prompt_table(prompts: pa.Table | list[str] | list[dict]) -> pa.Table:
    """Prompts as an Arrow table with `prompt_id` and `prompt` (ids 0..n-1 when not given)."""
    if isinstance(prompts, pa.Table):
        table = prompts
    elif prompts and all(isinstance(p, str) for p in prompts):
        table = pa.table({"prompt": list(prompts)})
    elif prompts and all(isinstance(p, dict) for p in prompts):
        table = pa.Table.from_pylist(list(prompts))
    else:
        raise TypeError("prompts: expected a non-empty list of strings or dicts, or a pyarrow Table")
    if "prompt" not in table.column_names:
        raise ValueError(f"prompts: no 'prompt' column (columns: {table.column_names})")
    if "prompt_id" not in table.column_names:
        table = table.append_column("prompt_id", pa.array(range(table.num_rows), pa.int64()))
    return table


def init_ray(resources: ResourcesConfig, address: str | None = None) -> None:
    """Connect to Ray, or start a local one that can hold every actor of `resources`.

    A local Ray counts one CPU per core; the actors of a config may ask for more (a
    trainer, generators and filters each take a share), so the local Ray advertises
    at least what they ask for instead of leaving one of them pending for ever.
    """
    if ray.is_initialized():
        return
    if address is not None or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=_working_dir_modules())
        return
    demand = total_request(actor_requests(resources)).get("CPU", 0)
    _listen_on_loopback_only()
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(demand)))


def _working_dir_modules() -> dict | None:
    """A runtime_env that ships the working directory's `*.py` modules to a cluster's nodes.

    A user's filter (`filters: ["mymod:check"]`) lives beside the config; a local Ray
    already puts the driver's working directory on every worker's path, but nodes of a
    cluster do not have that directory. `py_modules` uploads just those files (not the
    directory, which may hold runs and checkpoints) and does not move the actors' working
    directory. Under `ray job submit` the job's own runtime_env (`--working-dir .`) does this.
    """
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    modules = sorted(str(p) for p in Path.cwd().glob("*.py"))
    if not modules or RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ:
        return None
    return {"py_modules": modules}


def _listen_on_loopback_only() -> None:
    """Make an embedded local Ray bind 127.0.0.1 instead of the host's address.

    Ray's switch for this is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its local-only mode).
    The processes Ray starts read the variable; this process read it when Ray was
    imported, so the module constant is set as well. Set the variable to 1 to let
    other machines reach the embedded Ray.
    """
    from ray._private import ray_constants

    local_only = os.environ.setdefault(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0") == "0"
    ray_constants.ENABLE_RAY_CLUSTER = not local_only


class RayIterativeSFTTrainer:
    """A trainer actor group, generator actors and a filter pool, driven one call at a time."""

    def __init__(
        self,
        model: str,
        args: dict[str, Any] | None = None,
        *,
        tokenizer: str | None = None,
        resources: ResourcesConfig | None = None,
        sampling: SamplingConfig | None = None,
        filters: list | None = None,
        filter_timeout_s: float = 10.0,
        trust_remote_code: bool = False,
        tiny_overrides: dict | None = None,
        checkpoint: StoragePath | str | None = None,
        lora: LoraConfig | None = None,
    ):
        self.resources = resources or ResourcesConfig()
        self.sampling = sampling or SamplingConfig()
        if lora is not None and self.sampling.engine == "vllm" and lora.r > VLLM_MAX_LORA_RANK:
            raise ValueError(f"model.lora.r: sampling.engine: vllm serves adapters of rank up to "
                             f"{VLLM_MAX_LORA_RANK}, got {lora.r}")
        self.lora = lora
        init_ray(self.resources)
        self._requests = {q.role: q for q in actor_requests(self.resources)}
        check_cluster_fits(list(self._requests.values()))
        self._trainer_args = {"output_dir": "runs/trainer", "report_to": "none", **(args or {})}
        self._model_args = (model, tokenizer, trust_remote_code, tiny_overrides)
        # Generators and filters are asked for first: creating the trainer waits for its
        # placement group, and on an autoscaling cluster their nodes can start meanwhile.
        self.generators: list = []
        self.filter_pool: FilterPool | None = None
        self.trainer: TrainerGroup | None = None
        try:
            start = Deadline.after(self.resources.start_timeout_s, "resources.start_timeout_s")
            self.scale_generators(self.resources.num_generators)
            self.filter_pool = FilterPool(
                filters if filters is not None else [], self.resources.filter_pool_size, filter_timeout_s,
                self._restartable(self._requests["filter actor"].bundle),
            )
            self.trainer = self._new_trainer(checkpoint, start)
            self._wait_started(start)
            self.weights, self.version = self.trainer.publish()
            self.eos_token: str | None = self.trainer.call("eos_token", on="rank0")[0]
            self.weight_transport = self._weight_transport()
            self._form_weight_group()
        except BaseException:
            self.shutdown()  # a failed start leaves no actor behind
            raise

    def _new_trainer(self, checkpoint: StoragePath | str | None, start: Deadline) -> TrainerGroup:
        """The trainer's ranks, their placement group placed by the `start` deadline (else PlacementError)."""
        res = self.resources
        try:
            return TrainerGroup(
                self._model_args[0], self._trainer_args, res.trainer_ranks, res.trainer_cpus, res.trainer_gpus,
                res.custom_resources, *self._model_args[1:], checkpoint=checkpoint, lora=self.lora,
                placement_timeout_s=start.remaining(),
            )
        except ray.exceptions.GetTimeoutError:
            bundle = format_resources(self._requests["trainer rank"].bundle)
            waiting = [f"trainer ranks 0..{res.trainer_ranks - 1} (one placement group) asking for {bundle} each"]
            raise placement_timeout(start, waiting + not_started(self._other_actors()),
                                    list(self._requests.values())) from None

    def _other_actors(self) -> list[tuple[str, Any, dict[str, float]]]:
        """(name, handle, request) of every generator and filter actor."""
        actors = [(f"generator {i}", g, self._requests["generator"].bundle) for i, g in enumerate(self.generators)]
        pool = self.filter_pool.actors if self.filter_pool is not None else []
        return actors + [(f"filter actor {i}", a, self._requests["filter actor"].bundle) for i, a in enumerate(pool)]

    def _wait_started(self, start: Deadline) -> None:
        """Every generator and filter actor placed and constructed, by the `start` deadline."""
        wait_started(self._other_actors(), start, self.actor_roster(), list(self._requests.values()))

    def _restartable(self, bundle: dict[str, float]) -> dict[str, Any]:
        """Actor options: `bundle`, and restarts and retries within the run's limits.

        A generator that dies is restarted and its unfinished call retried: sampling is
        seeded per call, so the retry yields the same rows, no sample lost or doubled.
        """
        return {**actor_options(bundle), "max_restarts": self.resources.max_restarts,
                "max_task_retries": self.resources.max_task_retries}

    def actor_roster(self) -> ActorRoster:
        """How errors name this trainer's actors (`generator 0`, `filter actor 1`, `trainer rank 0`)."""
        names = {g._actor_id.hex(): f"generator {i}" for i, g in enumerate(self.generators)}
        if self.filter_pool is not None:
            names |= {a._actor_id.hex(): f"filter actor {i}" for i, a in enumerate(self.filter_pool.actors)}
        if self.trainer is not None:
            names |= {r._actor_id.hex(): f"trainer rank {i}" for i, r in enumerate(self.trainer.ranks)}
        return ActorRoster(names, self.resources.max_restarts, self.resources.max_task_retries)

    def restore_trainer(self, checkpoint: StoragePath | str) -> dict[str, Any]:
        """Replace the trainer (dead or alive) by one restored from `checkpoint`; generators reload its weights.

        Returns the `extra` state saved with the checkpoint.
        """
        self.trainer.shutdown()
        self.trainer = self._new_trainer(checkpoint, Deadline.after(self.resources.start_timeout_s,
                                                                    "resources.start_timeout_s"))
        self.weights, self.version = self.trainer.publish()
        self._form_weight_group()
        ray.get([g.sync.remote([self.weights], self.version, True) for g in self.generators])
        return self.trainer.restored

    def _weight_transport(self) -> str:
        """`resources.weight_transport` resolved: "auto" is "broadcast" when a generator runs on another node
        than the trainer (of one rank), else "object_store"."""
        transport = self.resources.weight_transport
        if transport != "auto":
            return transport
        if self.resources.trainer_ranks != 1 or self.lora is not None:  # shards, or an adapter of a few MB
            return "object_store"
        trainer_node = self.trainer.call("placement", on="rank0")[0][0]
        nodes = ray.get([g.node_id.remote() for g in self.generators])
        return "broadcast" if any(node != trainer_node for node in nodes) else "object_store"

    def _form_weight_group(self) -> None:
        """With the broadcast transport: (re)form the `WeightGroup` of the trainer's rank 0 and every generator."""
        if self.weight_transport != "broadcast" or not self.generators:
            return
        rank0, size = self.trainer.ranks[0], len(self.generators) + 1
        res = self.resources
        backend = "nccl" if res.trainer_gpus > 0 and res.generator_gpus > 0 else "gloo"
        address, layout = self.trainer.gather([rank0.open_weight_group.remote(size)])[0]
        layout_ref = ray.put(layout)
        joins = [rank0.join_weight_group.remote(address, size, backend)]
        joins += [g.join_weight_group.remote(address, i + 1, size, backend, layout_ref)
                  for i, g in enumerate(self.generators)]
        ray.get(joins)

    def scale_generators(self, count: int) -> None:
        """Grow or shrink the generator pool; new generators load the current weights before they sample."""
        options = self._restartable(self._requests["generator"].bundle)
        changed = count != len(self.generators)
        while len(self.generators) < count:
            model, tokenizer, trust_remote_code, tiny_overrides = self._model_args
            self.generators.append(GeneratorActor.options(**options).remote(
                model, len(self.generators), self.sampling, tokenizer, trust_remote_code, tiny_overrides, self.lora))
        for gone in self.generators[count:]:
            ray.kill(gone)
        del self.generators[count:]
        if changed and self.trainer is not None:  # not while starting: __init__ forms the group
            self.weight_transport = self._weight_transport()
            self._form_weight_group()

    def generate(
        self,
        prompts: pa.Table | list[str] | list[dict],
        *,
        seed: int = 0,
        round_index: int = 0,
        **sampling: Any,
    ) -> list[ray.ObjectRef]:
        """Shard prompts across generators and sample with the current weights; returns rollout references.

        `sampling` overrides fields of the SamplingConfig (num_samples, temperature, ...).
        """
        if "engine" in sampling:
            raise ValueError("engine: fixed when the generators start (sampling.engine), not per call")
        config = dataclasses.replace(self.sampling, **sampling)
        table = prompt_table(prompts)
        shards = _split(table, len(self.generators))
        weights = [self.weights]
        return [
            g.generate.remote(ray.put(shard), weights, self.version, config, seed * 1_000_003 + round_index * 1009 + i,
                              round_index)
            for i, (g, shard) in enumerate(zip(self.generators, shards))
            if shard.num_rows
        ]

    def filter(self, rollouts: list[ray.ObjectRef], filters: list | None = None) -> ScoredRollouts:
        """Score rollout batches in the filter pool (as soon as each is ready); returns references."""
        pairs = [self.filter_pool.score(ref, filters) for ref in rollouts]
        return ScoredRollouts([p[0] for p in pairs], [p[1] for p in pairs])

    def step(self, rollouts: ScoredRollouts | list[ray.ObjectRef] | None = None, deadline: Deadline | None = None,
             **kwargs: Any) -> dict:
        """Train: on the accepted rows of scored rollouts, or with `IterativeSFTTrainer.step`'s arguments.

        Training on rollouts stops at `deadline` with `RoundTimeoutError` naming the ranks still
        at work. The statistics carry the weight `version` the step made.
        """
        if rollouts is not None:
            if kwargs:
                raise ValueError("rollouts: give rollouts or step() arguments, not both")
            refs = self.step_async(rollouts)
            try:
                return self.trainer.gather(refs, None if deadline is None else deadline.remaining())[0]
            except ray.exceptions.GetTimeoutError:
                _, pending = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
                raise round_timeout(pending, deadline, "train", self.actor_roster()) from None
        return self.trainer.step(**kwargs)

    def step_async(self, rollouts: ScoredRollouts | list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Start training on scored rollouts, passed by reference to every rank; returns one reference
        per rank (`trainer.gather(refs)[0]` is the statistics, and raises any rank's failure)."""
        tables = rollouts.tables if isinstance(rollouts, ScoredRollouts) else list(rollouts)
        return self.trainer.call_async("step_rollouts", *tables)

    def sync_weights(self, version: int | None = None, deadline: Deadline | None = None) -> int:
        """Publish the trainer's weights once and have every generator load them (by `deadline`); returns the version.

        `version` is the trainer's current version when the caller knows it (a step's statistics
        carry it), which saves asking the trainer.
        """
        self.publish_weights(version)
        loads = [g.sync.remote([self.weights], self.version) for g in self.generators]
        wait_for(loads, deadline, "sync", self.actor_roster(), fetch=True)
        return self.version

    def publish_weights(self, version: int | None = None) -> int:
        """Put the trainer's current weights in the object store (generators load them on their next call).

        `version`: as in `sync_weights`.
        """
        current = self.trainer.call("version", on="rank0")[0] if version is None else version
        if current != self.version:
            self.weights, self.version = self.trainer.publish(current)
            if self.weight_transport == "broadcast":
                self._broadcast_weights()
        return self.version

    def _broadcast_weights(self) -> None:
        """Broadcast the current version from the trainer's rank 0 to every generator (the broadcast transport).

        The snapshot is in the object store as well (put on the trainer's node, pulled by nobody), so a
        generator that missed a broadcast still loads the version it is asked for. A generator that Ray
        restarted since the group formed has no place in it: the group is formed again and the broadcast
        tried once more.
        """
        for attempt in (1, 2):
            refs = [self.trainer.ranks[0].broadcast_weights.remote()]
            refs += [g.receive_weights.remote(self.version) for g in self.generators]
            try:
                ray.get(refs)
                return
            except ray.exceptions.RayTaskError:
                if attempt == 2:
                    raise
                self._form_weight_group()

    def collect(self, refs: ScoredRollouts | list[ray.ObjectRef]) -> pa.Table:
        """Fetch rollout batches into one table, for looking at them in a notebook."""
        tables = refs.tables if isinstance(refs, ScoredRollouts) else refs
        return pa.concat_tables(ray.get(list(tables)))

    def save(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Save a checkpoint: Hugging Face model + tokenizer + training state (+ `extra` JSON), atomically."""
        self.trainer.save(path, extra)

    def shutdown(self) -> None:
        """Stop every actor this trainer started (those that did start, when it failed while starting)."""
        for g in self.generators:
            ray.kill(g)
        for a in self.filter_pool.actors if self.filter_pool is not None else []:
            ray.kill(a)
        if self.trainer is not None:
            self.trainer.shutdown()


def _split(table: pa.Table, parts: int) -> list[pa.Table]:
    """Cut a table into `parts` contiguous slices of near-equal size (prompts stay whole)."""
    size, extra = divmod(table.num_rows, parts)
    out, start = [], 0
    for i in range(parts):
        n = size + (1 if i < extra else 0)
        out.append(table.slice(start, n))
        start += n
    return out
