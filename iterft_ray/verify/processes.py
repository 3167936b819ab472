"""The filter processes: worker processes that run row filters on a batch's rows, each call under a real timeout.

`iterft_ray.verify.scoring` hands them one (prompt, completion, meta) per row and gets back
one (score, accepted, filter_error, final_answer); nothing here knows about tables or selectors.
"""

from __future__ import annotations

import collections
import multiprocessing.connection as mp_connection
import numbers
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cloudpickle

from iterft_ray.call_processes import START_LIMIT_S, CallProcess, Zygote, live_zygote
from iterft_ray.verify.verdict import Verdict

if TYPE_CHECKING:
    from iterft_ray.verify.filters import RowFilter


@dataclass
class _Row:
    """A row on its way through the row filters, in one filter process."""

    index: int
    args: tuple
    filter_index: int = 0
    total: float | None = None
    answer: str | None = None  # the first final answer a filter's Verdict gave
    deadline: float = 0.0


class FilterProcesses:
    """Worker processes that run row-filter calls, one row each at a time, under a timeout.

    A call past its timeout is stopped by killing its process (`iterft_ray.call_processes`), and the
    killed worker is replaced before the next row. The workers are forked from a zygote that loaded the
    filters, so neither the first nor a replacement imports the filters' modules again.
    """

    def __init__(self, row_filters: list[RowFilter], size: int, passed_score: float = 1.0):
        """`passed_score`: the score of a row that passed and that no filter gave a number (1.0 for gates only;
        0.0 when a reward model's reward is added afterwards, so the score is the reward)."""
        self.row_filters = row_filters
        self.passed_score = passed_score
        self.names = [getattr(f, "__name__", None) or getattr(f, "name", None) or repr(f) for f in row_filters]
        self.size = size
        try:
            self._payload = cloudpickle.dumps(row_filters)
        except Exception as e:
            raise ValueError(f"row filters {self.names}: cannot be pickled for a filter process: {e}") from None
        self._workers: list[CallProcess] = []
        self._zygote: Zygote | None = None

    def score_rows(self, rows: list[tuple], timeout_s: float,
                   passed_score: float | None = None) -> list[tuple[float, bool, str | None, str | None]]:
        """(score, accepted, filter_error, final_answer) for each (prompt, completion, meta); `passed_score`
        replaces the constructor's for this call (0.0 for trajectories, whose score starts from their reward)."""
        passed = self.passed_score if passed_score is None else passed_score
        results: list = [None] * len(rows)
        todo = collections.deque(_Row(i, args) for i, args in enumerate(rows))
        while len(self._workers) < min(self.size, len(rows)):
            self._workers.append(self._new_worker())
        busy: dict[CallProcess, _Row] = {}

        def call(worker: CallProcess, row: _Row) -> None:
            busy[worker] = row
            row.deadline = time.monotonic() + timeout_s
            try:
                worker.send(row.filter_index, row.args)
            except OSError:  # it died between calls; the next receive reports it
                pass

        def finish(worker: CallProcess, row: _Row, result: tuple, replace: bool = False) -> None:
            results[row.index] = result
            del busy[worker]
            if replace:
                self._workers[self._workers.index(worker)] = self._new_worker()

        while todo or busy:
            for worker in self._workers:
                if todo and worker.ready and worker not in busy:
                    call(worker, todo.popleft())
            waiting = [w for w in self._workers if w in busy or not w.ready]
            deadlines = [row.deadline for row in busy.values()]
            deadlines += [w.started + START_LIMIT_S for w in waiting if not w.ready]
            wait_s = max(0.0, min(deadlines) - time.monotonic())
            for conn in mp_connection.wait([w.conn for w in waiting], wait_s):
                worker = next(w for w in waiting if w.conn is conn)
                if not worker.ready:
                    worker.receive_ready()
                    continue
                row = busy[worker]
                try:
                    ok, value = worker.receive()
                except (EOFError, OSError):
                    error = f"filter process died with exit code {worker.stop()}"
                    finish(worker, row, self._reject(row, f"{self.names[row.filter_index]}: {error}"), replace=True)
                    continue
                done = self._advance(row, ok, value, passed)
                if done is None:
                    call(worker, row)
                else:
                    finish(worker, row, done)
            now = time.monotonic()
            for worker in self._workers:
                if not worker.ready and now > worker.started + START_LIMIT_S:
                    raise RuntimeError(f"a filter process did not start within {START_LIMIT_S}s")
            for worker, row in list(busy.items()):
                if now >= row.deadline:
                    worker.stop()
                    error = f"{self.names[row.filter_index]}: TimeoutError: timeout after {timeout_s:g}s"
                    finish(worker, row, self._reject(row, error), replace=True)
        return results

    def _advance(self, row: _Row, ok: bool, value: Any,
                 passed: float) -> tuple[float, bool, str | None, str | None] | None:
        """Apply one filter's result; the row's final result, or None when the next filter runs."""
        name = self.names[row.filter_index]
        if not ok:
            return self._reject(row, f"{name}: {value}")
        gate = None
        if isinstance(value, Verdict):
            if row.answer is None and value.answer is not None:
                row.answer = str(value.answer)
            value, gate = value.value, value.passed
        if isinstance(value, bool):
            if not value:
                return self._reject(row, None)
        elif isinstance(value, numbers.Real):
            row.total = (row.total or 0.0) + float(value)
            if gate is False:
                return self._reject(row, None)
        else:
            return self._reject(row, f"{name}: returned {value!r}, expected a bool or a number")
        row.filter_index += 1
        if row.filter_index < len(self.row_filters):
            return None
        return (passed if row.total is None else row.total), True, None, row.answer

    @staticmethod
    def _reject(row: _Row, error: str | None) -> tuple[float, bool, str | None, str | None]:
        """A rejected row keeps the score so far, and the answer it gave (a wrong answer counts in a vote)."""
        return row.total or 0.0, False, error, row.answer

    def start(self) -> None:
        """Start the workers now rather than at the first batch: a filter actor calls this at its start, so
        loading the filters' modules overlaps the other actors' start."""
        while len(self._workers) < self.size:
            self._workers.append(self._new_worker())

    def _new_worker(self) -> CallProcess:
        self._zygote = live_zygote(self._zygote)
        return self._zygote.fork(self._payload)

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []
        if self._zygote is not None:
            self._zygote.release()
            self._zygote = None


