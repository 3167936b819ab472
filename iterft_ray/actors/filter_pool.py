"""FilterPool: actors that score rollout batches in parallel; only small summaries reach the driver."""

from __future__ import annotations

import itertools
from typing import Any

import cloudpickle
import ray

from iterft_ray.actors.reward_pool import RewardModelClient
from iterft_ray.actors.warm import keep_or_end, take_or_start
from iterft_ray.data.rollouts import RolloutBatch, summarize
from iterft_ray.verify.scoring import RolloutScorer


@ray.remote
class FilterActor:
    """Runs the configured filters over one rollout batch at a time, several rows at once.

    The row filters run in `processes` worker processes that live as long as the actor,
    so a slow verifier holds up one process, not the batch, and a call past `timeout_s`
    is killed with its process. Reward models are scored by the reward-model actors through
    `rewards` (`iterft_ray.actors.reward_pool`), never loaded here.
    """

    def __init__(self, filters: list, timeout_s: float, processes: int, rewards: RewardModelClient | None = None,
                 min_env_score: float = 1.0):
        self.rewards = rewards or RewardModelClient({})
        self.min_env_score = min_env_score
        self.scorer = RolloutScorer(filters, timeout_s, processes, self.rewards, min_env_score)
        self.scorer.start()  # the filters' modules load while the other actors start
        self.timeout_s = timeout_s
        self.processes = processes
        # The last override (the driver's held-out check each round) keeps its processes too.
        self._override: tuple[bytes, RolloutScorer] | None = None

    def release(self) -> bool:
        """Be as new, for the next pool asking for a filter actor of this spec (`keep_actors_warm`): the
        configured filters' processes stay, an override's close."""
        if self._override is not None:
            self._override[1].close()
            self._override = None
        return True

    @ray.method(num_returns=2)
    def score(self, rollouts: RolloutBatch, filters: list | None = None) -> tuple[RolloutBatch, dict[str, Any]]:
        """Score a batch; return (scored batch, its summary). `filters` overrides the configured ones."""
        scored = self._scorer_for(filters).score(rollouts)
        return scored, summarize(scored)

    def _scorer_for(self, filters: list | None) -> RolloutScorer:
        if filters is None:
            return self.scorer
        key = cloudpickle.dumps(filters)
        if self._override is None or self._override[0] != key:
            if self._override is not None:
                self._override[1].close()
            self._override = (key, RolloutScorer(filters, self.timeout_s, self.processes, self.rewards,
                                                 self.min_env_score))
        return self._override[1]


class FilterPool:
    """A fixed pool of FilterActors fed round-robin; Ray queues batches at busy actors.

    `processes` is the number of rows each actor scores at once; `rewards`, the reward-model actors
    every filter actor sends its reward-model rows to; `min_env_score`, `env.min_score` (trajectories).
    """

    def __init__(
        self,
        filters: list,
        size: int,
        timeout_s: float = 10.0,
        actor_options: dict | None = None,
        processes: int = 4,
        rewards: RewardModelClient | None = None,
        min_env_score: float = 1.0,
    ):
        RolloutScorer(filters, timeout_s, processes)  # fail here, in the driver, on a bad spec; starts nothing
        # Filter actors that call reward-model actors hold their handles: those are never kept warm.
        self._spec = (("filter actor", actor_options, filters, timeout_s, processes, min_env_score)
                      if rewards is None or not rewards.actors else None)

        def start() -> ray.actor.ActorHandle:
            return FilterActor.options(**(actor_options or {})).remote(filters, timeout_s, processes, rewards,
                                                                       min_env_score)

        self.actors = [take_or_start("filter actor", self._spec, start) for _ in range(size)]
        self._next = itertools.cycle(range(size))

    def score(self, rollouts: ray.ObjectRef, filters: list | None = None) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        """Queue one rollout batch; returns (scored batch ref, summary ref)."""
        return self.actors[next(self._next)].score.remote(rollouts, filters)

    def shutdown(self) -> None:
        """End the filter actors, or within `keep_actors_warm()` keep them for the next pool of the same spec."""
        for a in self.actors:
            keep_or_end(self._spec, a)
