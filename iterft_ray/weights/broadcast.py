"""Across nodes: a bucketed broadcast of weight versions from the trainer's rank 0 to the generators.

A `WeightGroup` is a torch.distributed process group of its own (Gloo on CPU, NCCL on GPUs);
rank 0 hands the receivers a `WeightLayout` once, when the group forms, and each version then
moves its bytes only, in buckets packed into two staging buffers. What a receiver gets is a
`WeightSnapshot`, loaded like one from the object store. A version can travel instead as a `WeightDelta`
from the one before (`broadcast_delta`): first the number of changed elements of every entry (one int64
each), then the changed indices and values packed into buckets the same way. `weights/sync.py` decides when.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

import psutil
import ray
import torch
import torch.distributed as dist

from iterft_ray.weights.delta import WeightDelta, index_dtype
from iterft_ray.weights.snapshot import (
    WeightSnapshot, _reading_shared_arrays, _stored_entries, _to_array, adapter_parameters, is_peft_model,
)

# A broadcast moves a version in buckets of about this size: large enough that each collective's
# latency is small against its bytes, small enough that the staging buffers cost little memory.
BUCKET_BYTES = 64 << 20
# Entries start at offsets aligned to this within a bucket, so a view of any dtype is aligned.
_ALIGN = 64
# How long a member of a `WeightGroup` waits for the others (to meet, or in a broadcast) before it fails.
WEIGHT_GROUP_TIMEOUT = datetime.timedelta(seconds=300)


@dataclass
class WeightLayout:
    """What every version a `WeightGroup` broadcasts holds: the stored entries (name, dtype name, shape) in
    order, packed into buckets, and the snapshot's aliases and adapter config.

    Rank 0 hands it to the receivers once, when the group forms: a model's names, dtypes and shapes do not
    change while it trains, so a version moves its bytes and nothing else.
    """

    entries: list[tuple[str, str, tuple[int, ...]]]
    buckets: list[list[tuple[int, int]]]  # per bucket: (entry index, byte offset in the bucket)
    bucket_sizes: list[int]
    aliases: dict[str, str]
    adapter_config: Any = None

    @property
    def nbytes(self) -> int:
        return sum(_entry_bytes(dtype, shape) for _, dtype, shape in self.entries)


def _entry_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * getattr(torch, dtype).itemsize


def _published_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries a version of `model` publishes: a PEFT model's adapter only, else its state_dict."""
    return adapter_parameters(model) if is_peft_model(model) else model.state_dict()


def weight_layout(model: torch.nn.Module, bucket_bytes: int = BUCKET_BYTES,
                  dtype: torch.dtype | None = None) -> WeightLayout:
    """The `WeightLayout` of `model`'s versions; `dtype`: floating-point entries travel cast to it (the engines')."""
    stored, aliases = _stored_entries(_published_state(model))
    entries = [(name, str(dtype if dtype is not None and t.is_floating_point() else t.dtype).removeprefix("torch."),
                tuple(t.shape)) for name, t in stored.items()]
    buckets: list[list[tuple[int, int]]] = [[]]
    sizes = [0]
    for i, (_, dtype, shape) in enumerate(entries):
        nbytes = _entry_bytes(dtype, shape)
        if buckets[-1] and sizes[-1] + nbytes > bucket_bytes:
            buckets.append([])
            sizes.append(0)
        buckets[-1].append((i, sizes[-1]))
        sizes[-1] += -(-nbytes // _ALIGN) * _ALIGN
    adapter_config = model.peft_config[model.active_adapter] if is_peft_model(model) else None
    return WeightLayout(entries, buckets, sizes, aliases, adapter_config)


def open_weight_group_store(size: int, timeout: datetime.timedelta) -> tuple[dist.TCPStore, tuple[str, int]]:
    """Rank 0: the `TCPStore` where a `WeightGroup` of `size` members meets, and its (address, port).

    It listens on this node's Ray address only (a socket bound there and handed to the store): a
    `TCPStore` that binds its own port listens on every interface.
    """
    ip = ray.util.get_node_ip_address()
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    sock.bind((ip, 0))
    sock.listen()
    port = sock.getsockname()[1]
    store = dist.TCPStore(ip, port, size, is_master=True, timeout=timeout, wait_for_workers=False,
                          master_listen_fd=sock.detach())
    return store, (ip, port)


class WeightGroup:
    """A process group of the trainer's rank 0 (its rank 0) and the generators (1..N), for weights only.

    A group of its own, not torch.distributed's default group (the trainer's ranks may be using that):
    Gloo on CPU, NCCL when `backend` says so (every member on a GPU). Members meet at rank 0's
    `TCPStore` (`open_weight_group_store`); every member must construct its `WeightGroup` at the same
    time, since the constructor connects them. Gloo listens on the interface that holds this node's
    Ray address only, so a cluster bound to loopback stays on loopback.
    """

    def __init__(self, address: tuple[str, int], rank: int, size: int, backend: str,
                 timeout: datetime.timedelta, store: dist.TCPStore | None = None):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
        self.rank, self.size, self.backend = rank, size, backend
        self.device = torch.device("cuda" if backend == "nccl" else "cpu")
        if store is None:
            store = dist.TCPStore(address[0], address[1], size, is_master=False, timeout=timeout)
        self.store = store  # rank 0's serves the others: it lives as long as the group
        prefixed = dist.PrefixStore("iterft_ray_weights", store)
        if backend == "nccl":
            self.group = dist.ProcessGroupNCCL(prefixed, rank, size, dist.ProcessGroupNCCL.Options())
        else:
            with _gloo_interface(ray.util.get_node_ip_address()):
                self.group = dist.ProcessGroupGloo(prefixed, rank, size, timeout)

    def broadcast(self, tensor: torch.Tensor) -> dist.Work:
        """Start broadcasting `tensor` from rank 0 into every member's `tensor`; `.wait()` the returned work."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        return self.group.broadcast([tensor], options)


@contextlib.contextmanager
def _gloo_interface(ip: str):
    """GLOO_SOCKET_IFNAME set to the interface that holds `ip` while a Gloo group is made (Gloo's only
    switch for where it listens; without it Gloo binds the address the host name resolves to)."""
    names = [name for name, addrs in psutil.net_if_addrs().items() if any(a.address == ip for a in addrs)]
    saved = os.environ.get("GLOO_SOCKET_IFNAME")
    if names:
        os.environ["GLOO_SOCKET_IFNAME"] = names[0]
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = saved


def broadcast_weights(group: WeightGroup, model: torch.nn.Module, layout: WeightLayout) -> None:
    """Rank 0: send `model`'s current weights to every member of `group`, bucket by bucket.

    Each bucket is packed (one copy, on the model's device) into one of two staging buffers while
    the previous one is on the wire, cast there to the entry's dtype in `layout` (the one the receivers got
    when the group formed).
    """
    stored, _ = _stored_entries(_published_state(model))
    tensors = [stored[name] for name, _, _ in layout.entries]
    staging: list[torch.Tensor] = []
    in_flight: list[dist.Work | None] = [None, None]
    with torch.no_grad():
        for b, (bucket, size) in enumerate(zip(layout.buckets, layout.bucket_sizes)):
            slot = b % 2
            if in_flight[slot] is not None:
                in_flight[slot].wait()
            if len(staging) <= slot:
                staging.append(torch.empty(max(layout.bucket_sizes), dtype=torch.uint8, device=group.device))
            buffer = staging[slot][:size]
            for i, offset in bucket:
                _, dtype, shape = layout.entries[i]
                buffer[offset : offset + _entry_bytes(dtype, shape)].view(getattr(torch, dtype)).view(shape).copy_(
                    tensors[i])
            in_flight[slot] = group.broadcast(buffer)
        for work in in_flight:
            if work is not None:
                work.wait()


def receive_weights(group: WeightGroup, layout: WeightLayout, version: int) -> WeightSnapshot:
    """A member: receive the version rank 0 is broadcasting, as a `WeightSnapshot` of views of the buckets.

    Every bucket is new memory, not reused across versions: a CPU replica then points its weights at
    them (`load_snapshot(share=True)`), as at a snapshot from the object store. Over NCCL the
    snapshot's entries are CUDA tensors.
    """
    arrays: dict[str, Any] = {}
    for bucket, size in zip(layout.buckets, layout.bucket_sizes):
        buffer = torch.empty(size, dtype=torch.uint8, device=group.device)
        group.broadcast(buffer).wait()
        for i, offset in bucket:
            name, dtype, shape = layout.entries[i]
            t = buffer[offset : offset + _entry_bytes(dtype, shape)].view(getattr(torch, dtype)).view(shape)
            arrays[name] = _to_array(t) if t.device.type == "cpu" else t
    return WeightSnapshot(version=version, arrays=arrays, dtypes={n: d for n, d, _ in layout.entries},
                          aliases=dict(layout.aliases), adapter_config=layout.adapter_config)


# A delta's count for an entry that travels whole (most of it changed); 0: unchanged, k > 0: k changed elements.
_WHOLE = -1


def _delta_parts(layout: WeightLayout, counts: list[int]) -> list[tuple[int, str, int]]:
    """The byte runs a delta with `counts` sends, in order: (entry index, "index" | "values" | "whole", bytes)."""
    parts = []
    for i, ((_, dtype, shape), count) in enumerate(zip(layout.entries, counts)):
        if count == _WHOLE:
            parts.append((i, "whole", _entry_bytes(dtype, shape)))
        elif count:
            parts.append((i, "index", count * index_dtype(math.prod(shape)).itemsize))
            parts.append((i, "values", count * getattr(torch, dtype).itemsize))
    return parts


def _packed(parts: list[tuple[int, str, int]], bucket_bytes: int) -> list[tuple[list[tuple[int, int]], int]]:
    """`parts` packed into buckets of about `bucket_bytes`: per bucket, (part index, byte offset) and its size."""
    buckets: list[tuple[list[tuple[int, int]], int]] = []
    placed: list[tuple[int, int]] = []
    size = 0
    for p, (_, _, nbytes) in enumerate(parts):
        if placed and size + nbytes > bucket_bytes:
            buckets.append((placed, size))
            placed, size = [], 0
        placed.append((p, size))
        size += -(-nbytes // _ALIGN) * _ALIGN
    if placed:
        buckets.append((placed, size))
    return buckets


def _delta_counts(delta: WeightDelta, layout: WeightLayout) -> list[int]:
    return [_WHOLE if name in delta.whole else len(delta.changed[name][0]) if name in delta.changed else 0
            for name, _, _ in layout.entries]


def broadcast_delta(group: WeightGroup, delta: WeightDelta, layout: WeightLayout,
                    bucket_bytes: int = BUCKET_BYTES) -> int:
    """Rank 0: send version `delta.version` as `delta` (from `delta.base_version`) to every member of `group`;
    returns the bytes sent, the counts included (what the transport moved)."""
    counts = torch.tensor(_delta_counts(delta, layout), dtype=torch.int64, device=group.device)
    group.broadcast(counts).wait()
    parts = _delta_parts(layout, counts.tolist())
    sent = counts.nbytes
    with torch.no_grad(), _reading_shared_arrays():
        for placed, size in _packed(parts, bucket_bytes):
            buffer = torch.empty(size, dtype=torch.uint8, device=group.device)
            for p, offset in placed:
                i, kind, nbytes = parts[p]
                name = layout.entries[i][0]
                array = (delta.whole[name] if kind == "whole"
                         else delta.changed[name][0 if kind == "index" else 1])
                src = array if isinstance(array, torch.Tensor) else torch.from_numpy(array)
                buffer[offset : offset + nbytes].copy_(src.reshape(-1).view(torch.uint8))
            group.broadcast(buffer).wait()
            sent += size
    return sent


def receive_delta(group: WeightGroup, layout: WeightLayout, base_version: int, version: int,
                  bucket_bytes: int = BUCKET_BYTES) -> tuple[WeightDelta, int]:
    """A member: receive the `WeightDelta` rank 0 is broadcasting (`broadcast_delta`), as views of the buckets,
    and the bytes received. Over NCCL its indices and values are CUDA tensors."""
    counts = torch.empty(len(layout.entries), dtype=torch.int64, device=group.device)
    group.broadcast(counts).wait()
    parts = _delta_parts(layout, counts.tolist())
    delta = WeightDelta(base_version, version, dtypes={n: d for n, d, _ in layout.entries})
    received = counts.nbytes
    index_parts: dict[str, Any] = {}
    for placed, size in _packed(parts, bucket_bytes):
        buffer = torch.empty(size, dtype=torch.uint8, device=group.device)
        group.broadcast(buffer).wait()
        received += size
        for p, offset in placed:
            i, kind, nbytes = parts[p]
            name, dtype, shape = layout.entries[i]
            run = buffer[offset : offset + nbytes]
            if kind == "index":
                t = run.view(getattr(torch, str(index_dtype(math.prod(shape)))))
            else:
                t = run.view(getattr(torch, dtype))
                t = t.view(shape) if kind == "whole" else t
            array = _to_array(t) if t.device.type == "cpu" else t
            if kind == "whole":
                delta.whole[name] = array
            elif kind == "index":
                index_parts[name] = array
            else:
                delta.changed[name] = (index_parts.pop(name), array)
    return delta, received
