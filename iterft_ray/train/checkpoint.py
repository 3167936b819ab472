"""Training state on disk as safetensors and JSON: nothing here unpickles a file.

A checkpoint directory is a Hugging Face model directory (config, safetensors weights,
tokenizer: `from_pretrained` loads it) plus what a resumed run needs to continue bit for
bit: `optimizer/`, each rank's shard of the optimizer moments as safetensors (written by
torch.distributed.checkpoint's Hugging Face storage, whose shard offsets live in each
file's header, so any number of ranks reads its own slices back), and
`training_state.safetensors` + `training_state.json` (RNG states, scheduler position,
update counter, parameter groups, `extra`).

No rank holds the whole model or optimizer to save them: sharded weights are gathered
one parameter at a time into rank 0's file, and each rank writes its own optimizer shard.
`save_training_state` writes into a temp directory and renames it, so a crash while saving
leaves the previous checkpoint as it was; `save_checkpoint` does the same into a run's
storage, which may be an object store (see `storage.py`).
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

from iterft_ray.storage import StoragePath
from iterft_ray.train.sharding import rank, world_size
from iterft_ray.weights.snapshot import full_adapter_state, is_peft_model

TENSORS, META, OPTIMIZER = "training_state.safetensors", "training_state.json", "optimizer"
WEIGHTS = "model.safetensors"
OPTIMIZER_PART_BYTES = 256 * 2**20  # the most optimizer state a save holds serialized at once, over all ranks
# safetensors' names of the dtypes a model's parameters and buffers come in.
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def save_training_state(trainer, path: str | Path, extra: dict[str, Any] | None = None) -> Path | None:
    """Write model, tokenizer, optimizer, scheduler, RNG and `extra` (JSON) to `path`, atomically.

    A LoRA trainer (a PeftModel) writes its adapter in PEFT format instead of the model,
    loadable with `PeftModel.from_pretrained(base, path)`; sharded, the adapter is gathered whole.

    With sharded ranks every rank calls it, with the same `path`: a directory all of them
    see (one node, or a shared filesystem). The files load with `from_pretrained` and resume
    with any number of ranks. Returns the path on rank 0, else None.
    """
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    _write_checkpoint(trainer, tmp, extra)
    if rank() != 0:
        return None
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _write_checkpoint(trainer, directory: Path, extra: dict[str, Any] | None) -> None:
    """Every rank writes its part into `directory` (its own, or one all share): rank 0 all of it but the
    other ranks' optimizer shards. Collective when sharded."""
    _write_model(trainer, directory)
    optimizer = get_optimizer_state_dict(trainer.model, _torch_optimizer(trainer))
    tensors, optimizer_meta = _split_optimizer_state(optimizer)
    optimizer_meta["parts"] = _parts(tensors)
    # Each rank writes its shard of the moments (plain tensors on one rank); the offsets go in the header.
    # DCP's writer serializes a file in memory, so it gets one part at a time, not the whole state.
    with _one_process_quiet():
        for number, keys in enumerate(optimizer_meta["parts"]):
            dcp.save({k: tensors[k] for k in keys},
                     storage_writer=HuggingFaceStorageWriter(str(directory / OPTIMIZER / f"part-{number:04d}"),
                                                             save_distributed=world_size() > 1))
    if rank() == 0:
        trainer.tokenizer.save_pretrained(directory)
        _write_state(trainer, directory, optimizer_meta, extra)


def _write_model(trainer, directory: Path) -> None:
    """The model (or LoRA adapter) as Hugging Face files; collective when sharded, rank 0 writes."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model):  # the base never changes: the adapter alone, gathered whole (small)
        state = full_adapter_state(model)
        if rank() == 0:
            model.save_pretrained(directory, state_dict={k: v.detach().cpu() for k, v in state.items()},
                                  safe_serialization=True)
    elif trainer.sharded:
        _stream_sharded_model(model, directory)
    else:
        model.save_pretrained(directory, safe_serialization=True)


def _stream_sharded_model(model: torch.nn.Module, directory: Path) -> None:
    """Write an FSDP2-sharded model's weights into rank 0's `model.safetensors`, one parameter at a time.

    Every rank takes part in each parameter's all-gather; rank 0 writes it and drops it before the
    next, so it never holds the whole model. Tied parameters are stored once, under the first name,
    as `save_pretrained` does. The config names the model's own class (FSDP2's subclass,
    FSDPLlamaForCausalLM, is no architecture a loader knows) and the dtype stored.
    """
    state = _untied(model, get_model_state_dict(model))
    writing = rank() == 0
    with open(directory / WEIGHTS, "wb") if writing else nullcontext() as out, torch.no_grad():
        if writing:
            out.write(_safetensors_header(state))
        for tensor in state.values():
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            if writing:
                out.write(full.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
            del full
    if not writing:
        return
    config = copy.deepcopy(model.config)
    config.architectures = [_unsharded_class(model).__name__]
    config.dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


def _untied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the second name of each tied parameter (an LM head tied to the embeddings)."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)
    return state


def _safetensors_header(state: dict[str, torch.Tensor]) -> bytes:
    """The safetensors header for `state`'s tensors, stored in order after it.

    safetensors' own writer takes every tensor at once; the header needs only shapes and dtypes.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in state.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format keeps the data 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded


def _parts(tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """`tensors`' keys in runs of about OPTIMIZER_PART_BYTES (whole tensors, counted at their full size:
    every rank, whatever it holds of each, draws the same parts)."""
    parts: list[list[str]] = []
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if not parts or size + nbytes > OPTIMIZER_PART_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(key)
        size += nbytes
    return parts


def _split_optimizer_state(optimizer: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict keyed by parameter name as (its tensors, flat; the rest, JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": optimizer["param_groups"], "state": {}}
    for name, state in optimizer["state"].items():
        meta["state"][name] = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value
            else:
                meta["state"][name][key] = value
    return tensors, meta


def _write_state(trainer, directory: Path, optimizer_meta: dict[str, Any], extra: dict[str, Any] | None) -> None:
    """Rank 0: RNG states, scheduler, update counter, the optimizer's non-tensor state and `extra`."""
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
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
    save_file(tensors, str(directory / TENSORS))
    (directory / META).write_text(json.dumps(meta), encoding="utf-8")


def load_training_state(trainer, path: str | Path) -> dict[str, Any]:
    """Restore optimizer, scheduler, update counter and RNG from `path` (the model, or adapter, was loaded from it).

    With sharded ranks every rank calls it and reads only its own slices of the optimizer
    state, whatever number of ranks wrote it. Returns the `extra` dict saved with it.
    """
    path = Path(path)
    if not (path / OPTIMIZER).is_dir():
        raise ValueError(f"{path}: no {OPTIMIZER}/ directory (a checkpoint written before sharded optimizer "
                         "state); its model files still load with from_pretrained")
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    tensors = load_file(str(path / TENSORS))
    model, optimizer = trainer.model, _torch_optimizer(trainer)
    # The live state (made if need be) gives each tensor its shape and shard, dcp.load fills it in place.
    live, _ = _split_optimizer_state(get_optimizer_state_dict(model, optimizer))
    with _one_process_quiet():
        for number, keys in enumerate(meta["optimizer"]["parts"]):
            dcp.load({k: live[k] for k in keys},
                     storage_reader=HuggingFaceStorageReader(str(path / OPTIMIZER / f"part-{number:04d}")))
    state: dict[str, dict[str, Any]] = {name: dict(values) for name, values in meta["optimizer"]["state"].items()}
    for key, value in live.items():
        name, field = key.rsplit(".", 1)
        state.setdefault(name, {})[field] = value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["optimizer"]["param_groups"]})
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


@contextmanager
def _one_process_quiet() -> Iterator[None]:
    """DCP warns on every save and load without a process group that it assumes one process: on one
    rank that is the intent, and the warning would reach a run's console."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def save_checkpoint(trainer, location: StoragePath | str | Path, extra: dict[str, Any] | None = None) -> None:
    """`save_training_state` to a local path or a store; every rank of a sharded trainer calls it.

    For a store each rank writes into a temp directory on its own node and uploads its own
    files (rank 0: all but the optimizer shards of the others), training_state.json last,
    once every rank's are in: the mark `is_checkpoint` looks for. A crash while uploading
    leaves no checkpoint rather than a broken one, and nothing assumes that this node's
    disk is the one the driver reads.
    """
    target = StoragePath.of(location)
    if target.is_local:
        save_training_state(trainer, target, extra)
        return
    with tempfile.TemporaryDirectory(prefix="iterft-checkpoint-") as tmp:
        written = Path(tmp) / target.name
        written.mkdir()
        _write_checkpoint(trainer, written, extra)
        if rank() == 0:
            target.delete()
        _barrier()
        for file in sorted(p for p in written.rglob("*") if p.is_file() and p.name != META):
            StoragePath.of(file).copy_to(target / file.relative_to(written).as_posix())
        _barrier()
        if rank() == 0:
            StoragePath.of(written / META).copy_to(target / META)


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
