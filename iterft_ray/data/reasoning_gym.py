"""reasoning-gym's procedural tasks as a prompt source, and its own verifiers as the `reasoning_gym` filter.

reasoning-gym (PyPI `reasoning-gym`, pure Python, offline) generates each task's entries from a seed
(entry i from `Random(seed + i)`), each with its question, its answer and task-specific metadata, and
grades an answer with the task's own `score_answer(answer, entry)`. A row carries where its entry came
from (`rg_task`, `rg_seed`, `rg_index`, with the data set's `rg_size` and `rg_options`), and the filter
regenerates the entry from them when it grades: the metadata differs by task and need not travel.

Splits drawn with nearby seeds share entries (seed 0's entry 1 is seed 1's entry 0), and small tasks
repeat questions at any seed: `disjoint` drops from training every question an evaluation or validation
split also has, compared as normalised text.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from iterft_ray.config import ReasoningGymConfig
from iterft_ray.verify.verdict import Verdict

COMPOSITE = "composite"


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise ValueError("reasoning-gym is not installed: pip install 'iterft_ray[reasoning_gym]' "
                         "(or pip install reasoning-gym)") from None
    return reasoning_gym


def create(spec: ReasoningGymConfig, key: str):
    """The reasoning-gym data set `spec` describes; a bad task name or option is a ValueError naming `key`."""
    rg = _reasoning_gym()
    from reasoning_gym.factory import DATASETS

    names = [spec.task] if spec.task is not None else list(spec.tasks)
    for name in names:
        if name not in DATASETS:
            raise ValueError(f"{key}.{'task' if spec.task else 'tasks'}: unknown reasoning-gym task {name!r} "
                             f"(expected one of its {len(DATASETS)} tasks, e.g. {', '.join(sorted(DATASETS)[:5])})")
    task, options = _dataset_arguments(spec)
    try:
        return rg.create_dataset(task, size=spec.size, seed=spec.seed, **options)
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"{key}.options: reasoning-gym refused them for {', '.join(names)}: "
                         f"{' '.join(str(e).split()) or type(e).__name__}") from None


def _dataset_arguments(spec: ReasoningGymConfig) -> tuple[str, dict[str, Any]]:
    """(task, keyword options) for `reasoning_gym.create_dataset`: a mix goes through its composite data set,
    each task with its weight and its own options (`options: {NAME: {...}}`)."""
    if spec.task is not None:
        return spec.task, dict(spec.options)
    from reasoning_gym.composite import DatasetSpec

    return COMPOSITE, {"datasets": [DatasetSpec(name, float(weight), dict(spec.options.get(name, {})))
                                    for name, weight in spec.tasks.items()]}


def prompt_table(spec: ReasoningGymConfig, key: str) -> pa.Table:
    """The data set's entries as prompt rows: `prompt` (the question), `answer`, where the entry came from
    (`rg_task`, `rg_seed`, `rg_index`, `rg_size`, `rg_options`) and `prompt_id` (the index)."""
    dataset = create(spec, key)
    task = spec.task if spec.task is not None else COMPOSITE
    options = json.dumps(spec.options if spec.task is not None else {"tasks": spec.tasks, "options": spec.options},
                         sort_keys=True)
    rows = []
    for index in range(spec.size):
        entry = dataset[index]
        rows.append({"prompt": entry["question"], "answer": str(entry["answer"]), "rg_task": task,
                     "rg_seed": spec.seed, "rg_index": index, "rg_size": spec.size, "rg_options": options,
                     "prompt_id": index})
    return pa.Table.from_pylist(rows)


def normalised(question: str) -> str:
    """A question as compared across splits: lower case, runs of white space as one space."""
    return re.sub(r"\s+", " ", question).strip().lower()


def disjoint(train: pa.Table, others: list[pa.Table]) -> tuple[pa.Table, int]:
    """`train` without the rows whose question one of `others` (evaluation, validation) also has, and how many
    rows that dropped."""
    seen = {normalised(q) for table in others if table is not None for q in table.column("prompt").to_pylist()}
    keep = [normalised(q) not in seen for q in train.column("prompt").to_pylist()]
    return train.filter(pa.array(keep, pa.bool_())), keep.count(False)


@functools.lru_cache(maxsize=8)
def _dataset_of(task: str, seed: int, size: int, options: str):
    """The data set a row came from, built once per filter process."""
    opened = json.loads(options)
    if task == COMPOSITE:
        spec = ReasoningGymConfig(tasks=opened["tasks"], options=opened["options"], size=size, seed=seed)
    else:
        spec = ReasoningGymConfig(task=task, options=opened, size=size, seed=seed)
    return create(spec, "data.reasoning_gym")


def extract_answer(completion: str) -> str:
    """The answer reasoning-gym's `extract_answer` finds (the last `<answer>...</answer>`), else the whole
    completion, stripped."""
    from reasoning_gym.utils import extract_answer as tagged

    found = tagged(completion)
    return found if found is not None else completion.strip()


@dataclass(frozen=True)
class ReasoningGymFilter:
    """The `reasoning_gym` filter: the task's own `score_answer` on the extracted answer is the row's score, and
    the row passes at `min_score` or more."""

    min_score: float = 1.0

    def __call__(self, prompt: str, completion: str, meta: dict) -> Verdict:
        missing = [c for c in ("rg_task", "rg_seed", "rg_index", "rg_size", "rg_options") if meta.get(c) is None]
        if missing:
            raise ValueError(f"the row has no {', '.join(missing)}: reasoning_gym grades rows of data.reasoning_gym "
                             "(or eval.reasoning_gym)")
        dataset = _dataset_of(meta["rg_task"], int(meta["rg_seed"]), int(meta["rg_size"]), meta["rg_options"])
        answer = extract_answer(completion)
        score = float(dataset.score_answer(answer, dataset[int(meta["rg_index"])]))
        return Verdict(score, answer, passed=score >= self.min_score)


def reasoning_gym_filter(min_score: float = 1.0) -> ReasoningGymFilter:
    """Row filter: grade a completion with its reasoning-gym task's own `score_answer`, on the answer in its
    last `<answer>` tags (the whole completion, stripped, without them). The score is the row's; it passes at
    `min_score` (default 1.0: a fully right answer), as `env.min_score` gates an environment's reward."""
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)):
        raise ValueError(f"filter 'reasoning_gym': min_score: expected a number, got {min_score!r}")
    _reasoning_gym()
    return ReasoningGymFilter(float(min_score))
