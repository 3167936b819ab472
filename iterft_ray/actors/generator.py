"""GeneratorActor: a model replica that samples rollouts with the weight version it is told to use."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import ray

from ..config import LoraConfig, SamplingConfig
from ..engines import create_engine
from ..tiny import resolve_model_path
from ..weights import WeightSnapshot


@ray.remote
class GeneratorActor:
    """Holds one engine (`sampling.engine`: hf or vllm); loads a weight snapshot only when its version is newer
    than the one it has."""

    def __init__(self, model_path: str, generator_id: int, sampling: SamplingConfig, tokenizer_path: str | None = None,
                 trust_remote_code: bool = False, tiny_overrides: dict | None = None, lora: LoraConfig | None = None):
        self.generator_id = generator_id
        model_path = resolve_model_path(model_path, **(tiny_overrides or {}))
        self.engine = create_engine(model_path, tokenizer_path, trust_remote_code, sampling, lora)
        self.version = -1  # the weights on disk; the first snapshot always loads
        self.loads = 0
        self.load_seconds: float | None = None

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

    def sync(self, weights: list[ray.ObjectRef], version: int, force: bool = False) -> int:
        """Load snapshot `version` if it is newer than the replica's (or `force`); return the version held.

        `force` is for a trainer restored from a checkpoint, whose versions restart below ours.
        """
        if force or version > self.version:
            snapshot: WeightSnapshot = ray.get(weights[0])
            start = time.perf_counter()
            self.engine.load(snapshot)
            self.load_seconds = time.perf_counter() - start
            self.version = snapshot.version
            self.loads += 1
        return self.version

    def info(self) -> dict:
        """Version, number of snapshot loads, the last load's seconds, weight checksum and node: for tests and
        status lines."""
        return {
            "version": self.version,
            "loads": self.loads,
            "load_seconds": self.load_seconds,
            "checksum": self.engine.checksum(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }
