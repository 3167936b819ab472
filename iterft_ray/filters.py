"""Filters that score and select rollouts: the "keep the ones a verifier likes" step of a round.

A rollout batch is a `pyarrow.Table`, one row per sample, with at least `prompt_id`,
`prompt` and `completion` (generators add `sample_id`, `answer`, ...). `score_rollouts`
adds `score`, `accepted` and `filter_error` and keeps every row, so rejected samples can
still be logged.

There are two kinds of filter:

- A row filter is any callable `f(prompt, completion, meta) -> bool | float`, where
  `meta` is the row as a dict without `prompt` and `completion`. A bool is a gate; a
  number adds to the row's score.
- A selector is any object with `select(table) -> pyarrow boolean array`. It sees the
  whole batch with `score` and `accepted` columns and returns the new accepted mask. All
  samples of a prompt are in one batch, so per-prompt selection (best-of-k) works.

Built-ins are module-level classes, not closures, because filters travel to Ray actors
by pickle.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import queue
import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, Union, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc

from iterft_ray.tasks import get_task

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


class _FilterThread:
    """Runs row-filter calls one at a time on a daemon thread, with a timeout per call.

    Python cannot stop a thread, so on a timeout the stuck call is abandoned to its thread
    (which exits if the call ever returns) and later calls go to a fresh thread.
    """

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        args = (self._calls, self._results)
        threading.Thread(target=_serve, args=args, daemon=True, name="iterft-filter").start()

    def call(self, fn: Callable, args: tuple, timeout_s: float) -> Any:
        self._calls.put((fn, args))
        try:
            ok, value = self._results.get(timeout=timeout_s)
        except queue.Empty:
            self.close()
            self._start()
            raise TimeoutError(f"timeout after {timeout_s}s") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._calls.put(None)


def _serve(calls: queue.SimpleQueue, results: queue.SimpleQueue) -> None:
    while (call := calls.get()) is not None:
        fn, args = call
        try:
            results.put((True, fn(*args)))
        except BaseException as e:  # re-raised in the caller's thread
            results.put((False, e))


def score_rollouts(
    table: pa.Table, filters: Sequence[RowFilter | Selector | str | dict], timeout_s: float = 10.0
) -> pa.Table:
    """Score a rollout batch: add `score` (float64), `accepted` (bool) and `filter_error` (string).

    Row filters run first, in order, and a row stops at its first rejection. A bool
    result is a gate; numbers add up to the score; with no number, the score is 1.0 if
    every gate passed, else 0.0. A row filter that raises or runs past `timeout_s`
    rejects only that row, with the error in `filter_error`. Selectors then run in order
    and can only narrow `accepted`. Rejected rows stay in the table.
    """
    for column in REQUIRED_COLUMNS:
        if column not in table.column_names:
            raise ValueError(f"rollout batch has no {column!r} column; needs {REQUIRED_COLUMNS}")
    for column in _ADDED_COLUMNS:
        if column in table.column_names:
            raise ValueError(f"rollout batch already has a {column!r} column; score it once")
    resolved = [resolve_filter(spec) for spec in filters]
    is_selector = [isinstance(f, Selector) for f in resolved]
    if is_selector != sorted(is_selector):
        raise ValueError(f"row filters must come before selectors, got {resolved}")
    row_filters = [f for f, sel in zip(resolved, is_selector) if not sel]
    selectors = [f for f, sel in zip(resolved, is_selector) if sel]

    rows = _score_rows(table, row_filters, timeout_s)
    table = table.append_column("score", pa.array([r[0] for r in rows], pa.float64()))
    table = table.append_column("accepted", pa.array([r[1] for r in rows], pa.bool_()))
    table = table.append_column("filter_error", pa.array([r[2] for r in rows], pa.string()))
    accepted_index = table.schema.get_field_index("accepted")
    for selector in selectors:
        mask = pc.and_(table["accepted"], selector.select(table))
        table = table.set_column(accepted_index, "accepted", mask)
    return table


def _score_rows(
    table: pa.Table, row_filters: list[RowFilter], timeout_s: float
) -> list[tuple[float, bool, str | None]]:
    """(score, accepted, filter_error) for each row."""
    if not row_filters:
        return [(1.0, True, None)] * table.num_rows
    prompts = table["prompt"].to_pylist()
    completions = table["completion"].to_pylist()
    metas = table.drop_columns(["prompt", "completion"]).to_pylist()
    worker = _FilterThread()
    try:
        return [
            _score_row(worker, row_filters, (prompt, completion, meta), timeout_s)
            for prompt, completion, meta in zip(prompts, completions, metas)
        ]
    finally:
        worker.close()


def _score_row(
    worker: _FilterThread, row_filters: list[RowFilter], args: tuple, timeout_s: float
) -> tuple[float, bool, str | None]:
    """(score, accepted, filter_error) for one row; a rejected row keeps the score so far."""
    total = None
    for f in row_filters:
        name = getattr(f, "__name__", None) or repr(f)
        try:
            value = worker.call(f, args, timeout_s)
        except Exception as e:
            return total or 0.0, False, f"{name}: {type(e).__name__}: {e}"
        if isinstance(value, bool):
            if not value:
                return total or 0.0, False, None
        elif isinstance(value, numbers.Real):
            total = (total or 0.0) + float(value)
        else:
            return total or 0.0, False, f"{name}: returned {value!r}, expected a bool or a number"
    return (1.0 if total is None else total), True, None
