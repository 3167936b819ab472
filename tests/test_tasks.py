import pickle

import pytest

from iterft_ray.data.tasks import get_task


def _pair(prompt: str) -> tuple[int, int]:
    a, b = prompt.removesuffix("=").split("+")
    return int(a), int(b)


def test_addition_has_the_requested_sizes_and_correct_answers():
    task = get_task("addition", num_train=50, num_heldout=20, num_warmup=30)

    assert task.name == "addition"
    assert (len(task.train_prompts), len(task.heldout_prompts)) == (50, 20)
    assert len(task.warmup_examples) == 30
    for row in task.train_prompts + task.heldout_prompts:
        a, b = _pair(row["prompt"])
        assert row["answer"] == str(a + b)
    for example in task.warmup_examples:
        a, b = _pair(example["prompt"])
        assert example["completion"] == str(a + b)
        assert task.check(example["completion"], str(a + b))


def test_prompt_ids_are_unique_across_splits():
    task = get_task("addition")

    ids = [row["prompt_id"] for row in task.train_prompts + task.heldout_prompts]
    assert len(ids) == len(set(ids)) == 512 + 200


def test_heldout_problems_are_never_trained_on():
    task = get_task("addition")

    heldout = {_pair(row["prompt"]) for row in task.heldout_prompts}
    train = {_pair(row["prompt"]) for row in task.train_prompts}
    warmup = {_pair(example["prompt"]) for example in task.warmup_examples}
    assert len(heldout) == 200
    assert heldout.isdisjoint(train)
    assert heldout.isdisjoint(warmup)


def test_same_seed_gives_the_same_task_and_another_seed_does_not():
    assert get_task("addition", seed=3) == get_task("addition", seed=3)
    assert get_task("addition", seed=3).train_prompts != get_task("addition", seed=4).train_prompts


def test_digits_sets_the_operand_range():
    task = get_task("addition", digits=3, num_train=300, num_heldout=0, num_warmup=0)

    operands = [n for row in task.train_prompts for n in _pair(row["prompt"])]
    assert max(operands) < 1000
    assert max(operands) >= 100


@pytest.mark.parametrize(
    "completion, correct",
    [
        ("82", True),
        ("82\n", True),
        ("  82", True),
        ("82 xyz", False),
        ("82</s>", False),
        ("820", False),
        ("8", False),
        ("81", False),
        ("", False),
        ("</s>", False),
        ("x82", False),
    ],
)
def test_check_wants_exactly_the_answer(completion, correct):
    assert get_task("addition").check(completion, "82") is correct


def test_check_survives_pickling_for_ray_actors():
    check = pickle.loads(pickle.dumps(get_task("addition").check))

    assert check("82", "82")
    assert not check("83", "82")


def test_unknown_task_names_the_known_tasks():
    with pytest.raises(ValueError, match=r"'subtraction'.*addition"):
        get_task("subtraction")


def test_misspelt_option_is_named():
    with pytest.raises(ValueError, match="digitz"):
        get_task("addition", digitz=3)


def test_too_many_problems_for_the_digits_is_an_error():
    with pytest.raises(ValueError, match="digits=1"):
        get_task("addition", digits=1)


def test_reversed_answers_are_the_sums_digits_backwards():
    from iterft_ray.data.tasks import get_task

    task = get_task("addition", reverse_answer=True, num_train=50, num_heldout=20, num_warmup=10)
    for row in task.train_prompts + task.heldout_prompts:
        a, b = map(int, row["prompt"].rstrip("=").split("+"))
        assert row["answer"] == str(a + b)[::-1]
        assert task.check(row["answer"], row["answer"])
    for example in task.warmup_examples:
        a, b = map(int, example["prompt"].rstrip("=").split("+"))
        assert example["completion"] == str(a + b)[::-1]


def test_padded_operands_give_fixed_width_prompts_and_answers():
    task = get_task("addition", digits=2, num_train=200, num_heldout=50, num_warmup=50,
                    reverse_answer=True, pad_operands=True)

    rows = task.train_prompts + task.heldout_prompts
    rows += [{"prompt": e["prompt"], "answer": e["completion"]} for e in task.warmup_examples]
    assert any(_pair(r["prompt"])[0] < 10 for r in rows)  # one-digit operands are there, padded
    for row in rows:
        a, b = _pair(row["prompt"])
        assert len(row["prompt"]) == len("37+45=")
        assert row["prompt"] == f"{a:02d}+{b:02d}="
        assert row["answer"] == f"{a + b:03d}"[::-1]  # 37+45 -> "082" -> "280"
