"""reasoning-gym as a prompt source and a verifier: its questions stream as prompts, its own `score_answer` grades
(on the answer in `<answer>` tags, or the whole completion), evaluation and training questions are disjoint, and a
bad task name or option is one line at load."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import reasoning_gym
import yaml

from iterft_ray.cli import main
from iterft_ray.config import ReasoningGymConfig, load_config
from iterft_ray.data.reasoning_gym import ReasoningGymFilter, disjoint, prompt_table
from iterft_ray.run.run_dir import check_start

TASK = {"task": "basic_arithmetic", "size": 40, "seed": 0, "options": {"max_terms": 2, "max_digits": 1}}


def test_the_filter_grades_with_the_tasks_own_score_answer_tagged_or_not():
    rows = prompt_table(ReasoningGymConfig(**TASK), "data.reasoning_gym").to_pylist()
    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=40, seed=0, max_terms=2, max_digits=1)
    grade = ReasoningGymFilter()
    for row in rows[:5]:
        entry = dataset[row["rg_index"]]
        assert row["prompt"] == entry["question"] and row["answer"] == str(entry["answer"])
        meta = {k: v for k, v in row.items() if k != "prompt"}
        tagged = grade(row["prompt"], f"Let me think. <answer> {row['answer']} </answer>", meta)
        assert (tagged.value, tagged.answer, tagged.passed) == (1.0, row["answer"], True)
        untagged = grade(row["prompt"], f"  {row['answer']}\n", meta)
        assert (untagged.value, untagged.passed) == (1.0, True)
        wrong = f"<answer>{row['answer']}1</answer>"
        verdict = grade(row["prompt"], wrong, meta)
        assert verdict.value == dataset.score_answer(f"{row['answer']}1", entry) and verdict.passed is False
    partial = ReasoningGymFilter(min_score=0.0)(rows[0]["prompt"], "<answer>?</answer>", {
        k: v for k, v in rows[0].items() if k != "prompt"})
    assert partial.passed is True  # min_score 0: every graded row passes, with its score


def test_training_drops_the_questions_its_evaluation_also_has():
    train = prompt_table(ReasoningGymConfig(**{**TASK, "seed": 0}), "data.reasoning_gym")
    heldout = prompt_table(ReasoningGymConfig(**{**TASK, "seed": 1}), "eval.reasoning_gym")
    kept, dropped = disjoint(train, [heldout])
    # Entry i comes from Random(seed + i): seed 1's entries are seed 0's shifted by one, so 39 of 40 are shared.
    assert dropped >= 39 and kept.num_rows == train.num_rows - dropped
    assert not set(kept.column("prompt").to_pylist()) & set(heldout.column("prompt").to_pylist())


def _config(tmp_path: Path, **data) -> dict:
    return {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"reasoning_gym": {**TASK, **data}},
        "eval": {"reasoning_gym": {**TASK, "size": 8, "seed": 1000}, "num_samples": 0},
        "sampling": {"num_samples": 2, "max_new_tokens": 6},
        "trainer": {"learning_rate": 1e-3, "per_device_train_batch_size": 16},
        "resources": {"num_generators": 1, "filter_pool_size": 1},
        "loop": {"rounds": 1, "prompts_per_round": 8, "warmup_passes": 0, "output_dir": str(tmp_path / "run")},
    }


@pytest.mark.parametrize("data, key", [
    ({"task": "no_such_task"}, "data.reasoning_gym.task: unknown reasoning-gym task 'no_such_task'"),
    ({"task": None, "tasks": {"chain_sum": 1, "nope": 2}, "options": {}}, "data.reasoning_gym.tasks: unknown reasoning-gym task 'nope'"),
    ({"options": {"max_termz": 2}}, "data.reasoning_gym.options: reasoning-gym refused them for basic_arithmetic"),
    ({"task": None}, "data.reasoning_gym: give task (one reasoning-gym task) or tasks"),
])
def test_a_bad_task_or_option_is_refused_at_load_naming_the_key(tmp_path, data, key):
    with pytest.raises(ValueError, match="^" + key.replace("(", r"\(").replace(")", r"\)")):
        load_config(_config(tmp_path, **data))


def test_defaults_and_exclusive_sources(tmp_path):
    config = load_config(_config(tmp_path))
    assert config.filters == [{"name": "reasoning_gym"}, {"name": "deduplicate"}] and config.data.task is None  # rft
    both = _config(tmp_path)
    both["data"]["prompts_file"] = str(tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match=r"^data.prompts_file, data.reasoning_gym: prompts come from one"):
        load_config(both)
    start = check_start(load_config(_config(tmp_path, seed=999)))  # eval seed 1000: 39 of its 40 shifted by one
    assert start.dropped_from_training >= 7 and start.prompts.num_rows == 40 - start.dropped_from_training
    with_validation = _config(tmp_path, seed=999)
    with_validation["eval"]["validation"] = {"reasoning_gym": {**TASK, "size": 8, "seed": 1010}}
    start = check_start(load_config(with_validation))  # seed 1010: training's entries 11..18 too
    validation = set(start.validation.column("prompt").to_pylist())
    assert start.dropped_from_training >= 14 and not validation & set(start.prompts.column("prompt").to_pylist())


def test_a_run_on_reasoning_gym_is_graded_by_score_answer(tmp_path, ray_up, capsys):
    """Through `iterft run`: the rows carry where their entry came from, and each row's score is what the task's
    own score_answer gives its completion."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path)))
    assert main(["run", str(path)]) == 0
    rows = pq.read_table(tmp_path / "run" / "rounds" / "0001" / "generations.parquet").to_pylist()
    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=40, seed=0, max_terms=2, max_digits=1)
    assert len(rows) == 16 and {r["rg_task"] for r in rows} == {"basic_arithmetic"}
    for row in rows:
        answer = row["completion"].strip()
        assert row["score"] == dataset.score_answer(answer, dataset[row["rg_index"]]), row
        assert row["accepted"] == (row["score"] >= 1.0)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "eval_greedy" in metrics[-1] and "eval_filter_errors" not in {k for m in metrics for k, v in m.items() if v}


def test_a_mix_of_tasks_is_drawn_and_graded_through_the_composite_data_set():
    spec = ReasoningGymConfig(tasks={"basic_arithmetic": 1, "chain_sum": 1}, size=30, seed=5,
                              options={"chain_sum": {"min_terms": 2, "max_terms": 2}})
    rows = prompt_table(spec, "data.reasoning_gym").to_pylist()
    composite = reasoning_gym.create_dataset("composite", size=30, seed=5, datasets=[
        reasoning_gym.composite.DatasetSpec("basic_arithmetic", 1.0, {}),
        reasoning_gym.composite.DatasetSpec("chain_sum", 1.0, {"min_terms": 2, "max_terms": 2})])
    sources = {composite[i]["metadata"]["source_dataset"] for i in range(30)}
    assert sources == {"basic_arithmetic", "chain_sum"}
    for row in rows[:6]:
        meta = {k: v for k, v in row.items() if k != "prompt"}
        assert row["prompt"] == composite[row["rg_index"]]["question"]
        assert ReasoningGymFilter()(row["prompt"], f"<answer>{row['answer']}</answer>", meta).value == 1.0
