"""Where each round trains from and on what (recipe.*), and the algorithm presets, through the loop."""

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from iterft_ray.actors.trainer_actor import TrainerRank
from iterft_ray.config import ModelConfig, load_config
from iterft_ray.presets import PRESETS
from iterft_ray.run.loop import IterativeLoop
from iterft_ray.run.training_set import deduplicated

# The module's trainers reuse its earlier trainers' actors (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("warm_actors")


@pytest.fixture(scope="module", autouse=True)
def local_ray(shared_ray):
    shared_ray.up()


def config(tmp_path, recipe, rounds=3, algorithm="rft"):
    return {
        "algorithm": algorithm,
        "model": {"name_or_path": "tiny-llama"},
        "data": {"task": "addition", "task_options": {"num_train": 64, "num_heldout": 8, "num_warmup": 8}},
        "sampling": {"num_samples": 3, "max_new_tokens": 4},
        "trainer": {"learning_rate": 1e-2, "per_device_train_batch_size": 8},
        "resources": {"num_generators": 1, "filter_pool_size": 1},
        "filters": ["toy_filters:odd_prompts"],
        "recipe": recipe,
        "loop": {"rounds": rounds, "prompts_per_round": 8, "output_dir": str(tmp_path / "run"), "save_every": 1,
                 "warmup_passes": 1, "eval_every": 10},
    }


def _ledger(run, n):
    return pq.read_table(run / "accepted" / f"round-{n:04d}.parquet")


def _weights(directory):
    return load_file(str(directory / "model.safetensors"))


def test_train_from_base_on_all_rounds_for_two_epochs_restarts_each_round(tmp_path):
    """algorithm: rest_em (train_from: base) with recipe train_on all, epochs 2: each round's weights are the base
    weights trained afresh (new optimizer and schedule) for two passes over every round's accepted samples so far,
    deduplicated; the versions still advance and the generators sample the new ones; a resume goes on alike."""
    c = config(tmp_path, {"train_on": "all", "epochs": 2}, rounds=2, algorithm="rest_em")
    loop = IterativeLoop(c)
    try:
        stats = loop.run()
    finally:
        loop.shutdown()
    loop = IterativeLoop({**c, "loop": {**c["loop"], "rounds": 3}}, resume=True)
    try:
        stats += loop.run()
    finally:
        loop.shutdown()
    run = tmp_path / "run"
    base = run / "checkpoints" / "base"
    assert (base / "model.safetensors").is_file()
    versions = [s["weight_version"] for s in stats]
    assert versions == sorted(set(versions)) and len(versions) == 3
    for n in (2, 3):  # the generators sampled round n with the weights round n-1 made
        assert set(pq.read_table(run / "rounds" / f"{n:04d}" / "generations.parquet")["weight_version"].to_pylist()) \
            == {versions[n - 2]}

    torch.set_num_threads(1)  # as in the trainer actor (one CPU), for the same float sums
    load = load_config(c)
    args = {"output_dir": str(tmp_path / "rebuilt"), "seed": 0, **load.trainer, "report_to": "none"}
    for n in (1, 2, 3):  # a new trainer on the base weights (its own optimizer), two passes over the rows
        rank = TrainerRank(0, 1)
        rank.setup(ModelConfig(name_or_path=str(base)), args, {})
        table = deduplicated([_ledger(run, k) for k in range(1, n + 1)])
        nonempty = sum(1 for ids in table["completion_ids"].to_pylist() if ids)
        this_round = sum(1 for ids in _ledger(run, n)["completion_ids"].to_pylist() if ids)
        assert stats[n - 1]["train_rows"] == nonempty and (n == 1 or nonempty > this_round)
        rebuilt = rank.step_rollouts(table, epochs=2)
        assert rebuilt["updates"] == stats[n - 1]["updates"] and rebuilt["updates"] % 2 == 0
        trained = _weights(run / "checkpoints" / f"round-{n:04d}")
        ours = {k: v.detach() for k, v in rank.trainer.model.state_dict().items()}
        for key, value in trained.items():
            torch.testing.assert_close(ours[key].to(value.dtype), value, atol=1e-5, rtol=1e-5, msg=key)
    base_weights = _weights(base)
    assert any(not torch.equal(base_weights[k], trained[k]) for k in trained)


def test_last_rounds_trains_on_that_many_rounds_from_the_current_weights(tmp_path):
    """recipe: train_on last_rounds (2), from the current weights: round 3 trains on rounds 2 and 3's samples."""
    loop = IterativeLoop(config(tmp_path, {"train_on": "last_rounds", "last_rounds": 2}))
    try:
        stats = loop.run()
    finally:
        loop.shutdown()
    run = tmp_path / "run"
    assert not (run / "checkpoints" / "base").exists()
    for n, window in ((1, [1]), (2, [1, 2]), (3, [2, 3])):
        table = deduplicated([_ledger(run, k) for k in window])
        assert stats[n - 1]["train_rows"] == sum(1 for ids in table["completion_ids"].to_pylist() if ids)


def test_presets_set_their_keys_and_any_can_be_overridden(tmp_path):
    base = config(tmp_path, {})
    del base["recipe"]
    assert load_config(base).recipe.train_from == "current"
    star = load_config({**base, "algorithm": "star"})
    assert (star.recipe.train_from, star.recipe.rationalize) == ("base", True)
    assert "{answer}" in star.recipe.hint_template
    assert load_config({**base, "algorithm": "rest_em"}).recipe.train_from == "base"
    overridden = load_config({**base, "algorithm": "rest_em", "recipe": {"train_from": "current", "epochs": 3}})
    assert (overridden.recipe.train_from, overridden.recipe.epochs) == ("current", 3)
    with pytest.raises(ValueError, match=r"^filters: algorithm: raft"):
        load_config({**base, "algorithm": "raft"})
    with pytest.raises(ValueError, match=r"^algorithm: expected one of"):
        load_config({**base, "algorithm": "ppo"})
    with pytest.raises(ValueError, match=r"^recipe.train_on: expected"):
        load_config({**base, "recipe": {"train_on": "everything"}})
    assert set(PRESETS) == {"rft", "raft", "rest_em", "star"}


def test_rest_em_samples_the_whole_prompt_set_each_iteration_and_caps_samples_per_prompt(tmp_path):
    """algorithm: rest_em: loop.prompts_per_round all (each round one pass over every training prompt), from the
    base, at most 10 samples a prompt (best_of_k 10)."""
    c = config(tmp_path, {}, rounds=2, algorithm="rest_em")
    del c["loop"]["prompts_per_round"], c["recipe"]
    loaded = load_config(c)
    assert loaded.loop.prompts_per_round == "all" and loaded.recipe.train_from == "base"
    assert loaded.filters[-1] == {"name": "best_of_k", "k": 10}
    loop = IterativeLoop(c)
    try:
        loop.run()
    finally:
        loop.shutdown()
    for n in (1, 2):
        ids = pq.read_table(tmp_path / "run" / "rounds" / f"{n:04d}" / "generations.parquet")["prompt_id"].to_pylist()
        assert sorted(set(ids)) == list(range(64)) and len(ids) == 64 * 3  # every training prompt, once each


def test_star_trains_growing_steps_and_retries_each_failed_prompt_once_with_a_hint(tmp_path):
    c = config(tmp_path, {"steps_first": 2, "steps_growth": 2.0}, rounds=2, algorithm="star")
    loaded = load_config(c)
    assert (loaded.recipe.hinted_samples, loaded.recipe.rationalize) == (1, True)
    assert (load_config({**c, "recipe": {}}).recipe.steps_first, load_config({**c, "recipe": {}}).recipe.steps_growth) \
        == (40, 1.2)
    loop = IterativeLoop(c)
    try:
        stats = loop.run()
    finally:
        loop.shutdown()
    assert [s["updates"] for s in stats] == [2, 4]  # 2, then 2 x 2.0, whatever the rows
    for n in (1, 2):
        rows = pq.read_table(tmp_path / "run" / "rounds" / f"{n:04d}" / "generations.parquet").to_pylist()
        failed = {r["prompt_id"] for r in rows if not r["hinted"]} - {r["prompt_id"] for r in rows if r["accepted"]}
        hinted = [r["prompt_id"] for r in rows if r["hinted"]]
        assert failed and sorted(hinted) == sorted(failed)  # one hinted sample per failed prompt


def test_rft_trains_no_two_identical_completions_of_a_prompt(tmp_path):
    c = config(tmp_path, {}, rounds=1)
    c["sampling"] = {"num_samples": 8, "max_new_tokens": 2, "temperature": 0.05}  # nearly greedy: repeats
    assert load_config(c).filters == ["toy_filters:odd_prompts", {"name": "deduplicate"}]
    loop = IterativeLoop(c)
    try:
        loop.run()
    finally:
        loop.shutdown()
    run = tmp_path / "run"
    generated = pq.read_table(run / "rounds" / "0001" / "generations.parquet").to_pylist()
    passed = [(r["prompt_id"], r["completion"]) for r in generated if r["prompt_id"] % 2]
    assert len(set(passed)) < len(passed)  # the samples repeat...
    accepted = [(r["prompt_id"], r["completion"]) for r in _ledger(run, 1).to_pylist()]
    assert accepted and len(set(accepted)) == len(accepted) and set(accepted) == set(passed)  # ...the trained do not
