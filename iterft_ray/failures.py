"""Failure bounds: a run that cannot go on stops with a message instead of waiting for ever.

Three ways a run used to hang, and what stops each one:

- An actor that dies on every call (out of memory loading a snapshot, a selector that
  crashes its process): Ray restarts it at most `resources.max_restarts` times and retries
  its call at most `resources.max_task_retries` times; past that `wait_for` raises
  `ActorFailedError` naming the actor (`generator 1`), its node and its last error.
- A call that never returns: `wait_for` waits until a `Deadline` (`loop.round_timeout_s`
  for a round) and raises `RoundTimeoutError` naming the actors still working.
- Actors the cluster can never hold (a filter actor that asks for half a CPU on a
  2-CPU head the trainer and a generator already fill): `check_cluster_fits` compares the
  whole run's request with what a fixed cluster has, before any actor starts, and
  `wait_started` gives every actor `resources.start_timeout_s` to be placed; both raise
  `PlacementError` naming what was asked and what is there.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from iterft_ray.config import ResourcesConfig


class ActorFailedError(RuntimeError):
    """A generator or filter actor died past its restart limits, or raised, during a call the run needs."""


class RoundTimeoutError(RuntimeError):
    """Calls a round needs were not done by its deadline (`loop.round_timeout_s`)."""


class PlacementError(RuntimeError):
    """The run's actors cannot all be placed on the cluster: never (too big), or not within the start timeout."""


# ------------------------------------------------------------------ deadlines and waits


@dataclass(frozen=True)
class Deadline:
    """A point in time and the config key that set it, for the message when it passes."""

    at: float  # time.monotonic()
    seconds: float
    key: str

    @classmethod
    def after(cls, seconds: float, key: str) -> Deadline:
        return cls(time.monotonic() + seconds, seconds, key)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())


@dataclass(frozen=True)
class ActorRoster:
    """How errors name a run's actors (actor id in hex -> `generator 0`), and the limits they run under."""

    names: dict[str, str]
    max_restarts: int
    max_task_retries: int

    def name(self, actor_id: str | None) -> str:
        return self.names.get(actor_id or "", f"actor {actor_id}")


def wait_for(refs: list[ray.ObjectRef], deadline: Deadline | None, what: str, roster: ActorRoster,
             fetch: bool = False, on_done: Callable[[int], None] | None = None) -> list[Any] | None:
    """Wait until every reference is ready, by `deadline` (None: no limit); with `fetch`, return their values.

    Without `fetch` nothing is copied to this process (`fetch_local=False`): rollouts stay
    where they were made, and a failed one shows when the call that consumes it fails. With
    `fetch` (small results only: summaries, statistics) each value is fetched once, as soon
    as it is ready, so the first failure is raised at once, not when the slowest call ends.
    `on_done(n)` is told how many finished at each wake-up (a progress bar).
    """
    pending, values = list(refs), {}
    while pending:
        timeout = None if deadline is None else deadline.remaining()
        done, pending = ray.wait(pending, num_returns=1, timeout=timeout, fetch_local=fetch)
        if not done:
            raise round_timeout(pending, deadline, what, roster)
        if fetch:
            values[done[0]] = get_or_name(done[0], what, roster)
        if on_done is not None:
            on_done(len(done))
    return [values[r] for r in refs] if fetch else None


def get_or_name(ref: ray.ObjectRef, what: str, roster: ActorRoster) -> Any:
    """`ray.get(ref)`; a generator's or filter's failure becomes `ActorFailedError` naming that actor.

    A trainer rank's failure is raised as Ray raised it: the loop recognises a dead trainer
    by Ray's `RayActorError` and restores it from a checkpoint.
    """
    try:
        return ray.get(ref)
    except (RayActorError, RayTaskError) as error:
        actor_id = _failing_actor(error) or _producer(ref)
        name = roster.name(actor_id)
        if name.startswith("trainer"):
            raise
        died = isinstance(_innermost(error), RayActorError)
        limits = (f" (restarts allowed: resources.max_restarts = {roster.max_restarts}, retries of a call: "
                  f"resources.max_task_retries = {roster.max_task_retries})") if died else ""
        raise ActorFailedError(
            f"{what}: {describe_actor(actor_id, name)} {'died' if died else 'failed'}{limits}; last error: "
            f"{last_error(error)}"
        ) from None


def round_timeout(pending: list[ray.ObjectRef], deadline: Deadline, what: str, roster: ActorRoster
                  ) -> RoundTimeoutError:
    """The error for calls still `pending` at `deadline`, naming the actors that run them."""
    working = sorted({_producer(r) or "" for r in pending})
    who = "; ".join(describe_actor(a, roster.name(a)) if a else "a Ray task of the driver" for a in working)
    return RoundTimeoutError(f"{what}: not done within {deadline.key} ({deadline.seconds:g} s); {len(pending)} of "
                             f"its calls still running, on: {who}")


def _producer(ref: ray.ObjectRef) -> str | None:
    """The actor whose call makes `ref` (None for a task or a put)."""
    actor = ref.task_id().actor_id()
    return None if actor.is_nil() else actor.hex()


def _innermost(error: BaseException) -> BaseException:
    """The error at the bottom of a chain of task errors (a filter call whose rollout's generator died)."""
    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return error


def _failing_actor(error: BaseException) -> str | None:
    """The id of the actor where a (chained) failure started: the one that died, or the one that raised.

    A call that raised is named in its traceback's header (`actor_id=...`); a call whose
    input failed carries its input's traceback after its own, so the last header is the origin.
    """
    chain = error
    while True:
        if isinstance(chain, RayActorError) and getattr(chain, "actor_id", None):
            return chain.actor_id
        if not isinstance(chain, RayTaskError) or chain.cause is None:
            break
        chain = chain.cause
    headers = re.findall(r"actor_id=([0-9a-f]+)", str(error))
    return headers[-1] if headers else None


_RAY_CONTEXT = re.compile(r"\s*(class_name|actor_id|pid|name|namespace|ip): ")


def last_error(error: BaseException, limit: int = 500) -> str:
    """One line: the exception a call raised, or Ray's notice of how an actor died."""
    inner = _innermost(error)
    if isinstance(inner, RayActorError):  # less what describe_actor already says
        text = "\n".join(line for line in str(inner).splitlines() if not _RAY_CONTEXT.match(line))
    else:
        text = f"{type(inner).__name__}: {inner}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_actor(actor_id: str | None, name: str) -> str:
    """`generator 0 (GeneratorActor, node 1a2b3c4d at 10.0.0.5, pid 4242, DEAD after 3 restarts)`, as the GCS
    has it; an actor not running anywhere yet says so."""
    info = ray._private.state.actors(actor_id=actor_id) if actor_id else {}
    if not info:
        return name
    # An actor waiting for resources may already have a node picked, but no process (pid 0) yet.
    # A dead actor's record may keep its node but lose the address.
    ip = info["Address"].get("IPAddress")
    where = (f"node {info['Address']['NodeID'][:8]}{f' at {ip}' if ip else ''}, pid {info['Pid']}"
             if info["Pid"] else "no process on any node yet")
    restarts = info["NumRestarts"]
    state = f"{info['State']} after {restarts} restart{'s' * (restarts != 1)}" if restarts else info["State"]
    return f"{name} ({info['ActorClassName']}, {where}, {state})"


# ------------------------------------------------------------------ placement


@dataclass(frozen=True)
class ActorRequest:
    """`count` actors of one role, each asking Ray for `bundle` (`{"CPU": 1, "generator": 1}`)."""

    role: str
    count: int
    bundle: dict[str, float]


def actor_requests(resources: ResourcesConfig) -> list[ActorRequest]:
    """What the whole run asks Ray for: trainer ranks, generators, filter actors (the one place it is spelt out)."""
    r = resources

    def bundle(cpus: float, gpus: float, custom: str) -> dict[str, float]:
        b = {"CPU": cpus, "GPU": gpus, custom: 1 if r.custom_resources else 0}
        return {k: float(v) for k, v in b.items() if v}

    return [
        ActorRequest("trainer rank", r.trainer_ranks, bundle(r.trainer_cpus, r.trainer_gpus, "trainer")),
        ActorRequest("generator", r.num_generators, bundle(r.generator_cpus, r.generator_gpus, "generator")),
        ActorRequest("filter actor", r.filter_pool_size, bundle(r.filter_cpus, 0, "filter")),
    ]


def actor_options(bundle: dict[str, float]) -> dict[str, Any]:
    """`bundle` as `.options(...)` of an actor: num_cpus, num_gpus and the custom resources."""
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0), "resources": custom or None}


def total_request(requests: list[ActorRequest]) -> dict[str, float]:
    total: dict[str, float] = {}
    for q in requests:
        for k, v in q.bundle.items():
            total[k] = total.get(k, 0.0) + v * q.count
    return total


def check_cluster_fits(requests: list[ActorRequest]) -> None:
    """Refuse, before any actor starts, a run that the cluster can never hold.

    On a fixed cluster (no autoscaler, or Ray's read-only one) the whole request must fit
    in the nodes' total resources and each actor on one node. An autoscaling cluster that
    publishes its maxima in Ray's cluster config (read as Ray Train reads them) is held to
    those; one that does not (the autoscaler of `ray up` keeps its node types to itself)
    is not checked here, and `wait_started` bounds the wait for its nodes instead.
    Fragmentation (enough in total, but not in the right places) also shows only there.
    """
    asked = total_request(requests)
    maxima = ray._private.state.state.get_max_resources_from_cluster_config()
    if maxima:
        short = {k: v for k, v in asked.items() if v > maxima.get(k, 0) + 1e-9}
        if short:
            most = format_resources({k: maxima.get(k, 0) for k in asked})
            raise PlacementError(_too_big(requests, asked, f"this cluster's autoscaler grows it to at most {most}"))
        return
    if _autoscales():
        return
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in asked}
    there = f"this cluster ({len(nodes)} node{'s' * (len(nodes) != 1)}, no autoscaler) has {format_resources(have)}"
    if any(v > have[k] + 1e-9 for k, v in asked.items()):
        raise PlacementError(_too_big(requests, asked, there))
    for q in requests:
        if q.count and not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in q.bundle.items()) for n in nodes):
            raise PlacementError(
                f"resources: a {q.role} asks for {format_resources(q.bundle)}, and no node of this cluster has that "
                f"much (nodes: {'; '.join(format_resources({k: n.get(k, 0.0) for k in q.bundle}) for n in nodes)}); "
                f"{_keys_of(q.role)}"
            )


def _too_big(requests: list[ActorRequest], asked: dict[str, float], there: str) -> str:
    parts = ", ".join(f"{q.count} {q.role}{'s' * (q.count != 1)} x {format_resources(q.bundle)}"
                      for q in requests if q.count)
    return (f"resources: the run asks for {parts}: {format_resources(asked)} in all, but {there}, so not every "
            f"actor could ever start; lower the counts or per-actor resources (resources.trainer_ranks, "
            f"num_generators, filter_pool_size, *_cpus, *_gpus) or give the cluster more")


def _keys_of(role: str) -> str:
    key = {"trainer rank": "trainer", "generator": "generator", "filter actor": "filter"}[role]
    return f"lower resources.{key}_cpus / resources.{key}_gpus or add a bigger node"


def _autoscales() -> bool:
    """Whether an autoscaler with node types of its own runs (may add nodes), as its status says.

    Ray starts a read-only autoscaler on a head without an autoscaling config; its node
    types are the live nodes (`node_<id>`). No status yet, or autoscaler v2 (another
    status format): counted as autoscaling, so nothing is refused on a guess.
    """
    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2():
        return True
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return True
    report = json.loads(raw).get("autoscaler_report") or {}
    types = set(report.get("active_nodes") or {}) | {p[2] for p in report.get("pending_nodes") or []}
    types |= set(report.get("pending_launches") or {})
    live = {format_readonly_node_type(n["NodeID"]) for n in ray.nodes()}
    return not types or not types <= live


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
    """`{CPU: 2, GPU: 1}`: whole numbers without a fraction."""

    def num(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    return "{" + ", ".join(f"{k}: {num(v)}" for k, v in sorted(resources.items())) + "}"

