"""Prompts set aside for evaluation by a seeded rule (`eval.heldout_fraction`): never trained on.

A prompt is held out when a hash of (seed, prompt_id) falls below the fraction: the same prompts
for every run with that seed, whatever the order they are read in, with no list to keep. The
rounds skip them as they take prompts (`PromptCursor.next_rows`); the evaluation reads them
from the source's first shards, up to `eval.max_prompts`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa

from iterft_ray.data.prompts import PromptSource


@dataclass(frozen=True)
class HeldOut:
    """The rule: the prompts whose hash of (`seed`, prompt_id), a number in [0, 1), is in [`start`, `fraction`).
    The test split (eval.heldout_fraction) takes [0, f); a validation split (eval.validation.fraction) the band
    after it; the rounds skip all of [0, both)."""

    fraction: float
    seed: int
    start: float = 0.0

    def mask(self, prompt_ids: list) -> list[bool]:
        """Which of these prompts are held out."""
        return [self.start <= _unit(f"{self.seed}/{pid!r}") < self.fraction for pid in prompt_ids]

    def training_part(self, table: pa.Table) -> pa.Table:
        return table.filter(pa.array([not h for h in self.mask(table["prompt_id"].to_pylist())]))

    def held_out_part(self, table: pa.Table) -> pa.Table:
        return table.filter(pa.array(self.mask(table["prompt_id"].to_pylist())))


def held_out_prompts(prompts: pa.Table | PromptSource, rule: HeldOut, limit: int) -> pa.Table:
    """The held-out prompts of a task's table or a source (its shards in file order), at most `limit`."""
    if isinstance(prompts, pa.Table):
        return rule.held_out_part(prompts).slice(0, limit)
    parts, found = [], 0
    for i in range(len(prompts.shards)):
        part = rule.held_out_part(prompts.read_shard(i))
        parts.append(part)
        found += part.num_rows
        if found >= limit:
            break
    return pa.concat_tables(parts).slice(0, limit)


def _unit(key: str) -> float:
    """A number in [0, 1) from `key`, the same on every machine and Python (not `hash()`)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
