"""The few private Ray APIs iterft_ray needs, each with why, checked on Ray 2.60.0.

Everything else in the package uses Ray's public API. Each function here wraps one private
name, so a Ray upgrade that moves it breaks here and in `tests/test_ray_internals.py`,
which calls every one of them, and nowhere else.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ray

CHECKED_ON = "2.60.0"


def actor_id(handle: ray.actor.ActorHandle) -> str:
    """The hex id of an actor handle, to name actors in errors (`generator 0`) by the ids Ray's errors carry.

    Private: `ActorHandle._actor_id`; the public `get_runtime_context().get_actor_id()` works only
    inside the actor itself.
    """
    return handle._actor_id.hex()


def actor_record(actor_id_hex: str) -> dict[str, Any]:
    """The GCS's record of one actor (node, address, pid, state, restarts), {} if it has none.

    Private: `ray._private.state.actors`; `ray.util.state.get_actor` needs the dashboard's state
    API, which an embedded Ray started without a dashboard does not serve.
    """
    return ray._private.state.actors(actor_id=actor_id_hex) or {}


def autoscaler_maxima() -> dict[str, float]:
    """The resource maxima an autoscaler published in Ray's cluster config (KubeRay, Ray Train's source),
    {} when none did.

    Private: `GlobalState.get_max_resources_from_cluster_config`, the one reader of that config.
    """
    return ray._private.state.state.get_max_resources_from_cluster_config() or {}


def autoscaler_node_types() -> set[str] | None:
    """The node types in the (v1) autoscaler's last status report, or None when there is no report yet or
    the autoscaler is v2 (another format): the caller then assumes nodes may be added.

    Private: the status is in the GCS's internal KV under `DEBUG_AUTOSCALING_STATUS`; no public
    API reports an autoscaler's node types.
    """
    from ray._private import ray_constants
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2():
        return None
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return None
    report = json.loads(raw).get("autoscaler_report") or {}
    types = set(report.get("active_nodes") or {}) | {p[2] for p in report.get("pending_nodes") or []}
    return types | set(report.get("pending_launches") or {})


def readonly_node_type(node_id: str) -> str:
    """The name Ray's read-only autoscaler (a plain `ray start --head`) gives a live node's type.

    Private: `ray.autoscaler._private.util.format_readonly_node_type`; comparing with it tells a
    read-only autoscaler (node types = the live nodes) from one that can add nodes.
    """
    from ray.autoscaler._private.util import format_readonly_node_type

    return format_readonly_node_type(node_id)


# Ray frees the objects whose last reference went once a second (its `free_objects_period_milliseconds`,
# 1000). A weight version the driver lets go just before the trainer puts the next is then still in the
# store, the next goes into pages the store had not used yet, and the store keeps every page it has
# used: two versions' worth (1 GB more at Qwen2.5-0.5B in bf16) for the rest of the run. Within 10 ms the
# old version's pages are free before the cast of the next ends. Private: `_system_config`, read when a
# Ray starts (a cluster started elsewhere keeps its own; `RAY_free_objects_period_milliseconds=10` there).
FREE_OBJECTS_SOON = {"free_objects_period_milliseconds": 10}


def listen_on_loopback_only() -> None:
    """Make an embedded local Ray bind 127.0.0.1 instead of the host's address.

    Ray's switch is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its local-only mode). The processes Ray
    starts read the variable; this process read it when Ray was imported, so the module constant
    `ray_constants.ENABLE_RAY_CLUSTER` is set as well (private: no public switch exists).
    Set the variable to 1 to let other machines reach the embedded Ray.
    """
    from ray._private import ray_constants

    local_only = os.environ.setdefault(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0") == "0"
    ray_constants.ENABLE_RAY_CLUSTER = not local_only


def dialed_address(address: str) -> str | None:
    """The host:port `ray.init(address=...)` will dial: "auto" looked up, a loopback host replaced by this
    host's address (unless in loopback-only mode, `listen_on_loopback_only`); None where Ray would start one.

    Private: `ray._private.services.canonicalize_bootstrap_address`, the function `ray.init` itself uses,
    so a check before `ray.init` dials what Ray would (it retries an unreachable GCS for minutes).
    """
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address)


def inside_ray_job() -> bool:
    """Whether this driver runs under `ray job submit` (the job's runtime_env already ships its files).

    Private: the name of the variable Ray's job supervisor sets, `RAY_JOB_CONFIG_JSON_ENV_VAR`.
    """
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ


def is_object_store_buffer(obj: Any) -> bool:
    """Whether `obj` (the bottom `.base` of a numpy array) is a buffer of Ray's shared-memory object store.

    Private: the buffer type lives in `ray._raylet`; a weight snapshot joins its pieces without a
    copy only where they lie in one object-store object.
    """
    return type(obj).__module__ == "ray._raylet"


def local_node_resources() -> dict[str, float]:
    """What a local Ray started now would have: the machine's CPUs, GPUs and memory as Ray counts them
    (`RAY_OVERRIDE_RESOURCES` included), for `iterft check` to test a run's fit without starting one.

    Private: `ResourceAndLabelSpec`, the class `ray.init` resolves a new node's resources with.
    """
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    return ResourceAndLabelSpec().resolve(is_head=True, node_ip_address="127.0.0.1").to_resource_dict()
