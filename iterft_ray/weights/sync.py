"""WeightSync: a weight version's whole trip, from the trainer's ranks to every generator's engine.

    publish: the ranks put their weights once (one rank: all of them; N ranks: their shards,
             assembled into one snapshot by a worker of its own; LoRA: the adapter only)
    transport: "object_store" (generators on other nodes pull the snapshot) or "broadcast"
             (the trainer's rank 0 sends each version in buckets over a `WeightGroup`, and the
             snapshot is still put for a generator that joins or restarts in between)
    delta:   where a version's bytes travel into memory a generator owns (the broadcast; the object store
             to a generator on a GPU), the version also travels as a `WeightDelta` from the one before:
             made once on the trainer's node from the two snapshots there, broadcast instead of the whole
             version, or offered beside the snapshot in the object store. A generator applies it in place
             only onto exactly its base; new, restarted or behind, it loads the whole snapshot
    load:    each generator loads the version it is asked for, when newer than its own
             (`GeneratorActor.sync`; the engines' own load functions sit beside the engines)

What a delta holds in memory besides the versions: the previous snapshot stays in the object store until
the delta against it is made (a second or so after the next one is put; it was there while the next was
put anyway), and the delta itself (an int32 index and a value per changed element). CPU hf generators on
the object store keep sampling from the node's one shared snapshot: a delta needs weights of their own.

This is the one place that owns the current version and its snapshot reference. Versions only
go up: a trainer restored from an older checkpoint is moved on past every version published
before it, so a generator never has to be told to load an older number.
"""

from __future__ import annotations

from typing import Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from iterft_ray.actors.failures import ActorRoster, Deadline, wait_for
from iterft_ray.actors.generator_pool import GeneratorPool
from iterft_ray.actors.trainer_actor import TrainerRank
from iterft_ray.actors.trainer_group import TrainerGroup
from iterft_ray.config import ResourcesConfig
from iterft_ray.weights.delta import WeightDelta, weight_delta
from iterft_ray.weights.snapshot import WeightSnapshot, assemble_snapshot


@ray.remote(num_cpus=0)
def _assemble_task(shards: list[ray.ObjectRef]):
    """Full weights from the ranks' shards, in a worker of its own so no rank holds a full copy."""
    return assemble_snapshot(ray.get(shards))


@ray.remote(num_cpus=0)
def _delta_task(base: WeightSnapshot, new: WeightSnapshot) -> WeightDelta:
    """The delta between two published versions, on the trainer's node: both are read there with no copy."""
    return weight_delta(base, new)


def publish_from(trainer: TrainerGroup) -> tuple[ray.ObjectRef, int]:
    """The trainer's current weights as one snapshot reference, and their version (the ranks are called
    together): one rank puts all of them, N ranks their shards (assembled by `_assemble_task`), LoRA the adapter."""
    refs = [r[0] for r in trainer.call(TrainerRank.publish)]
    version = trainer.version()
    if trainer.model.lora is not None or len(refs) == 1:  # an adapter: whole on rank 0, no assembly
        return refs[0], version
    return _assemble_task.remote(refs), version


class WeightSync:
    """The current weight version of a trainer and how it reaches a pool of generators."""

    def __init__(self, trainer: TrainerGroup, generators: GeneratorPool, resources: ResourcesConfig,
                 roster: Callable[[], ActorRoster]):
        """Publishes the trainer's current weights; `roster` names the actors in errors."""
        self.trainer, self.generators, self.resources, self.roster = trainer, generators, resources, roster
        self.snapshot, self.version = publish_from(trainer)
        # The current version as a `WeightDelta` from `delta_base` (the version published before), where
        # deltas travel; None: whole versions only.
        self.delta: ray.ObjectRef | None = None
        self.delta_base: int | None = None
        # Bytes the trainer's last broadcast sent (a delta's or the whole version's).
        self.broadcast_bytes: int | None = None
        self.trainer_node = self._trainer_node()
        self.transport = self._resolve_transport()
        self._form_group()

    def publish(self, version: int | None = None) -> int:
        """Put the trainer's weights in the object store if they are newer than the published version (and
        broadcast them, with that transport); generators load them on their next call. Returns the version.

        `version` is the trainer's current version when the caller knows it (a step's statistics carry it),
        which saves asking the trainer.
        """
        current = self.trainer.version() if version is None else version
        if current > self.version:
            base, base_version = self.snapshot, self.version
            if not self._deltas_travel():
                # Let the old version go before the new one is put: the object store keeps the pages it has
                # used, so two versions at once would stay the store's size for the rest of the run.
                base = self.snapshot = None
            self.snapshot, self.version = publish_from(self.trainer)
            self.delta, self.delta_base = None if base is None else self._delta_from(base), base_version
            if self.transport == "broadcast":
                self._broadcast()
        return self.version

    def sync(self, version: int | None = None, deadline: Deadline | None = None) -> int:
        """`publish`, then every generator loads the version (by `deadline`); returns the version."""
        self.publish(version)
        delta = None if self.delta is None else [self.delta]
        loads = [g.sync.remote([self.snapshot], self.version, delta, self.delta_base) for g in self.generators.actors]
        wait_for(loads, deadline, "sync", self.roster(), fetch=True)
        return self.version

    def trainer_replaced(self, trainer: TrainerGroup) -> None:
        """A trainer restored from a checkpoint takes over: its version moves on past every version published
        so far, and every generator loads its weights now."""
        self.trainer = trainer
        self.trainer_node = self._trainer_node()
        trainer.call(TrainerRank.advance_version, self.version + 1)
        self.snapshot, self.version = publish_from(trainer)
        self.delta = None  # restored weights: most of them differ
        self._form_group()
        ray.get([g.sync.remote([self.snapshot], self.version) for g in self.generators.actors])

    def generators_changed(self) -> None:
        """The pool grew or shrank: the transport is chosen again and a broadcast group formed anew."""
        self.transport = self._resolve_transport()
        self._form_group()

    def _deltas_travel(self) -> bool:
        """Whether versions also travel as deltas (`resources.weight_delta`): to the broadcast's generators, or
        on the object store to generators on GPUs (the others there share the node's snapshot). An adapter
        always travels whole."""
        return not (self.resources.weight_delta == "off" or self.trainer.model.lora is not None
                    or (self.transport != "broadcast" and self.resources.generator_gpus == 0))

    def _delta_from(self, base: ray.ObjectRef) -> ray.ObjectRef:
        """The current version as a delta from snapshot `base`, made on the trainer's node."""
        node = NodeAffinitySchedulingStrategy(self.trainer_node, soft=True)
        return _delta_task.options(scheduling_strategy=node).remote(base, self.snapshot)

    def _trainer_node(self) -> str:
        """The node of the trainer's rank 0, asked once per trainer (not on every version)."""
        return self.trainer.call(TrainerRank.placement, on="rank0")[0][0]

    def _resolve_transport(self) -> str:
        """`resources.weight_transport` resolved: "auto" is "broadcast" when a generator runs on another node
        than the trainer (of one rank, full weights), else "object_store"."""
        transport = self.resources.weight_transport
        if transport != "auto":
            return transport
        if len(self.trainer.ranks) != 1 or self.trainer.model.lora is not None:  # shards, or a few MB of adapter
            return "object_store"
        return "broadcast" if any(node != self.trainer_node for node in self.generators.node_ids()) else "object_store"

    def _form_group(self) -> None:
        """With the broadcast transport: (re)form the `WeightGroup` of the trainer's rank 0 and every generator."""
        self._group_version = None  # the version the group's members were last sent
        if self.transport != "broadcast" or not len(self.generators):
            return
        size = len(self.generators) + 1
        backend = "nccl" if self.resources.trainer_gpus > 0 and self.resources.generator_gpus > 0 else "gloo"
        address, layout = self.trainer.call(TrainerRank.open_weight_group, size, on="rank0")[0]
        layout_ref = ray.put(layout)
        joins = self.trainer.call_async(TrainerRank.join_weight_group, address, size, backend, on="rank0")
        joins += [g.join_weight_group.remote(address, i + 1, size, backend, layout_ref)
                  for i, g in enumerate(self.generators.actors)]
        ray.get(joins)

    def _broadcast(self) -> None:
        """Broadcast the current version from the trainer's rank 0 to every generator: as its delta when there
        is one (a member that does not hold its base loads the whole snapshot at its next `sync`), else whole.

        The snapshot is in the object store as well (put on the trainer's node, pulled by nobody), so a
        generator that missed a broadcast still loads the version it is asked for. A generator that Ray
        restarted since the group formed has no place in it: the group is formed again and the broadcast
        tried once more.
        """
        # A delta only onto a version this group was sent: before that, a member may be sampling from the
        # node's shared snapshot (a CPU hf engine), which a delta cannot be written into.
        if self.delta is None or self.delta_base != self._group_version:
            delta, base = None, None
        else:
            delta, base = [self.delta], self.delta_base
        for attempt in (1, 2):
            refs = self.trainer.call_async(TrainerRank.broadcast_weights, delta, on="rank0")
            refs += [g.receive_weights.remote(self.version, base) for g in self.generators.actors]
            try:
                self.broadcast_bytes = ray.get(refs)[0]
                self._group_version = self.version
                return
            except ray.exceptions.RayTaskError:
                if attempt == 2:
                    raise
                self._form_group()


