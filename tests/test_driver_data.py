"""The driver holds references, not data: over async rounds, no rollout batch ever gets a copy on the driver's
node."""

from pathlib import Path

import pytest
import ray
from ray_head import loopback_cluster

from iterft_ray.run.loop import IterativeLoop


@pytest.fixture
def driver_alone_on_head(own_ray):
    """A head with no CPUs (the driver only) and a worker node for every actor, from ray.cluster_utils.Cluster;
    loopback and token auth (`loopback_cluster`). A rollout the driver fetched gets a copy on the head."""
    with loopback_cluster("iftd", {"num_cpus": 0}, {"num_cpus": 4},
                          runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}}) as (cluster, worker):
        yield {"head": cluster.head_node.node_id, "worker": worker.node_id}


@pytest.mark.timeout(240)
def test_the_driver_fetches_no_rollout_over_rounds(driver_alone_on_head, tmp_path):
    """Async rounds of 64 prompts x 16 samples: each rollout batch is well over Ray's inline limit, so it lives
    in the worker node's object store; Ray's object directory says which nodes ever got a copy."""
    head, worker = driver_alone_on_head["head"], driver_alone_on_head["worker"]
    cfg = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"task": "addition", "task_options": {"num_train": 256, "num_heldout": 4, "num_warmup": 4}},
        "filters": [{"name": "length_bounds", "min_chars": 1}],
        "sampling": {"num_samples": 16, "max_new_tokens": 8},
        "trainer": {"learning_rate": 1e-3, "per_device_train_batch_size": 64},
        "loop": {"rounds": 3, "prompts_per_round": 64, "async_mode": True, "eval_every": 3, "save_every": 3,
                 "output_dir": str(tmp_path / "run")},
        # A filter actor that asks for a CPU cannot land on the head (no CPUs): it runs beside the rollouts.
        "resources": {"filter_cpus": 0.5},
    }
    loop = IterativeLoop(cfg)
    try:
        batches = []
        for _ in range(2):
            loop.round()  # and meanwhile the next round's rollouts are sampled: the loop holds their references
            batches += loop._pending[0][1]
        loop.round()
        where = ray.experimental.get_object_locations(batches)
    finally:
        loop.shutdown()
    sizes = [w["object_size"] for w in where.values()]
    fetched = sum(w["object_size"] for w in where.values() if head in w["node_ids"])
    print(f"rollout batches {sizes} bytes; copies on the driver's node: {fetched} bytes")
    assert len(batches) == 2 and min(sizes) > 100 * 1024  # in the object store, not inlined into the driver
    assert all(worker in w["node_ids"] for w in where.values())
    assert fetched == 0  # the driver waited on them without fetching
