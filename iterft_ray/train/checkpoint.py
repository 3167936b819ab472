"""Training state on disk as safetensors and JSON: nothing here unpickles a file.

A checkpoint directory holds the model and tokenizer (`save_pretrained`), and
`training_state.safetensors` + `training_state.json` with what a resumed run needs to
continue bit for bit: optimizer moments, scheduler position, update counter and the
RNG states. `save_training_state` writes into a temp directory and renames it, so a
crash while saving leaves the previous checkpoint as it was; `save_checkpoint` does the
same into a run's storage, which may be an object store (see `storage.py`).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from iterft_ray.storage import StoragePath
from iterft_ray.weights.snapshot import full_adapter_state

TENSORS, META = "training_state.safetensors", "training_state.json"


def save_training_state(trainer, path: str | Path, extra: dict[str, Any] | None = None) -> Path | None:
    """Write model, tokenizer, optimizer, scheduler, RNG and `extra` (JSON) to `path`, atomically.

    A LoRA trainer (a PeftModel) writes its adapter in PEFT format instead of the model,
    loadable with `PeftModel.from_pretrained(base, path)`; sharded, the adapter is gathered whole.

    With sharded ranks every rank calls it: the full model and optimizer state are
    gathered (to rank 0's CPU, one tensor at a time) and rank 0 writes; the files are the
    same as one rank's, so a checkpoint loads with `from_pretrained` and resumes with any
    number of ranks. Returns the path on the rank that wrote it, else None.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=trainer.sharded)
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter = isinstance(model, PeftModel)
    # A LoRA adapter is gathered alone (small); the frozen base never changes and is not saved.
    model_state = full_adapter_state(model) if adapter else get_model_state_dict(trainer.model, options=options)
    optimizer = get_optimizer_state_dict(trainer.model, _torch_optimizer(trainer), options=options)
    if trainer.sharded and dist.get_rank() != 0:
        return None
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter:  # the base never changes: the adapter alone, as adapter_config.json + adapter_model.safetensors
        model.save_pretrained(tmp, state_dict={k: v.detach().cpu() for k, v in model_state.items()},
                              safe_serialization=True)
    else:
        # A gathered state dict holds tied parameters (embeddings and LM head) twice; keep
        # the first name, as save_pretrained does for a live model.
        first: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(param), name) != name:
                model_state.pop(name, None)
        model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
    if trainer.sharded and not adapter:  # the class FSDP2 made (FSDPLlamaForCausalLM) is no architecture a loader knows
        model.config.architectures = [_unsharded_class(model).__name__]
        model.config.save_pretrained(tmp)
    trainer.tokenizer.save_pretrained(tmp)

    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    # Optimizer state keyed by parameter name (not position), as torch's distributed
    # checkpoint helpers give it: the same for one rank and for N.
    optimizer_meta: dict[str, Any] = {"param_groups": optimizer["param_groups"], "state": {}}
    for name, state in optimizer["state"].items():
        optimizer_meta["state"][name] = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{name}.{key}"] = value.detach().cpu().contiguous()
            else:
                optimizer_meta["state"][name][key] = value
    numpy_state = np.random.get_state()
    meta = {
        "global_step": trainer.state.global_step,
        "optimizer": optimizer_meta,
        "scheduler": trainer.lr_scheduler.state_dict(),
        "rng": {
            "python": _listify(random.getstate()),
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        },
        "extra": extra or {},
    }
    save_file(tensors, str(tmp / TENSORS))
    (tmp / META).write_text(json.dumps(meta), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def load_training_state(trainer, path: str | Path) -> dict[str, Any]:
    """Restore optimizer, scheduler, update counter and RNG from `path` (the model, or adapter, was loaded from it).

    With sharded ranks every rank calls it and keeps its shard of the optimizer state.
    Returns the `extra` dict saved with it.
    """
    path = Path(path)
    tensors = load_file(str(path / TENSORS))
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    state: dict[str, dict[str, Any]] = {name: dict(values) for name, values in meta["optimizer"]["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            name, field = key.removeprefix("optimizer.").rsplit(".", 1)
            state.setdefault(name, {})[field] = value
    set_optimizer_state_dict(
        trainer.model, _torch_optimizer(trainer), {"state": state, "param_groups": meta["optimizer"]["param_groups"]},
        options=StateDictOptions(full_state_dict=True),
    )
    trainer.lr_scheduler.load_state_dict(meta["scheduler"])
    trainer.state.global_step = meta["global_step"]
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_tuplify(meta["rng"]["python"]))
    name, keys, *rest = meta["rng"]["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    return meta["extra"]


def _torch_optimizer(trainer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def _unsharded_class(model: torch.nn.Module) -> type:
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def save_checkpoint(trainer, location: StoragePath | str | Path, extra: dict[str, Any] | None = None) -> None:
    """`save_training_state` to a local path or a store; every rank of a sharded trainer calls it.

    For a store the checkpoint is written to a temp directory on this node and uploaded
    with training_state.json last, the mark `is_checkpoint` looks for: a crash while
    uploading leaves no checkpoint rather than a broken one, and nothing assumes that
    this node's disk is the one the driver reads.
    """
    target = StoragePath.of(location)
    if target.is_local:
        save_training_state(trainer, target, extra)
        return
    with tempfile.TemporaryDirectory(prefix="iterft-checkpoint-") as tmp:
        written = save_training_state(trainer, Path(tmp) / target.name, extra)
        if written is not None:
            target.upload_directory(written, last=META)


def copy_model_files(checkpoint: StoragePath | Path, target: StoragePath | Path) -> None:
    """Copy a checkpoint's Hugging Face files (model or adapter, tokenizer, configs) to `target`, leaving the
    training state out: a directory `from_pretrained` loads. What was in `target` before is replaced."""
    checkpoint, target = StoragePath.of(checkpoint), StoragePath.of(target)
    target.delete()
    target.mkdir()
    for path in checkpoint.iterdir():
        if path.name not in (TENSORS, META) and path.is_file():
            path.copy_to(target / path.name)


def is_checkpoint(path: StoragePath | Path) -> bool:
    """A complete checkpoint: the training state is there (written last, locally by rename, in a store last)."""
    path = StoragePath.of(path)
    return (path / META).is_file() and (path / TENSORS).is_file()



def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value
