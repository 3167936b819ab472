"""Built-in verifiable tasks: prompts with known answers and a checker, for demos and tests.

A task knows nothing of models or Ray: it is lists of dicts plus a `check` function.
Each task module provides `build_splits(**options)` and `check(completion, answer)`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from iterft_ray.data.tasks import addition, multiplication

_TASKS = {"addition": addition, "multiplication": multiplication}


@dataclass(frozen=True)
class Task:
    """A verifiable task: train and held-out prompts with answers, warm-up examples, a checker.

    Prompt rows are `{"prompt_id", "prompt", "answer"}` with ids unique across both splits;
    warm-up examples are `{"prompt", "completion"}`, or `{"messages": [...]}` conversations (a tool's protocol). No held-out problem appears in the
    train prompts or the warm-up examples, so held-out accuracy measures generalisation.
    `check` is a module-level function, so it pickles by reference to Ray actors.
    """

    name: str
    train_prompts: list[dict]
    heldout_prompts: list[dict]
    warmup_examples: list[dict]
    check: Callable[[str, str], bool]
    # Prompts to select on (the rollback gate, the best checkpoint), apart from the held-out ones reported.
    validation_prompts: list[dict] = field(default_factory=list)


def get_task(name: str, **options) -> Task:
    """Build a built-in task by name, e.g. `get_task("addition", digits=3)`.

    Options are checked against the task's `build_splits` signature, so a misspelt option
    is a ValueError naming it rather than being ignored.
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(_TASKS)}")
    module = _TASKS[name]
    try:
        inspect.signature(module.build_splits).bind(**options)
    except TypeError as e:
        raise ValueError(
            f"task {name!r}: {e}; expected options {inspect.signature(module.build_splits)}"
        ) from None
    train, heldout, warmup, *validation = module.build_splits(**options)  # validation: the tasks that have one
    return Task(name, train, heldout, warmup, module.check, *validation)
