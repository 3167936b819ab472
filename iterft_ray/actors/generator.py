"""GeneratorActor: a model replica that samples rollouts with the weight version it is told to use."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import ray

from iterft_ray.config import ModelConfig, SamplingConfig
from iterft_ray.engines import create_engine
from iterft_ray.weights.broadcast import WEIGHT_GROUP_TIMEOUT, WeightGroup, WeightLayout, receive_weights
from iterft_ray.weights.snapshot import WeightSnapshot


# "weights": joining the trainer's `WeightGroup` and receiving a broadcast run on a thread of their own,
# so a version arrives while the generator samples with the previous one (async mode); only the
# actor's own thread (generate, sync) loads a version into the engine.
@ray.remote(concurrency_groups={"weights": 1})
class GeneratorActor:
    """Holds one engine (`sampling.engine`: hf or vllm); loads a weight snapshot only when its version is newer
    than the one it has: the one broadcast to it (`receive_weights`) if that is the version asked for, else
    the one in the object store."""

    def __init__(self, model: ModelConfig, generator_id: int, sampling: SamplingConfig):
        self.generator_id = generator_id
        self.engine = create_engine(model, sampling)
        self.version = -1  # the weights on disk; the first snapshot always loads
        self.loads = 0
        self.load_seconds: float | None = None
        self.loaded_from: str | None = None  # "broadcast" or "object_store": where the last version came from
        self.weight_group: WeightGroup | None = None
        self.weight_layout: WeightLayout | None = None
        self.received: WeightSnapshot | None = None

    def generate(
        self,
        prompts: pa.Table,
        weights: list[ray.ObjectRef],
        version: int,
        sampling: SamplingConfig,
        seed: int,
        round_index: int,
    ) -> pa.Table:
        """Sample a prompt shard with snapshot `version` (at least).

        `weights` is the snapshot reference wrapped in a list, so Ray does not fetch
        it unless this replica is behind.
        """
        self.sync(weights, version)
        return self.engine.sample(prompts, sampling, seed, self.version, self.generator_id, round_index)

    def sync(self, weights: list[ray.ObjectRef], version: int) -> int:
        """Load snapshot `version` if it is newer than the replica's; return the version held.

        Versions only go up (a restored trainer's move on past every version published before).
        """
        if version > self.version:
            received, self.received = self.received, None
            if received is not None and received.version == version:
                snapshot, self.loaded_from = received, "broadcast"
            else:
                snapshot, self.loaded_from = ray.get(weights[0]), "object_store"
            start = time.perf_counter()
            self.engine.load(snapshot)
            self.load_seconds = time.perf_counter() - start
            self.version = snapshot.version
            self.loads += 1
        return self.version

    @ray.method(concurrency_group="weights")
    def join_weight_group(self, address: tuple[str, int], rank: int, size: int, backend: str,
                          layout: WeightLayout) -> None:
        """Join the trainer's `WeightGroup` as member `rank`, while the trainer's rank 0 and the other
        generators join it."""
        self.weight_group, self.weight_layout, self.received = None, layout, None
        self.weight_group = WeightGroup(address, rank, size, backend, WEIGHT_GROUP_TIMEOUT)

    @ray.method(concurrency_group="weights")
    def receive_weights(self, version: int) -> None:
        """Receive version `version` from the trainer's broadcast; the next `sync` to it loads it."""
        if self.weight_group is None:  # restarted by Ray since the group formed
            raise RuntimeError(f"generator {self.generator_id} is in no weight group")
        self.received = receive_weights(self.weight_group, self.weight_layout, version)

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
            "checksum": self.engine.checksum(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }
