"""Connecting to Ray, or starting an embedded one: on loopback, with token authentication as configured."""

from __future__ import annotations

import math
import os
from pathlib import Path

import ray

from iterft_ray.actors.placement import actor_requests, total_request
from iterft_ray.config import ResourcesConfig
from iterft_ray.ray_internals import inside_ray_job, listen_on_loopback_only


def init_ray(resources: ResourcesConfig, address: str | None = None) -> None:
    """Connect to Ray, or start a local one that can hold every actor of `resources`.

    A local Ray counts one CPU per core; the actors of a config may ask for more (a
    trainer, generators and filters each take a share), so the local Ray advertises
    at least what they ask for instead of leaving one of them pending for ever.
    """
    if ray.is_initialized():
        return
    if address is not None or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=_working_dir_modules())
        return
    demand = total_request(actor_requests(resources)).get("CPU", 0)
    listen_on_loopback_only()
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(demand)))


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
