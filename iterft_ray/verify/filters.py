"""The filter vocabulary: row filters and selectors, and `resolve_filter`, which turns a spec into one.

There are two kinds of filter:

- A row filter is any callable `f(prompt, completion, meta) -> bool | float | Verdict`, where
  `meta` is the row as a dict without `prompt` and `completion`. A bool is a gate; a
  number adds to the row's score; a `Verdict` is either, with the final answer the filter
  read from the completion (what an evaluation's majority vote counts). Row filters run in worker processes, several rows at
  once, and a call past its timeout is killed with its process (`iterft_ray.verify.processes`).
- A reward model (`reward_model`, `iterft_ray.verify.reward_model`) is neither: a descriptor the
  scoring code sends whole batches to; its reward adds to the score of each row that passed the gates.
- A selector is any object with `select(table) -> pyarrow boolean array`. It sees the
  whole batch with `score` and `accepted` columns and returns the new accepted mask. All
  samples of a prompt are in one batch, so per-prompt selection (best-of-k) works.

`iterft_ray.verify.scoring` applies them to a rollout batch (`iterft_ray.data.rollouts`).
Built-ins are module-level classes, not closures, because filters travel to Ray actors
by pickle. The verifiers `math_answer` and `python_tests` live in `iterft_ray.verify.verifiers`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import numbers
import re
import types
import typing
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Union, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc

from iterft_ray.data.reasoning_gym import reasoning_gym_filter
from iterft_ray.data.tasks import get_task
from iterft_ray.verify.reward_model import RewardModel, reward_model
from iterft_ray.verify.verdict import Verdict
from iterft_ray.verify.verifiers import math_answer, python_tests

RowFilter = Callable[[str, str, dict], Union[bool, float, Verdict]]


@runtime_checkable
class Selector(Protocol):
    """A batch filter: given the scored batch, returns which rows stay accepted."""

    def select(self, table: pa.Table) -> pa.BooleanArray: ...


# Row filters.


@dataclass(frozen=True)
class _ExactAnswer:
    task: str
    check: Callable[[str, str], bool] = field(repr=False)

    def __call__(self, prompt: str, completion: str, meta: dict) -> Verdict:
        # The task's checkers compare the whole completion, stripped: that is the answer given.
        return Verdict(self.check(completion, meta["answer"]), completion.strip())


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
    seed: int | None = None

    def select(self, table: pa.Table) -> pa.BooleanArray:
        by_prompt = defaultdict(list)
        for row in _accepted_rows(table):
            by_prompt[row[1]].append(row)
        if self.seed is None:
            keep = [i for rows in by_prompt.values() for i in _best_first(rows)[: self.k]]
        else:  # ties by a hash of (seed, sample_id): the same rows win after a resume, whatever the row order
            ids = table["sample_id"].to_pylist()
            tie = {i: _unit_hash(f"{self.seed}/{ids[i]}") for rows in by_prompt.values() for i, _, _ in rows}
            keep = [i for rows in by_prompt.values()
                    for i, _, _ in sorted(rows, key=lambda row: (-row[2], tie[row[0]]))[: self.k]]
        return _mask(table.num_rows, keep)


def _unit_hash(key: str) -> int:
    """A number from `key`, the same on every machine and Python (not `hash()`)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


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


def best_of_k(k: int = 1, seed: int | None = None) -> Selector:
    """Selector (RAFT): per prompt, keep the k accepted rows with the highest score.

    Ties go to the earlier row, or, with `seed`, by a hash of the seed and the row's `sample_id` (RAFT's
    preset gives `loop.seed`: no preference for the first samples, and the same choice after a resume);
    a prompt with fewer than k accepted rows keeps them all.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"filter 'best_of_k': expected an integer k >= 1, got {k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"filter 'best_of_k': expected an integer seed, got {seed!r}")
    return _BestOfK(k, seed)


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
    "reasoning_gym": reasoning_gym_filter,
    "reward_model": reward_model,
    "deduplicate": deduplicate,
    "best_of_k": best_of_k,
    "top_fraction": top_fraction,
    "score_threshold": score_threshold,
}


def resolve_filter(spec: RowFilter | Selector | RewardModel | str | dict) -> RowFilter | Selector | RewardModel:
    """Turn a filter spec from code or YAML into a row filter or a selector.

    A spec is a callable or selector (used as-is), a built-in name or import string
    "package.module:attribute", or a dict `{"name": ..., **options}`. Options go to a
    built-in's factory; an imported object is used as-is, so it takes no options. `reward_model`
    resolves to a `RewardModel` descriptor, scored by batch, not per row (`iterft_ray.verify.reward_model`).
    """
    if callable(spec) or isinstance(spec, (Selector, RewardModel)):
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


def selects_by_score(spec: Any) -> bool:
    """Whether a resolved filter is a selector that keeps rows by their score (best_of_k, top_fraction,
    score_threshold, a user's): `deduplicate` keeps rows by their text, so a score alone still accepts them."""
    return isinstance(spec, Selector) and not isinstance(spec, _Deduplicate)


def returns_number(row_filter: RowFilter | Selector) -> bool:
    """Whether a row filter is declared to return a number (`-> float`), a score that alone accepts every row.

    Read from its return annotation (of `__call__` for a callable object); one without an annotation, or
    declared to return a bool, is not counted.
    """
    if isinstance(row_filter, Selector) or not callable(row_filter):
        return False
    plain = inspect.isfunction(row_filter) or inspect.ismethod(row_filter)
    function = row_filter if plain else type(row_filter).__call__
    try:
        returned = typing.get_type_hints(function).get("return")
    except Exception:  # an annotation naming something its module cannot resolve: not declared, then
        return False
    options = typing.get_args(returned) if typing.get_origin(returned) in (Union, types.UnionType) else (returned,)
    return any(t in (int, float) for t in options) and bool not in options


def _import_filter(path: str) -> RowFilter | Selector:
    module_name, _, attribute = path.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"filter {path!r}: cannot import it: {e}") from None
    if not (callable(target) or isinstance(target, Selector)):
        raise ValueError(f"filter {path!r}: expected a callable or a selector, got {target!r}")
    return target
