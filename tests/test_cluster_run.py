"""The actor system on more than one node.

- Autoscaling: the head of cluster/local.yaml (fake multi-node provider, no worker nodes)
  runs a two-round config whose actors ask for the `trainer`, `generator` and `filter`
  resources; the autoscaler adds the nodes, the generators run on generator nodes,
  and the idle nodes go away afterwards.
- Weight sync across nodes: on a two-node `ray.cluster_utils.Cluster` (token auth on,
  loopback), a generator on the second node samples with the trainer's weights, which
  reach it through the object store; a generator added between steps loads the current
  weights before it samples. With the default `resources.weight_transport: auto` the
  trainer broadcasts each version to the generators over a Gloo group instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from ray._private.authentication import authentication_utils as auth_utils

# The fixture of tests/test_cluster_configs.py: cluster/local.yaml on loopback, with its
# own ports, temp dir and token (RAY_AUTH_TOKEN_PATH in its env), no worker nodes.
from ray_head import loopback_cluster
from test_cluster_configs import fake_cluster  # noqa: F401  (a pytest fixture)

from iterft_ray.config import ResourcesConfig, SamplingConfig
from iterft_ray.ray_trainer import RayIterativeSFTTrainer

# ------------------------------------------------------------------------ autoscaling

RUN_CONFIG = {
    "model": {"name_or_path": "tiny-llama"},
    "data": {"task": "addition", "task_options": {"num_train": 32, "num_heldout": 4, "num_warmup": 4}},
    "filters": [{"name": "exact_answer"}],
    "sampling": {"num_samples": 2, "temperature": 1.0, "max_new_tokens": 4},
    "trainer": {"learning_rate": 0.001, "per_device_train_batch_size": 16},
    "resources": {"num_generators": 2, "filter_pool_size": 1, "custom_resources": True},
    "loop": {"rounds": 2, "prompts_per_round": 8, "warmup_passes": 0, "eval_every": 2, "save_every": 2},
}

# After the run: where its actors ran (the GCS keeps dead actors in its table), what
# the nodes offered, then how long until only the head is left.
INSPECT = textwrap.dedent(
    """
    import json, sys, time
    import ray

    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    head = ray.get_runtime_context().get_node_id()
    nodes = {n["NodeID"]: {"alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()}
    actors = [{"class": a["ActorClassName"], "node": a["Address"]["NodeID"]}
              for a in ray._private.state.actors().values()]
    print(json.dumps({"head": head, "nodes": nodes, "actors": actors}), flush=True)
    t0 = time.monotonic()
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    while alive != [head] and time.monotonic() - t0 < float(sys.argv[2]):
        time.sleep(1)
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print(json.dumps({"alive": alive, "waited": time.monotonic() - t0}), flush=True)
    """
)


@pytest.mark.timeout(300)
def test_autoscaled_run_places_generators_on_new_nodes_then_scales_down(fake_cluster, tmp_path):  # noqa: F811
    address, env = fake_cluster["address"], fake_cluster["env"]
    run_dir = tmp_path / "run"
    config = json.loads(json.dumps(RUN_CONFIG))
    config["loop"]["output_dir"] = str(run_dir)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "iterft_ray", "run", str(tmp_path / "config.yaml"), "--address", address],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    run_s = time.monotonic() - t0
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]

    # Both rounds completed, each sampled by both generators.
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]  # 0: held-out accuracy before training
    for r in (1, 2):
        table = pq.read_table(run_dir / "rounds" / f"{r:04d}" / "generations.parquet")
        assert table.num_rows == 8 * 2 == metrics[r]["samples"]
        assert set(table["generator_id"].to_pylist()) == {0, 1}
    assert (run_dir / "checkpoints" / "round-0002").is_dir()

    inspect = subprocess.Popen([sys.executable, "-c", INSPECT, address, "100"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = inspect.communicate(timeout=150)
    finally:
        if inspect.poll() is None:
            inspect.kill()
    assert inspect.returncode == 0, out + err
    placed, gone = (json.loads(line) for line in out.strip().splitlines()[-2:])
    head, nodes = placed["head"], placed["nodes"]
    where: dict[str, list[str]] = {}
    for actor in placed["actors"]:
        where.setdefault(actor["class"], []).append(actor["node"])

    # The head (0 CPUs, none of the custom resources) ran none of the actors: the
    # autoscaler added a node for each, of the type that offers what it asked for.
    assert len(where["GeneratorActor"]) == 2
    assert len(set(where["GeneratorActor"])) == 2, "the two generators shared a node (generator nodes offer 1)"
    # (Seconds after the run, well within the idle timeout, every one of them is still up;
    # a dead node lists no resources.)
    for cls, resource in (("GeneratorActor", "generator"), ("TrainerRank", "trainer"), ("FilterActor", "filter")):
        assert where.get(cls), f"no {cls} in the actor table: {placed['actors']}"
        for node in where[cls]:
            assert node != head, f"{cls} ran on the head"
            assert nodes.get(node, {}).get("alive"), f"{cls}'s node {node} is unknown or already gone: {nodes}"
            assert nodes[node]["resources"].get(resource, 0) >= 1, (cls, nodes[node])
    assert sum(n["resources"].get("generator", 0) for n in nodes.values() if n["alive"]) == 2, nodes

    # Idle for idle_timeout_minutes (0.5): the worker nodes are removed, the head stays.
    assert gone["alive"] == [head], f"worker nodes still alive after {gone['waited']:.0f} s: {gone['alive']}"
    print(f"driver run {run_s:.0f} s; worker nodes gone {gone['waited']:.0f} s after the run")


# ------------------------------------------------------------ weight sync across nodes


@pytest.fixture
def two_nodes(own_ray):
    """A head (trainer, filter) and a second node (generator: 2) from ray.cluster_utils.Cluster.

    Loopback only, token auth on (`loopback_cluster`).
    """
    with loopback_cluster("iftn", {"num_cpus": 2, "resources": {"trainer": 1, "filter": 1}},
                          {"num_cpus": 2, "resources": {"generator": 2}}) as (cluster, worker):
        assert auth_utils.is_token_auth_enabled()
        yield {"cluster": cluster, "head": cluster.head_node.node_id, "worker": worker.node_id,
               "address": cluster.address, "token": Path(os.environ["RAY_AUTH_TOKEN_PATH"])}


WRONG_TOKEN = textwrap.dedent(
    """
    import sys
    from ray._raylet import GcsClient
    try:
        GcsClient(address=sys.argv[1]).internal_kv_get(b"session_name", b"session", timeout=5)
    except Exception as e:
        print(type(e).__name__)
    else:
        print("ACCEPTED")
    """
)

PROMPTS = ["12+30=", "7+5=", "3+4=", "10+11="]
TEXTS = ["12+30=42", "7+5=12", "3+4=7", "10+11=21"]


def _listening_addresses() -> set[str]:
    """The addresses that this process's children (the nodes, their workers) listen on."""
    pids = {p.pid for p in psutil.Process().children(recursive=True)}
    return {c.laddr.ip for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids}


def _actor_node(handle) -> str:
    return ray._private.state.actors(actor_id=handle._actor_id.hex())["Address"]["NodeID"]


@pytest.mark.timeout(300)
def test_generator_on_another_node_samples_with_the_trainers_weights(two_nodes, tmp_path):
    head, worker = two_nodes["head"], two_nodes["worker"]
    assert head != worker
    # Auth is really on for this cluster: a client with the wrong token is refused.
    wrong = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    wrong.update(RAY_AUTH_TOKEN="0" * 64)
    out = subprocess.run([sys.executable, "-c", WRONG_TOKEN, two_nodes["address"]], env=wrong,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "AuthenticationError", out.stdout + out.stderr

    rt = RayIterativeSFTTrainer(
        "tiny-llama", {"learning_rate": 1e-2, "per_device_train_batch_size": 4, "output_dir": str(tmp_path / "t")},
        resources=ResourcesConfig(num_generators=1, filter_pool_size=1, custom_resources=True,
                                  weight_transport="object_store"),
        sampling=SamplingConfig(num_samples=2, max_new_tokens=4),
    )
    try:
        trainer_node = _actor_node(rt.trainer.ranks[0])
        assert trainer_node == head
        first = ray.get(rt.generators[0].info.remote())
        assert first["node_id"] == worker != trainer_node

        # A step, then a sync: the generator on the other node holds the trainer's new weights.
        before = rt.trainer.checksum()
        stats = rt.step(texts=TEXTS)
        assert stats["updates"] >= 1
        version = rt.sync_weights()
        assert version == stats["version"] >= 1
        trained = rt.trainer.checksum()
        assert trained != before
        info = ray.get(rt.generators[0].info.remote())
        assert info["version"] == version and info["checksum"] == trained
        assert info["loads"] == first["loads"] + 1
        # The snapshot was put on the trainer's node and pulled into the generator's.
        locations = ray.experimental.get_object_locations([rt.weights])[rt.weights]
        assert {head, worker} <= set(locations["node_ids"]), locations
        rows = rt.collect(rt.generate(PROMPTS, round_index=1))
        assert set(rows["weight_version"].to_pylist()) == {version}

        # Another step, published but not synced (as in async mode); a second generator
        # joins and must load the current weights before it samples.
        stats = rt.step(texts=TEXTS)
        current = rt.publish_weights()
        assert current == stats["version"] > version
        rt.scale_generators(2)
        fresh = ray.get(rt.generators[1].info.remote())
        assert fresh["node_id"] == worker
        assert fresh["version"] == -1 and fresh["loads"] == 0  # the weights on disk
        assert fresh["checksum"] != rt.trainer.checksum()
        rows = rt.collect(rt.generate(PROMPTS, round_index=2))
        assert set(rows["generator_id"].to_pylist()) == {0, 1}
        assert set(rows["weight_version"].to_pylist()) == {current}
        infos = ray.get([g.info.remote() for g in rt.generators])
        assert [i["checksum"] for i in infos] == [rt.trainer.checksum()] * 2
        assert [i["version"] for i in infos] == [current, current]
        assert infos[1]["loads"] == 1
        assert _listening_addresses() <= {"127.0.0.1", "::ffff:127.0.0.1"}
    finally:
        rt.shutdown()


@pytest.mark.timeout(300)
def test_across_nodes_the_trainer_broadcasts_each_version_to_the_generators(two_nodes, tmp_path):
    head, worker = two_nodes["head"], two_nodes["worker"]
    rt = RayIterativeSFTTrainer(
        "tiny-llama", {"learning_rate": 1e-2, "per_device_train_batch_size": 4, "output_dir": str(tmp_path / "t")},
        resources=ResourcesConfig(num_generators=2, filter_pool_size=1, custom_resources=True),
        sampling=SamplingConfig(num_samples=2, max_new_tokens=4),
    )
    try:
        assert _actor_node(rt.trainer.ranks[0]) == head
        assert {_actor_node(g) for g in rt.generators} == {worker}
        assert rt.weight_sync.transport == "broadcast"  # auto: the generators are on another node

        for _ in range(2):  # the second version goes through the same group
            rt.step(texts=TEXTS)
            version = rt.sync_weights()
            trained = rt.trainer.checksum()
            infos = ray.get([g.info.remote() for g in rt.generators])
            assert [(i["version"], i["loaded_from"], i["checksum"]) for i in infos] == [
                (version, "broadcast", trained)] * 2
        # The snapshot stayed on the trainer's node: nothing pulled it through the object store.
        assert ray.experimental.get_object_locations([rt.weights])[rt.weights]["node_ids"] == [head]
        rows = rt.collect(rt.generate(PROMPTS, round_index=1))
        assert set(rows["weight_version"].to_pylist()) == {version}
        # The group's store and Gloo listen on the nodes' (loopback) address only.
        assert _listening_addresses() <= {"127.0.0.1", "::ffff:127.0.0.1"}
    finally:
        rt.shutdown()
