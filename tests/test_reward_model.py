"""Reward models as scorers (RAFT): a sequence-classification model served by its own actors, its logit the score."""

from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from iterft_ray.actors.filter_pool import FilterPool
from iterft_ray.actors.placement import PlacementError, actor_requests, check_cluster_fits
from iterft_ray.actors.reward_pool import RewardModelPool, reward_models_of
from iterft_ray.config import ResourcesConfig, load_config
from iterft_ray.run.loop import IterativeLoop
from iterft_ray.tiny import build_tiny_reward_model

# The module's trainers reuse its earlier trainers' actors (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("warm_actors")

TASK = {"task": "addition", "task_options": {"num_train": 32, "num_heldout": 4, "num_warmup": 4}}


@pytest.fixture(scope="module", autouse=True)
def local_ray(shared_ray):
    shared_ray.up()


@pytest.fixture(scope="module")
def reward_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    return {"plain": str(build_tiny_reward_model(root / "plain", seed=1)),
            "chat": str(build_tiny_reward_model(root / "chat", seed=2, chat_template=True))}


def plain_forward(path: str, prompt: str, completion: str) -> float:
    """The reward as a user computes it by hand: one unpadded text through AutoModelForSequenceClassification."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": completion}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt + completion, return_tensors="pt").input_ids
    with torch.inference_mode():
        return model(input_ids=ids).logits[0, 0].item()


def test_pool_scores_each_row_as_a_plain_forward_of_the_reward_model(reward_paths):
    path = reward_paths["chat"]
    filters = [{"name": "length_bounds", "min_chars": 1}, {"name": "reward_model", "model": path, "batch_size": 2}]
    completions = ["3", "4 and then some", "", "34", "a much longer completion than the others", "5"]
    rollouts = pa.table({"prompt_id": pa.array([0, 0, 0, 1, 1, 1], pa.int64()),
                         "prompt": ["1+2="] * 3 + ["30+4="] * 3, "completion": completions,
                         "weight_version": pa.array([0] * 6, pa.int64())})
    rewards = RewardModelPool(reward_models_of(filters), size=2, actor_options={"num_cpus": 0.5})
    filter_pool = FilterPool(filters, size=1, actor_options={"num_cpus": 0.5}, processes=1, rewards=rewards.client())
    try:
        scored, _ = filter_pool.score(ray.put(rollouts))
        scored = ray.get(scored)
    finally:
        for actor in filter_pool.actors:
            ray.kill(actor)
        rewards.shutdown()

    rows = scored.to_pylist()
    assert [r["accepted"] for r in rows] == [c != "" for c in completions]
    for row in rows:
        if row["accepted"]:
            assert row["score"] == pytest.approx(plain_forward(path, row["prompt"], row["completion"]), abs=1e-5)
        else:  # rejected by the gate before it: not sent to the reward model
            assert row["score"] == 0.0


def test_raft_run_keeps_each_prompts_top_k_by_reward(reward_paths, tmp_path):
    path = reward_paths["plain"]
    config = {
        "model": {"name_or_path": "tiny-llama"},
        "algorithm": "raft",
        "data": TASK,
        "filters": [{"name": "reward_model", "model": path}, {"name": "best_of_k", "k": 2}],
        "sampling": {"num_samples": 4, "max_new_tokens": 4},
        "trainer": {"learning_rate": 1e-3, "per_device_train_batch_size": 32},
        "resources": {"num_generators": 1, "filter_pool_size": 1, "filter_cpus": 0.5, "reward_model_cpus": 0.5},
        "loop": {"rounds": 1, "prompts_per_round": 4, "output_dir": str(tmp_path / "run"), "save_every": 1},
        "eval": {"num_samples": 0},
    }
    loop = IterativeLoop(config)
    try:
        assert len(loop.rl.reward_pool.actors) == 1
        loop.run()
        reward_actors = loop.rl.reward_pool.actors
    finally:
        loop.shutdown()

    table = pq.read_table(tmp_path / "run" / "rounds" / "0001" / "generations.parquet")
    assert table.num_rows == 4 * 4
    by_prompt = defaultdict(list)
    for i, row in enumerate(table.to_pylist()):
        assert row["score"] == pytest.approx(plain_forward(path, row["prompt"], row["completion"]), abs=1e-5)
        by_prompt[row["prompt_id"]].append((-row["score"], i, row["accepted"]))
    for rows in by_prompt.values():
        assert [accepted for _, _, accepted in sorted(rows)] == [True, True, False, False]
    # The evaluation scores with the same reward model (its row filters, selectors left out): nothing rejected.
    evaluation = pq.read_table(tmp_path / "run" / "eval" / "0001.parquet")
    assert all(evaluation["accepted"].to_pylist()) and evaluation["score"].null_count == 0
    # Shutdown kills the reward-model actors.
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(reward_actors[0].score.remote(["1+2="], ["3"]), timeout=30)


@pytest.mark.parametrize("spec, message", [
    ({"name": "reward_model"}, "missing a required argument: 'model'"),
    ({"name": "reward_model", "model": "/no/such/reward/model"}, "is not a model directory"),
    ({"name": "reward_model", "model": "CAUSAL"}, "not a sequence-classification model"),
    ({"name": "reward_model", "model": "PLAIN", "batch_size": 0}, "batch_size"),
])
def test_bad_reward_model_options_fail_at_load_naming_the_filter(spec, message, reward_paths, llama_path):
    spec = {**spec, **({"model": {"CAUSAL": llama_path, "PLAIN": reward_paths["plain"]}[spec["model"]]}
                       if spec.get("model") in ("CAUSAL", "PLAIN") else {})}
    with pytest.raises(ValueError, match=rf"^filters\[0\]: .*{message}"):
        load_config({"model": {"name_or_path": "tiny-llama"}, "data": TASK,
                     "filters": [spec, {"name": "best_of_k", "k": 2}]})


def test_reward_model_actors_are_in_the_runs_request_only_when_a_filter_names_one(reward_paths):
    resources = ResourcesConfig(num_reward_models=2, reward_model_cpus=0.5, reward_model_gpus=1)
    none = {q.role: q for q in actor_requests(resources)}
    one = {q.role: q for q in actor_requests(resources, reward_models=1)}
    assert none["reward model"].count == 0
    assert one["reward model"].count == 2 and one["reward model"].bundle == {"CPU": 0.5, "GPU": 1.0}
    # The cluster-fit check covers them (the session's Ray: one node, 8 CPUs).
    with pytest.raises(PlacementError, match=r"9 reward models x \{CPU: 1\}.*num_reward_models"):
        check_cluster_fits(actor_requests(ResourcesConfig(num_reward_models=9), reward_models=1))
    with pytest.raises(PlacementError, match=r"1 reward model x \{CPU: 9\}"):
        check_cluster_fits(actor_requests(ResourcesConfig(reward_model_cpus=9), reward_models=1))
    check_cluster_fits(actor_requests(ResourcesConfig(num_reward_models=9)))  # no reward_model filter: none asked
    with pytest.raises(ValueError, match="resources.reward_model_gpus"):
        ResourcesConfig(reward_model_gpus=1.5)
    with pytest.raises(ValueError, match=r"^eval.filters\[0\]: reward model"):
        load_config({"model": {"name_or_path": "tiny-llama"}, "data": TASK,
                     "eval": {"filters": [{"name": "reward_model", "model": reward_paths["plain"]}]}})


def test_checker_reward_model_trains_saves_and_serves_as_a_reward_model_filter(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    from checker_reward_model import train_checker_reward_model, wrong_answer

    import random

    rng = random.Random(0)
    assert all(wrong_answer(a, rng).strip() != a for a in ["0", "7", "82", "199"] for _ in range(50))
    result = train_checker_reward_model({"num_train": 32, "num_heldout": 8, "num_warmup": 8}, str(tmp_path / "ck"),
                                        steps=20, batch_size=16)
    assert set(result) >= {"path", "false_accept_rate", "false_reject_rate", "threshold"}
    assert 0 <= result["false_accept_rate"] <= 1 and 0 <= result["false_reject_rate"] <= 1
    assert result["steps"] == 20 and result["heldout_pairs"] == 8 * 3
    # What it saved is a reward_model filter's model, loaded as a user's config would name it.
    load_config({"model": {"name_or_path": "tiny-llama"}, "data": TASK,
                 "filters": [{"name": "reward_model", "model": result["path"]}, {"name": "best_of_k", "k": 1}]})
