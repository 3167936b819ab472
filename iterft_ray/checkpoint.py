"""Training state on disk as safetensors and JSON: nothing here unpickles a file.

A checkpoint directory holds the model and tokenizer (`save_pretrained`), and
`training_state.safetensors` + `training_state.json` with what a resumed run needs to
continue bit for bit: optimizer moments, scheduler position, update counter and the
RNG states. `save_training_state` writes into a temp directory and renames it, so a
crash while saving leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TENSORS, META = "training_state.safetensors", "training_state.json"


def save_training_state(trainer, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write model, tokenizer, optimizer, scheduler, RNG and `extra` (JSON) to `path`, atomically."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.save_pretrained(tmp, safe_serialization=True)
    trainer.tokenizer.save_pretrained(tmp)

    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    optimizer = trainer.optimizer.state_dict()
    optimizer_meta: dict[str, Any] = {"param_groups": optimizer["param_groups"], "state": {}}
    for index, state in optimizer["state"].items():
        optimizer_meta["state"][str(index)] = {}
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                optimizer_meta["state"][str(index)][name] = value
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
    """Restore optimizer, scheduler, update counter and RNG from `path` (the model was loaded from it).

    Returns the `extra` dict saved with it.
    """
    path = Path(path)
    tensors = load_file(str(path / TENSORS))
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    state: dict[int, dict[str, Any]] = {int(i): dict(values) for i, values in meta["optimizer"]["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    trainer.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
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


def is_checkpoint(path: Path) -> bool:
    return (path / META).is_file() and (path / TENSORS).is_file()


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value
