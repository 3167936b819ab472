"""What changed between two weight versions: the bytes a version needs to travel to a replica that holds the one before.

In the engines' dtype (bf16) most elements of a weight keep their bits through one small-learning-rate step: the
fp32 master moves by less than half a bf16 step. A `WeightDelta` holds, per stored entry of the published
snapshot, the flat indices (int32) and new values of the elements whose bits changed, or the whole new array
where that is smaller (more than about a third of a bf16 entry changed: 4 + 2 bytes per changed element against 2
per element). Unchanged entries are absent.

    delta = weight_delta(base, new)     # both `WeightSnapshot`s, read where they lie (zero-copy from the store)
    apply_delta(tensors, delta)         # a replica's own copy of `base`, written in place into `new`

Bitwise, not by value: -0.0 and 0.0 differ, and a NaN equals itself, so applying a delta to exactly the base
gives exactly the new version (its `weights_checksum`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from iterft_ray.weights.snapshot import WeightSnapshot, _from_array, _reading_shared_arrays

_UINT_OF_ITEMSIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def index_dtype(numel: int) -> np.dtype:
    """The dtype of an entry's changed-element indices: int32, or int64 for an entry of 2**31 elements or more
    (a function of the shape alone, so a broadcast's receivers know it without being told)."""
    return np.dtype(np.int32 if numel < 2**31 else np.int64)


@dataclass
class WeightDelta:
    """Version `version` as what changed since `base_version`, per stored entry of the snapshot.

    `changed`: entry -> (flat int32 indices, their new values); `whole`: entry -> the new array, where more of
    it changed than indices pay for. Values and arrays are stored as in a `WeightSnapshot` (bf16 as uint16
    views, `dtypes` names the torch dtype). Only a replica holding exactly `base_version` can apply it.
    """

    base_version: int
    version: int
    changed: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    whole: dict[str, np.ndarray] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """The bytes of the delta's arrays: what a transport moves for it."""
        return (sum(i.nbytes + v.nbytes for i, v in self.changed.values())
                + sum(a.nbytes for a in self.whole.values()))


def _bits(array: np.ndarray) -> np.ndarray:
    """`array` flat as unsigned integers of its width (no copy), so comparison is bitwise."""
    return np.ascontiguousarray(array).reshape(-1).view(_UINT_OF_ITEMSIZE[array.dtype.itemsize])


def weight_delta(base: WeightSnapshot, new: WeightSnapshot) -> WeightDelta:
    """The `WeightDelta` from snapshot `base` to snapshot `new` of the same model.

    Entry by entry, so the extra memory is one entry's comparison at a time (a bool per element and the changed
    indices), besides the delta itself.
    """
    if base.arrays.keys() != new.arrays.keys() or base.dtypes != new.dtypes:
        raise ValueError(f"weight versions {base.version} and {new.version} store different entries or dtypes")
    if base.adapter_config is not None or new.adapter_config is not None:
        raise ValueError("an adapter version travels whole (a few MB): no delta")
    delta = WeightDelta(base.version, new.version, dtypes=dict(new.dtypes))
    for name, array in new.arrays.items():
        if array.shape != base.arrays[name].shape:
            raise ValueError(f"{name}: shape {base.arrays[name].shape} in version {base.version}, "
                             f"{array.shape} in {new.version}")
        new_bits = _bits(array)
        index = np.flatnonzero(new_bits != _bits(base.arrays[name]))
        if not index.size:
            continue
        index_type = index_dtype(array.size)
        if index.size * (index_type.itemsize + array.dtype.itemsize) >= array.nbytes:
            delta.whole[name] = array
        else:
            delta.changed[name] = (index.astype(index_type), new_bits[index].view(array.dtype))
    return delta


def apply_delta(tensors: dict[str, torch.Tensor], delta: WeightDelta) -> None:
    """Write `delta` into `tensors` in place: a replica's own, contiguous copy of the delta's base version, by
    stored entry name (a tied alias is the same tensor, so it follows). A tensor on a GPU gets the changed
    elements only: the indices and values are what cross to the device."""
    with torch.no_grad(), _reading_shared_arrays():
        for name, (index, values) in delta.changed.items():
            dst = tensors[name]
            src = _from_array(values, delta.dtypes[name]).to(dst.device, dst.dtype)
            index = index if isinstance(index, torch.Tensor) else torch.from_numpy(index)  # a tensor: over NCCL
            dst.view(-1)[index.to(dst.device, torch.int64)] = src
        for name, array in delta.whole.items():
            tensors[name].copy_(_from_array(array, delta.dtypes[name]))
