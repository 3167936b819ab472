"""Shared fixtures: tiny models built once per session, loaded through from_pretrained; one local Ray for
the modules that can share one."""

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from iterft_ray.actors.warm import keep_actors_warm  # noqa: E402
from iterft_ray.ray_internals import FREE_OBJECTS_SOON  # noqa: E402
from iterft_ray.ray_start import QUIET_ACTORS  # noqa: E402
from iterft_ray.tiny import build_tiny_model  # noqa: E402
from ray_head import live_actors, live_placement_groups  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: str(build_tiny_model(name, root / name)) for name in ("tiny-llama", "tiny-gpt2", "tiny-t5")}


@pytest.fixture(scope="session")
def llama_path(tiny_paths):
    return tiny_paths["tiny-llama"]


@pytest.fixture(scope="session")
def t5_path(tiny_paths):
    return tiny_paths["tiny-t5"]


@pytest.fixture(scope="session")
def bf16_checkpoint(llama_path, tmp_path_factory):
    """tiny-llama saved in bf16, as a real model's checkpoint is (config.json says bfloat16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("bf16") / "model"
    AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(llama_path).save_pretrained(path)
    assert AutoModelForCausalLM.from_pretrained(path).dtype == torch.bfloat16  # transformers keeps the saved dtype
    return str(path)


# ---------------------------------------------------------------- one local Ray for the session


class SharedRay:
    """One embedded local Ray that the modules which need no cluster of their own share, instead of each
    starting (and stopping) one: a start is seconds of CPU on a small machine.

    Started on first use (`up()`) and left running for the next module; a module or test that needs Ray
    down (one that starts its own, or checks that nothing started one) calls `down()`, and the next `up()`
    starts it again. Loopback only and token auth on, with a token of its own (`loopback_cluster` in
    ray_head.py does the same for two-node clusters): RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH stay in
    os.environ while it runs, so a subprocess that connects to it (a child driver) authenticates.

    Sized for the largest module that shares it (test_ray_loop: 8 CPUs). The job's runtime_env puts this
    directory on the workers' PYTHONPATH, as `ray job submit --working-dir` would: actors import the test
    modules' filters and selectors by import string. `up()` gives each user a clean cluster, as a fresh Ray
    would be: no live actor, no placement group.
    """

    NUM_CPUS = 8
    # Ray keeps up to NUM_CPUS idle task workers (and starts them with the first driver); each idle one costs
    # ~0.4 s of CPU a minute, and this Ray lives as long as the suite. Two are kept for the runs' writer tasks.
    IDLE_WORKERS = {"num_workers_soft_limit": 2, "prestart_worker_first_driver": False}

    def __init__(self):
        self.running = False
        self._tmp = None
        self._saved = None

    def up(self):
        import ray

        if self.running and ray.is_initialized():
            self._clear()
            return
        if ray.is_initialized():
            raise RuntimeError("another Ray is connected; the module that started it must shut it down")
        self._start()

    def down(self):
        import ray

        if not self.running:
            return
        self.running = False
        try:
            ray.shutdown()
        finally:
            self._restore()

    def _start(self):
        import ray
        from ray._private import ray_constants
        from ray._private.authentication_test_utils import reset_auth_token_state

        self._tmp = Path(tempfile.mkdtemp(prefix="iftshared", dir="/tmp"))
        (self._tmp / "token").write_text(secrets.token_hex(32))
        self._saved = (dict(os.environ), ray_constants.ENABLE_RAY_CLUSTER)
        for key in [k for k in os.environ if k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))]:
            del os.environ[key]
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self._tmp / "token"),
                          RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
        ray_constants.ENABLE_RAY_CLUSTER = False
        reset_auth_token_state()
        try:
            ray.init(address="local", num_cpus=self.NUM_CPUS, include_dashboard=False,
                     _system_config={**FREE_OBJECTS_SOON, **self.IDLE_WORKERS},
                     runtime_env={"env_vars": {"PYTHONPATH": str(TESTS), **QUIET_ACTORS}})
        except BaseException:
            self._restore()
            raise
        self.running = True

    def _restore(self):
        from ray._private import ray_constants
        from ray._private.authentication_test_utils import reset_auth_token_state

        if self._saved is not None:
            environ, flag = self._saved
            os.environ.clear()
            os.environ.update(environ)
            ray_constants.ENABLE_RAY_CLUSTER = flag
            self._saved = None
        reset_auth_token_state()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _clear(self, wait_s: float = 20.0):
        """Give the module a clean cluster, as a fresh Ray would be: wait for the actors and placement groups
        that earlier modules let go of to be gone; if any are still held, start a fresh Ray instead.

        Ray Data's singletons (`live_actors`) do not count: they stay for the cluster's life by design, and
        counting them cost every test after a prompts file a 20 s wait and a new Ray; nor do the actors a
        module keeps warm (`warm_actors`)."""
        deadline = time.monotonic() + wait_s
        while True:
            if not live_actors() and not live_placement_groups():
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.down()
        self._start()


@pytest.fixture(scope="session")
def shared_ray():
    """The session's one local Ray (see SharedRay): `shared_ray.up()` in a module's Ray fixture."""
    shared = SharedRay()
    yield shared
    shared.down()


@pytest.fixture(scope="module")
def warm_actors():
    """The module's trainers reuse the actors of its earlier ones (`keep_actors_warm`): each new actor is a
    process importing torch and transformers, seconds of CPU. For modules whose tests need no fresh process
    (one that checks a process's own peak memory, or that nothing is left after a run, does)."""
    with keep_actors_warm() as warm:
        yield warm


@pytest.fixture
def ray_up(shared_ray):
    """The shared Ray, up and clean, for one test (a module-scoped fixture calls `shared_ray.up()` itself)."""
    shared_ray.up()
    return shared_ray


@pytest.fixture
def ray_down(shared_ray):
    """No Ray connected: the shared one taken down, for a test that checks that nothing started one."""
    shared_ray.down()


@pytest.fixture(scope="module")
def own_ray(shared_ray):
    """For a module that starts a Ray of its own (its own cluster shape or settings): the shared one taken down
    first, since one process connects to one Ray."""
    shared_ray.down()


def _ray_group(items) -> int:
    """0: needs no Ray; 1: shares the session's Ray; 2: starts Ray of its own."""
    names = set().union(*(item.fixturenames for item in items))
    return 2 if "own_ray" in names else 1 if "shared_ray" in names else 0


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Run the modules that share the session's Ray one after another, so that it starts once rather than
    once per run of them: after the modules that need no Ray, before those that start their own. Within a
    module, the tests that take the shared Ray down (`ray_down`) run first, the others in their order. Any
    order works; this one only starts Ray less often."""
    modules = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = {name: (_ray_group(module_items), i) for i, (name, module_items) in enumerate(modules.items())}
    items.sort(key=lambda item: (order[item.nodeid.split("::")[0]], "ray_down" not in item.fixturenames))
