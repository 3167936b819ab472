"""Warm actors (`keep_actors_warm`): a trainer built after another of the same shape reuses its actor processes,
made as new, and samples, filters and trains exactly as one with new processes does; what Ray restarted is not
handed on, and nothing outlives the block."""

import json
import os
import signal
import time

import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file

from iterft_ray import keep_actors_warm
from iterft_ray.ray_internals import actor_id, actor_record
from iterft_ray.run.loop import IterativeLoop

TIMING = {"generate_time", "filter_time", "train_time", "sync_time", "round_time"}


@pytest.fixture(scope="module", autouse=True)
def local_ray(shared_ray):
    shared_ray.up()


def config(run_dir):
    return {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"task": "addition", "task_options": {"num_train": 32, "num_heldout": 4, "num_warmup": 8}},
        "sampling": {"num_samples": 2, "max_new_tokens": 5},
        "trainer": {"learning_rate": 1e-2, "per_device_train_batch_size": 8, "optim": "adamw_torch"},
        "resources": {"num_generators": 1, "filter_pool_size": 1},
        "filters": ["toy_filters:odd_prompts"],
        "loop": {"rounds": 2, "prompts_per_round": 6, "save_every": 2, "eval_every": 2, "output_dir": str(run_dir)},
    }


def actor_ids(loop):
    rl = loop.rl
    return [actor_id(a) for a in [*rl.trainer.ranks, *rl.generators.actors, *rl.filter_pool.actors]]


def run(run_dir):
    loop = IterativeLoop(config(run_dir))
    try:
        ids = actor_ids(loop)
        loop.run()
    finally:
        loop.shutdown()
    return ids


def results(run_dir):
    metrics = [{k: v for k, v in json.loads(x).items() if k not in TIMING}
               for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(run_dir / "checkpoints" / "round-0002" / "model.safetensors"))
    generations = [pq.read_table(run_dir / "rounds" / f"{r:04d}" / "generations.parquet") for r in (1, 2)]
    return metrics, weights, generations


def assert_same_results(a, b):
    (ma, wa, ga), (mb, wb, gb) = results(a), results(b)
    assert ma == mb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(x.equals(y) for x, y in zip(ga, gb))


def wait_dead(ids, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while any(actor_record(i).get("State") != "DEAD" for i in ids):
        assert time.monotonic() < deadline, [actor_record(i).get("State") for i in ids]
        time.sleep(0.2)


def test_warm_actors_are_reused_as_new_and_a_restarted_one_is_not(tmp_path):
    cold = run(tmp_path / "cold")
    wait_dead(cold)  # outside the block a run's actors end with it

    with keep_actors_warm() as warm:
        first = run(tmp_path / "first")
        assert warm.held()[0] == set(first)
        second = run(tmp_path / "second")
        assert second == first and set(first).isdisjoint(cold)  # the same three actors, not new ones

        loop = IterativeLoop(config(tmp_path / "third"))
        try:
            assert actor_ids(loop) == first
            generator = loop.rl.generators[0]
            pid = ray.get(generator.info.remote())["pid"]
            os.kill(pid, signal.SIGKILL)
            assert ray.get(generator.info.remote())["pid"] != pid  # Ray restarted it
        finally:
            loop.shutdown()
        kept = warm.held()[0]
        assert actor_id(generator) not in kept and kept == set(first) - {actor_id(generator)}
    wait_dead(first)  # the block's end ends what it kept

    # Reused processes sample, filter and train bit for bit as new ones do.
    assert_same_results(tmp_path / "cold", tmp_path / "first")
    assert_same_results(tmp_path / "cold", tmp_path / "second")
