"""TrainerActor: one rank of the trainer, the IterativeSFTTrainer on its own GPUs.

N ranks run torch.distributed together (`trainer_group.py` creates and calls them) and the
trainer shards the model with FSDP2 over them. Every rank gets the whole input (a rollout
batch arrives by reference, so on one node that costs nothing), validates it the same way,
and trains on its shard `rank::N`.

The weight version is a counter of its own, not the trainer's `global_step`: it goes up by
one for each step that changed the weights, is saved with every checkpoint, and can be moved
on (never back) by `advance_version`, so that a trainer restored from an older checkpoint, or
rolled back, still publishes versions newer than any a generator holds.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
from contextlib import nullcontext
from typing import Any

import pyarrow as pa
import ray
import torch
import torch.distributed as dist
from transformers import AutoTokenizer, PreTrainedModel

from iterft_ray.actors.heap import map_large_blocks
from iterft_ray.train.batching import examples_from_tensors
from iterft_ray.train.checkpoint import load_training_state, save_checkpoint
from iterft_ray.train.labels import rollout_labels
from iterft_ray.config import LoraConfig, ModelConfig
from iterft_ray.data.rollouts import training_rows
from iterft_ray.engines import engine_dtype
from iterft_ray.storage import StoragePath
from iterft_ray.tiny import model_files
from iterft_ray.train.models import empty_model, load_model
from iterft_ray.train.trainer import IterativeSFTConfig, IterativeSFTTrainer
from iterft_ray.weights.broadcast import (
    WEIGHT_GROUP_TIMEOUT, WeightGroup, WeightLayout, broadcast_delta, broadcast_weights, open_weight_group_store,
    weight_layout,
)
from iterft_ray.weights.snapshot import (
    is_peft_model, publish_adapter, publish_shard, publish_weights, weights_checksum,
)

# The key of the weight version in a checkpoint's saved `extra` state.
VERSION_KEY = "weight_version"


class TrainerRank:
    """One rank of the trainer. Call `setup` before anything else.

    A plain class, made an actor below: the group calls its methods by reference
    (`group.call(TrainerRank.step_rollouts, ...)`), so a rename breaks at the call, not at run time.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.trainer: IterativeSFTTrainer | None = None
        self.weight_version = 0
        self._weight_store: dist.TCPStore | None = None  # rank 0's, once it opens a weight group

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

    def setup(self, model: ModelConfig, trainer_args: dict[str, Any], env: dict[str, str],
              checkpoint: StoragePath | str | None = None) -> dict[str, Any]:
        """Join the process group (if several ranks) and build the trainer, from `checkpoint` if given.

        With `model.lora` the model is the frozen base and a checkpoint holds only the
        adapter, so a restore loads the base from `model` and the adapter from the checkpoint.

        `env` is the distributed environment of this rank; it is set before torch touches
        a device, so CUDA_VISIBLE_DEVICES (all GPUs of this node's ranks, in local-rank
        order) lets the ranks of a node see each other's devices. Returns the `extra`
        state saved with the checkpoint (empty for a fresh start).
        """
        os.environ.update(env)
        # Full weights are published in the engines' dtype, read from the run's model (not a checkpoint, which
        # holds the fp32 masters). An adapter travels as it trains: a few MB, and engines keep adapters in fp32
        # over a bf16 base too (peft's autocast_adapter_dtype; vLLM casts as it loads).
        self.publish_dtype = engine_dtype(model) if model.lora is None else None
        # A checkpoint in a store is downloaded to this node for the loaders, which read files.
        with StoragePath.of(checkpoint).local_copy() if checkpoint is not None else nullcontext() as local:
            checkpoint = None if local is None else str(local)
            model_path, tokenizer_path = model_files(model)
            if checkpoint is not None:
                tokenizer_path = checkpoint
                if model.lora is None:
                    model_path = checkpoint
            if self.world_size > 1:
                if torch.cuda.is_available():
                    torch.cuda.set_device(int(env["LOCAL_RANK"]))
                backend = trainer_args.get("ddp_backend") or ("nccl" if torch.cuda.is_available() else "gloo")
                timeout = datetime.timedelta(seconds=trainer_args.get("ddp_timeout", 1800))
                dist.init_process_group(backend, init_method="env://", timeout=timeout)
            if not ray.get_gpu_ids():  # a rank given no GPU trains on the CPU, where bf16 needs `use_cpu`
                trainer_args = {**trainer_args, "use_cpu": True}
                map_large_blocks()
            self.model_config, self.args = model, IterativeSFTConfig(**trainer_args)
            self._build_trainer(model_path, tokenizer_path, checkpoint)
            if checkpoint is None:
                return {}
            restored = load_training_state(self.trainer, checkpoint)
            # Checkpoints from before the counter: the update count was the version then.
            self.weight_version = restored.pop(VERSION_KEY, self.trainer.state.global_step)
            return restored

    def _build_trainer(self, model_path: str, tokenizer_path: str, adapter_dir: str | None) -> None:
        """A new IterativeSFTTrainer (fresh optimizer and schedule) on the model at `model_path`, with the
        LoRA adapter saved in `adapter_dir` (a new one when None) if the run trains one."""
        model = self.model_config
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=model.trust_remote_code)
        # Ranks after the first start on the meta device and receive their shards from rank 0 (shard_model).
        load = empty_model if self.rank > 0 else load_model
        loaded = load(model_path, trust_remote_code=model.trust_remote_code)
        self.built_on = next(loaded.parameters()).device.type
        self.trainer = IterativeSFTTrainer(_model_to_train(loaded, model.lora, adapter_dir, self.args.seed),
                                           self.args, processing_class=tokenizer)

    def restart_from(self, path: StoragePath | str) -> None:
        """Train on from the weights saved in `path` (recipe.train_from: base) with fresh fp32 masters, optimizer
        and learning-rate schedule, as a new trainer would. The weight version is kept: the next step moves it on,
        so generators never mistake the restarted weights for ones they hold. Collective on several ranks."""
        self.trainer = None  # the old model and optimizer go before the new ones load
        gc.collect()
        with StoragePath.of(path).local_copy() as local:
            model_path = str(local) if self.model_config.lora is None else model_files(self.model_config)[0]
            self._build_trainer(model_path, str(local), str(local))

    def step(self, input_ids=None, attention_mask=None, labels=None, texts=None, texts_labels=None) -> dict:
        """`IterativeSFTTrainer.step` on this rank's shard of the given lists."""
        examples = self.trainer.build_examples(input_ids, attention_mask, labels, texts, texts_labels)
        return self._train(examples[self.rank :: self.world_size])

    def step_rollouts(self, *rollouts: pa.Table, restart_from: StoragePath | str | None = None,
                      epochs: int = 1, train_turns: str = "all", updates: int | None = None) -> dict:
        """Train `epochs` passes (or exactly `updates` updates, passing over the rows as often as that takes) on
        the accepted rows of scored rollout batches: the sampled tokens, prompt masked (and, in trajectories,
        observations; `train_turns: last` keeps only the final turn: `rollout_labels`).

        With `restart_from` (recipe.train_from: base) the trainer first restarts from the weights saved there;
        a round with nothing to train on keeps the weights it has (and its version), restarting nothing.
        """
        accepted = [t.filter(t["accepted"]) for t in rollouts if t.num_rows]
        table = pa.concat_tables(accepted) if accepted else None
        rows = [] if table is None or table.num_rows == 0 else training_rows(table)
        if rows and restart_from is not None:  # every rank sees all rows, so all restart or none
            self.restart_from(restart_from)
        is_encoder_decoder = self.trainer.is_encoder_decoder
        input_ids, labels = [], []
        for row in rows[self.rank :: self.world_size]:
            ids, targets = rollout_labels(*row, train_turns=train_turns, is_encoder_decoder=is_encoder_decoder)
            input_ids.append(torch.tensor(ids))
            labels.append(torch.tensor(targets))
        examples = examples_from_tensors(
            input_ids, None, labels, is_encoder_decoder, self.trainer.max_length, self.trainer.truncation_mode
        )
        return {**self._train(examples, epochs, updates), "train_rows": len(rows)}

    def _train(self, examples: list, epochs: int = 1, updates: int | None = None) -> dict:
        """Train `epochs` passes over this rank's examples (each pass shuffled anew), or passes until `updates`
        updates are done (the last pass cut short); the statistics, of all passes together, carry the weight
        `version` the step made."""
        if updates is None:
            passes = [self.trainer.train_examples(examples) for _ in range(epochs)]
        else:
            passes, left = [], updates
            while left > 0:
                passes.append(self.trainer.train_examples(examples, max_updates=left))
                if not passes[-1]["updates"]:
                    break  # nothing to train on: no pass would make an update
                left -= passes[-1]["updates"]
        stats = merge_step_stats(passes)
        if stats["updates"]:
            self.weight_version += 1
        stats["version"] = self.weight_version
        return stats

    def eos_token(self) -> str | None:
        return self.trainer.tokenizer.eos_token

    def version(self) -> int:
        """The weight version: steps that changed the weights, and moves on by `advance_version`."""
        return self.weight_version

    def advance_version(self, at_least: int) -> int:
        """Move the weight version on to `at_least` if it is behind (never back); returns the version."""
        self.weight_version = max(self.weight_version, at_least)
        return self.weight_version

    def publish(self) -> list[ray.ObjectRef]:
        """Put this rank's weights in the object store once: all of them on one rank, its shard on several,
        the adapter only when a LoRA adapter trains.

        Returns [ref] (wrapped so it stays a reference).
        """
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if is_peft_model(model):  # gathered whole from the shards; rank 0 puts it
            return [publish_adapter(model, self.version(), put=self.rank == 0)]
        if self.trainer.sharded:
            return [publish_shard(self.trainer.model, self.version(), self.publish_dtype)]
        return [publish_weights(model, self.version(), self.publish_dtype)]

    def open_weight_group(self, size: int) -> tuple[tuple[str, int], WeightLayout]:
        """Rank 0: serve the store where a `WeightGroup` of `size` members (this rank and the generators)
        meets; returns its address and the layout every version it broadcasts will have."""
        self._weight_store, address = open_weight_group_store(size, WEIGHT_GROUP_TIMEOUT)
        self.weight_layout = weight_layout(self._published_model(), dtype=self.publish_dtype)
        return address, self.weight_layout

    def join_weight_group(self, address: tuple[str, int], size: int, backend: str) -> None:
        """Rank 0: join the `WeightGroup` as its rank 0, while the generators join it."""
        self.weight_group = WeightGroup(address, 0, size, backend, WEIGHT_GROUP_TIMEOUT, store=self._weight_store)

    def broadcast_weights(self, delta: list[ray.ObjectRef] | None = None) -> int:
        """Rank 0: broadcast the current weights to the `WeightGroup` (the generators call `receive_weights`
        at the same time), whole or, given `[ref]` of a `WeightDelta`, as that delta (read zero-copy: it was
        made on this node); returns the bytes sent."""
        if delta is not None:
            return broadcast_delta(self.weight_group, ray.get(delta[0]), self.weight_layout)
        broadcast_weights(self.weight_group, self._published_model(), self.weight_layout)
        return sum(self.weight_layout.bucket_sizes)

    def _published_model(self) -> torch.nn.Module:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def evaluate(self) -> dict:
        return self.trainer.evaluate()

    def save(self, path: StoragePath | str, extra: dict[str, Any] | None = None) -> None:
        """Save a checkpoint (Hugging Face model + training state + `extra`) to a local path or a store,
        atomically; collective, rank 0 writes (a store gets it uploaded from this node)."""
        save_checkpoint(self.trainer, path, {**(extra or {}), VERSION_KEY: self.weight_version})

    def checksum(self) -> str:
        """One rank only: `weights_checksum` of its model as it publishes it (cast to the engines' dtype; the
        group checksums sharded weights itself)."""
        return weights_checksum(self.trainer.accelerator.unwrap_model(self.trainer.model), self.publish_dtype)

    def peak_memory(self) -> dict[str, float]:
        """Peak resident memory of this rank's process (and of its GPU), in MB."""
        import resource

        out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch.cuda.is_available():
            out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out

    def release(self) -> bool:
        """Be as new, for the next group asking for a rank of this spec (`keep_actors_warm`): no trainer, version
        0. Only a rank of one, never in a weight group: a process group of several ranks is not formed twice."""
        if self.world_size > 1 or self._weight_store is not None:
            return False
        type(self).__init__(self, self.rank, self.world_size)
        gc.collect()  # the model and optimizer go now, not when the next setup replaces them
        return True

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def merge_step_stats(parts: list[dict]) -> dict:
    """The statistics of several `train_examples` calls as one call's: counts and times add up, the loss is
    per target token over all of them, the learning rate and global step are the last call's."""
    if len(parts) == 1:
        return parts[0]
    total = {key: sum(p[key] for p in parts) for key in
             ("num_sequences", "num_tokens", "num_target_tokens", "updates", "step_time")}
    targets, tokens, updates = total["num_target_tokens"], total["num_tokens"], total["updates"]
    loss = sum(p["loss"] * p["num_target_tokens"] for p in parts if p["num_target_tokens"])
    norm = sum(p["grad_norm"] * p["updates"] for p in parts if p["updates"])
    padded = sum(p["pad_fraction"] * p["num_tokens"] for p in parts)
    return {**parts[-1], **total,
            "loss": loss / targets if targets else float("nan"),
            "grad_norm": norm / updates if updates else float("nan"),
            "pad_fraction": padded / tokens if tokens else 0.0,
            "tokens_per_second": tokens / total["step_time"] if total["step_time"] > 0 else 0.0}


def _model_to_train(model: PreTrainedModel, lora: LoraConfig | None, checkpoint: str | None, seed: int):
    """`model`, or with `lora` a PeftModel over it: a new adapter, or the one saved in `checkpoint`.

    A new adapter is initialised from `seed` (`trainer.seed`): FSDP2 shards what each rank
    holds and broadcasts nothing, so every rank must draw the same initial weights.

    A module-level function, not inlined in `setup`: Ray pickles actor methods by value,
    and `model.config` there would make cloudpickle try to ship `torch.distributed.config`.
    """
    if lora is None:
        return model
    from peft import PeftModel, get_peft_model

    if checkpoint is not None:
        return PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    torch.manual_seed(seed)
    return get_peft_model(model, lora.peft_config(bool(getattr(model.config, "is_encoder_decoder", False))))


TrainerActor = ray.remote(TrainerRank)
