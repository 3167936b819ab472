"""RewardModelPool: the actors that serve the run's reward models, each holding its model's weights.

Who calls them: the filter actors. A filter actor already holds the batch and knows which rows
passed the gates, so it sends only those rows' texts (`RewardModelClient`, handed to it at its
start) and adds the rewards before the selectors run; the driver keeps its one call per batch
and never touches the rows. The filters themselves know nothing of actors: the scoring code
(`iterft_ray.verify.scoring`) asks a `RewardScores` callable, which here is the client.
"""

from __future__ import annotations

from typing import Any

import ray

from iterft_ray.actors.warm import take_or_start
from iterft_ray.verify.filters import resolve_filter
from iterft_ray.verify.reward_model import RewardModel, RewardScorer


@ray.remote
class RewardModelActor:
    """One reward model, loaded once when the actor starts (bf16 on a GPU), scoring batches of texts."""

    def __init__(self, spec: RewardModel):
        self.scorer = RewardScorer(spec)

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """The reward of each (prompt, completion), in order."""
        return self.scorer.score(prompts, completions)


class RewardModelClient:
    """What a filter actor holds: each reward model's actor handles. Called as the scoring code's `rewards`.

    A batch is split in equal contiguous parts over the model's actors, so every actor of the pool
    works on a big batch. A reward actor's failure (past its restarts) fails the whole batch: a
    broken reward model is a broken run, not a rejected row.
    """

    def __init__(self, actors: dict[RewardModel, list[ray.actor.ActorHandle]]):
        self.actors = actors

    def __call__(self, spec: RewardModel, prompts: list[str], completions: list[str]) -> list[float]:
        if spec not in self.actors:
            served = sorted(m.model for m in self.actors) or "none"
            raise ValueError(f"filter 'reward_model': no actor serves {spec.model} (served: {served}); reward models "
                             "are started for the filters the trainer is built with (RayIterativeSFTTrainer filters=...)")
        actors = self.actors[spec]
        size = -(-len(prompts) // len(actors))
        parts = [actor.score.remote(prompts[i:i + size], completions[i:i + size])
                 for actor, i in zip(actors, range(0, len(prompts), size))]
        return [reward for part in ray.get(parts) for reward in part]


class RewardModelPool:
    """`size` RewardModelActors for each distinct reward model of `filters`' specs (none when there is none)."""

    def __init__(self, models: list[RewardModel], size: int, actor_options: dict[str, Any] | None = None):
        # Never kept warm; idle warm actors end first, to free their resources (`take_or_start`).
        options = actor_options or {}
        self.by_model = {spec: [take_or_start("reward model", None,
                                              lambda: RewardModelActor.options(**options).remote(spec))
                                for _ in range(size)] for spec in dict.fromkeys(models)}

    @property
    def actors(self) -> list[ray.actor.ActorHandle]:
        return [a for handles in self.by_model.values() for a in handles]

    def client(self) -> RewardModelClient:
        """The picklable client that filter actors score with."""
        return RewardModelClient(self.by_model)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.by_model = {}


def reward_models_of(filters: list) -> list[RewardModel]:
    """The distinct reward models among filter specs, in order."""
    resolved = [resolve_filter(spec) for spec in filters]
    return list(dict.fromkeys(f for f in resolved if isinstance(f, RewardModel)))
