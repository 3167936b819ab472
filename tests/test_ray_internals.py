"""Every private Ray API the package uses, called against a real Ray: a Ray upgrade that moves one fails here."""

import os
import time

import numpy as np
import pytest
import ray

from iterft_ray import ray_internals


@pytest.fixture
def local_ray(ray_up):
    """The session's Ray (tests/conftest.py)."""


@ray.remote(num_cpus=0)
class _Probe:
    def own_id(self) -> str:
        return ray.get_runtime_context().get_actor_id()


def test_checked_on_the_locked_ray():
    assert ray.__version__ == ray_internals.CHECKED_ON


def test_actor_id_and_record(local_ray):
    probe = _Probe.remote()
    actor = ray_internals.actor_id(probe)
    assert actor == ray.get(probe.own_id.remote())
    record = ray_internals.actor_record(actor)
    assert record["ActorClassName"] == "_Probe" and record["State"] == "ALIVE"
    assert record["Address"]["NodeID"] == ray.get_runtime_context().get_node_id()
    assert {"Pid", "NumRestarts"} <= set(record)
    ray.kill(probe)
    assert ray_internals.actor_record("ff" * 16) == {}


def test_autoscaler_readers(local_ray):
    assert ray_internals.autoscaler_maxima() == {}  # no autoscaler published maxima
    node = ray.get_runtime_context().get_node_id()
    name = ray_internals.readonly_node_type(node)
    assert isinstance(name, str) and node in name
    types = ray_internals.autoscaler_node_types()
    assert types is None or types <= {name}  # a local head: at most Ray's read-only autoscaler's own node


def test_object_store_buffers_are_recognised(local_ray):
    array = ray.get(ray.put(np.zeros(1 << 20, np.uint8)))
    base = array
    while getattr(base, "base", None) is not None:
        base = base.base
    assert ray_internals.is_object_store_buffer(base)
    assert not ray_internals.is_object_store_buffer(np.zeros(4).base)


def test_loopback_switch_and_job_detection(monkeypatch):
    from ray._private import ray_constants

    monkeypatch.delenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_internals.listen_on_loopback_only()
    assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert not ray_internals.inside_ray_job()
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}")
    assert ray_internals.inside_ray_job()


def test_dialed_address_is_what_ray_init_dials():
    assert ray_internals.dialed_address("local") is None  # ray.init starts a Ray
    assert ray_internals.dialed_address("10.1.2.3:6379") == "10.1.2.3:6379"
    with pytest.raises(ValueError):
        ray_internals.dialed_address("http://10.1.2.3:8265")


def _shmem() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Shmem:"))


def test_a_dropped_object_frees_its_pages_for_the_next_put(local_ray):
    """`FREE_OBJECTS_SOON`: a weight version let go just before the next is put leaves its pages to it, so
    the store holds one version's pages, not two (Ray's default frees once a second)."""
    size = 64 << 20
    first = ray.put(np.ones(size, np.uint8))  # pages the store may not have used yet
    del first
    time.sleep(0.2)
    before = _shmem()
    second = ray.put(np.full(size, 2, np.uint8))
    grown = _shmem() - before
    assert ray.get(second)[0] == 2
    assert grown < size // 2, f"the second put took {grown >> 20} MiB of new pages"


def test_local_node_resources_are_what_a_local_ray_would_have():
    import psutil

    from iterft_ray.ray_internals import local_node_resources

    node = local_node_resources()
    assert node["CPU"] == os.cpu_count()
    assert 0 < node["memory"] + node["object_store_memory"] <= psutil.virtual_memory().total
