"""How a generator samples: `hf` (transformers `generate`) or `vllm` (a vLLM engine).

Both engines load a `WeightSnapshot` in place and return the same rollout table
(`iterft_ray.data.rollouts.rollout_table`); `GeneratorActor` holds one of them.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig

from iterft_ray.config import ModelConfig, SamplingConfig
from iterft_ray.tiny import model_files


def engine_dtype(model: ModelConfig) -> torch.dtype:
    """The dtype every engine holds `model`'s weights in: the checkpoint's (`dtype` in its config.json), fp32
    when it names none.

    The one place that decides it: both engines load the model in it, and the trainer publishes each weight
    version cast to it (its fp32 masters in a bf16 checkpoint's bf16), so the object store holds what the
    engines hold and a version's bytes are those an engine keeps.
    """
    model_path, _ = model_files(model)
    dtype = AutoConfig.from_pretrained(model_path, trust_remote_code=model.trust_remote_code).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def create_engine(model: ModelConfig, config: SamplingConfig):
    """The engine `config.engine` names, loaded with `model`'s weights (a tiny name is built here first).

    `model.lora`: the run trains this adapter, so the engine must be able to serve it (vLLM decides
    at start-up; the hf engine adds the adapter when the first adapter snapshot arrives).
    """
    model_path, tokenizer_path = model_files(model)
    if config.engine == "vllm":
        from iterft_ray.engines.vllm import VLLMEngine  # vllm is an optional dependency

        return VLLMEngine(model_path, tokenizer_path, model.trust_remote_code, model.lora, config.vllm,
                          dtype=engine_dtype(model))
    from iterft_ray.engines.hf import HFEngine

    return HFEngine(model_path, tokenizer_path, model.trust_remote_code, engine_dtype(model))
