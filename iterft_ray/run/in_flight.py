"""Rollouts in flight at a checkpoint (async mode): saved beside it, so that a resume trains on the very rows.

In async mode the rounds after round r are sampled while round r trains, from older weights. A
checkpoint after round r therefore also needs those rollouts: sampling them again after a resume
would use round r's weights instead, and the run would no longer be the one it was. They are
written, one Parquet file per generator shard (the filters see the same batches again), to
`in_flight/round-NNNN/` (NNNN: the checkpoint's round) before the checkpoint itself, whose
completion mark comes last; a checkpoint's loop state lists what it holds.
"""

from __future__ import annotations

import io
from collections import deque

import pyarrow.parquet as pq
import ray

from iterft_ray.run.records import write_generations
from iterft_ray.storage import StoragePath

IN_FLIGHT_DIR = "in_flight"


def _shard_path(out: StoragePath, checkpoint_round: int, round_index: int, shard: int) -> StoragePath:
    return out / IN_FLIGHT_DIR / f"round-{checkpoint_round:04d}" / f"{round_index:04d}-{shard:03d}.parquet"


def save_in_flight(out: StoragePath, checkpoint_round: int,
                   pending: deque[tuple[int, list[ray.ObjectRef]]]) -> list[dict[str, int]]:
    """Write the pending rounds' rollouts (waiting for any still sampling); returns [{round, shards}] for the
    checkpoint's loop state."""
    (out / IN_FLIGHT_DIR / f"round-{checkpoint_round:04d}").delete()
    writes, saved = [], []
    for round_index, refs in pending:
        writes += [write_generations(_shard_path(out, checkpoint_round, round_index, i), [ref])
                   for i, ref in enumerate(refs)]
        saved.append({"round": round_index, "shards": len(refs)})
    ray.get(writes)
    return saved


def load_in_flight(out: StoragePath, checkpoint_round: int,
                   saved: list[dict[str, int]]) -> deque[tuple[int, list[ray.ObjectRef]]]:
    """The pending rounds a checkpoint saved, back in the object store in their order."""
    pending: deque[tuple[int, list[ray.ObjectRef]]] = deque()
    for entry in saved:
        refs = [ray.put(pq.read_table(io.BytesIO(_shard_path(out, checkpoint_round, entry["round"], i).read_bytes())))
                for i in range(entry["shards"])]
        pending.append((entry["round"], refs))
    return pending


def delete_in_flight(out: StoragePath, keep_round: int) -> None:
    """Remove the in-flight rollouts of checkpoints other than `keep_round` (older ones are never resumed from
    once a newer checkpoint is complete, and a resume from an older one rewrites its own)."""
    for path in (out / IN_FLIGHT_DIR).iterdir():
        if path.name != f"round-{keep_round:04d}":
            path.delete()
