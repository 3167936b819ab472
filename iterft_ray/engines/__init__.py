"""How a generator samples: `hf` (transformers `generate`) or `vllm` (a vLLM engine).

Both engines load a `WeightSnapshot` in place and return the same rollout table
(`iterft_ray.engines.hf_sampling.rollout_table`); `GeneratorActor` holds one of them.
"""

from __future__ import annotations

from iterft_ray.config import LoraConfig, SamplingConfig


def create_engine(model_path: str, tokenizer_path: str | None, trust_remote_code: bool, config: SamplingConfig,
                  lora: LoraConfig | None = None):
    """The engine `config.engine` names, loaded with the weights at `model_path`.

    `lora`: the run trains this adapter, so the engine must be able to serve it (vLLM decides
    at start-up; the hf engine adds the adapter when the first adapter snapshot arrives).
    """
    if config.engine == "vllm":
        from iterft_ray.engines.vllm import VLLMEngine  # vllm is an optional dependency

        return VLLMEngine(model_path, tokenizer_path, trust_remote_code, lora)
    from iterft_ray.engines.hf import HFEngine

    return HFEngine(model_path, tokenizer_path, trust_remote_code)
