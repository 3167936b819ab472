"""Sampling seeds, derived from `loop.seed` in one place: a shard retried after a generator died, a round
re-run after a restore, and a benchmark's single-process round all sample the same rows."""

from __future__ import annotations


def shard_seed(seed: int, round_index: int, shard: int) -> int:
    """The seed of prompt shard `shard` (one generator's call) of round `round_index`."""
    return seed * 1_000_003 + round_index * 1009 + shard


def request_seed(shard_seed_: int, request: int) -> int:
    """The seed of the `request`-th prompt of a shard, for engines seeded per request (vLLM's `seed`)."""
    return (shard_seed_ * 1_000_003 + request) % (1 << 63)


def wave_seed(seed: int, wave: int) -> int:
    """The seed a round's `wave`-th sampling call starts from (sequential best-of-n, STaR's hinted pass): wave 0
    keeps `seed`, so a run without waves samples as before; a later wave's seeds differ from the earlier ones'
    (and from the seeds of the next 1000 rollbacks, which move `seed` on by one each)."""
    return seed + wave * 1_000


def turn_seed(shard_seed_: int, trajectory: int, turn: int) -> int:
    """The seed of turn `turn` of the `trajectory`-th trajectory of a shard (multi-turn rounds): its own per
    (trajectory, turn), so a trajectory run again from its start samples the same turns."""
    return request_seed(shard_seed_, trajectory * 1_009 + turn)
