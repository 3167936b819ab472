"""The pass-rate record of a run's prompts, and the curriculum that sets prompts aside by it.

Per prompt (keyed by `str(prompt_id)`): samples generated (`attempts`), samples accepted,
the last round it was drawn in, how many consecutive rounds it was solved in (every sample
accepted), and samples generated since it last came back (`tries`). It is updated from the
filters' per-prompt counts (`iterft_ray.data.rollouts.summarize`), never from rows, counting the
plain samples only: a hinted one (STaR) says what the model does with the answer given.

`curriculum.solved_rounds`: a prompt solved in that many consecutive rounds of its own is set
aside; `curriculum.max_attempts`: one never accepted after that many tries is set aside.
The prompt cursor skips set-aside prompts (`training_part`), like held-out ones, for the rest
of the epoch the prompt was last drawn in. With `curriculum.bring_back` it comes back when the
cursor reaches a later epoch, its streak and tries reset; without it, it stays aside for the run.
The record is small JSON (`state`), kept in each checkpoint's loop state.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from iterft_ray.config import CurriculumConfig

ATTEMPTS, ACCEPTED, LAST_ROUND, STREAK, TRIES = range(5)


class PassRecord:
    """Per-prompt attempts, accepted, last round (see the module docstring), and the prompts set aside by it."""

    def __init__(self, config: CurriculumConfig):
        self.config = config
        self.prompts: dict[str, list[int]] = {}  # str(prompt_id) -> [attempts, accepted, last_round, streak, tries]
        self.set_aside: dict[str, int] = {}  # str(prompt_id) -> the epoch it was set aside in
        self.drawn: dict[str, int] = {}  # str(prompt_id) -> the epoch the cursor last handed it out in
        self.brought_back = 0

    @property
    def active(self) -> bool:
        """Whether a rule can set prompts aside (else the cursor need not ask)."""
        return self.config.solved_rounds is not None or self.config.max_attempts is not None

    def update(self, round_number: int, counts: dict[Any, list[int]]) -> list[str]:
        """Add a round's per-prompt [generated, accepted] counts; returns the prompts set aside now (each for the
        rest of the epoch it was drawn in)."""
        aside = []
        for pid, (generated, accepted) in counts.items():
            key = str(pid)
            entry = self.prompts.setdefault(key, [0, 0, 0, 0, 0])
            entry[ATTEMPTS] += generated
            entry[ACCEPTED] += accepted
            entry[LAST_ROUND] = round_number
            entry[STREAK] = entry[STREAK] + 1 if generated and accepted == generated else 0
            entry[TRIES] += generated
            if key not in self.set_aside and self._set_aside_now(entry):
                self.set_aside[key] = self.drawn.get(key, 0)
                aside.append(key)
        return aside

    def _set_aside_now(self, entry: list[int]) -> bool:
        solved, attempts = self.config.solved_rounds, self.config.max_attempts
        return ((solved is not None and entry[STREAK] >= solved)
                or (attempts is not None and entry[ACCEPTED] == 0 and entry[TRIES] >= attempts))

    def training_part(self, table: pa.Table, start: int, num_rows: int) -> pa.Table:
        """The rows of cursor positions [start, start + len) that are not set aside; with bring_back, rows of a
        later epoch than their prompt's setting aside bring it back (and are kept). Notes each kept row's epoch."""
        keep = []
        for offset, pid in enumerate(table.column("prompt_id").to_pylist()):
            key, epoch = str(pid), (start + offset) // num_rows
            aside = self.set_aside.get(key)
            if aside is not None and self.config.bring_back and epoch > aside:
                del self.set_aside[key]
                self.prompts[key][STREAK] = self.prompts[key][TRIES] = 0
                self.brought_back += 1
                aside = None
            if aside is None:
                self.drawn[key] = epoch
            keep.append(aside is None)
        return table.filter(pa.array(keep, pa.bool_()))

    def state(self) -> dict[str, Any]:
        """The record as JSON for a checkpoint's loop state."""
        return {"prompts": self.prompts, "set_aside": self.set_aside, "drawn": self.drawn,
                "brought_back": self.brought_back}

    def restore(self, state: dict[str, Any] | None) -> None:
        """Go back to a `state()` (a checkpoint from before the record: an empty one)."""
        state = state or {}
        self.prompts = {k: list(v) for k, v in state.get("prompts", {}).items()}
        self.set_aside = dict(state.get("set_aside", {}))
        self.drawn = dict(state.get("drawn", {}))
        self.brought_back = state.get("brought_back", 0)
