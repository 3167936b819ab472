"""Contiguous slices of near-equal size: prompt shards for generators, trajectory groups for the runner."""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T", bound=Sequence)


def split(items: T, parts: int) -> list[T]:
    """`parts` contiguous slices of `items` (a list or a pyarrow table) in order, sizes differing by at most one;
    the first `len(items) % parts` get the extra item, so the same length always splits the same way."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out
