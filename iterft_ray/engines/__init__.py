"""How a generator samples: `hf` (transformers `generate`) or `vllm` (a vLLM engine).

Both engines load a `WeightSnapshot` in place and return the same rollout table
(`iterft_ray.data.rollouts.rollout_table`); `GeneratorActor` holds one of them.
"""

from __future__ import annotations

from iterft_ray.config import ModelConfig, SamplingConfig
from iterft_ray.tiny import model_files


def create_engine(model: ModelConfig, config: SamplingConfig):
    """The engine `config.engine` names, loaded with `model`'s weights (a tiny name is built here first).

    `model.lora`: the run trains this adapter, so the engine must be able to serve it (vLLM decides
    at start-up; the hf engine adds the adapter when the first adapter snapshot arrives).
    """
    model_path, tokenizer_path = model_files(model)
    if config.engine == "vllm":
        from iterft_ray.engines.vllm import VLLMEngine  # vllm is an optional dependency

        return VLLMEngine(model_path, tokenizer_path, model.trust_remote_code, model.lora, config.vllm)
    from iterft_ray.engines.hf import HFEngine

    return HFEngine(model_path, tokenizer_path, model.trust_remote_code)
