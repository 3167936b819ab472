"""TrainerActor: the IterativeSFTTrainer on its own GPUs, as one rank or a group of ranks.

A group of N ranks is N actors in one placement group running torch.distributed (NCCL
on GPUs, Gloo on CPU), with the environment `torchrun` would give them (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The trainer shards the model with
FSDP2 over the group. Every rank gets the whole input (a rollout batch arrives by
reference, so on one node that costs nothing), validates it the same way, and trains
on its shard `rank::N`.

The group calls its ranks in one declared way, `TrainerGroup.call(method, on=...)`:
on every rank (anything that touches sharded state is collective) or on rank 0 only.
It always gathers every called rank's result, and the first rank to fail is raised
with its rank and traceback as soon as it fails, not when the others give up waiting
in a collective.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from contextlib import nullcontext
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from transformers import AutoTokenizer, PreTrainedModel

from iterft_ray.train.batching import IGNORE_INDEX, examples_from_tensors
from iterft_ray.train.checkpoint import load_training_state, save_checkpoint
from iterft_ray.config import LoraConfig
from iterft_ray.storage import StoragePath
from iterft_ray.tiny import resolve_model_path
from iterft_ray.train.trainer import IterativeSFTConfig, IterativeSFTTrainer, load_model
from iterft_ray.weights.snapshot import (
    WEIGHT_GROUP_TIMEOUT, WeightGroup, WeightLayout, assemble_snapshot, broadcast_weights, open_weight_group_store,
    publish_adapter, publish_shard, publish_weights, weight_layout, weights_checksum,
)


class TrainerRankError(RuntimeError):
    """A trainer rank failed; the message holds its rank and traceback."""


@ray.remote
class TrainerActor:
    """One rank of the trainer. Call `setup` before anything else."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.trainer: IterativeSFTTrainer | None = None

    def placement(self) -> tuple[str, list[int]]:
        """(node id, GPU ids) of this rank, for the group to work out local ranks and devices."""
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), [int(g) for g in ray.get_gpu_ids()]

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0: an address and free port on its node where the group can meet."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, model_path: str, trainer_args: dict[str, Any], env: dict[str, str],
              tokenizer_path: str | None = None, trust_remote_code: bool = False,
              tiny_overrides: dict | None = None, checkpoint: StoragePath | str | None = None,
              lora: LoraConfig | None = None) -> dict[str, Any]:
        """Join the process group (if several ranks) and build the trainer, from `checkpoint` if given.

        With `lora` the model at `model_path` is the frozen base and a checkpoint holds only
        the adapter, so a restore loads the base from `model_path` and the adapter from it.

        `env` is the distributed environment of this rank; it is set before torch touches
        a device, so CUDA_VISIBLE_DEVICES (all GPUs of this node's ranks, in local-rank
        order) lets the ranks of a node see each other's devices. Returns the `extra`
        state saved with the checkpoint (empty for a fresh start).
        """
        os.environ.update(env)
        # A checkpoint in a store is downloaded to this node for the loaders, which read files.
        with StoragePath.of(checkpoint).local_copy() if checkpoint is not None else nullcontext() as local:
            checkpoint = None if local is None else str(local)
            if checkpoint is not None:
                tokenizer_path = checkpoint
            if checkpoint is not None and lora is None:
                model_path = checkpoint
            else:
                model_path = resolve_model_path(model_path, **(tiny_overrides or {}))
            if self.world_size > 1:
                if torch.cuda.is_available():
                    torch.cuda.set_device(int(env["LOCAL_RANK"]))
                backend = trainer_args.get("ddp_backend") or ("nccl" if torch.cuda.is_available() else "gloo")
                timeout = datetime.timedelta(seconds=trainer_args.get("ddp_timeout", 1800))
                dist.init_process_group(backend, init_method="env://", timeout=timeout)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path, trust_remote_code=trust_remote_code)
            args = IterativeSFTConfig(**trainer_args)
            self.trainer = IterativeSFTTrainer(
                _model_to_train(load_model(model_path, trust_remote_code=trust_remote_code), lora, checkpoint, args.seed),
                args,
                processing_class=tokenizer,
            )
            return load_training_state(self.trainer, checkpoint) if checkpoint is not None else {}

    def step(self, input_ids=None, attention_mask=None, labels=None, texts=None, texts_labels=None) -> dict:
        """`IterativeSFTTrainer.step` on this rank's shard of the given lists."""
        examples = self.trainer.build_examples(input_ids, attention_mask, labels, texts, texts_labels)
        return self.trainer.train_examples(examples[self.rank :: self.world_size])

    def step_rollouts(self, *rollouts: pa.Table) -> dict:
        """Train on the accepted rows of scored rollout batches: the sampled tokens, prompt masked."""
        accepted = [t.filter(t["accepted"]) for t in rollouts if t.num_rows]
        table = pa.concat_tables(accepted) if accepted else None
        rows = [] if table is None or table.num_rows == 0 else _token_rows(table)
        mine = rows[self.rank :: self.world_size]
        is_encoder_decoder = self.trainer.is_encoder_decoder
        input_ids, labels = [], []
        for prompt, completion in mine:
            if is_encoder_decoder:
                input_ids.append(torch.tensor(prompt))
                labels.append(torch.tensor(completion))
            else:
                input_ids.append(torch.tensor(prompt + completion))
                labels.append(torch.tensor([IGNORE_INDEX] * len(prompt) + completion))
        examples = examples_from_tensors(
            input_ids, None, labels, is_encoder_decoder, self.trainer.max_length, self.trainer.truncation_mode
        )
        stats = self.trainer.train_examples(examples)
        stats["version"] = self.version()
        return stats

    def eos_token(self) -> str | None:
        return self.trainer.tokenizer.eos_token

    def version(self) -> int:
        """The weight version: optimizer updates so far."""
        return self.trainer.state.global_step

    def publish(self) -> list[ray.ObjectRef]:
        """Put this rank's weights in the object store once: all of them on one rank, its shard on several,
        the adapter only when a LoRA adapter trains.

        Returns [ref] (wrapped so it stays a reference).
        """
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if isinstance(model, PeftModel):  # gathered whole from the shards; rank 0 puts it
            return [publish_adapter(model, self.version(), put=self.rank == 0)]
        if self.trainer.sharded:
            return [publish_shard(self.trainer.model, self.version())]
        return [publish_weights(model, self.version())]

    def open_weight_group(self, size: int) -> tuple[tuple[str, int], WeightLayout]:
        """Rank 0: serve the store where a `WeightGroup` of `size` members (this rank and the generators)
        meets; returns its address and the layout every version it broadcasts will have."""
        self._weight_store, address = open_weight_group_store(size, WEIGHT_GROUP_TIMEOUT)
        self.weight_layout = weight_layout(self._published_model())
        return address, self.weight_layout

    def join_weight_group(self, address: tuple[str, int], size: int, backend: str) -> None:
        """Rank 0: join the `WeightGroup` as its rank 0, while the generators join it."""
        self.weight_group = WeightGroup(address, 0, size, backend, WEIGHT_GROUP_TIMEOUT, store=self._weight_store)

    def broadcast_weights(self) -> int:
        """Rank 0: broadcast the current weights to the `WeightGroup` (the generators call `receive_weights`
        at the same time); returns the version sent."""
        broadcast_weights(self.weight_group, self._published_model(), self.weight_layout)
        return self.version()

    def _published_model(self) -> torch.nn.Module:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def evaluate(self) -> dict:
        return self.trainer.evaluate()

    def save(self, path: StoragePath | str, extra: dict[str, Any] | None = None) -> None:
        """Save a checkpoint (Hugging Face model + training state + `extra`) to a local path or a store,
        atomically; collective, rank 0 writes (a store gets it uploaded from this node)."""
        save_checkpoint(self.trainer, path, extra)

    def checksum(self) -> str:
        """One rank only: `weights_checksum` of its model (the group checksums sharded weights itself)."""
        return weights_checksum(self.trainer.accelerator.unwrap_model(self.trainer.model))

    def peak_memory(self) -> dict[str, float]:
        """Peak resident memory of this rank's process (and of its GPU), in MB."""
        import resource

        out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch.cuda.is_available():
            out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _model_to_train(model: PreTrainedModel, lora: LoraConfig | None, checkpoint: str | None, seed: int):
    """`model`, or with `lora` a PeftModel over it: a new adapter, or the one saved in `checkpoint`.

    A new adapter is initialised from `seed` (`trainer.seed`): FSDP2 shards what each rank
    holds and broadcasts nothing, so every rank must draw the same initial weights.

    A module-level function, not inlined in `setup`: Ray pickles actor methods by value,
    and `model.config` there would make cloudpickle try to ship `torch.distributed.config`.
    """
    if lora is None:
        return model
    if checkpoint is not None:
        return PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    torch.manual_seed(seed)
    return get_peft_model(model, lora.peft_config(bool(getattr(model.config, "is_encoder_decoder", False))))


def _token_rows(table: pa.Table) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids) of each row with a non-empty completion."""
    nonempty = table.filter(pc.greater(pc.list_value_length(table["completion_ids"]), 0))
    return list(zip(nonempty["prompt_ids"].to_pylist(), nonempty["completion_ids"].to_pylist()))


def _gather(refs: list[ray.ObjectRef], timeout_s: float | None = None) -> list[Any]:
    """Every rank's result, in rank order; the first rank to fail is raised as soon as it fails.

    A rank that died is raised as Ray's own `RayActorError`, so callers that recover a
    lost trainer still recognise it. Ranks not done within `timeout_s` raise `GetTimeoutError`.
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


@ray.remote(num_cpus=0)
def _assemble_task(shards: list[ray.ObjectRef]):
    """Full weights from the ranks' shards, in a worker of its own so no rank holds a full copy."""
    return assemble_snapshot(ray.get(shards))


class TrainerGroup:
    """Driver-side handle of the trainer's ranks: creates them together and calls them together."""

    def __init__(
        self,
        model_path: str,
        trainer_args: dict[str, Any],
        ranks: int = 1,
        cpus_per_rank: float = 1,
        gpus_per_rank: float = 0,
        custom_resources: bool = False,
        tokenizer_path: str | None = None,
        trust_remote_code: bool = False,
        tiny_overrides: dict | None = None,
        checkpoint: StoragePath | str | None = None,
        lora: LoraConfig | None = None,
        placement_timeout_s: float | None = None,
    ):
        """`placement_timeout_s`: how long to wait for the ranks' placement group (GetTimeoutError past it)."""
        bundle = {"CPU": cpus_per_rank, "GPU": gpus_per_rank, "trainer": 1 if custom_resources else 0}
        bundle = {k: v for k, v in bundle.items() if v}
        self.placement_group = placement_group([bundle] * ranks, strategy="PACK")
        self.lora = lora
        self.ranks: list = []
        try:
            ray.get(self.placement_group.ready(), timeout=placement_timeout_s)
            self._create_ranks(model_path, trainer_args, ranks, cpus_per_rank, gpus_per_rank, custom_resources,
                               tokenizer_path, trust_remote_code, tiny_overrides, checkpoint, lora)
        except BaseException:
            self.shutdown()  # a rank that failed to start leaves no rank or placement group behind
            raise

    def _create_ranks(self, model_path, trainer_args, ranks, cpus_per_rank, gpus_per_rank, custom_resources,
                      tokenizer_path, trust_remote_code, tiny_overrides, checkpoint, lora) -> None:
        # Ray would give each rank only its own GPU; the group sets CUDA_VISIBLE_DEVICES itself.
        runtime_env = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}} if gpus_per_rank else None
        self.ranks = [
            TrainerActor.options(
                num_cpus=cpus_per_rank,
                num_gpus=gpus_per_rank,
                resources={"trainer": 1} if custom_resources else None,
                runtime_env=runtime_env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
            ).remote(i, ranks)
            for i in range(ranks)
        ]
        envs = self._rank_environments(ranks)
        self.restored: dict[str, Any] = self.call(
            "setup", model_path, trainer_args, tokenizer_path=tokenizer_path, trust_remote_code=trust_remote_code,
            tiny_overrides=tiny_overrides, checkpoint=checkpoint, lora=lora, per_rank={"env": envs},
        )[0]

    def _rank_environments(self, ranks: int) -> list[dict[str, str]]:
        """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT (and the node's GPUs) of each rank."""
        placements = self.call("placement")
        addr, port = self.call("rendezvous_address", on="rank0")[0]
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

    def call_async(self, method: str, *args, on: str = "all", per_rank: dict[str, list] | None = None,
                   **kwargs) -> list[ray.ObjectRef]:
        """Start `method` on every rank (`on="all"`) or on rank 0 (`on="rank0"`).

        Returns one reference per called rank, in rank order; `gather` waits for them.
        `per_rank` gives keyword arguments that differ by rank (one value per rank).
        """
        if on not in ("all", "rank0"):
            raise ValueError(f"on: expected 'all' or 'rank0', got {on!r}")
        ranks = range(len(self.ranks)) if on == "all" else [0]
        return [
            getattr(self.ranks[i], method).remote(*args, **kwargs, **{k: v[i] for k, v in (per_rank or {}).items()})
            for i in ranks
        ]

    @staticmethod
    def gather(refs: list[ray.ObjectRef], timeout_s: float | None = None) -> list[Any]:
        """The results of `call_async`, in rank order; the first rank's failure (with its rank and
        traceback) is raised as soon as it happens, not when the other ranks give up waiting for it.
        Past `timeout_s`, `GetTimeoutError`.

        The wait is the caller's: a Ray task doing it would start a worker process per call.
        """
        return _gather(refs, timeout_s)

    def call(self, method: str, *args, on: str = "all", per_rank: dict[str, list] | None = None, **kwargs) -> list:
        """`call_async`, waited for here: the list of results in rank order."""
        return _gather(self.call_async(method, *args, on=on, per_rank=per_rank, **kwargs))

    def step(self, **kwargs) -> dict:
        """Same arguments as `IterativeSFTTrainer.step`; the batch is sharded across ranks."""
        return self.call("step", **kwargs)[0]

    def step_rollouts(self, rollouts: list[ray.ObjectRef]) -> dict:
        """Train on scored rollout batches, passed by reference to every rank."""
        return self.call("step_rollouts", *rollouts)[0]

    def publish(self, version: int | None = None) -> tuple[ray.ObjectRef, int]:
        """Publish the full weights once; returns (snapshot ref, version).

        One rank puts its weights; several put their shards and a worker of their own
        assembles the full snapshot (the format generators load) from them. `version` is the
        ranks' current version when the caller knows it (else they are asked).
        """
        refs = [r[0] for r in self.call("publish")]
        version = self.call("version", on="rank0")[0] if version is None else version
        if self.lora is not None:  # a LoRA adapter: whole on rank 0, small, no assembly
            return refs[0], version
        return (refs[0] if len(refs) == 1 else _assemble_task.remote(refs)), version

    def save(self, path: StoragePath | str, extra: dict[str, Any] | None = None) -> None:
        self.call("save", path, extra)

    def evaluate(self) -> dict:
        return self.call("evaluate")[0]

    def checksum(self) -> str:
        """`weights_checksum` of the full weights (equal to one unsharded model's); of sharded LoRA ranks,
        of the adapter alone (what they publish)."""
        if len(self.ranks) == 1:
            return self.call("checksum")[0]
        return weights_checksum(ray.get(self.publish()[0]))

    def peak_memory(self) -> list[dict[str, float]]:
        return self.call("peak_memory")

    def shutdown(self) -> None:
        """Stop every rank (dead or stuck ones included) and free the placement group."""
        try:
            ray.get([r.shutdown.remote() for r in self.ranks], timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.RayTaskError):
            pass  # a rank stuck in a collective after another failed: killed below
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.placement_group)

