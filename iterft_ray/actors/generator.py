"""GeneratorActor: a model replica that samples rollouts with the weight version it is told to use."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import ray

from iterft_ray.actors.heap import return_freed_memory
from iterft_ray.config import ModelConfig, SamplingConfig
from iterft_ray.engines import create_engine
from iterft_ray.envs.runner import EnvRun, run_trajectories
from iterft_ray.weights.broadcast import (
    WEIGHT_GROUP_TIMEOUT, WeightGroup, WeightLayout, receive_delta, receive_weights,
)
from iterft_ray.weights.delta import WeightDelta
from iterft_ray.weights.snapshot import WeightSnapshot, owned_copy


# "weights": joining the trainer's `WeightGroup` and receiving a broadcast run on a thread of their own,
# so a version arrives while the generator samples with the previous one (async mode); only the
# actor's own thread (generate, sync) loads a version into the engine.
@ray.remote(concurrency_groups={"weights": 1})
class GeneratorActor:
    """Holds one engine (`sampling.engine`: hf or vllm); loads a weight version only when it is newer than the
    one it has, from the first of: what was broadcast to it (`receive_weights`: a delta from the version it
    holds, or the whole version), a delta in the object store from the version it holds, the whole snapshot
    in the object store. A delta is applied only where the engine holds its own copy of the weights
    (`engine.can_load_delta()`); a generator new, restarted or behind loads the whole version."""

    def __init__(self, model: ModelConfig, generator_id: int, sampling: SamplingConfig):
        self._args = (model, generator_id, sampling)
        self.generator_id = generator_id
        self.engine = create_engine(model, sampling)
        self.version = -1  # the weights on disk; the first snapshot always loads
        self.loads = 0
        self.load_seconds: float | None = None
        # Where the last version came from ("broadcast" or "object_store"), as what ("whole" or "delta"), and
        # the bytes it came as (a whole snapshot's or a delta's), as that transport moved them.
        self.loaded_from: str | None = None
        self.loaded_as: str | None = None
        self.transfer_bytes: int | None = None
        self.weight_group: WeightGroup | None = None
        self.weight_layout: WeightLayout | None = None
        self.received: WeightSnapshot | WeightDelta | None = None
        self.received_bytes = 0

    def generate(
        self,
        prompts: pa.Table,
        weights: list[ray.ObjectRef],
        version: int,
        sampling: SamplingConfig,
        seed: int,
        round_index: int,
        env: EnvRun | None = None,
    ) -> pa.Table:
        """Sample a prompt shard with snapshot `version` (at least): completions, or with `env` trajectories.

        `weights` is the snapshot reference wrapped in a list, so Ray does not fetch
        it unless this replica is behind.
        """
        self.sync(weights, version)
        if env is None:
            return self.engine.sample(prompts, sampling, seed, self.version, self.generator_id, round_index)
        rollouts = run_trajectories(self.engine, prompts, env, sampling, seed, self.version, self.generator_id,
                                    round_index)
        if hasattr(self.engine, "sleep"):  # vLLM's sleep mode: the trainer trains next
            self.engine.sleep()
        return rollouts

    def sync(self, weights: list[ray.ObjectRef], version: int, delta: list[ray.ObjectRef] | None = None,
             base_version: int | None = None) -> int:
        """Load version `version` if it is newer than the replica's; return the version held.

        `weights`: [ref] of the whole snapshot; `delta`: [ref] of a `WeightDelta` to it from `base_version`,
        where one was made. Only what is loaded is fetched. Versions only go up (a restored trainer's move on
        past every version published before).
        """
        if version > self.version:
            received, self.received = self.received, None
            start = time.perf_counter()
            if received is not None and received.version == version and self._can_load(received):
                self._load(received, "broadcast", self.received_bytes)
            elif delta is not None and base_version == self.version and self.engine.can_load_delta():
                self._load(ray.get(delta[0]), "object_store", None)
            else:
                snapshot = ray.get(weights[0])
                # In a weight group an engine that keeps the snapshot it loads gets its own copy, as it would
                # a broadcast's buckets: the deltas broadcast after this version then apply to it.
                owned = self.weight_group is not None and self.engine.keeps_snapshot
                self._load(owned_copy(snapshot) if owned else snapshot, "object_store", snapshot.nbytes)
            return_freed_memory()  # the engine's temporaries of the load (vLLM's repacking: ~1 GB at 0.5B)
            self.load_seconds = time.perf_counter() - start
            self.loads += 1
        return self.version

    def _can_load(self, received: WeightSnapshot | WeightDelta) -> bool:
        """A whole version always loads; a delta only onto exactly its base, into weights the engine owns."""
        if isinstance(received, WeightSnapshot):
            return True
        return received.base_version == self.version and self.engine.can_load_delta()

    def _load(self, weights: WeightSnapshot | WeightDelta, transport: str, nbytes: int | None) -> None:
        if isinstance(weights, WeightDelta):
            self.engine.load_delta(weights)
            self.loaded_as = "delta"
        else:
            self.engine.load(weights)
            self.loaded_as = "whole"
        self.loaded_from, self.transfer_bytes = transport, weights.nbytes if nbytes is None else nbytes
        self.version = weights.version

    @ray.method(concurrency_group="weights")
    def join_weight_group(self, address: tuple[str, int], rank: int, size: int, backend: str,
                          layout: WeightLayout) -> None:
        """Join the trainer's `WeightGroup` as member `rank`, while the trainer's rank 0 and the other
        generators join it."""
        self.weight_group, self.weight_layout, self.received = None, layout, None
        self.weight_group = WeightGroup(address, rank, size, backend, WEIGHT_GROUP_TIMEOUT)

    @ray.method(concurrency_group="weights")
    def receive_weights(self, version: int, base_version: int | None = None) -> None:
        """Receive version `version` from the trainer's broadcast, whole or (`base_version` given) as a delta
        from that version; the next `sync` to it loads it. A delta is kept, not applied, until then: the
        replica may be sampling with the version before."""
        if self.weight_group is None:  # restarted by Ray since the group formed
            raise RuntimeError(f"generator {self.generator_id} is in no weight group")
        self.received = None
        if base_version is None:
            self.received = receive_weights(self.weight_group, self.weight_layout, version)
            self.received_bytes = sum(self.weight_layout.bucket_sizes)
        else:
            self.received, self.received_bytes = receive_delta(self.weight_group, self.weight_layout, base_version,
                                                               version)

    def release(self) -> bool:
        """Be as new, for the next pool asking for a generator of this spec (`keep_actors_warm`): the engine
        rebuilt from the model's files, no version held. A member of a weight group is not reused (False)."""
        if self.weight_group is not None:
            return False
        self.engine = None  # the old replica goes before the new one loads
        type(self).__init__(self, *self._args)
        return_freed_memory()
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def info(self) -> dict:
        """Version, number of snapshot loads, the last load's seconds, weight checksum and node: for tests and
        status lines."""
        return {
            "version": self.version,
            "loads": self.loads,
            "load_seconds": self.load_seconds,
            "loaded_from": self.loaded_from,
            "loaded_as": self.loaded_as,
            "transfer_bytes": self.transfer_bytes,
            "checksum": self.engine.checksum(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }
