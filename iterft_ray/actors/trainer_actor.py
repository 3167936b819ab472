"""TrainerActor: the IterativeSFTTrainer on its own GPUs, as one rank or a group of ranks.

A group of N ranks is N actors in one placement group running torch.distributed (NCCL
on GPUs, Gloo on CPU). Every rank gets the whole input (a rollout batch arrives by
reference, so on one node that costs nothing), validates it the same way, and trains
on its shard `rank::N`; gradients are summed over ranks once per update. Rank 0
publishes the weights.
"""

from __future__ import annotations

import socket
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from transformers import AutoTokenizer

from ..batching import IGNORE_INDEX, examples_from_tensors
from ..checkpoint import load_training_state, save_training_state
from ..tiny import resolve_model_path
from ..trainer import IterativeSFTConfig, IterativeSFTTrainer, load_model
from ..weights import publish_weights, weights_checksum


@ray.remote
class TrainerActor:
    """One rank of the trainer. Call `setup` before anything else."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.trainer: IterativeSFTTrainer | None = None

    def rendezvous_address(self) -> str:
        """Rank 0: an address on its node where the group can meet."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def setup(self, model_path: str, trainer_args: dict[str, Any], address: str | None,
              tokenizer_path: str | None = None, trust_remote_code: bool = False,
              tiny_overrides: dict | None = None, checkpoint: str | None = None) -> dict[str, Any]:
        """Join the process group (if several ranks) and build the trainer, from `checkpoint` if given.

        Returns the `extra` state saved with the checkpoint (empty for a fresh start).
        """
        if checkpoint is not None:
            model_path = tokenizer_path = checkpoint
        else:
            model_path = resolve_model_path(model_path, **(tiny_overrides or {}))
        if self.world_size > 1:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, init_method=address, rank=self.rank, world_size=self.world_size)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path, trust_remote_code=trust_remote_code)
        self.trainer = IterativeSFTTrainer(
            load_model(model_path, trust_remote_code=trust_remote_code),
            IterativeSFTConfig(**trainer_args),
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
        """Rank 0: put the current weights in the object store once; returns [ref] (wrapped so it stays a ref)."""
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        return [publish_weights(model, self.version())]

    def evaluate(self) -> dict:
        return self.trainer.evaluate()

    def save(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Rank 0: save a checkpoint (Hugging Face model + training state + `extra`), atomically."""
        save_training_state(self.trainer, path, extra)

    def checksum(self) -> str:
        return weights_checksum(self.trainer.accelerator.unwrap_model(self.trainer.model))

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _token_rows(table: pa.Table) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids) of each row with a non-empty completion."""
    nonempty = table.filter(pc.greater(pc.list_value_length(table["completion_ids"]), 0))
    return list(zip(nonempty["prompt_ids"].to_pylist(), nonempty["completion_ids"].to_pylist()))


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
        checkpoint: str | None = None,
    ):
        bundle = {"CPU": cpus_per_rank, "GPU": gpus_per_rank, "trainer": 1 if custom_resources else 0}
        bundle = {k: v for k, v in bundle.items() if v}
        self.placement_group = placement_group([bundle] * ranks, strategy="PACK")
        self.ranks: list = []
        try:
            self._start(model_path, trainer_args, ranks, cpus_per_rank, gpus_per_rank, custom_resources,
                        tokenizer_path, trust_remote_code, tiny_overrides, checkpoint)
        except BaseException:
            self.shutdown()  # a rank that failed to start leaves no rank or placement group behind
            raise

    def _start(self, model_path, trainer_args, ranks, cpus_per_rank, gpus_per_rank, custom_resources,
               tokenizer_path, trust_remote_code, tiny_overrides, checkpoint) -> None:
        ray.get(self.placement_group.ready())
        self.ranks = [
            TrainerActor.options(
                num_cpus=cpus_per_rank,
                num_gpus=gpus_per_rank,
                resources={"trainer": 1} if custom_resources else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
            ).remote(i, ranks)
            for i in range(ranks)
        ]
        address = ray.get(self.ranks[0].rendezvous_address.remote()) if ranks > 1 else None
        self.restored: dict[str, Any] = ray.get([
            r.setup.remote(model_path, trainer_args, address, tokenizer_path, trust_remote_code, tiny_overrides,
                           checkpoint)
            for r in self.ranks
        ])[0]

    def _all(self, method: str, *args, **kwargs) -> Any:
        """Call `method` on every rank; return rank 0's result."""
        return ray.get([getattr(r, method).remote(*args, **kwargs) for r in self.ranks])[0]

    def step_rollouts_async(self, rollouts: list[ray.ObjectRef]) -> ray.ObjectRef:
        """Start `step_rollouts` on every rank; returns rank 0's result reference (ranks finish together)."""
        return [r.step_rollouts.remote(*rollouts) for r in self.ranks][0]

    def step(self, **kwargs) -> dict:
        """Same arguments as `IterativeSFTTrainer.step`; the batch is sharded across ranks."""
        return self._all("step", **kwargs)

    def step_rollouts(self, rollouts: list[ray.ObjectRef]) -> dict:
        """Train on scored rollout batches, passed by reference to every rank."""
        return ray.get(self.step_rollouts_async(rollouts))

    def publish(self) -> tuple[ray.ObjectRef, int]:
        """Publish rank 0's weights; returns (snapshot ref, version)."""
        ref = ray.get(self.ranks[0].publish.remote())[0]
        return ref, ray.get(self.ranks[0].version.remote())

    def save(self, path: str, extra: dict[str, Any] | None = None) -> None:
        ray.get(self.ranks[0].save.remote(path, extra))

    def evaluate(self) -> dict:
        return self._all("evaluate")

    def checksum(self) -> str:
        return ray.get(self.ranks[0].checksum.remote())

    def shutdown(self) -> None:
        """Stop every rank (dead ones included) and free the placement group."""
        try:
            ray.get([r.shutdown.remote() for r in self.ranks], timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.placement_group)
