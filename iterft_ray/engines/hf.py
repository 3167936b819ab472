"""The transformers engine: `generate` on a model replica, weights copied into its parameters."""

from __future__ import annotations

import copy

import pyarrow as pa
import torch
from transformers import AutoTokenizer

from iterft_ray.config import SamplingConfig
from iterft_ray.data.rollouts import RolloutBatch
from iterft_ray.engines.base import SampledTurn
from iterft_ray.engines.hf_sampling import generate_token_ids, sample_rollouts, stop_token_ids
from iterft_ray.train.models import load_model
from iterft_ray.weights.delta import WeightDelta, apply_delta
from iterft_ray.weights.snapshot import WeightSnapshot, is_peft_model, is_writable, load_snapshot, weights_checksum


class HFEngine:
    """A model replica on the GPU when there is one; the CPU default."""

    def __init__(self, model_path: str, tokenizer_path: str | None, trust_remote_code: bool,
                 dtype: torch.dtype | None = None):
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # `dtype`: `engine_dtype`'s in a run, the dtype the trainer publishes versions in (None: transformers').
        dtype_arg = {} if dtype is None else {"dtype": dtype}
        self.model = load_model(model_path, trust_remote_code=trust_remote_code, **dtype_arg).to(device).eval()
        # On CPU the replica's weights are the arrays of the snapshot it loaded last (`load`).
        self.keeps_snapshot = device == "cpu"
        self.stops = stop_token_ids(self.model.generation_config, self.tokenizer)
        config = self.model.config
        self.max_model_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self._owns_weights = True  # False while they are a read-only snapshot of the object store

    def load(self, snapshot: WeightSnapshot) -> None:
        """Copy a snapshot in; an adapter snapshot into the adapter only, added to the replica on the first one.

        The adapter stays separate from the base (not merged into it): the replica then
        computes exactly base + adapter as the trainer and `PeftModel.from_pretrained` do,
        and a new version replaces the adapter's weights with no unmerge drifting the base.

        On CPU the replica's weights become the snapshot's shared arrays (`share=True`):
        the trainer's publish is then the only copy a version costs, and N generators on a
        node hold one copy of the weights between them, not N. On a GPU they are copied in
        place into the existing parameters.
        """
        if snapshot.adapter_config is not None and not is_peft_model(self.model):
            from peft import get_peft_model

            self.model = get_peft_model(self.model, copy.deepcopy(snapshot.adapter_config)).eval()
        load_snapshot(self.model, snapshot, share=True)
        self._owns_weights = not self.keeps_snapshot or is_writable(snapshot)

    def can_load_delta(self) -> bool:
        """Whether a `WeightDelta` can be written into the replica's weights: on a GPU always, on CPU when
        they are its own memory (a broadcast's buckets), never the node's one shared snapshot."""
        return self._owns_weights and not is_peft_model(self.model)

    def load_delta(self, delta: WeightDelta) -> None:
        """Write the changed elements of the next version into the replica's weights, in place (on a GPU, the
        changed indices and values are what cross to the device)."""
        apply_delta(self.model.state_dict(), delta)

    def sample(self, prompts: pa.Table, config: SamplingConfig, seed: int, weight_version: int,
               generator_id: int, round_index: int) -> RolloutBatch:
        return sample_rollouts(self.model, self.tokenizer, prompts, config, seed, weight_version, generator_id,
                               round_index)

    def generate_ids(self, prompt_ids: list[list[int]], config: SamplingConfig, seeds: list[int],
                     max_new_tokens: list[int]) -> list[SampledTurn]:
        """`Engine.generate_ids`: one `generate` call (in batches of `config.batch_size`), seeded with `seeds[0]`."""
        return [SampledTurn(ids, done, total) for _, ids, done, total in
                generate_token_ids(self.model, self.tokenizer, prompt_ids, config, seeds[0], 1, max_new_tokens)]

    def checksum(self) -> str:
        return weights_checksum(self.model)
