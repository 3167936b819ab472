"""Connecting to Ray, or starting an embedded one: on loopback, with token authentication as configured."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray

from iterft_ray.ray_internals import FREE_OBJECTS_SOON, dialed_address, inside_ray_job, listen_on_loopback_only


def init_ray(address: str | None = None) -> None:
    """Connect to Ray, or start a local one with what this machine has.

    The local Ray counts the machine's CPUs and memory as Ray itself does (`RAY_OVERRIDE_RESOURCES`, Ray's
    own variable, can say otherwise), never the run's demand: a run that asks for more is refused by the
    fit check (`placement.check_cluster_fits`) before any actor starts, as on a cluster.
    """
    global _embedded
    if ray.is_initialized():
        return
    if address is not None or os.environ.get("RAY_ADDRESS"):
        check_listening(address or os.environ["RAY_ADDRESS"], "--address" if address else "RAY_ADDRESS")
        ray.init(address=address, runtime_env=_runtime_env(cluster=True), logging_level=logging.WARNING)
        return
    listen_on_loopback_only()
    # Token auth on loopback is this project's own default setup, not news for the user at every start.
    token_note = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = token_note.level
    token_note.setLevel(logging.ERROR)
    try:
        # No dashboard: its processes cost a run 2-3 s of start-up on 2 cores (`jobs/bench_startup.py`); a head
        # started with `ray start --head` has one, and `--address` runs there.
        ray.init(address="local", runtime_env=_runtime_env(cluster=False), logging_level=logging.WARNING,
                 _system_config=FREE_OBJECTS_SOON, include_dashboard=False)
    finally:
        token_note.setLevel(level)
    _embedded = ray.get_runtime_context().gcs_address


_embedded: str | None = None  # the GCS address of the local Ray this process started, if any


def embedded() -> bool:
    """Whether the connected Ray is one this process started (one node, no autoscaler)."""
    return ray.is_initialized() and _embedded == ray.get_runtime_context().gcs_address


# The actors load and save models with transformers, whose per-file bars ("Loading weights", "Writing model
# shards") would reach the driver's console through Ray's log forwarding on every start and checkpoint.
QUIET_ACTORS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _runtime_env(cluster: bool) -> dict | None:
    """The runtime_env of the run's workers: quiet transformers bars, and on a cluster the working directory's
    modules. Under `ray job submit` the job's own runtime_env (jobs/runtime_env.yaml) sets both."""
    if inside_ray_job():
        return None
    return {"env_vars": dict(QUIET_ACTORS), **((_working_dir_modules() or {}) if cluster else {})}


class RayAddressError(ValueError):
    """Nothing answers at the Ray address given: found in seconds, where `ray.init` would retry for minutes."""


def check_listening(address: str, key: str, timeout_s: float = 10.0) -> None:
    """Refuse an address where nothing accepts a connection, naming `key` (`--address` or `RAY_ADDRESS`).

    Dials what `ray.init` would dial: for 127.0.0.1 that is this host's own address unless
    loopback-only mode is on, so a head started with it (the README's variable) and a driver
    without it meet here, with the variable to set. `ray://` (Ray Client) has its own timeout.
    """
    if address.startswith("ray://"):
        return
    try:
        dialed = dialed_address(address)
    except (ValueError, ConnectionError) as e:  # no host:port, or "auto" and no Ray running
        raise RayAddressError(f"{key}: {address!r}: {e}; expected the head's HOST:PORT") from None
    if dialed is None:
        return
    if _accepts(dialed, timeout_s):
        return
    hint = "is a Ray head running there? (`ray status` on the head prints its address)"
    if dialed != address and _accepts(address, timeout_s):
        hint = (f"{address} answers on loopback only, and Ray dials this host's address {dialed} unless "
                f"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set, as for the head")
    where = address if dialed == address else f"{address} (dialed as {dialed})"
    raise RayAddressError(f"{key}: nothing accepts a connection at {where} within {timeout_s:g} s; {hint}")


def _accepts(host_port: str, timeout_s: float) -> bool:
    host, _, port = host_port.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError):
        return False
    return True


def _working_dir_modules() -> dict | None:
    """A runtime_env that ships the working directory's `*.py` modules to a cluster's nodes.

    A user's filter (`filters: ["mymod:check"]`) lives beside the config; a local Ray
    already puts the driver's working directory on every worker's path, but nodes of a
    cluster do not have that directory. `py_modules` uploads just those files (not the
    directory, which may hold runs and checkpoints) and does not move the actors' working
    directory. Under `ray job submit` the job's own runtime_env (`--working-dir .`) does this.
    """
    modules = sorted(str(p) for p in Path.cwd().glob("*.py"))
    if not modules or inside_ray_job():
        return None
    return {"py_modules": modules}
