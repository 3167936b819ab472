"""Scoring a rollout batch: row filters in the filter processes, then selectors over the whole batch.

`score_rollouts` adds `score`, `accepted` and `filter_error` (`iterft_ray.data.rollouts.SCORE_SCHEMA`)
and keeps every row, so rejected samples can still be logged. The filters themselves are
in `iterft_ray.verify.filters`; the processes that run row filters under a timeout, in
`iterft_ray.verify.processes`; reward models, by batch, through a `RewardScores` callable (the reward-model
actors' client in a filter actor, `iterft_ray.actors.reward_pool`; `LocalRewards` without Ray).
"""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import pyarrow.compute as pc

from iterft_ray.data.rollouts import RolloutBatch, check_unscored, with_scores
from iterft_ray.verify.filters import RowFilter, Selector, resolve_filter
from iterft_ray.verify.processes import FilterProcesses
from iterft_ray.verify.reward_model import RewardModel, RewardScorer

# Scores (prompts, completions) with a reward model: a pool of actors' (`iterft_ray.actors.reward_pool`),
# or `LocalRewards`, which loads the model in this process.
RewardScores = Callable[[RewardModel, list, list], list]


def score_rollouts(
    table: RolloutBatch,
    filters: Sequence[RowFilter | Selector | RewardModel | str | dict],
    timeout_s: float = 10.0,
    processes: int = 4,
    rewards: RewardScores | None = None,
) -> RolloutBatch:
    """Score a rollout batch: add `score` (float64), `accepted` (bool) and `filter_error` (string).

    Row filters run first, in order, and a row stops at its first rejection. A bool
    result is a gate; numbers add up to the score; with no number, the score is 1.0 if
    every gate passed, else 0.0. A reward model (`reward_model`) adds its reward to the score of each
    row that passed every gate, whatever its place among the row filters (scores add, gates only
    reject, so the order does not change a result); rows already rejected are not sent to it and
    keep the score they had. With a reward model the score of a row no other filter gave a number
    is its reward alone. A row filter that raises or runs past `timeout_s`
    rejects only that row, with the error in `filter_error`. Selectors then run in order
    and can only narrow `accepted`. Rejected rows stay in the table.

    Row filters run in up to `processes` worker processes, several rows at once; a call
    past `timeout_s` is stopped by killing its process, so it may not rely on side
    effects in the caller's process. Use `RolloutScorer` to keep the processes between
    batches. `rewards` scores for the reward models (default: load each here, `LocalRewards`).
    """
    scorer = RolloutScorer(filters, timeout_s, processes, rewards)
    try:
        return scorer.score(table)
    finally:
        scorer.close()


class RolloutScorer:
    """Scores rollout batches with one list of filters, keeping its filter processes between batches.

    Not thread-safe: one batch at a time. `rewards` scores rows with the reward models among the
    filters; without it each is loaded in this process on first use (`LocalRewards`), never at
    construction, so building a scorer to check the specs (the driver does) loads no weights.
    """

    def __init__(
        self,
        filters: Sequence[RowFilter | Selector | RewardModel | str | dict],
        timeout_s: float = 10.0,
        processes: int = 4,
        rewards: RewardScores | None = None,
        min_env_score: float = 1.0,
    ):
        if not (isinstance(timeout_s, numbers.Real) and timeout_s > 0):
            raise ValueError(f"filter timeout_s: expected a number > 0, got {timeout_s!r}")
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"filter processes: expected an integer >= 1, got {processes!r}")
        resolved = [resolve_filter(spec) for spec in filters]
        is_selector = [isinstance(f, Selector) for f in resolved]
        if is_selector != sorted(is_selector):
            raise ValueError(f"row filters must come before selectors, got {resolved}")
        self.reward_models = [f for f in resolved if isinstance(f, RewardModel)]
        self.row_filters = [f for f, sel in zip(resolved, is_selector) if not sel and not isinstance(f, RewardModel)]
        self.selectors = [f for f, sel in zip(resolved, is_selector) if sel]
        self.timeout_s = float(timeout_s)
        self.min_env_score = min_env_score  # `env.min_score`: trajectories (rows with `env_reward`) below it fail
        self._rewards = rewards
        passed_score = 0.0 if self.reward_models else 1.0
        self._pool = FilterProcesses(self.row_filters, processes, passed_score) if self.row_filters else None

    def score(self, table: RolloutBatch) -> RolloutBatch:
        """The batch with `score`, `accepted` and `filter_error` added (see `score_rollouts`)."""
        check_unscored(table)
        trajectories = "env_reward" in table.column_names
        passed = 0.0 if self.reward_models or trajectories else 1.0
        if self._pool is None or table.num_rows == 0:
            rows = [(passed, True, None, None)] * table.num_rows
        else:
            calls = zip(
                table["prompt"].to_pylist(),
                table["completion"].to_pylist(),
                table.drop_columns(["prompt", "completion"]).to_pylist(),
            )
            rows = self._pool.score_rows(list(calls), self.timeout_s, passed)
        if trajectories:
            rows = self._gate_trajectories(table, rows)
        if self.reward_models:
            rows = self._add_rewards(table, rows)
        table = with_scores(table, rows)
        accepted_index = table.schema.get_field_index("accepted")
        for selector in self.selectors:
            mask = pc.and_(table["accepted"], selector.select(table))
            table = table.set_column(accepted_index, "accepted", mask)
        return table

    def _gate_trajectories(self, table: RolloutBatch, rows: list[tuple]) -> list[tuple]:
        """A trajectory's score is its `env_reward` plus what numeric row filters add; it is accepted only without
        an `env_error`, not `truncated`, with `env_reward >= env.min_score`, and past its row filters' gates."""
        gated = []
        columns = zip(table["env_reward"].to_pylist(), table["env_error"].to_pylist(), table["truncated"].to_pylist(),
                      table["completion"].to_pylist())
        for (score, accepted, error, answer), (reward, env_error, truncated, final) in zip(rows, columns):
            passed = env_error is None and not truncated and reward >= self.min_env_score
            # The final assistant message is the answer given (maj@n votes on it) where no filter read one.
            gated.append((reward + score, accepted and passed, error, answer if answer is not None else final.strip()))
        return gated

    def _add_rewards(self, table: RolloutBatch, rows: list[tuple]) -> list[tuple]:
        """`rows` with each reward model's reward added to the score of every row still accepted."""
        passed = [i for i, row in enumerate(rows) if row[1]]
        if not passed:
            return rows
        prompts, completions = table["prompt"].to_pylist(), table["completion"].to_pylist()
        prompts, completions = [prompts[i] for i in passed], [completions[i] for i in passed]
        if self._rewards is None:
            self._rewards = LocalRewards()
        rows = list(rows)
        for spec in self.reward_models:
            rewards = self._rewards(spec, prompts, completions)
            for i, reward in zip(passed, rewards):
                score, accepted, error, answer = rows[i]
                rows[i] = (score + float(reward), accepted, error, answer)
        return rows

    def start(self) -> None:
        """Start the filter processes now, not at the first batch (`FilterProcesses.start`)."""
        if self._pool is not None:
            self._pool.start()

    def close(self) -> None:
        """Stop the filter processes (they also die with this process)."""
        if self._pool is not None:
            self._pool.close()


class LocalRewards:
    """Reward models loaded in this process, each once, on first use: scoring without Ray (a notebook, a test)."""

    def __init__(self):
        self._scorers: dict[RewardModel, RewardScorer] = {}

    def __call__(self, spec: RewardModel, prompts: list, completions: list) -> list:
        if spec not in self._scorers:
            self._scorers[spec] = RewardScorer(spec)
        return self._scorers[spec].score(prompts, completions)
