"""math_answer: math-verify's equality, from any thread, stopped by the filter timeout when sympy hangs."""

import threading

import pyarrow as pa
import pytest

from iterft_ray.verify.filters import resolve_filter
from iterft_ray.verify.scoring import score_rollouts

CASES = [
    # (gold answer, completion, accepted)
    ("\\frac{1}{2}", "So the answer is $\\boxed{\\frac{1}{2}}$.", True),
    ("1/2", "The answer is 0.5", True),
    ("0.75", "We get \\boxed{\\frac{3}{4}}", True),
    ("\\frac{2}{3}", "so \\boxed{0.6}", False),
    ("\\sqrt{2}/2", "\\boxed{\\frac{1}{\\sqrt{2}}}", True),
    ("50\\%", "The discount is 50%.", True),
    ("0.5", "that is \\boxed{50\\%}", True),
    ("40\\%", "The discount is 50%.", False),
    ("(1, 2)", "The point is \\boxed{(1, 2)}", True),
    ("(1, 2)", "The point is \\boxed{(2, 1)}", False),
    ("72", "She sold 48/2 = 24 clips in May, so 48 + 24 = 72 in total. #### 72", True),
    ("72", "First 70, then 71, finally 73", False),
    ("3", "try 2, then \\boxed{3}, check 5", True),
    ("5", "I do not know.", False),
]


def _math_rollouts(cases) -> pa.Table:
    return pa.table(
        {
            "prompt_id": list(range(len(cases))),
            "prompt": ["Solve it."] * len(cases),
            "completion": [c for _, c, _ in cases],
            "answer": [a for a, _, _ in cases],
        }
    )


def test_math_answer_accepts_equal_answers_in_any_notation():
    scored = score_rollouts(_math_rollouts(CASES), ["math_answer"], timeout_s=60)

    assert scored["accepted"].to_pylist() == [ok for _, _, ok in CASES]
    assert scored["filter_error"].to_pylist() == [None] * len(CASES)
    # The answer read from each completion, right or wrong: what a majority vote counts.
    answers = scored["final_answer"].to_pylist()
    assert answers[:4] == ["1/2", "0.500000000000000", "3/4", "0.600000000000000"]


def test_math_answer_works_outside_the_main_thread():
    check = resolve_filter({"name": "math_answer"})
    results, errors = [], []

    def verify_all():
        try:
            results.extend(check("", completion, {"answer": gold}) for gold, completion, _ in CASES)
        except Exception as e:  # recorded for the assert below
            errors.append(e)

    thread = threading.Thread(target=verify_all)
    thread.start()
    thread.join()

    assert errors == []
    assert [r.value for r in results] == [ok for _, _, ok in CASES]


def test_a_hanging_math_answer_is_stopped_by_the_filter_timeout():
    # sympy evaluates 9^(9^(9^9)) in one C call that never releases the GIL.
    cases = [("5", "\\boxed{5}", True), ("5", "\\boxed{9^{9^{9^{9}}}}", False), ("7", "\\boxed{7}", True)]

    scored = score_rollouts(_math_rollouts(cases), ["math_answer"], timeout_s=5, processes=2)

    assert scored["accepted"].to_pylist() == [True, False, True]
    assert scored["filter_error"].to_pylist() == [None, "math_answer: TimeoutError: timeout after 5s", None]


def test_math_answer_without_an_answer_is_an_error_naming_it():
    check = resolve_filter("math_answer")

    with pytest.raises(ValueError, match="math_answer.*'answer'"):
        check("", "\\boxed{1}", {})
