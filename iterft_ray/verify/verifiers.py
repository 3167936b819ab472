"""Built-in verifiers for real tasks: math answers (math-verify) and code run against unit tests.

Both are row filters (`f(prompt, completion, meta) -> bool`) and are reached by name
through `iterft_ray.verify.filters.resolve_filter` ("math_answer", "python_tests"). Neither
enforces its own time limit: the filter processes of `score_rollouts` kill a call past
the filter timeout, which works for any code, where math-verify's SIGALRM timeouts only
work in a process's main thread (math-verify issues #50, #55). So both work from any
thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from iterft_ray.verify.sandbox import SandboxLimits, run_python
from iterft_ray.verify.verdict import Verdict


@dataclass(frozen=True)
class _MathAnswer:
    name = "math_answer"  # how errors in `filter_error` name it

    def __call__(self, prompt: str, completion: str, meta: dict) -> Verdict:
        # Imported here: sympy takes a second to load, and only processes that verify pay it.
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        if meta.get("answer") is None:
            raise ValueError("math_answer: the row has no 'answer'")
        gold = parse(f"${meta['answer']}$", parsing_timeout=None)
        extraction = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
        answer = parse(completion, extraction, parsing_timeout=None)
        # The parsed expression's text is the vote: "0.5" and "1/2" both parse to 1/2.
        return Verdict(bool(verify(gold, answer, timeout_seconds=None)), str(answer[0]) if answer else None)

    def __reduce__(self):
        # Unpickled in a filter process: load math-verify while the process starts, not
        # in the first call, which runs against the filter timeout.
        return _loaded_math_answer, ()


def _loaded_math_answer() -> _MathAnswer:
    import math_verify  # noqa: F401

    return _MathAnswer()


def math_answer() -> _MathAnswer:
    """Row filter: accept a completion whose final answer equals `meta["answer"]` mathematically.

    The completion's answer is its `\\boxed{...}` expression, else the last number or
    expression after an anchor ("the answer is ..."), else the last one in it; equality
    is math-verify's (1/2 = 0.5 = \\frac{1}{2}, 50% = 0.5, tuples and intervals,
    LaTeX). The gold answer is read as LaTeX, so "\\frac{3}{4}", "3/4" and "0.75" all work.
    """
    return _MathAnswer()


CODE_BLOCK = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class _PythonTests:
    limits: SandboxLimits
    name = "python_tests"  # how errors in `filter_error` name it

    def __call__(self, prompt: str, completion: str, meta: dict) -> bool:
        tests = meta.get("tests")
        if not isinstance(tests, str):
            raise ValueError(f"python_tests: the row's 'tests' should be Python source, got {tests!r}")
        return run_python(f"{program_of(completion)}\n\n{tests}\n", self.limits).passed


def program_of(completion: str) -> str:
    """The Python program in a completion: its last fenced code block, else all of it."""
    blocks = CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def python_tests(
    wall_s: float = 10.0,
    cpu_s: int = 10,
    memory_mb: int = 512,
    processes: int = 16,
    output_bytes: int = 65536,
    scratch_mb: int = 16,
) -> _PythonTests:
    """Row filter: run the completion's program, then `meta["tests"]`, in the sandbox; accept on exit 0.

    The program is the completion's last fenced code block (```python ... ```), or the
    whole completion. It runs with the standard library only, no network and no view of
    the host (see `iterft_ray.verify.sandbox`). A program that fails, or passes a limit, is a
    rejected row; a sandbox that cannot start (bubblewrap missing) is a filter error.
    Keep `wall_s` below the loop's `filter_timeout_s`.
    """
    try:
        limits = SandboxLimits(wall_s, cpu_s, memory_mb, processes, output_bytes, scratch_mb)
    except ValueError as e:
        raise ValueError(f"filter 'python_tests': {e}") from None
    return _PythonTests(limits)
