"""Versioned weight snapshots through the Ray object store.

The trainer publishes each weight version with one `ray.put`; every generator on the
same node reads it without a copy, and on CPU samples from it where it lies:

    ref = publish_weights(model, version)                      # trainer: the one copy, into the store
    load_snapshot(generator_model, ray.get(ref), share=True)   # CPU generator: no copy (GPU: one, to the device)

Weights travel as numpy arrays, not torch tensors. Ray pickles numpy arrays with
out-of-band buffers (pickle protocol 5), so `ray.get` returns read-only arrays that
point into shared memory; a pickled torch tensor is copied on both put and get
(measured here: a 1 GB tensor takes 5-7 s to put and ~3 s to get, the same bytes as
numpy ~1.2 s and ~0 s). `RAY_ENABLE_ZERO_COPY_TORCH_TENSORS` is not needed.

Ray is imported only where a snapshot is put: loading one and checksumming a model need no
Ray, so the hf engine runs where Ray is not installed (jobs/gpu_check.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor, Shard

if TYPE_CHECKING:
    import ray

# torch dtypes numpy can hold as themselves; any other (bfloat16, float8 ...) is stored
# as the unsigned integer of the same width and reinterpreted on load.
_NUMPY_NATIVE = {
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64,
    torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128,
}
_UINT_OF_WIDTH = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


@dataclass
class WeightSnapshot:
    """One version of a model's weights as numpy arrays, keyed by state_dict name.

    `dtypes` holds the torch dtype name of every array ("bfloat16", "float32", ...);
    dtypes numpy lacks are stored as same-width unsigned integer views. Tensors that
    share storage with an earlier state_dict entry (tied embeddings) are stored once:
    `aliases` maps the skipped name to the stored one.

    The arrays are separate, not one flat buffer with offsets: the get is zero-copy
    either way and the put is one memcpy per array into shared memory, but a flat
    buffer needs one more full copy to gather the parameters into it, while separate
    arrays are put straight from the live parameters (see `publish_weights`).
    Measured for a 134M-parameter fp32 Llama (0.54 GB, 2 CPU cores): publish 0.15 s
    with separate arrays, 0.5-0.8 s gathering into a flat buffer first; get 1 ms both.
    """

    version: int
    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)
    # A LoRA adapter's snapshot (`publish_adapter`) holds only the adapter's weights, and
    # here its peft config, so a replica of the base model can add the same adapter.
    adapter_config: Any = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def __reduce__(self):
        """Pickled as pieces of at most `_PIECE_BYTES` per array, joined again without a copy when unpickled
        from the object store (see `_pieces`)."""
        pieces = {name: (array.dtype, array.shape, _pieces(array)) for name, array in self.arrays.items()}
        return _joined_snapshot, (self.version, pieces, self.dtypes, self.aliases, self.adapter_config)


# Ray copies each pickled buffer into the object store with one `memcpy` if it holds at most
# 1 MiB, and with 6 threads started for that buffer alone if it is larger
# (`Pickle5Writer.write_to`). For a snapshot's ~150 arrays that is ~900 thread starts per
# version. Measured on 2 shared cores for a 134M-parameter fp32 model (0.54 GB), in CPU seconds
# (wall time there followed the load): a put of the arrays whole 0.092-0.103, of 1 MiB pieces
# 0.063-0.093, one `copy_` into preallocated memory 0.061-0.069. Ray lays the pieces of a
# buffer one after another (each a multiple of its 64-byte alignment), so a reader joins them
# again with no copy; where they do not lie so, `_joined` copies, and the tests catch it.
_PIECE_BYTES = 1 << 20


def _pieces(array: np.ndarray) -> list[np.ndarray]:
    """Consecutive byte views of at most `_PIECE_BYTES` covering `array` (no copy)."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return [flat[i : i + _PIECE_BYTES] for i in range(0, flat.nbytes, _PIECE_BYTES)]


def _joined(dtype: np.dtype, shape: tuple[int, ...], pieces: list[np.ndarray]) -> np.ndarray:
    """The array `_pieces` cut: a view spanning the pieces where they lie back to back in one object-store
    object (what `ray.get` returns), else a copy (pieces from an ordinary unpickle lie anywhere)."""
    if not pieces:
        return np.empty(shape, dtype)
    if len(pieces) == 1:
        flat = pieces[0]
    elif _in_object_store(pieces[0]) and _back_to_back(pieces):
        # One object's memory; the first piece keeps all of it mapped (Ray's buffer of a piece holds the object).
        flat = np.lib.stride_tricks.as_strided(pieces[0], shape=(sum(p.nbytes for p in pieces),), strides=(1,),
                                               writeable=False)
    else:
        flat = np.concatenate(pieces)
    return flat.view(dtype).reshape(shape)


def _back_to_back(pieces: list[np.ndarray]) -> bool:
    """Whether each piece starts where the one before it ends (pieces of one unpickle: one object's buffers)."""
    start = pieces[0].__array_interface__["data"][0]
    return all(p.__array_interface__["data"][0] == start + i * _PIECE_BYTES for i, p in enumerate(pieces))


def _in_object_store(array: np.ndarray) -> bool:
    """Whether `array` is a view of a Ray object-store buffer (through views and `as_strided`'s holders)."""
    if "ray" not in sys.modules:  # no Ray in this process: no object store either
        return False
    from iterft_ray.ray_internals import is_object_store_buffer

    base = array
    while getattr(base, "base", None) is not None:
        base = base.base
    return is_object_store_buffer(base)


def _joined_snapshot(version: int, pieces: dict, dtypes: dict[str, str], aliases: dict[str, str],
                     adapter_config: Any) -> WeightSnapshot:
    arrays = {name: _joined(dtype, shape, parts) for name, (dtype, shape, parts) in pieces.items()}
    return WeightSnapshot(version=version, arrays=arrays, dtypes=dtypes, aliases=aliases, adapter_config=adapter_config)


def _to_array(t: torch.Tensor) -> np.ndarray:
    """A numpy view of CPU tensor `t` (no copy), reinterpreting dtypes numpy lacks."""
    if t.dtype not in _NUMPY_NATIVE:
        t = t.view(_UINT_OF_WIDTH[t.element_size()])
    return t.numpy()


def _from_array(array: np.ndarray | torch.Tensor, dtype_name: str) -> torch.Tensor:
    """A CPU tensor over `array` (no copy), with the dtype the snapshot recorded (a tensor, from an NCCL
    broadcast, as it is). Call it inside `_reading_shared_arrays()`."""
    if isinstance(array, torch.Tensor):
        return array
    t = torch.from_numpy(array)
    dtype = getattr(torch, dtype_name)
    return t if t.dtype == dtype else t.view(dtype)


@contextlib.contextmanager
def _reading_shared_arrays():
    """Silences torch's warning for tensors over read-only arrays (from `ray.get`: shared memory, never
    written through them), once for a whole load rather than per tensor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        yield


def _stored_entries(state: dict[str, torch.Tensor], local: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The entries of `state` a version stores, detached, and the aliases of the rest: a tensor that shares
    storage with an earlier entry (tied embeddings) is stored once. `local`: a sharded (DTensor) entry's
    local shard."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        t = t.detach()
        if local and isinstance(t, DTensor):
            t = t.to_local()
        if t.numel():
            key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        stored[name] = t
    return stored, aliases


def _snapshot(model: torch.nn.Module, version: int, copy: bool, local: bool = False,
              state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> WeightSnapshot:
    """`local`: take a sharded (DTensor) entry's local shard, as `publish_shard` does. `state`: these
    entries only (default: the model's whole state_dict). `dtype`: floating-point entries cast to it."""
    stored, aliases = _stored_entries(model.state_dict() if state is None else state, local)
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for name, t in stored.items():
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(device="cpu", dtype=dtype).contiguous()  # the cast is the copy (off the device too)
        elif t.device.type != "cpu":
            t = t.to("cpu").contiguous()  # the device-to-host copy is the one copy
        elif copy or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        arrays[name] = _to_array(t)
        dtypes[name] = str(t.dtype).removeprefix("torch.")
    return WeightSnapshot(version=version, arrays=arrays, dtypes=dtypes, aliases=aliases)


def owned_copy(snapshot: WeightSnapshot) -> WeightSnapshot:
    """`snapshot` copied into this process's own, writable memory (a snapshot from `ray.get` is read-only and
    shared by the node's readers), for a replica that applies later versions' deltas in place
    (`iterft_ray.weights.delta`)."""
    arrays = {name: np.array(array) for name, array in snapshot.arrays.items()}
    return WeightSnapshot(snapshot.version, arrays, dict(snapshot.dtypes), dict(snapshot.aliases),
                          snapshot.adapter_config)


def is_writable(snapshot: WeightSnapshot) -> bool:
    """Whether every array of `snapshot` may be written in place: this process's own memory (a broadcast's
    buckets, `owned_copy`), not the object store's."""
    return all(isinstance(a, torch.Tensor) or a.flags.writeable for a in snapshot.arrays.values())


def snapshot_from_model(model: torch.nn.Module, version: int, dtype: torch.dtype | None = None) -> WeightSnapshot:
    """A CPU copy of `model`'s state_dict as a `WeightSnapshot` (floating-point entries in `dtype` if given).

    It is a real copy: training the model afterwards does not change the snapshot.
    """
    return _snapshot(model, version, copy=True, dtype=dtype)


def publish_weights(model: torch.nn.Module, version: int, dtype: torch.dtype | None = None) -> ray.ObjectRef:
    """Put weight version `version` of `model` into the object store, once.

    The put itself is the copy: CPU parameters are handed to `ray.put` as numpy views
    and Ray copies their bytes into shared memory before returning, so later training
    cannot change the published version and no intermediate copy is made.

    `dtype`: the engines' (`iterft_ray.engines.engine_dtype`): floating-point weights are cast to it, so fp32
    masters of a bf16 model are stored as the bf16 an engine holds, half the bytes. The cast is then the copy
    the put copies: one tensor per entry in `dtype`, alive until the put returns (the put API takes whole
    objects, so the cast cannot write into the object store's memory itself).
    """
    return _put(_snapshot(model, version, copy=False, dtype=dtype))


def _put(obj: Any) -> ray.ObjectRef:
    import ray

    return ray.put(obj)


def is_peft_model(model: Any) -> bool:
    """Whether `model` is a peft `PeftModel`, without importing peft: none exists before peft is imported, and a
    generator that serves no adapter then never imports it (with transformers' `Trainer`, 0.7 s of CPU)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of a PEFT model (its adapter's weights), by state_dict name.

    The names keep peft's adapter name (`...q_proj.lora_A.default.weight`), so they are
    the same in any replica that added the same adapter.
    """
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def full_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`adapter_parameters`, each whole: of an FSDP2-sharded model all-gathered from the ranks' shards.

    Collective when sharded (every rank calls it, in the same order); the adapter is small,
    so gathering all of it on every rank costs little and no rank holds the base twice.
    """
    with torch.no_grad():
        return {name: p.full_tensor() if isinstance(p, DTensor) else p
                for name, p in adapter_parameters(model).items()}


def publish_adapter(model: torch.nn.Module, version: int, put: bool = True) -> ray.ObjectRef | None:
    """Put version `version` of a PEFT model's adapter (its weights and config) into the object store.

    Only the adapter moves: the base weights never change, and a generator holds them already.
    A sharded model's adapter is gathered from the ranks' shards first (every rank calls this;
    the ranks with `put=False` take part in the gather only and return None).
    """
    state = full_adapter_state(model)
    if not put:
        return None
    snapshot = _snapshot(model, version, copy=False, state=state)
    snapshot.adapter_config = model.peft_config[model.active_adapter]
    return _put(snapshot)


@dataclass
class WeightShard:
    """One rank's part of a weight version: its rows of each sharded tensor, and the unsharded rest.

    `sharded` names the entries cut along dim 0 (FSDP2's `Shard(0)`); concatenating the
    ranks' parts of them in rank order gives the full tensor.
    """

    snapshot: WeightSnapshot
    sharded: list[str]


def publish_shard(model: torch.nn.Module, version: int, dtype: torch.dtype | None = None) -> ray.ObjectRef:
    """Put this rank's shard of an FSDP2-sharded `model` into the object store (a `WeightShard`).

    Like `publish_weights` (`dtype` included), the put is the only copy, and a rank never holds the full weights.
    """
    sharded = []
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor):
            if tuple(t.placements) != (Shard(0),):
                raise ValueError(f"{name}: expected a tensor sharded along dim 0, got {t.placements}")
            sharded.append(name)
    return _put(WeightShard(_snapshot(model, version, copy=False, local=True, dtype=dtype), sharded))


def assemble_snapshot(shards: list[WeightShard]) -> WeightSnapshot:
    """The full `WeightSnapshot` of a version from every rank's `WeightShard`, in rank order."""
    first = shards[0].snapshot
    sharded = set(shards[0].sharded)
    arrays = {
        name: np.concatenate([s.snapshot.arrays[name] for s in shards], axis=0) if name in sharded else array
        for name, array in first.arrays.items()
    }
    return WeightSnapshot(version=first.version, arrays=arrays, dtypes=dict(first.dtypes), aliases=dict(first.aliases))


def load_snapshot(model: torch.nn.Module, snapshot: WeightSnapshot, share: bool = False) -> None:
    """Copy `snapshot` into `model`'s parameters and buffers in place.

    The model may be on any device; each tensor is copied once, straight from the
    (possibly shared, read-only) array into the parameter, casting if the model's
    dtype differs. Tied parameters are filled through whichever name was stored.
    Every state_dict entry of the model must be in the snapshot, with the same shape; of a
    PEFT model that added the snapshot's adapter, every adapter parameter.

    `share=True` copies nothing where it need not: a CPU tensor of the snapshot's dtype is
    pointed at the snapshot's array itself (`torch.from_numpy`, no copy), so a replica
    reading a snapshot from the object store holds the one shared copy instead of its own.
    The model then holds the snapshot's memory until the next load replaces it, and must
    never write its weights: a snapshot from `ray.get` is shared with every reader on the
    node (a replica only samples, so nothing writes them). A tensor on another device or
    of another dtype is still copied into the existing one; a model's dtype and device do
    not change between versions, so a tensor that shares never becomes one that is copied into.
    """
    if snapshot.adapter_config is None:
        # keep_vars: the Parameter objects themselves, so `share` can re-point them.
        state = model.state_dict(keep_vars=True)
    else:
        state = adapter_parameters(model)
    missing = [n for n in state if n not in snapshot.arrays and n not in snapshot.aliases]
    unexpected = [n for n in (*snapshot.arrays, *snapshot.aliases) if n not in state]
    if missing or unexpected:
        raise KeyError(f"snapshot v{snapshot.version} does not match the model: "
                       f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, dst in state.items():
        array = snapshot.arrays[snapshot.aliases.get(name, name)]
        if tuple(array.shape) != tuple(dst.shape):
            raise ValueError(f"{name}: snapshot shape {tuple(array.shape)}, "
                             f"model shape {tuple(dst.shape)}")
    done: set[int] = set()
    with torch.no_grad(), _reading_shared_arrays():
        for name, dst in state.items():
            if id(dst) in done:  # tied in this model too (the same Parameter): already filled
                continue
            done.add(id(dst))
            src_name = snapshot.aliases.get(name, name)
            src = _from_array(snapshot.arrays[src_name], snapshot.dtypes[src_name])
            if share and dst.device.type == "cpu" and dst.dtype == src.dtype:
                dst.data = src
            else:
                dst.data.copy_(src)


def weights_checksum(model_or_snapshot: torch.nn.Module | WeightSnapshot, dtype: torch.dtype | None = None) -> str:
    """sha256 over every stored tensor's name, dtype, shape and bytes, in name order.

    Equal for a model and its snapshot, and for two models with identical weights, so
    tests can compare a generator's weights with the trainer's. Tied duplicates are
    hashed once; the version number is not hashed. `dtype`: of a model, its floating-point
    weights cast to it first (what `publish_weights(model, v, dtype)` stores).
    """
    snapshot = model_or_snapshot
    if isinstance(model_or_snapshot, torch.nn.Module):
        snapshot = _snapshot(model_or_snapshot, version=-1, copy=False, dtype=dtype)
    digest = hashlib.sha256()
    for name in sorted(snapshot.arrays):
        array = snapshot.arrays[name]
        if isinstance(array, torch.Tensor):  # received over NCCL
            array = _to_array(array.cpu())
        array = np.ascontiguousarray(array)
        digest.update(f"{name}|{snapshot.dtypes[name]}|{array.shape}|".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()
