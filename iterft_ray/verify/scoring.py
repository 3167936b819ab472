"""Scoring a rollout batch: row filters in the filter processes, then selectors over the whole batch.

`score_rollouts` adds `score`, `accepted` and `filter_error` (`iterft_ray.data.rollouts.SCORE_SCHEMA`)
and keeps every row, so rejected samples can still be logged. The filters themselves are
in `iterft_ray.verify.filters`; the processes that run row filters under a timeout, in
`iterft_ray.verify.processes`.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import pyarrow.compute as pc

from iterft_ray.data.rollouts import RolloutBatch, check_unscored, with_scores
from iterft_ray.verify.filters import RowFilter, Selector, resolve_filter
from iterft_ray.verify.processes import FilterProcesses


def score_rollouts(
    table: RolloutBatch,
    filters: Sequence[RowFilter | Selector | str | dict],
    timeout_s: float = 10.0,
    processes: int = 4,
) -> RolloutBatch:
    """Score a rollout batch: add `score` (float64), `accepted` (bool) and `filter_error` (string).

    Row filters run first, in order, and a row stops at its first rejection. A bool
    result is a gate; numbers add up to the score; with no number, the score is 1.0 if
    every gate passed, else 0.0. A row filter that raises or runs past `timeout_s`
    rejects only that row, with the error in `filter_error`. Selectors then run in order
    and can only narrow `accepted`. Rejected rows stay in the table.

    Row filters run in up to `processes` worker processes, several rows at once; a call
    past `timeout_s` is stopped by killing its process, so it may not rely on side
    effects in the caller's process. Use `RolloutScorer` to keep the processes between
    batches.
    """
    scorer = RolloutScorer(filters, timeout_s, processes)
    try:
        return scorer.score(table)
    finally:
        scorer.close()


class RolloutScorer:
    """Scores rollout batches with one list of filters, keeping its filter processes between batches.

    Not thread-safe: one batch at a time.
    """

    def __init__(
        self,
        filters: Sequence[RowFilter | Selector | str | dict],
        timeout_s: float = 10.0,
        processes: int = 4,
    ):
        if not (isinstance(timeout_s, numbers.Real) and timeout_s > 0):
            raise ValueError(f"filter timeout_s: expected a number > 0, got {timeout_s!r}")
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"filter processes: expected an integer >= 1, got {processes!r}")
        resolved = [resolve_filter(spec) for spec in filters]
        is_selector = [isinstance(f, Selector) for f in resolved]
        if is_selector != sorted(is_selector):
            raise ValueError(f"row filters must come before selectors, got {resolved}")
        self.row_filters = [f for f, sel in zip(resolved, is_selector) if not sel]
        self.selectors = [f for f, sel in zip(resolved, is_selector) if sel]
        self.timeout_s = float(timeout_s)
        self._pool = FilterProcesses(self.row_filters, processes) if self.row_filters else None

    def score(self, table: RolloutBatch) -> RolloutBatch:
        """The batch with `score`, `accepted` and `filter_error` added (see `score_rollouts`)."""
        check_unscored(table)
        if self._pool is None or table.num_rows == 0:
            rows = [(1.0, True, None, None)] * table.num_rows
        else:
            calls = zip(
                table["prompt"].to_pylist(),
                table["completion"].to_pylist(),
                table.drop_columns(["prompt", "completion"]).to_pylist(),
            )
            rows = self._pool.score_rows(list(calls), self.timeout_s)
        table = with_scores(table, rows)
        accepted_index = table.schema.get_field_index("accepted")
        for selector in self.selectors:
            mask = pc.and_(table["accepted"], selector.select(table))
            table = table.set_column(accepted_index, "accepted", mask)
        return table

    def close(self) -> None:
        """Stop the filter processes (they also die with this process)."""
        if self._pool is not None:
            self._pool.close()
