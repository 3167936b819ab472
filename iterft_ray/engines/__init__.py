"""How a generator samples: `hf` (transformers `generate`) or `vllm` (a vLLM engine).

Both engines load a `WeightSnapshot` in place and return the same rollout table
(`iterft_ray.sampling.rollout_table`); `GeneratorActor` holds one of them.
"""

from __future__ import annotations

from ..config import SamplingConfig


def create_engine(model_path: str, tokenizer_path: str | None, trust_remote_code: bool, config: SamplingConfig):
    """The engine `config.engine` names, loaded with the weights at `model_path`."""
    if config.engine == "vllm":
        from .vllm import VLLMEngine  # vllm is an optional dependency

        return VLLMEngine(model_path, tokenizer_path, trust_remote_code)
    from .hf import HFEngine

    return HFEngine(model_path, tokenizer_path, trust_remote_code)
