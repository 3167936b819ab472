"""GeneratorPool: the generator actors, how many there are, which prompts each samples, with which seed."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import ray

from iterft_ray.actors.generator import GeneratorActor
from iterft_ray.actors.warm import keep_or_end, take_or_start
from iterft_ray.config import ModelConfig, SamplingConfig
from iterft_ray.engines.seeding import shard_seed
from iterft_ray.data.slices import split
from iterft_ray.envs.runner import EnvRun


class GeneratorPool:
    """Generator actors of one model and engine; `options` are each actor's Ray options (resources, restarts).
    With `env`, every call samples trajectories in that environment (`iterft_ray.envs.runner`)."""

    def __init__(self, model: ModelConfig, sampling: SamplingConfig, options: dict[str, Any],
                 env: EnvRun | None = None):
        self.model, self.sampling, self.options, self.env = model, sampling, options, env
        self.actors: list[ray.actor.ActorHandle] = []

    def __len__(self) -> int:
        return len(self.actors)

    def __iter__(self):
        return iter(self.actors)

    def __getitem__(self, index: int) -> ray.actor.ActorHandle:
        return self.actors[index]

    def scale(self, count: int) -> bool:
        """Grow or shrink to `count` generators; returns whether the count changed. A new generator holds the
        weights on disk until its first call loads the version it is given."""
        changed = count != len(self.actors)
        while len(self.actors) < count:
            index = len(self.actors)
            self.actors.append(take_or_start("generator", self._spec(index), lambda: GeneratorActor.options(
                **self.options).remote(self.model, index, self.sampling)))
        for gone in self.actors[count:]:
            ray.kill(gone)
        del self.actors[count:]
        return changed

    def generate(self, prompts: pa.Table, weights: ray.ObjectRef, version: int, sampling: SamplingConfig,
                 seed: int, round_index: int) -> list[ray.ObjectRef]:
        """One contiguous shard of `prompts` per generator, sampled with weight `version` (at least) and the
        shard's own seed; returns one rollout reference per non-empty shard."""
        shards = split(prompts, len(self.actors))
        return [
            g.generate.remote(ray.put(shard), [weights], version, sampling, shard_seed(seed, round_index, i),
                              round_index, self.env)
            for i, (g, shard) in enumerate(zip(self.actors, shards))
            if shard.num_rows
        ]

    def node_ids(self) -> list[str]:
        return ray.get([g.node_id.remote() for g in self.actors])

    def shutdown(self) -> None:
        """End the generators, or within `keep_actors_warm()` keep them for the next pool of the same spec."""
        for index, g in enumerate(self.actors):
            keep_or_end(self._spec(index), g)

    def _spec(self, index: int) -> tuple | None:
        """What a warm generator must have been made with to be taken (`warm.py`); None where none is kept: the hf
        engine without an adapter rebuilds as new in its process, while vLLM's engine and its caches, and an
        adapter added to a replica, are not taken apart again."""
        if self.sampling.engine != "hf" or self.model.lora is not None or self.env is not None:
            return None
        return ("generator", self.options, self.model, index, self.sampling)
