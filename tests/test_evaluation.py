"""Evaluation (eval: section, `iterft eval`), the best checkpoint and its rollback gate, final/, the accepted/ ledger."""

import itertools
import json
import math
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from iterft_ray.cli import main
from iterft_ray.config import load_config
from iterft_ray.run.evaluation import eval_metrics, pass_at_k
from iterft_ray.run.loop import IterativeLoop
from iterft_ray.run.records import plotted_metrics

# The module's trainers reuse its earlier trainers' actors (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("warm_actors")


def test_pass_at_k_is_the_chance_that_k_of_n_samples_hold_a_pass():
    for n, c in [(5, 0), (5, 1), (5, 3), (6, 6), (4, 2)]:
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            assert math.isclose(pass_at_k(n, c, k), sum(any(s) for s in subsets) / len(subsets)), (n, c, k)


def test_eval_metrics_greedy_pass_at_k_and_majority_vote():
    rows = [  # prompt, mode, accepted, final_answer, score
        (1, "greedy", True, "7", 1.0), (2, "greedy", False, "3", 0.0),
        (1, "sampled", True, "7", 1.0), (1, "sampled", False, "8", 0.0), (1, "sampled", True, "7", 1.0),
        # prompt 2: the wrong "3" wins the vote 2 to 1 although one sample is right
        (2, "sampled", False, "3", 0.0), (2, "sampled", True, "5", 1.0), (2, "sampled", False, "3", 0.0),
    ]
    table = pa.table({name: [r[i] for r in rows] for i, name in
                      enumerate(["prompt_id", "eval_mode", "accepted", "final_answer", "score"])})
    table = table.append_column("filter_error", pa.array([None] * len(rows), pa.string()))
    metrics = eval_metrics(table, 3)
    assert metrics["eval_filter_errors"] == 0 and "eval_first_filter_error" not in metrics
    assert metrics["eval_greedy"] == 0.5
    assert math.isclose(metrics["eval_pass@1"], (2 / 3 + 1 / 3) / 2)
    assert metrics["eval_pass@3"] == 1.0
    assert metrics["eval_maj@3"] == 0.5
    assert math.isclose(metrics["eval_score_mean"], 3 / 6)
    no_answers = table.set_column(3, "final_answer", pa.nulls(len(rows), pa.string()))
    assert "eval_maj@3" not in eval_metrics(no_answers, 3)  # a vote needs answers a filter read
    failed = table.set_column(5, "filter_error", pa.array([None, "checker: timed out"] + [None] * 6, pa.string()))
    assert eval_metrics(failed, 3)["eval_filter_errors"] == 1
    assert eval_metrics(failed, 3)["eval_first_filter_error"] == "checker: timed out"


def _write_jsonl(path: Path, first_id: int, count: int) -> Path:
    path.write_text("".join(json.dumps({"prompt_id": first_id + i, "prompt": f"What is {i} + {i}?",
                                        "answer": str(2 * i)}) + "\n" for i in range(count)))
    return path


def _config(tmp_path: Path, **sections) -> dict:
    config = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"prompts_file": str(_write_jsonl(tmp_path / "train.jsonl", 0, 32))},
        "filters": [{"name": "length_bounds", "min_chars": 1}],
        "sampling": {"num_samples": 2, "max_new_tokens": 6},
        "trainer": {"learning_rate": 3e-3, "per_device_train_batch_size": 16, "optim": "adamw_torch"},
        "resources": {"num_generators": 1, "filter_pool_size": 1},
        "loop": {"rounds": 2, "prompts_per_round": 8, "save_every": 1, "eval_every": 1,
                 "output_dir": str(tmp_path / "run")},
        "eval": {"prompts_file": str(_write_jsonl(tmp_path / "eval.jsonl", 1000, 6)), "filters": ["math_answer"],
                 "num_samples": 3},
    }
    for name, values in sections.items():
        config[name].update(values)
    return config


def test_a_run_on_a_prompts_file_evaluates_every_round_and_iterft_eval_reproduces_a_checkpoint(
        tmp_path, ray_up, capsys):
    loop = IterativeLoop(_config(tmp_path))
    try:
        loop.run()
    finally:
        loop.shutdown()
    run = tmp_path / "run"
    console = capsys.readouterr().out
    assert "evaluation before round 1: greedy" in console and console.count("| eval greedy") == 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert {"eval_greedy", "eval_pass@1", "eval_pass@2", "eval_pass@3", "eval_score_mean"} <= set(m)
        assert m["heldout_accuracy"] == m["eval_greedy"]
    assert {"eval_greedy", "eval_pass@*"} <= set(plotted_metrics(metrics))

    eval_prompts = {f"What is {i} + {i}?" for i in range(6)} - {f"What is {i} + {i}?" for i in range(32)}
    eval_ids = set(range(1000, 1006))
    for r in (0, 1, 2):
        rows = pq.read_table(run / "eval" / f"{r:04d}.parquet")
        modes = rows["eval_mode"].to_pylist()
        assert modes.count("greedy") == 6 and modes.count("sampled") == 18
        assert set(rows["prompt_id"].to_pylist()) == eval_ids
        if any(a is not None for a in rows["final_answer"].to_pylist()):
            assert "eval_maj@3" in metrics[r]
    # Evaluation prompts never reach the trainer: they are in no round's rollouts and no ledger row.
    for r in (1, 2):
        trained = pq.read_table(run / "rounds" / f"{r:04d}" / "generations.parquet")
        assert not set(trained["prompt_id"].to_pylist()) & eval_ids
        assert not set(trained["prompt"].to_pylist()) & eval_prompts

    # The ledger: one dataset of every round's accepted rows, with provenance; its trained rows are those trained.
    ledger = datasets.load_dataset("parquet", data_dir=str(run / "accepted"), split="train")
    assert ledger.num_rows == sum(m["accepted"] for m in metrics[1:])
    assert {"round", "weight_version", "generator_id", "sampling_seed", "filters", "score", "trained",
            "prompt_ids", "completion_ids"} <= set(ledger.column_names)
    assert json.loads(ledger[0]["filters"]) == [{"name": "length_bounds", "min_chars": 1}, {"name": "deduplicate"}]
    for r in (1, 2):
        generations = pq.read_table(run / "rounds" / f"{r:04d}" / "generations.parquet").to_pylist()
        expected = {g["sample_id"] for g in generations if g["accepted"] and g["completion_ids"]}
        mine = [row for row in ledger if row["round"] == r]
        assert {row["sample_id"] for row in mine if row["trained"]} == expected
        assert sum(len(row["completion_ids"]) for row in mine if row["trained"]) == metrics[r]["num_target_tokens"]
        assert {row["sampling_seed"] for row in mine} == {g["sampling_seed"] for g in generations}

    assert main(["eval", str(run), "--checkpoint", str(run / "checkpoints" / "round-0002")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval_greedy"] == metrics[2]["eval_greedy"]
    assert result["eval_pass@3"] == metrics[2]["eval_pass@3"]
    again, recorded = (pq.read_table(p) for p in (run / "eval" / "round-0002.parquet", run / "eval" / "0002.parquet"))
    assert again["completion"].to_pylist() == recorded["completion"].to_pylist()
    assert (run / "final" / "model.safetensors").is_file()


def _validation(tmp_path: Path) -> dict:
    return {"prompts_file": str(_write_jsonl(tmp_path / "validation.jsonl", 2000, 4))}


def test_a_drop_past_eval_rollback_drop_restores_the_best_checkpoint(tmp_path, ray_up, capsys):
    config = _config(tmp_path, eval={"filters": ["toy_filters:only_version_zero"], "num_samples": 0,
                                     "rollback_drop": 0.5, "final_model": "best", "validation": _validation(tmp_path)})
    loop = IterativeLoop(config)
    try:
        untrained = loop.rl.trainer.checksum()
        stats = loop.run()
        assert loop.rollbacks == 2
        assert loop.rl.trainer.checksum() == untrained  # the best (round 0) weights, restored
        assert loop.rl.version > max(s["weight_version"] for s in stats)  # a restore is a new version
    finally:
        loop.shutdown()
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["val_greedy"] == 1.0 and [m["val_greedy"] for m in metrics[1:]] == [0.0, 0.0]
    assert [m["eval_greedy"] for m in metrics] == [1.0, 0.0, 0.0]  # the test split, beside it
    assert [m.get("rolled_back_to") for m in metrics[1:]] == [0, 0]
    assert (run / "eval" / "validation" / "0001.parquet").is_file() and (run / "eval" / "0001.parquet").is_file()
    assert "rolling back to" in capsys.readouterr().out
    best = load_file(str(run / "checkpoints" / "round-0000" / "model.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    assert best.keys() == final.keys() and all((best[k] == final[k]).all() for k in best)
    state = json.loads((run / "checkpoints" / "round-0002" / "training_state.json").read_text())["extra"]
    assert state["rollbacks"] == 2 and (state["best"]["round"], state["best"]["value"]) == (0, 1.0)
    assert loop.final_evaluation["eval_greedy"] == 1.0  # final/ holds the best weights, evaluated at 1.0


def test_selection_reads_the_validation_split_only(tmp_path, ray_up):
    """The test split falls (1.0 -> 0.0) while the validation split holds: no rollback, the best stays where the
    validation metric put it."""
    config = _config(tmp_path, eval={"filters": ["toy_filters:test_split_only_version_zero"], "num_samples": 0,
                                     "rollback_drop": 0.5, "final_model": "best", "validation": _validation(tmp_path)})
    loop = IterativeLoop(config)
    try:
        stats = loop.run()
    finally:
        loop.shutdown()
    assert [s["eval_greedy"] for s in stats] == [0.0, 0.0] and [s["val_greedy"] for s in stats] == [1.0, 1.0]
    assert loop.rollbacks == 0 and all("rolled_back_to" not in s for s in stats)
    assert loop.best["round"] == 0 and loop.best["value"] == 1.0 and "eval_greedy" in loop.best["eval"]


def test_selection_without_a_validation_split_is_refused_at_load(tmp_path):
    from iterft_ray.run.run_dir import check_start

    for eval_keys, named in (({"rollback_drop": 0.1}, "eval.rollback_drop"),
                             ({"final_model": "best"}, "eval.final_model: best")):
        with pytest.raises(ValueError, match=rf"^eval.validation: {named} selects on a validation split"):
            check_start(load_config(_config(tmp_path, eval=eval_keys)))
    with pytest.raises(ValueError, match=r"^eval.best_metric: expected one of .*never the test split"):
        load_config(_config(tmp_path, eval={"best_metric": "eval_greedy"}))
    with pytest.raises(ValueError, match=r"^eval.validation: expected one of prompts_file, dataset, fraction"):
        load_config(_config(tmp_path, eval={"validation": {}}))


def test_a_validation_fraction_is_a_band_of_its_own_that_rounds_skip(tmp_path):
    from iterft_ray.run.evaluation import held_out_rule
    from iterft_ray.run.run_dir import check_start

    config = load_config(_config(tmp_path, data={"prompts_file": str(_write_jsonl(tmp_path / "big.jsonl", 0, 400))},
                                 eval={"prompts_file": None, "heldout_fraction": 0.2, "validation": {"fraction": 0.2}}))
    start = check_start(config)
    test, validation = set(start.heldout["prompt_id"].to_pylist()), set(start.validation["prompt_id"].to_pylist())
    assert not test & validation and 40 < len(test) < 120 and 40 < len(validation) < 120
    rule = held_out_rule(config)
    trained = [pid for pid, out in zip(range(400), rule.mask(list(range(400)))) if not out]
    assert not set(trained) & (test | validation) and len(trained) + len(test) + len(validation) == 400


def test_eval_config_errors_name_the_key(tmp_path):
    from iterft_ray.config import load_config

    with pytest.raises(ValueError, match=r"eval.best_metric: expected one of .*val_pass@2"):
        load_config(_config(tmp_path, eval={"num_samples": 2, "best_metric": "val_pass@5"}))
    with pytest.raises(ValueError, match="eval.final_model"):
        load_config(_config(tmp_path, eval={"final_model": "first"}))
    with pytest.raises(ValueError, match=r"eval.rollback_drop: expected a number >= 0"):
        load_config(_config(tmp_path, eval={"rollback_drop": -1}))
    with pytest.raises(ValueError, match=r"eval.filters\[0\]: unknown filter"):
        load_config(_config(tmp_path, eval={"filters": ["nope"]}))


def test_heldout_fraction_sets_prompts_aside_that_no_round_takes(tmp_path, ray_up):
    from iterft_ray.data.prompt_stream import open_prompts
    from iterft_ray.data.prompts import PromptFile
    from iterft_ray.run.evaluation import held_out_rule
    from iterft_ray.run.run_dir import check_start
    from iterft_ray.config import load_config

    config = load_config(_config(tmp_path, eval={"prompts_file": None, "heldout_fraction": 0.25, "max_prompts": 5}))
    start = check_start(config)
    held = start.heldout["prompt_id"].to_pylist()
    rule = held_out_rule(config)
    everything = PromptFile(config.data.prompts_file).read_shard(0)["prompt_id"].to_pylist()
    all_held = [pid for pid, h in zip(everything, rule.mask(everything)) if h]
    assert len(held) == 5 and held == all_held[:5] and 0 < len(all_held) < len(everything)
    for source in (start.prompts, PromptFile(config.data.prompts_file).read_shard(0)):  # streamed, and a table
        cursor = open_prompts(source, 0, rule)
        try:
            taken = [pid for _ in range(10) for pid in cursor.next_rows(5)["prompt_id"].to_pylist()]
        finally:
            cursor.close()
        trainable = len(everything) - len(all_held)
        assert not set(taken) & set(all_held)
        assert sorted(taken[:trainable]) == sorted(set(everything) - set(all_held))  # each once per epoch
