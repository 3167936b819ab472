"""Filters that score and select rollouts: the "keep the ones a verifier likes" step of a round.

A rollout batch is a `pyarrow.Table`, one row per sample, with at least `prompt_id`,
`prompt` and `completion` (generators add `sample_id`, `answer`, ...). `score_rollouts`
adds `score`, `accepted` and `filter_error` and keeps every row, so rejected samples can
still be logged.

There are two kinds of filter:

- A row filter is any callable `f(prompt, completion, meta) -> bool | float`, where
  `meta` is the row as a dict without `prompt` and `completion`. A bool is a gate; a
  number adds to the row's score. Row filters run in worker processes, several rows at
  once, and a call past its timeout is killed with its process (see `RolloutScorer`).
- A selector is any object with `select(table) -> pyarrow boolean array`. It sees the
  whole batch with `score` and `accepted` columns and returns the new accepted mask. All
  samples of a prompt are in one batch, so per-prompt selection (best-of-k) works.

Built-ins are module-level classes, not closures, because filters travel to Ray actors
by pickle. The verifiers `math_answer` and `python_tests` live in `iterft_ray.verify.verifiers`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import importlib
import inspect
import math
import multiprocessing.connection as mp_connection
import numbers
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, Union, runtime_checkable

import cloudpickle
import pyarrow as pa
import pyarrow.compute as pc

from iterft_ray.data.tasks import get_task
from iterft_ray.verify.verifiers import math_answer, python_tests

RowFilter = Callable[[str, str, dict], Union[bool, float]]

REQUIRED_COLUMNS = ("prompt_id", "prompt", "completion")
_ADDED_COLUMNS = ("score", "accepted", "filter_error")


@runtime_checkable
class Selector(Protocol):
    """A batch filter: given the scored batch, returns which rows stay accepted."""

    def select(self, table: pa.Table) -> pa.BooleanArray: ...


# Row filters.


@dataclass(frozen=True)
class _ExactAnswer:
    task: str
    check: Callable[[str, str], bool] = field(repr=False)

    def __call__(self, prompt: str, completion: str, meta: dict) -> bool:
        return self.check(completion, meta["answer"])


@dataclass(frozen=True)
class _Regex:
    pattern: str

    def __call__(self, prompt: str, completion: str, meta: dict) -> bool:
        return re.search(self.pattern, completion) is not None


@dataclass(frozen=True)
class _LengthBounds:
    min_chars: int
    max_chars: int | None

    def __call__(self, prompt: str, completion: str, meta: dict) -> bool:
        too_long = self.max_chars is not None and len(completion) > self.max_chars
        return len(completion) >= self.min_chars and not too_long


def exact_answer(task: str = "addition") -> RowFilter:
    """Row filter: accept a completion that the task's checker grades correct.

    The answer comes from `meta["answer"]`, so the batch needs an `answer` column (copied
    from the prompt table by the generator).
    """
    return _ExactAnswer(task, get_task(task).check)


def regex(pattern: str) -> RowFilter:
    """Row filter: accept a completion in which `pattern` matches somewhere (`re.search`).

    Anchor with `^...$` to require the whole completion to match.
    """
    try:
        re.compile(pattern)
    except (re.error, TypeError) as e:
        raise ValueError(f"filter 'regex': bad pattern {pattern!r}: {e}") from None
    return _Regex(pattern)


def length_bounds(min_chars: int = 0, max_chars: int | None = None) -> RowFilter:
    """Row filter: accept a completion with `min_chars <= len(completion) <= max_chars`.

    Length is in characters, not tokens; `max_chars=None` means no upper bound.
    """
    valid = isinstance(min_chars, int) and min_chars >= 0
    valid = valid and (max_chars is None or isinstance(max_chars, int) and max_chars >= min_chars)
    if not valid:
        raise ValueError(
            f"filter 'length_bounds': expected 0 <= min_chars <= max_chars, "
            f"got min_chars={min_chars}, max_chars={max_chars}"
        )
    return _LengthBounds(min_chars, max_chars)


# Selectors.


def _accepted_rows(table: pa.Table) -> list[tuple[int, Any, float]]:
    """(row index, prompt_id, score) of the accepted rows, in row order."""
    columns = (table[name].to_pylist() for name in ("prompt_id", "score", "accepted"))
    return [(i, pid, score) for i, (pid, score, ok) in enumerate(zip(*columns)) if ok]


def _best_first(rows: list[tuple[int, Any, float]]) -> list[int]:
    """Row indices by descending score; ties keep row order."""
    return [i for i, _, _ in sorted(rows, key=lambda row: (-row[2], row[0]))]


def _mask(num_rows: int, keep: list[int]) -> pa.BooleanArray:
    mask = [False] * num_rows
    for i in keep:
        mask[i] = True
    return pa.array(mask, pa.bool_())


@dataclass(frozen=True)
class _Deduplicate:
    def select(self, table: pa.Table) -> pa.BooleanArray:
        completions = table["completion"].to_pylist()
        seen, keep = set(), []
        for i, pid, _ in _accepted_rows(table):
            if (pid, completions[i]) not in seen:
                seen.add((pid, completions[i]))
                keep.append(i)
        return _mask(table.num_rows, keep)


@dataclass(frozen=True)
class _BestOfK:
    k: int

    def select(self, table: pa.Table) -> pa.BooleanArray:
        by_prompt = defaultdict(list)
        for row in _accepted_rows(table):
            by_prompt[row[1]].append(row)
        keep = [i for rows in by_prompt.values() for i in _best_first(rows)[: self.k]]
        return _mask(table.num_rows, keep)


@dataclass(frozen=True)
class _TopFraction:
    fraction: float

    def select(self, table: pa.Table) -> pa.BooleanArray:
        rows = _accepted_rows(table)
        # Round before ceil: 0.28 * 25 is 7.000000000000001, which would keep 8.
        count = math.ceil(round(self.fraction * len(rows), 6))
        return _mask(table.num_rows, _best_first(rows)[:count])


@dataclass(frozen=True)
class _ScoreThreshold:
    min_score: float

    def select(self, table: pa.Table) -> pa.BooleanArray:
        at_least = pc.greater_equal(table["score"], self.min_score)
        return pc.and_(table["accepted"], at_least).combine_chunks()


def deduplicate() -> Selector:
    """Selector: keep the first accepted row of each (prompt_id, completion) pair.

    Stops a prompt's one easy answer from being trained on k times in a round.
    """
    return _Deduplicate()


def best_of_k(k: int = 1) -> Selector:
    """Selector (RAFT): per prompt, keep the k accepted rows with the highest score.

    Ties go to the earlier row; a prompt with fewer than k accepted rows keeps them all.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"filter 'best_of_k': expected an integer k >= 1, got {k!r}")
    return _BestOfK(k)


def top_fraction(fraction: float) -> Selector:
    """Selector: keep the highest-scoring `fraction` of the accepted rows of the whole batch.

    The count rounds up, so any fraction keeps at least one row when one is accepted.
    """
    if not (isinstance(fraction, numbers.Real) and 0 < fraction <= 1):
        raise ValueError(f"filter 'top_fraction': expected 0 < fraction <= 1, got {fraction!r}")
    return _TopFraction(fraction)


def score_threshold(min_score: float) -> Selector:
    """Selector: keep accepted rows with `score >= min_score`.

    Scores from gates only are 1.0 or 0.0; it is meant for numeric (reward) filters.
    """
    if not isinstance(min_score, numbers.Real):
        raise ValueError(f"filter 'score_threshold': expected a number, got {min_score!r}")
    return _ScoreThreshold(float(min_score))


_BUILTINS: dict[str, Callable[..., RowFilter | Selector]] = {
    "exact_answer": exact_answer,
    "regex": regex,
    "length_bounds": length_bounds,
    "math_answer": math_answer,
    "python_tests": python_tests,
    "deduplicate": deduplicate,
    "best_of_k": best_of_k,
    "top_fraction": top_fraction,
    "score_threshold": score_threshold,
}


def resolve_filter(spec: RowFilter | Selector | str | dict) -> RowFilter | Selector:
    """Turn a filter spec from code or YAML into a row filter or a selector.

    A spec is a callable or selector (used as-is), a built-in name or import string
    "package.module:attribute", or a dict `{"name": ..., **options}`. Options go to a
    built-in's factory; an imported object is used as-is, so it takes no options.
    """
    if callable(spec) or isinstance(spec, Selector):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(
            f"filter spec {spec!r}: expected a callable, a selector, a name, an import string "
            "'package.module:attribute', or a dict with a 'name' key"
        )
    options = dict(spec)
    name = options.pop("name")
    if name in _BUILTINS:
        factory = _BUILTINS[name]
        try:
            inspect.signature(factory).bind(**options)
        except TypeError as e:
            raise ValueError(
                f"filter {name!r}: {e}; expected options {inspect.signature(factory)}"
            ) from None
        return factory(**options)
    if isinstance(name, str) and ":" in name:
        if options:
            raise ValueError(
                f"filter {name!r}: got options {sorted(options)}, but an imported filter "
                "is used as-is and takes none"
            )
        return _import_filter(name)
    raise ValueError(
        f"unknown filter {name!r}; expected one of {sorted(_BUILTINS)} "
        "or an import string 'package.module:attribute'"
    )


def _import_filter(path: str) -> RowFilter | Selector:
    module_name, _, attribute = path.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"filter {path!r}: cannot import it: {e}") from None
    if not (callable(target) or isinstance(target, Selector)):
        raise ValueError(f"filter {path!r}: expected a callable or a selector, got {target!r}")
    return target


# Scoring.


def score_rollouts(
    table: pa.Table,
    filters: Sequence[RowFilter | Selector | str | dict],
    timeout_s: float = 10.0,
    processes: int = 4,
) -> pa.Table:
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
        self._pool = _FilterProcesses(self.row_filters, processes) if self.row_filters else None

    def score(self, table: pa.Table) -> pa.Table:
        """The batch with `score`, `accepted` and `filter_error` added (see `score_rollouts`)."""
        for column in REQUIRED_COLUMNS:
            if column not in table.column_names:
                raise ValueError(f"rollout batch has no {column!r} column; needs {REQUIRED_COLUMNS}")
        for column in _ADDED_COLUMNS:
            if column in table.column_names:
                raise ValueError(f"rollout batch already has a {column!r} column; score it once")
        if self._pool is None or table.num_rows == 0:
            rows = [(1.0, True, None)] * table.num_rows
        else:
            calls = zip(
                table["prompt"].to_pylist(),
                table["completion"].to_pylist(),
                table.drop_columns(["prompt", "completion"]).to_pylist(),
            )
            rows = self._pool.score_rows(list(calls), self.timeout_s)
        table = table.append_column("score", pa.array([r[0] for r in rows], pa.float64()))
        table = table.append_column("accepted", pa.array([r[1] for r in rows], pa.bool_()))
        table = table.append_column("filter_error", pa.array([r[2] for r in rows], pa.string()))
        accepted_index = table.schema.get_field_index("accepted")
        for selector in self.selectors:
            mask = pc.and_(table["accepted"], selector.select(table))
            table = table.set_column(accepted_index, "accepted", mask)
        return table

    def close(self) -> None:
        """Stop the filter processes (they also die with this process)."""
        if self._pool is not None:
            self._pool.close()


@dataclass
class _Row:
    """A row on its way through the row filters, in one filter process."""

    index: int
    args: tuple
    filter_index: int = 0
    total: float | None = None
    deadline: float = 0.0


# A filter process imports the filters' modules before its first call (math-verify
# loads sympy); on a busy node that can take a while, but not this long.
_START_LIMIT_S = 120.0


class _FilterProcesses:
    """Worker processes that run row-filter calls, one row each at a time, under a timeout.

    A thread cannot be stopped, and a call that spins in C or holds the GIL never returns
    to a watchdog in its own process; killing the worker process is the only stop that
    always works. Each worker leads its own process group, so a filter's children die
    with it, and gets SIGKILL when its parent dies. A killed worker is replaced before
    the next row.
    """

    def __init__(self, row_filters: list[RowFilter], size: int):
        self.row_filters = row_filters
        self.names = [getattr(f, "__name__", None) or getattr(f, "name", None) or repr(f) for f in row_filters]
        self.size = size
        try:
            self._payload = cloudpickle.dumps(row_filters)
        except Exception as e:
            raise ValueError(f"row filters {self.names}: cannot be pickled for a filter process: {e}") from None
        self._workers: list[_FilterProcess] = []

    def score_rows(self, rows: list[tuple], timeout_s: float) -> list[tuple[float, bool, str | None]]:
        """(score, accepted, filter_error) for each (prompt, completion, meta)."""
        results: list = [None] * len(rows)
        todo = collections.deque(_Row(i, args) for i, args in enumerate(rows))
        while len(self._workers) < min(self.size, len(rows)):
            self._workers.append(_FilterProcess(self._payload))
        busy: dict[_FilterProcess, _Row] = {}

        def call(worker: _FilterProcess, row: _Row) -> None:
            busy[worker] = row
            row.deadline = time.monotonic() + timeout_s
            try:
                worker.send(row.filter_index, row.args)
            except OSError:  # it died between calls; the next receive reports it
                pass

        def finish(worker: _FilterProcess, row: _Row, result: tuple, replace: bool = False) -> None:
            results[row.index] = result
            del busy[worker]
            if replace:
                self._workers[self._workers.index(worker)] = _FilterProcess(self._payload)

        while todo or busy:
            for worker in self._workers:
                if todo and worker.ready and worker not in busy:
                    call(worker, todo.popleft())
            waiting = [w for w in self._workers if w in busy or not w.ready]
            deadlines = [row.deadline for row in busy.values()]
            deadlines += [w.started + _START_LIMIT_S for w in waiting if not w.ready]
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
                done = self._advance(row, ok, value)
                if done is None:
                    call(worker, row)
                else:
                    finish(worker, row, done)
            now = time.monotonic()
            for worker in self._workers:
                if not worker.ready and now > worker.started + _START_LIMIT_S:
                    raise RuntimeError(f"a filter process did not start within {_START_LIMIT_S}s")
            for worker, row in list(busy.items()):
                if now >= row.deadline:
                    worker.stop()
                    error = f"{self.names[row.filter_index]}: TimeoutError: timeout after {timeout_s:g}s"
                    finish(worker, row, self._reject(row, error), replace=True)
        return results

    def _advance(self, row: _Row, ok: bool, value: Any) -> tuple[float, bool, str | None] | None:
        """Apply one filter's result; the row's final result, or None when the next filter runs."""
        name = self.names[row.filter_index]
        if not ok:
            return self._reject(row, f"{name}: {value}")
        if isinstance(value, bool):
            if not value:
                return self._reject(row, None)
        elif isinstance(value, numbers.Real):
            row.total = (row.total or 0.0) + float(value)
        else:
            return self._reject(row, f"{name}: returned {value!r}, expected a bool or a number")
        row.filter_index += 1
        if row.filter_index < len(self.row_filters):
            return None
        return (1.0 if row.total is None else row.total), True, None

    @staticmethod
    def _reject(row: _Row, error: str | None) -> tuple[float, bool, str | None]:
        """A rejected row keeps the score so far."""
        return row.total or 0.0, False, error

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []


class _FilterProcess:
    """One worker process and the socket the parent talks to it through."""

    def __init__(self, payload: bytes):
        ours, theirs = socket.socketpair()
        # The worker imports what this process can (a test module, a Ray working_dir).
        path = os.pathsep.join(os.path.abspath(p) for p in sys.path)
        command = f"from iterft_ray.verify.filters import _serve_calls; _serve_calls({theirs.fileno()})"
        self.process = subprocess.Popen(
            [sys.executable, "-c", command],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": path},
            start_new_session=True,
        )
        theirs.close()
        self.conn = mp_connection.Connection(ours.detach())
        self.conn.send_bytes(payload)
        self.started = time.monotonic()
        self.ready = False

    def receive_ready(self) -> None:
        """Take the worker's hello; it says whether the filters loaded there."""
        try:
            error = pickle.loads(self.conn.recv_bytes())
        except EOFError:
            error = f"it exited with code {self.stop()} while starting"
        if error is not None:
            raise RuntimeError(f"a filter process cannot load the filters: {error}")
        self.ready = True

    def send(self, filter_index: int, args: tuple) -> None:
        self.conn.send_bytes(pickle.dumps((filter_index, args)))

    def receive(self) -> tuple[bool, Any]:
        return pickle.loads(self.conn.recv_bytes())

    def stop(self) -> int:
        """Kill the worker and its process group; returns its exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.conn.close()
        return self.process.wait()


def _serve_calls(fd: int) -> None:
    """Main of a filter process: load the filters, then answer calls until the parent goes."""
    _die_with_parent()
    conn = mp_connection.Connection(fd)
    try:
        row_filters = cloudpickle.loads(conn.recv_bytes())
    except Exception as e:
        conn.send_bytes(pickle.dumps(f"{type(e).__name__}: {e}"))
        return
    conn.send_bytes(pickle.dumps(None))
    while True:
        try:
            filter_index, args = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        try:
            reply = (True, row_filters[filter_index](*args))
            data = pickle.dumps(reply)
        except Exception as e:
            data = pickle.dumps((False, f"{type(e).__name__}: {e}"))
        conn.send_bytes(data)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no filter outlives its actor."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl
            os._exit(1)
