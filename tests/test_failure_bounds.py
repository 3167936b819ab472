"""Failure bounds: an actor that dies on every call, a round that hangs and actors the cluster cannot hold
each end the run with a message naming what went wrong, in bounded time, instead of a silent hang."""

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml
from ray_head import free_port, loopback_env, ray_head

from iterft_ray.config import ResourcesConfig, SamplingConfig
from iterft_ray.run.loop import IterativeLoop
from iterft_ray.actors.failures import ActorFailedError, RoundTimeoutError
from iterft_ray.actors.placement import PlacementError
from iterft_ray.ray_trainer import RayIterativeSFTTrainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray(own_ray):
    # A Ray of its own, of 4 CPUs that the tests fill on purpose. Like `ray job submit --working-dir`: actors import tests/toy_filters.py's selectors by import string.
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield
    ray.shutdown()


def config(tmp_path, selector=None, **overrides):
    """A small run; `selector` names one of tests/toy_filters.py's selectors (else a plain length filter)."""
    cfg = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"task": "addition", "task_options": {"num_train": 16, "num_heldout": 4, "num_warmup": 4}},
        "filters": [f"toy_filters:{selector}" if selector else {"name": "length_bounds", "min_chars": 1}],
        "sampling": {"num_samples": 2, "max_new_tokens": 4},
        "trainer": {"learning_rate": 1e-3, "per_device_train_batch_size": 8},
        "resources": {"num_generators": 1, "filter_pool_size": 1, "max_restarts": 1, "max_task_retries": 1},
        "loop": {"rounds": 2, "prompts_per_round": 4, "output_dir": str(tmp_path / "run"), "save_every": 2},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


@pytest.mark.timeout(300)
def test_a_filter_actor_that_dies_on_every_call_ends_the_run_naming_it(local_ray, tmp_path):
    loop = IterativeLoop(config(tmp_path, "crashing"))
    try:
        with pytest.raises(ActorFailedError) as failed:
            loop.round()
    finally:
        loop.shutdown()
    message = str(failed.value)
    print(message)
    # Which actor, where, how often it was restarted, under which limits, and Ray's word on how it died.
    assert message.startswith("round 1 filter: filter actor 0 (FilterActor, node "), message
    assert "DEAD after 1 restart)" in message and "died" in message, message
    assert ("died (restarts allowed: resources.max_restarts = 1, retries of a call: resources.max_task_retries = 1)"
            in message), message
    assert "last error: The actor died unexpectedly" in message, message
    assert not (tmp_path / "run" / "rounds").exists()  # round 1 recorded nothing
    # Not a RayActorError, which `run()` would take for a lost trainer and try to restore.
    assert not isinstance(failed.value, ray.exceptions.RayActorError)


@pytest.mark.timeout(300)
def test_a_generator_that_keeps_dying_ends_the_run_naming_it(local_ray, tmp_path):
    """A generator process that dies whenever it is up (as one running out of memory on every load would)."""
    loop = IterativeLoop(config(tmp_path))
    generator, stop = loop.rl.generators[0], threading.Event()

    def keep_killing():
        while not stop.is_set():
            ray.kill(generator, no_restart=False)  # Ray may restart it: resources.max_restarts decides
            time.sleep(0.2)

    killer = threading.Thread(target=keep_killing, daemon=True)
    try:
        killer.start()
        start = time.monotonic()
        with pytest.raises(ActorFailedError) as failed:
            loop.round()
        waited = time.monotonic() - start
    finally:
        stop.set()
        killer.join()
        loop.shutdown()
    message = str(failed.value)
    print(message, f"({waited:.1f} s)")
    # Named where the driver first meets the error: the rollouts are waited on without being
    # fetched, so it surfaces in the filter calls that take them.
    assert message.startswith(("round 1 ", "evaluate before round 1")), message  # the first call that samples
    assert ": generator 0 (GeneratorActor, node " in message and "DEAD after 1 restart)" in message, message
    assert " at , " not in message, message
    assert "resources.max_restarts = 1" in message, message
    assert waited < 120, waited  # bounded: not the round timeout (an hour by default)


@pytest.mark.timeout(300)
def test_a_hung_round_ends_at_its_timeout_naming_the_actor_it_waits_for(local_ray, tmp_path):
    loop = IterativeLoop(config(tmp_path, "hanging", loop__round_timeout_s=3.0))
    try:
        start = time.monotonic()
        with pytest.raises(RoundTimeoutError) as hung:
            loop.round()
        waited = time.monotonic() - start
    finally:
        loop.shutdown()
    message = str(hung.value)
    print(message, f"({waited:.1f} s)")
    assert message.startswith("round 1 filter: not done within loop.round_timeout_s (3 s); 1 of its calls still "
                              "running, on: filter actor 0 (FilterActor, node "), message
    assert message.endswith("ALIVE)"), message
    assert waited < 100  # not the selector's 120 s: the round gave up, the selector did not finish


@pytest.mark.timeout(120)
def test_actors_that_cannot_be_placed_in_time_end_the_start_naming_them(local_ray, tmp_path):
    """Enough CPUs in all, but another job holds them: the start ends at resources.start_timeout_s."""
    hog = ray.remote(num_cpus=4)(type("OtherJob", (), {})).remote()
    ray.get(hog.__ray_ready__.remote())
    try:
        with pytest.raises(PlacementError) as unplaced:
            RayIterativeSFTTrainer(
                "tiny-llama", {"output_dir": str(tmp_path / "t")},
                resources=ResourcesConfig(trainer_cpus=0.5, generator_cpus=0.5, filter_cpus=0.5, start_timeout_s=3),
                sampling=SamplingConfig(max_new_tokens=4),
            )
    finally:
        ray.kill(hog)
    message = str(unplaced.value)
    print(message)
    assert message.startswith(
        "resources.start_timeout_s: after 3 s these actors have not started: trainer ranks 0..0 (one placement "
        "group) asking for {CPU: 0.5, memory: 0.60 GB} each; generator 0 (GeneratorActor, no process on any node "
        "yet, PENDING_CREATION) asking for {CPU: 0.5, memory: 0.60 GB}; filter actor 0 (FilterActor, no process on "
        "any node yet, PENDING_CREATION) asking for {CPU: 0.5, memory: 0.15 GB}. The run asks for {CPU: 1.5, "
        "memory: 1.35 GB} in all"), message
    assert re.search(r"the cluster has \{CPU: 4, memory: [0-9.]+ GB\}, of which \{CPU: 0, memory: [0-9.]+ GB\} is "
                     r"free", message), message
    # Nothing of the failed start is left holding resources.
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 4


@pytest.fixture
def two_cpu_head():
    """`ray start --head --num-cpus=2` on loopback with token auth, as a user's machine of 2 cores."""
    tmp = Path(tempfile.mkdtemp(prefix="iftf", dir="/tmp"))  # short: socket paths
    (tmp / "token").write_text(secrets.token_hex(32))
    port = free_port()
    env = loopback_env(RAY_AUTH_TOKEN_PATH=str(tmp / "token"), AUTOSCALER_UPDATE_INTERVAL_S="1")
    args = [
        "--node-ip-address=127.0.0.1", f"--port={port}", f"--ray-client-server-port={free_port()}",
        "--include-dashboard=false", "--dashboard-agent-listen-port=0", "--num-cpus=2",
        "--object-store-memory=100000000", f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats",
    ]
    try:
        with ray_head(args, env, cwd=tmp):
            yield {"address": f"127.0.0.1:{port}", "env": env, "tmp": tmp}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.timeout(120)
def test_a_run_that_needs_more_than_a_fixed_cluster_has_is_refused_before_any_actor_starts(two_cpu_head, tmp_path):
    """The reported case: the tiny config with a filter actor of half a CPU against a 2-CPU head asks for 2.5
    CPUs, so its filter could never start.

    Run right after the head starts, before its read-only autoscaler has reported the node: the start
    waits for that report instead of taking "no report yet" as an autoscaler (which waited, by chance).
    """
    address, env = two_cpu_head["address"], two_cpu_head["env"]
    config = yaml.safe_load((REPO / "iterft_ray" / "configs" / "tiny.yaml").read_text())
    config["loop"]["output_dir"] = str(tmp_path / "run")
    config["resources"]["filter_cpus"] = 0.5
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    run_env = dict(env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "iterft_ray", "run", str(tmp_path / "tiny.yaml"), "--address", address],
                         env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=90)
    print(run.stderr[-2000:], f"({time.monotonic() - start:.1f} s)")
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-4000:]
    assert re.fullmatch(re.escape(
        "iterft: error: resources: the run asks for 1 trainer rank x {CPU: 1, memory: 0.60 GB}, 1 generator x "
        "{CPU: 1, memory: 0.60 GB}, 1 filter actor x {CPU: 0.5, memory: 0.15 GB}: {CPU: 2.5, memory: 1.35 GB} in "
        "all, but this cluster (1 node, no autoscaler) has {CPU: 2, memory: ") + r"[0-9.]+" + re.escape(
        " GB}, so not every actor could ever start; lower the counts or per-actor resources (resources.trainer_ranks, "
        "num_generators, filter_pool_size, *_cpus, *_gpus) or give the cluster more"),
        run.stderr.strip().splitlines()[-1]), run.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # refused before anything was written



FRESH_RAY_CHECK = """
import ray
from iterft_ray.actors.placement import ActorRequest, PlacementError, check_cluster_fits
from iterft_ray.ray_internals import listen_on_loopback_only
listen_on_loopback_only()
ray.init(address="local", include_dashboard=False)  # as `ray start --head` would: not iterft's embedded Ray
try:
    check_cluster_fits([ActorRequest("trainer rank", 1, {"CPU": 1.0, "GPU": 1.0})])
    print("waits")
except PlacementError as e:
    print("refused:", e)
ray.shutdown()
"""


def test_a_request_no_node_has_is_refused_right_after_ray_starts():
    """A fresh Ray's read-only autoscaler reports its node a few seconds in; before that a GPU request on a
    GPU-less machine was taken as one an autoscaler might serve, and the start waited instead of refusing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["AUTOSCALER_UPDATE_INTERVAL_S"] = "8"  # a slow first report, as on a loaded machine: seconds of no node
    done = subprocess.run([sys.executable, "-c", FRESH_RAY_CHECK], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert "refused: resources: the run asks for 1 trainer rank x {CPU: 1, GPU: 1}" in done.stdout, \
        done.stdout + done.stderr[-2000:]
    assert "(1 node, no autoscaler) has {CPU: " in done.stdout
