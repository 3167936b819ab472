"""Failure bounds while a run waits: a run that cannot go on stops with a message instead of waiting for ever.

- An actor that dies on every call (out of memory loading a snapshot, a selector that
  crashes its process): Ray restarts it at most `resources.max_restarts` times and retries
  its call at most `resources.max_task_retries` times; past that `wait_for` raises
  `ActorFailedError` naming the actor (`generator 1`), its node and its last error.
- A call that never returns: `wait_for` waits until a `Deadline` (`loop.round_timeout_s`
  for a round) and raises `RoundTimeoutError` naming the actors still working.

Placing the actors in the first place is `placement.py`'s job.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from iterft_ray.ray_internals import actor_id as handle_id, actor_record


class ActorFailedError(RuntimeError):
    """A generator or filter actor died past its restart limits, or raised, during a call the run needs."""


class RoundTimeoutError(RuntimeError):
    """Calls a round needs were not done by its deadline (`loop.round_timeout_s`)."""


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
    info = actor_record(actor_id) if actor_id else {}
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


def roster_of(named: dict[str, list[ray.actor.ActorHandle]], resources) -> ActorRoster:
    """The `ActorRoster` of handles by role (`{"generator": [...], "trainer rank": [...]}`: `generator 0`, ...)."""
    names = {handle_id(h): f"{role} {i}" for role, handles in named.items() for i, h in enumerate(handles)}
    return ActorRoster(names, resources.max_restarts, resources.max_task_retries)
