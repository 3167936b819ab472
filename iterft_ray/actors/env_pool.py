"""EnvPool: the environment actors, where environments run for the trajectories the generators sample.

Environments outgrow a generator's node at scale (sandboxes, databases, simulators), so they run in
actors of their own (`resources.num_env_workers`, each asking for `resources.env_cpus` and, on a
cluster made from cluster/*.yaml, the `env` resource), never in the engine's process. An actor hosts
one environment instance per process (`iterft_ray.envs.hosts`) and serves the calls of many
trajectories at once, one thread each; a trajectory keeps its actor and process for all its turns.
"""

from __future__ import annotations

from typing import Any

import ray

from iterft_ray.config import EnvConfig
from iterft_ray.envs.hosts import EnvProcesses, Reply
from iterft_ray.envs.protocol import Messages

# Threads of an environment actor: the trajectories whose calls it runs at once (its processes mostly wait).
ENV_ACTOR_THREADS = 256


@ray.remote
class EnvActor:
    """Runs `open`, `step` and `close` of trajectories' environments, each in its trajectory's process."""

    def __init__(self, env: EnvConfig):
        self.processes = EnvProcesses(env.name, env.config, env.turn_timeout_s)
        self.processes.start()

    def open(self, key: str, name: str, extras: dict[str, Any], prompt: Messages) -> Reply:
        return self.processes.open(key, name, extras, prompt)

    def step(self, key: str, action: str) -> Reply:
        return self.processes.step(key, action)

    def close(self, key: str) -> Reply:
        return self.processes.close(key)


class EnvPool:
    """`size` environment actors for `env`; `options` are each actor's Ray options (resources, restarts)."""

    def __init__(self, env: EnvConfig, size: int, options: dict[str, Any]):
        self.actors = [EnvActor.options(**options, max_concurrency=ENV_ACTOR_THREADS).remote(env)
                       for _ in range(size)]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
