"""Warm actors: within `keep_actors_warm()`, a finished trainer's actors wait for the next trainer of the same
shape instead of exiting, so a driver that builds trainer after trainer (a notebook, a sweep, a test module)
starts each actor process once.

A new actor is a new process that imports torch and transformers before it does anything: seconds of CPU
each, more than a tiny model's whole round. An actor handed back is first made as new (`release` on the actor:
a generator rebuilds its engine from the files, a trainer rank drops its trainer and weight version) and is
kept only if that worked and Ray never restarted it (a restarted actor has used up restarts a new one would
have). It is taken only by a pool asking for an actor of the same spec: the same constructor arguments and
Ray options, so a restart of a reused actor by Ray builds what the pool asked for. Idle actors hold their
resources, so they end before a new actor of their kind starts, before a trainer's ranks wait for their
placement group, and once a trainer has taken what it can use (`take_or_start`, `end_idle_actors`): a trainer
of another shape, or a second one beside the first, is never left waiting for CPUs that idle actors hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import cloudpickle
import ray
from ray.util.placement_group import PlacementGroup

from iterft_ray.ray_internals import actor_id, actor_record

RELEASE_TIMEOUT_S = 30.0


@dataclasses.dataclass
class _Kept:
    item: Any
    actor_ids: set[str]
    placement_group_id: str | None
    end: Callable[[], None]
    job: str | None  # the driver's Ray job: actors of an earlier connection died with it


class WarmActors:
    """Idle actors by spec; `close` ends them all."""

    def __init__(self) -> None:
        self._idle: dict[bytes, tuple[str, list[_Kept]]] = {}  # spec's key: (the spec's kind, what is kept)

    def take(self, spec: tuple) -> Any | None:
        """An idle actor (or group of them) kept under `spec`, or None."""
        kept = self._idle.get(_key(spec), (None, []))[1]
        while kept:
            k = kept.pop()
            if k.job == _job():
                return k.item
        return None

    def keep(self, spec: tuple, item: Any, handles: list[ray.actor.ActorHandle], end: Callable[[], None],
             placement_group: PlacementGroup | None = None) -> None:
        """Keep `item` (the actors `handles`, in `placement_group` if they have one) under `spec` if every actor
        releases cleanly; `end` stops it when it is not kept, or when the warm actors close."""
        if not _released(handles):
            end()
            return
        group = placement_group.id.hex() if placement_group is not None else None
        self._idle.setdefault(_key(spec), (spec[0], []))[1].append(_Kept(item, {actor_id(h) for h in handles}, group,
                                                                          end, _job()))

    def held(self) -> tuple[set[str], set[str]]:
        """The hex ids of the actors and of the placement groups kept idle: not a finished run's leftovers."""
        kept = [k for _, ks in self._idle.values() for k in ks]
        return (set().union(*(k.actor_ids for k in kept)),
                {k.placement_group_id for k in kept if k.placement_group_id is not None})

    def close(self, kind: str | None = None) -> None:
        """End every idle actor, or those of `kind` (a spec's first item)."""
        job = _job()
        for key in [k for k, (spec_kind, _) in self._idle.items() if kind is None or spec_kind == kind]:
            for k in self._idle.pop(key)[1]:
                if k.job == job:
                    k.end()


_warm: WarmActors | None = None


def take_or_start(kind: str, spec: tuple | None, start: Callable[[], Any], *, end_all_idle: bool = False) -> Any:
    """An idle actor (or group) kept under `spec` (None: never one) within `keep_actors_warm()`, else what
    `start()` starts.

    Idle actors hold their resources: before a new actor starts, the idle ones of its `kind` end, or
    with `end_all_idle` every idle one (the trainer's ranks, which wait for their placement group). A trainer
    being built takes its generators and filter actors first, so the idle actors of other kinds wait for its
    later takes; `end_idle_actors` ends what it did not take.
    """
    warm = _warm
    if warm is None:
        return start()
    kept = warm.take(spec) if spec is not None else None
    if kept is not None:
        return kept
    warm.close(None if end_all_idle else kind)
    return start()


def keep_or_end(spec: tuple | None, actor: ray.actor.ActorHandle) -> None:
    """The other half of `take_or_start`: within `keep_actors_warm()`, keep a pool's `actor` under `spec` (None:
    never) for the next pool of that spec; else end it."""
    if _warm is not None and spec is not None:
        _warm.keep(spec, actor, [actor], lambda: ray.kill(actor))
    else:
        ray.kill(actor)


def end_idle_actors() -> None:
    """End every idle actor (a trainer has taken what it could use; the rest would hold resources)."""
    if _warm is not None:
        _warm.close()


def warm_actors() -> WarmActors | None:
    """The warm actors of the innermost `keep_actors_warm()`, or None outside one (actors exit when done)."""
    return _warm


@contextlib.contextmanager
def keep_actors_warm() -> Iterator[WarmActors]:
    """Trainers built inside reuse the actors of trainers shut down inside; all of them end on exit."""
    global _warm
    outer, _warm = _warm, WarmActors()
    try:
        yield _warm
    finally:
        _warm.close()
        _warm = outer


def _job() -> str | None:
    return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None


def _key(spec: tuple) -> bytes:
    return cloudpickle.dumps(spec)


def _released(handles: list[ray.actor.ActorHandle]) -> bool:
    """Every actor alive, never restarted, and made as new by its `release()` (which says whether it can be)."""
    try:
        if not all(ray.get([h.release.remote() for h in handles], timeout=RELEASE_TIMEOUT_S)):
            return False
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return False
    return all(actor_record(actor_id(h)).get("NumRestarts", 0) == 0 for h in handles)
