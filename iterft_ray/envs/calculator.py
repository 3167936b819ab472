"""`calculator`: arithmetic in a tagged call, evaluated by a parser (never `eval`); the last turn is the answer.

A turn with `<calc>EXPRESSION</calc>` gets `<result>VALUE</result>` back as a `tool` message (or
`<result>error: ...</result>`); a turn without a call is the final answer, graded against the row's
`answer` (the numbers equal, or the stripped texts). Options (`env.config`): `max_digits` (40), the
longest result it returns; `reward_correct` (1.0) and `reward_wrong` (0.0).
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction
from typing import Any

from iterft_ray.envs.protocol import StepOutput, TextEnv

CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class CalculatorEnv(TextEnv):
    """The model calls the calculator as often as it likes within `max_turns`, then answers."""

    def __init__(self, env_config: dict[str, Any] | None = None, extras: dict[str, Any] | None = None):
        super().__init__(env_config, extras)
        self.max_digits = int(self.env_config.get("max_digits", 40))
        self.calls = 0

    def step(self, action: str) -> StepOutput:
        self.turns += 1
        call = CALL.search(action)
        if call is None:
            correct = same_answer(action, self.extras.get("answer"))
            reward = self.env_config.get("reward_correct", 1.0) if correct else self.env_config.get("reward_wrong", 0.0)
            return {"observations": [], "reward": float(reward), "done": True, "metadata": {"correct": correct}}
        self.calls += 1
        try:
            result = format_number(evaluate(call.group(1), self.max_digits))
        except (ValueError, ZeroDivisionError, SyntaxError) as e:
            result = f"error: {e}"
        return {"observations": [{"role": "tool", "content": f"<result>{result}</result>"}], "reward": 0.0,
                "done": False, "metadata": {}}

    def get_metrics(self) -> dict[str, Any]:
        return {"calls": self.calls}


def evaluate(expression: str, max_digits: int = 40) -> Fraction:
    """The value of `+ - * /` and parentheses over integers and decimals, exactly; ValueError for anything else."""
    tree = ast.parse(expression.strip(), mode="eval")

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = value(node.operand)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            result = _OPERATORS[type(node.op)](value(node.left), value(node.right))
            if len(str(abs(result.numerator))) > max_digits:
                raise ValueError(f"more than {max_digits} digits")
            return result
        raise ValueError(f"unsupported expression {ast.unparse(node)!r}")

    return value(tree.body)


def format_number(value: Fraction) -> str:
    """An integer as digits; anything else as a decimal to 6 places, trailing zeros dropped."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6f}".rstrip("0").rstrip(".")


def same_answer(answer: str, expected: Any) -> bool:
    """Whether `answer` states `expected`: the same number, or the same text once stripped."""
    if expected is None:
        return False
    given, wanted = answer.strip(), str(expected).strip()
    try:
        return Fraction(given.replace(",", "")) == Fraction(wanted)
    except (ValueError, ZeroDivisionError):
        return given == wanted
