"""The engine interface a generator actor holds (`hf`, `vllm`): what both engines provide, declared once.

`sample` is single-turn rounds' call (prompt rows in, a rollout batch out); `generate_ids` is the
token-level seam the trajectory runner (`iterft_ray.envs.runner`) samples turns through: token ids
in, sampled token ids out, never text, so a trajectory keeps exactly the ids that were sampled.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import pyarrow as pa

from iterft_ray.config import SamplingConfig
from iterft_ray.data.rollouts import RolloutBatch
from iterft_ray.weights.delta import WeightDelta
from iterft_ray.weights.snapshot import WeightSnapshot


class SampledTurn(NamedTuple):
    """One sequence `generate_ids` sampled: its ids (the stop token included when `finished`), and their
    log-probability under the distribution sampled from."""

    ids: list[int]
    finished: bool
    logprob_sum: float


class Engine(Protocol):
    tokenizer: object
    stops: list[int]  # the token ids that end an assistant turn (`hf_sampling.stop_token_ids`)
    max_model_len: int  # the longest sequence (prompt + sampled) the engine serves
    keeps_snapshot: bool

    def load(self, snapshot: WeightSnapshot) -> None: ...

    def can_load_delta(self) -> bool: ...

    def load_delta(self, delta: WeightDelta) -> None: ...

    def sample(self, prompts: pa.Table, config: SamplingConfig, seed: int, weight_version: int,
               generator_id: int, round_index: int) -> RolloutBatch: ...

    def generate_ids(self, prompt_ids: list[list[int]], config: SamplingConfig, seeds: list[int],
                     max_new_tokens: list[int]) -> list[SampledTurn]:
        """One sample of each prompt (`config`'s temperature, top-p, top-k), at most `max_new_tokens[i]` tokens,
        stopping at a stop token. `seeds[i]` is sequence i's seed where the engine seeds per request (vllm);
        the hf engine seeds the call with `seeds[0]` (the same call samples the same tokens)."""
        ...

    def checksum(self) -> str | None: ...
