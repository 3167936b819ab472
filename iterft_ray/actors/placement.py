"""Placement: what a run asks Ray for, refused before any actor starts when the cluster can never hold it,
and bounded by `resources.start_timeout_s` while actors wait for nodes.

An example of what this stops: a filter actor that asks for half a CPU on a 2-CPU head the
trainer and a generator already fill. `check_cluster_fits` compares the whole run's request
with what a fixed cluster has, and `wait_started` gives every actor `resources.start_timeout_s`
to be placed; both raise `PlacementError` naming what was asked and what is there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray

from iterft_ray.actors.failures import ActorRoster, Deadline, RoundTimeoutError, _producer, describe_actor, wait_for
from iterft_ray.actors.footprint import actor_memory
from iterft_ray.actors.reward_pool import reward_models_of
from iterft_ray.config import ModelConfig, ResourcesConfig, SamplingConfig
from iterft_ray.ray_internals import (autoscaler_maxima, autoscaler_node_types, local_node_resources,
                                      readonly_node_type)
from iterft_ray.ray_start import embedded


class PlacementError(RuntimeError):
    """The run's actors cannot all be placed on the cluster: never (too big), or not within the start timeout."""



@dataclass(frozen=True)
class ActorRequest:
    """`count` actors of one role, each asking Ray for `bundle` (`{"CPU": 1, "generator": 1}`)."""

    role: str
    count: int
    bundle: dict[str, float]


def actor_requests(resources: ResourcesConfig, reward_models: int = 0, env: bool = False,
                   memory: dict[str, float] | None = None) -> list[ActorRequest]:
    """What the whole run asks Ray for: trainer ranks, generators, filter actors, `resources.num_reward_models`
    reward-model actors for each of the filters' `reward_models` distinct reward models, and with `env`
    (an `env:` section) `resources.num_env_workers` environment actors (the one place it is spelt out).
    `memory`: each role's bytes (`footprint.actor_memory`), asked for as Ray's `memory`."""
    r = resources
    memory = memory or {}

    def bundle(role: str, cpus: float, gpus: float, custom: str | None) -> dict[str, float]:
        b = {"CPU": cpus, "GPU": gpus, "memory": round(memory.get(role, 0)),
             **({custom: 1 if r.custom_resources else 0} if custom else {})}
        return {k: float(v) for k, v in b.items() if v}

    return [
        ActorRequest("trainer rank", r.trainer_ranks, bundle("trainer rank", r.trainer_cpus, r.trainer_gpus, "trainer")),
        ActorRequest("generator", r.num_generators, bundle("generator", r.generator_cpus, r.generator_gpus,
                                                            "generator")),
        ActorRequest("filter actor", r.filter_pool_size, bundle("filter actor", r.filter_cpus, 0, "filter")),
        ActorRequest("reward model", r.num_reward_models * reward_models,
                     bundle("reward model", r.reward_model_cpus, r.reward_model_gpus, None)),
        ActorRequest("env actor", r.num_env_workers if env else 0, bundle("env actor", r.env_cpus, 0, "env")),
    ]


def run_requests(model: ModelConfig, sampling: SamplingConfig, resources: ResourcesConfig, filters: list,
                 env: bool = False) -> list[ActorRequest]:
    """`actor_requests` of a run, each role with the memory its model takes (`footprint.actor_memory`)."""
    reward_models = reward_models_of(filters)
    memory = actor_memory(model, sampling, resources, [m.model for m in reward_models])
    return actor_requests(resources, len(reward_models), env, memory)


def actor_options(bundle: dict[str, float]) -> dict[str, Any]:
    """`bundle` as `.options(...)` of an actor: num_cpus, num_gpus, memory and the custom resources."""
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")}
    return {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0), "memory": bundle.get("memory"),
            "resources": custom or None}


def total_request(requests: list[ActorRequest]) -> dict[str, float]:
    total: dict[str, float] = {}
    for q in requests:
        for k, v in q.bundle.items():
            total[k] = total.get(k, 0.0) + v * q.count
    return total


def check_cluster_fits(requests: list[ActorRequest]) -> list[ActorRequest]:
    """Refuse, before any actor starts, a run that the cluster can never hold; returns the requests as the actors
    are to make them.

    On a fixed cluster (no autoscaler, or Ray's read-only one) and on the local Ray the whole
    request must fit in the nodes' total resources and each actor on one node. An autoscaling
    cluster that publishes its maxima in Ray's cluster config (read as Ray Train reads them) is
    held to those; one that does not (the autoscaler of `ray up` keeps its node types to itself)
    is not checked here, and `wait_started` bounds the wait for its nodes instead.
    Fragmentation (enough in total, but not in the right places) also shows only there.
    Where an autoscaler may add nodes and publishes no memory for them, the requests go without
    memory: its node types need not declare any, and an actor asking for memory would find none.
    """
    asked = total_request(requests)
    maxima = {} if embedded() else autoscaler_maxima()
    if maxima:
        short = {k for k, v in asked.items() if (k != "memory" or k in maxima) and v > maxima.get(k, 0) + 1e-9}
        if short:
            most = format_resources({k: maxima.get(k, 0) for k in asked if k != "memory" or k in maxima})
            raise PlacementError(_too_big(requests, asked, f"this cluster's autoscaler grows it to at most {most}",
                                          short))
        return requests if "memory" in maxima else without_memory(requests)
    if not embedded() and _autoscales():
        return without_memory(requests)
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    check_nodes_fit(requests, nodes, "the local Ray (this machine)" if embedded() else
                    f"this cluster ({len(nodes)} node{'s' * (len(nodes) != 1)}, no autoscaler)")
    return requests


def without_memory(requests: list[ActorRequest]) -> list[ActorRequest]:
    return [ActorRequest(q.role, q.count, {k: v for k, v in q.bundle.items() if k != "memory"}) for q in requests]


def check_machine_fits(requests: list[ActorRequest]) -> None:
    """`check_cluster_fits` for the local Ray that a run without a cluster would start, before it starts."""
    check_nodes_fit(requests, [local_node_resources()], "the local Ray (this machine)")


def check_nodes_fit(requests: list[ActorRequest], nodes: list[dict[str, float]], there: str) -> None:
    """The whole request within the nodes' total, and each actor on one node (`there` names the nodes)."""
    asked = total_request(requests)
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in asked}
    short = {k for k, v in asked.items() if v > have[k] + 1e-9}
    if short:
        raise PlacementError(_too_big(requests, asked, f"{there} has {format_resources(have)}", short))
    for q in requests:
        if q.count and not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in q.bundle.items()) for n in nodes):
            raise PlacementError(
                f"resources: a {q.role} asks for {format_resources(q.bundle)}, and no node of this cluster has that "
                f"much (nodes: {'; '.join(format_resources({k: n.get(k, 0.0) for k in q.bundle}) for n in nodes)}); "
                f"{_keys_of(q)}"
            )


def _too_big(requests: list[ActorRequest], asked: dict[str, float], there: str, short: set[str]) -> str:
    parts = ", ".join(f"{q.count} {q.role}{'s' * (q.count != 1)} x {format_resources(q.bundle)}"
                      for q in requests if q.count)
    rewards = ", num_reward_models" if any(q.role == "reward model" and q.count for q in requests) else ""
    rewards += ", num_env_workers" if any(q.role == "env actor" and q.count for q in requests) else ""
    memory = MEMORY_HINT if "memory" in short else ""
    return (f"resources: the run asks for {parts}: {format_resources(asked)} in all, but {there}, so not every "
            f"actor could ever start; lower the counts or per-actor resources (resources.trainer_ranks, "
            f"num_generators, filter_pool_size{rewards}, *_cpus, *_gpus){memory} or give the cluster more")


# What lowers an actor's memory (`footprint.actor_memory`): said wherever memory is what does not fit.
MEMORY_HINT = (", or the memory the model takes (a smaller model, model.lora, more resources.trainer_ranks, "
               "sampling.batch_size, sampling.vllm.kv_cache_memory_bytes)")


def _keys_of(q: ActorRequest) -> str:
    key = {"trainer rank": "trainer", "generator": "generator", "filter actor": "filter",
           "reward model": "reward_model", "env actor": "env"}[q.role]
    memory = MEMORY_HINT.removeprefix(", or ") + ", " if "memory" in q.bundle else ""
    return f"lower {memory}resources.{key}_cpus / resources.{key}_gpus or add a bigger node"


# How long a start waits for the autoscaler's first report naming nodes: a fresh head publishes an empty
# one (or none) for its first seconds, and deciding on that made the same start refuse or wait by chance.
AUTOSCALER_REPORT_WAIT_S = 20.0


def _autoscales(wait_s: float = AUTOSCALER_REPORT_WAIT_S) -> bool:
    """Whether an autoscaler with node types of its own runs (may add nodes), as its status says.

    Ray starts a read-only autoscaler on a head without an autoscaling config; its node
    types are the live nodes (`node_<id>`). A report that names no node yet is waited for
    (up to `wait_s`); still none then, or autoscaler v2 (another status format): counted
    as autoscaling, so nothing is refused on a guess.
    """
    deadline = time.monotonic() + wait_s
    while not (types := autoscaler_node_types()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not types:
        return True
    live = {readonly_node_type(n["NodeID"]) for n in ray.nodes()}
    return not types <= live


def wait_started(actors: list[tuple[str, ray.actor.ActorHandle, dict[str, float]]], deadline: Deadline,
                 roster: ActorRoster, requests: list[ActorRequest]) -> None:
    """Wait until every actor has been placed and has run its constructor, by `deadline`.

    `actors` are (name, handle, what it asks for). An actor whose constructor fails is
    raised as `ActorFailedError`; one still waiting for a node at the deadline as
    `PlacementError`, with what the run asks for and what the cluster has (in all, and free).
    """
    try:
        wait_for([a.__ray_ready__.remote() for _, a, _ in actors], deadline, "start", roster, fetch=True)
    except RoundTimeoutError:
        raise placement_timeout(deadline, not_started(actors), requests) from None


def not_started(actors: list[tuple[str, ray.actor.ActorHandle, dict[str, float]]]) -> list[str]:
    """Each of `actors` (name, handle, request) whose constructor has not run, described with its request."""
    ready = {a.__ray_ready__.remote(): (name, bundle) for name, a, bundle in actors}
    _, pending = ray.wait(list(ready), num_returns=len(ready), timeout=1.0, fetch_local=False)
    return [f"{describe_actor(_producer(r), ready[r][0])} asking for {format_resources(ready[r][1])}" for r in pending]


def placement_timeout(deadline: Deadline, waiting: list[str], requests: list[ActorRequest]) -> PlacementError:
    """The error for actors (`waiting`: each named, with its request) not started by the start deadline."""
    asked = total_request(requests)
    total, free = ray.cluster_resources(), ray.available_resources()
    return PlacementError(
        f"{deadline.key}: after {deadline.seconds:g} s these actors have not started: {'; '.join(waiting)}. "
        f"The run asks for {format_resources(asked)} in all; the cluster has "
        f"{format_resources({k: total.get(k, 0.0) for k in asked})}, of which "
        f"{format_resources({k: free.get(k, 0.0) for k in asked})} is free (other jobs' actors may hold the rest, "
        f"or the autoscaler could not add a node that fits). Lower the run's resources, free the cluster, or raise "
        f"{deadline.key} if nodes are still coming"
    )


def format_resources(resources: dict[str, float]) -> str:
    """`{CPU: 2, GPU: 1, memory: 1.25 GB}`: whole numbers without a fraction, memory in GB."""

    def num(k: str, v: float) -> str:
        if k == "memory":
            return f"{v / 1e9:.2f} GB"
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    return "{" + ", ".join(f"{k}: {num(k, v)}" for k, v in sorted(resources.items())) + "}"

