"""`Verdict`: what a row filter may return instead of a bool or a number, to say which answer it read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """A row filter's result (`value`: a bool gate or a number added to the score) with the final answer it
    extracted from the completion (`answer`), e.g. math_answer's parsed expression.

    The answer is kept in the scored batch's `final_answer` column, for rejected rows too: majority voting
    (an evaluation's maj@n) counts the answers a model gave, right or wrong.
    """

    value: bool | float
    answer: str | None = None
    # With a number: whether the row passes too (a score that also gates, as the reasoning_gym filter's
    # `min_score`); None: the number only adds to the score.
    passed: bool | None = None
