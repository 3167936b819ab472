"""Start and stop a Ray head of one's own for a test: loopback only, token auth on; and which actors of a
cluster are still alive.

`ray stop` would kill every Ray process of this user on the machine, other tests'
clusters included, so the head runs in its own session and is stopped by killing its
process group (SIGKILL: the GCS and the autoscaler ignore SIGTERM).
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from iterft_ray.actors.warm import warm_actors

RAY_CLI = str(Path(sys.executable).with_name("ray"))


# Ray Data's own actors: detached, named singletons that every dataset of a cluster shares (its stats and its
# autoscaling coordinator). The first prompts file read starts them, they hold no CPU, no run owns them, and
# they live as long as the cluster does.
RAY_DATA_ACTORS = frozenset({"_StatsActor", "_AutoscalingCoordinatorActor"})


def live_actors() -> list[dict]:
    """The GCS's records of the connected cluster's live actors, Ray Data's singletons and the actors kept warm
    (`keep_actors_warm`) left out."""
    from ray._private import state

    warm = warm_actors()
    kept = warm.held()[0] if warm is not None else set()
    return [a for a in state.actors().values()
            if a["State"] != "DEAD" and a["ActorID"] not in kept
            and not (a["IsDetached"] and a["ActorClassName"] in RAY_DATA_ACTORS)]


def live_placement_groups() -> list[dict]:
    """The connected cluster's placement groups not removed, those of trainers kept warm left out."""
    import ray

    warm = warm_actors()
    kept = warm.held()[1] if warm is not None else set()
    return [p for p in ray.util.placement_group_table().values()
            if p["state"] != "REMOVED" and p["placement_group_id"] not in kept]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(**extra: str) -> dict:
    """The environment for a head: no inherited RAY_ADDRESS, token auth on, loopback only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    env.update(
        RAY_AUTH_MODE="token",
        # Despite its name this makes Ray use 127.0.0.1 as the node address instead of
        # resolving the host's, so nothing listens beyond loopback.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        **extra,
    )
    return env


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def stop_group(pgid: int, wait_s: float = 15.0) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)


@contextmanager
def ray_head(args: list[str], env: dict, cwd: str | Path | None = None):
    """`ray start --head ARGS` in a new session; yields, then stops everything it started."""
    start = subprocess.Popen([RAY_CLI, "start", "--head", *args], env=env, start_new_session=True, cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = start.communicate(timeout=90)
        assert start.returncode == 0, out
        yield
    finally:
        if start.poll() is None:
            start.kill()
        stop_group(start.pid)
        leftovers = group_members(start.pid)
        assert not leftovers, f"processes of the Ray head still running: {leftovers}"


@contextmanager
def loopback_cluster(prefix: str, head: dict, worker: dict, runtime_env: dict | None = None):
    """A head and one worker node from `ray.cluster_utils.Cluster`, connected to; yields (cluster, worker node).

    Cluster starts the nodes from this process with this process's environment, so
    token auth is switched on here the way Ray's own tests do it: RAY_AUTH_MODE=token
    and RAY_AUTH_TOKEN_PATH (a token of our own) in os.environ, then RayConfig and the
    token cache reloaded. Everything binds 127.0.0.1. All of it is undone afterwards.
    `head` and `worker` are the nodes' extra arguments (num_cpus, resources).
    """
    import ray
    from ray._private import ray_constants
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: socket paths
    (tmp / "token").write_text(secrets.token_hex(32))
    saved_env, saved_flag = dict(os.environ), ray_constants.ENABLE_RAY_CLUSTER
    for key in [k for k in os.environ if k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))]:
        del os.environ[key]
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp / "token"),
                      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    ray_constants.ENABLE_RAY_CLUSTER = False
    reset_auth_token_state()
    cluster = None
    try:
        common = {"node_ip_address": "127.0.0.1", "temp_dir": str(tmp / "ray"), "object_store_memory": 100_000_000}
        cluster = Cluster(initialize_head=True, head_node_args={
            **common, **head, "include_dashboard": False, "dashboard_agent_listen_port": 0})
        node = cluster.add_node(**common, **worker)
        ray.init(address=cluster.address, logging_level="ERROR", runtime_env=runtime_env)
        yield cluster, node
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved_env)
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        reset_auth_token_state()
        shutil.rmtree(tmp, ignore_errors=True)
