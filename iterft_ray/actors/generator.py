"""GeneratorActor: a model replica that samples rollouts with the weight version it is told to use."""

from __future__ import annotations

import os

import pyarrow as pa
import ray
import torch
from transformers import AutoTokenizer

from ..sampling import SamplingParams, sample_rollouts
from ..tiny import resolve_model_path
from ..trainer import load_model
from ..weights import WeightSnapshot, load_snapshot, weights_checksum


@ray.remote
class GeneratorActor:
    """Holds one model replica; loads a weight snapshot only when its version is newer than the one it has."""

    def __init__(self, model_path: str, generator_id: int, tokenizer_path: str | None = None,
                 trust_remote_code: bool = False, tiny_overrides: dict | None = None):
        self.generator_id = generator_id
        model_path = resolve_model_path(model_path, **(tiny_overrides or {}))
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model_path, trust_remote_code=trust_remote_code).to(device).eval()
        self.version = -1  # the weights on disk; the first snapshot always loads
        self.loads = 0

    def generate(
        self,
        prompts: pa.Table,
        weights: list[ray.ObjectRef],
        version: int,
        params: SamplingParams,
        seed: int,
        round_index: int,
    ) -> pa.Table:
        """Sample a prompt shard with snapshot `version` (at least).

        `weights` is the snapshot reference wrapped in a list, so Ray does not fetch
        it unless this replica is behind.
        """
        self.sync(weights, version)
        return sample_rollouts(
            self.model, self.tokenizer, prompts, params, seed=seed, weight_version=self.version,
            generator_id=self.generator_id, round_index=round_index,
        )

    def sync(self, weights: list[ray.ObjectRef], version: int, force: bool = False) -> int:
        """Load snapshot `version` if it is newer than the replica's (or `force`); return the version held.

        `force` is for a trainer restored from a checkpoint, whose versions restart below ours.
        """
        if force or version > self.version:
            snapshot: WeightSnapshot = ray.get(weights[0])
            load_snapshot(self.model, snapshot)
            self.version = snapshot.version
            self.loads += 1
        return self.version

    def info(self) -> dict:
        """Version, number of snapshot loads, weight checksum and node: for tests and status lines."""
        return {
            "version": self.version,
            "loads": self.loads,
            "checksum": weights_checksum(self.model),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }
