"""The Ray actor system on a local Ray with tiny models: rounds, weight sync, rank groups, async mode."""

import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import torch

from iterft_ray.run.loop import IterativeLoop
from iterft_ray.ray_trainer import RayIterativeSFTTrainer
from iterft_ray.weights.sync import publish_from

# The module's trainers reuse its earlier trainers' actors (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("warm_actors")

TASK = {"task": "addition", "task_options": {"num_train": 64, "num_heldout": 8, "num_warmup": 8}}


@pytest.fixture(scope="module", autouse=True)
def local_ray(shared_ray):
    # The session's Ray (tests/conftest.py; 8 CPUs): like `ray job submit --working-dir`, actors can import
    # tests/toy_filters.py by its import string.
    shared_ray.up()


def config(tmp_path, **loop):
    return {
        "model": {"name_or_path": "tiny-llama"},
        "data": TASK,
        "sampling": {"num_samples": 3, "max_new_tokens": 4},
        "trainer": {"learning_rate": 1e-3, "per_device_train_batch_size": 32},
        "resources": {"num_generators": 2, "filter_pool_size": 2},
        "filters": ["toy_filters:odd_prompts"],
        "loop": {"rounds": 2, "prompts_per_round": 10, "output_dir": str(tmp_path / "run"), "save_every": 2,
                 "eval_every": 2, **loop},
    }


def test_round_trains_syncs_and_records_every_sample(tmp_path):
    loop = IterativeLoop(config(tmp_path))
    try:
        before = loop.rl.trainer.checksum()
        version = loop.rl.version
        stats = loop.round()
        after = loop.rl.trainer.checksum()
        assert after != before and stats["updates"] >= 1
        assert stats["weight_version"] > version

        table = pq.read_table(tmp_path / "run" / "rounds" / "0001" / "generations.parquet")
        assert table.num_rows == 10 * 3 == stats["samples"]
        counts = pc.value_counts(table["prompt_id"]).to_pylist()
        assert len(counts) == 10 and all(c["counts"] == 3 for c in counts)
        assert set(table["weight_version"].to_pylist()) == {version}
        assert set(table["generator_id"].to_pylist()) == {0, 1}
        assert len(set(table["sample_id"].to_pylist())) == 30
        accepted = table["accepted"].to_pylist()
        assert accepted == [pid % 2 == 1 for pid in table["prompt_id"].to_pylist()]
        assert 0 < sum(accepted) < 30  # rejected rows are kept, flagged
        assert stats["accepted"] == sum(accepted)

        # Weight sync: every generator now holds the trainer's weights; the same version is not loaded twice.
        infos = ray.get([g.info.remote() for g in loop.rl.generators])
        assert all(i["checksum"] == after and i["version"] == loop.rl.version for i in infos)
        loads = [i["loads"] for i in infos]
        assert loop.rl.sync_weights() == loop.rl.version
        assert [i["loads"] for i in ray.get([g.info.remote() for g in loop.rl.generators])] == loads

        second = loop.round()
        table = pq.read_table(tmp_path / "run" / "rounds" / "0002" / "generations.parquet")
        assert set(table["weight_version"].to_pylist()) == {stats["weight_version"]}
        assert "heldout_accuracy" in second
        assert (tmp_path / "run" / "checkpoints" / "round-0002" / "model.safetensors").exists()
    finally:
        loop.shutdown()


def test_raising_filter_rejects_its_rows_and_round_completes(tmp_path):
    cfg = config(tmp_path)
    cfg["filters"] = ["toy_filters:raising_filter"]
    cfg["resources"] = {"num_generators": 1, "filter_pool_size": 1}
    loop = IterativeLoop(cfg)
    try:
        stats = loop.round()
        table = pq.read_table(tmp_path / "run" / "rounds" / "0001" / "generations.parquet")
        for row in table.to_pylist():
            even = row["prompt_id"] % 2 == 0
            assert row["accepted"] == (not even)
            assert (row["filter_error"] is not None) == even
            if even:
                assert "broken reward model" in row["filter_error"]
        assert stats["filter_errors"] == sum(r["prompt_id"] % 2 == 0 for r in table.to_pylist())
        assert stats["updates"] == 1
    finally:
        loop.shutdown()


def test_async_mode_respects_staleness_bound(tmp_path):
    cfg = config(tmp_path, rounds=4, async_mode=True, max_staleness=1)
    cfg["resources"] = {"num_generators": 1, "filter_pool_size": 1}
    loop = IterativeLoop(cfg)
    try:
        stats = loop.run()
        assert len(stats) == 4
        assert all(s["staleness"] <= 1 for s in stats)
        assert max(s["staleness"] for s in stats) == 1  # it really overlapped
        assert stats[0]["staleness"] == 0
        # Each round's samples say which weights they came from.
        for s in stats[1:]:
            assert all(int(v) < s["weight_version"] for v in s["sample_weight_versions"])
    finally:
        loop.shutdown()


def test_warm_up_trains_on_the_demonstrations_of_data_warmup_file(tmp_path):
    """A user's own demonstrations (TRL's prompt/completion lines) warm up a run whose prompts come from a file."""
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "{i}+1=", "answer": "{i + 1}"}}\n' for i in range(8)))
    demos = [{"prompt": f"{i}+2=", "completion": str(i + 2)} for i in range(5)]
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    cfg = config(tmp_path, warmup_passes=2, prompts_per_round=8)
    cfg["data"] = {"prompts_file": str(tmp_path / "prompts.jsonl"), "warmup_file": str(tmp_path / "demos.jsonl")}
    cfg["resources"] = {"num_generators": 1, "filter_pool_size": 1}
    loop = IterativeLoop(cfg)
    try:
        before = loop.rl.version
        stats = loop.warm_up()
        assert stats["num_sequences"] == len(demos) and stats["num_target_tokens"] > 0
        assert loop.rl.version > before  # the generators sample round 1 with the warmed-up weights
    finally:
        loop.shutdown()


def test_two_rank_gloo_trainer_equals_one_rank_on_whole_batch():
    texts = ["12+30=42", "7+5=12", "100+1=101", "3+3=6", "45+45=90", "9+90=99"]
    common = {"learning_rate": 1e-2, "optim": "sgd", "train_sampling_strategy": "sequential", "report_to": "none"}
    one = RayIterativeSFTTrainer("tiny-llama", {**common, "per_device_train_batch_size": 6})
    two = RayIterativeSFTTrainer(
        "tiny-llama", {**common, "per_device_train_batch_size": 3}, resources=_ranks(2)
    )
    try:
        assert one.trainer.checksum() == two.trainer.checksum()
        s1, s2 = one.step(texts=texts), two.step(texts=texts)
        assert s1["num_sequences"] == s2["num_sequences"] == 6
        assert s1["updates"] == s2["updates"] == 1
        assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-5)
        a, b = ray.get(publish_from(one.trainer)[0]), ray.get(publish_from(two.trainer)[0])
        for name in a.arrays:
            torch.testing.assert_close(torch.from_numpy(a.arrays[name].copy()), torch.from_numpy(b.arrays[name].copy()),
                                       atol=1e-6, rtol=1e-5)
    finally:
        one.shutdown()
        two.shutdown()


def _ranks(n):
    from iterft_ray.config import ResourcesConfig

    return ResourcesConfig(trainer_ranks=n, num_generators=1, filter_pool_size=1)
