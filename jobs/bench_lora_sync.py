"""Benchmark: what a new weight version moves with LoRA (`model.lora`) against full fine-tuning.

    python jobs/bench_lora_sync.py [--json out.json] [--reps 3] [--r 16] [--engine hf|vllm]
    ray job submit --working-dir . -- python jobs/bench_lora_sync.py --json out.json

Builds a Llama-style model from config (no download, fp32, ~134M parameters, as
jobs/bench_weight_sync.py) and, interleaved in the same process after a warm-up:

  full  - `publish_weights` of the whole model, then `load_snapshot` in a generator replica
  lora  - `publish_adapter` of a PEFT LoRA adapter on the same model (r, alpha, q/k/v/o
          projections, the `model.lora` defaults but r), then its load into a PEFT replica
          (the hf engine's path: the adapter's weights copied in place, the base untouched)

With `--engine vllm` the two generators are `VLLMEngine`s over the same model saved to disk
(the vllm engine's paths: the full snapshot reloaded in place; the adapter written in PEFT
format and added under a new `LoRARequest` id, the base untouched).

It reports bytes per version (the snapshot put into the object store) and sync time
(publish until the generator has loaded), each LoRA / full; the bytes goal is <= 2%.
The bytes ratio depends on the model's shape, not on this machine, so it is also given
for a Llama-3-8B-shaped model, counted on the meta device (no memory, nothing timed).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import ray
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from iterft_ray.config import LoraConfig
from iterft_ray.weights.snapshot import adapter_parameters, load_snapshot, publish_adapter, publish_weights

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import (  # noqa: E402
    environment, init_ray, interleave, parser, print_environment, print_table, ratios, verdict, write_json,
)

# ~134M parameters, 0.54 GB in fp32 (jobs/bench_weight_sync.py's model).
MODEL_CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
# Llama-3-8B's shape: 8.03B parameters.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)


def build_model(shape: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**shape)).eval()


@ray.remote(num_cpus=1)
class BenchGenerator:
    """Stands in for a GeneratorActor with the hf engine: a replica that loads snapshots in place;
    with `model_dir`, a vllm engine over the model saved there (serving `lora` adapters if given)."""

    def __init__(self, model_dir: str | None = None, lora: LoraConfig | None = None):
        torch.set_num_threads(1)
        self.engine = None
        if model_dir is not None:
            from iterft_ray.engines.vllm import VLLMEngine

            self.engine = VLLMEngine(model_dir, None, False, lora)
        else:
            self.model = build_model(MODEL_CONFIG)

    def load(self, refs: list[ray.ObjectRef]) -> dict:
        start = time.perf_counter()
        snapshot = ray.get(refs[0])
        if self.engine is not None:
            self.engine.load(snapshot)
            return {"load_s": time.perf_counter() - start}
        if snapshot.adapter_config is not None and not isinstance(self.model, PeftModel):
            self.model = get_peft_model(self.model, copy.deepcopy(snapshot.adapter_config))
        load_snapshot(self.model, snapshot)
        return {"load_s": time.perf_counter() - start}


def sync(model: torch.nn.Module, publish, generator, version: int) -> dict:
    ref = publish(model, version)
    nbytes = ray.get(ref).nbytes
    ray.get(generator.load.remote([ref]))
    return {"bytes": nbytes}


def counted_8b(lora: LoraConfig) -> dict:
    """Parameters of a Llama-3-8B-shaped model and of its adapter, built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA3_8B))
    full = sum(p.numel() for p in model.parameters())
    adapter = sum(p.numel() for p in adapter_parameters(get_peft_model(model, lora.peft_config())).values())
    return {"params": full, "adapter_params": adapter, "bytes_ratio": adapter / full}


def main() -> None:
    p = parser(__doc__, reps=3, warmup=1)
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="the generators' engine (default hf)")
    args = p.parse_args()
    torch.set_num_threads(1)
    lora = LoraConfig(r=args.r, alpha=2.0 * args.r)
    nice = init_ray(num_cpus=2)
    env = {**environment(1), **nice}
    print_environment(env)

    full_model = build_model(MODEL_CONFIG)
    peft_model = get_peft_model(build_model(MODEL_CONFIG), lora.peft_config())
    with torch.no_grad():  # a trained adapter: lora_B is zero at init
        for t in adapter_parameters(peft_model).values():
            t.normal_(0, 0.02)
    if args.engine == "vllm":
        from iterft_ray.tiny import build_tokenizer

        model_dir = Path("runs/bench-lora-sync-model").resolve()
        full_model.save_pretrained(model_dir)
        build_tokenizer().save_pretrained(model_dir)  # vLLM wants one; sampling is not timed here
        generators = {"full": BenchGenerator.remote(str(model_dir)), "lora": BenchGenerator.remote(str(model_dir), lora)}
    else:
        generators = {"full": BenchGenerator.remote(), "lora": BenchGenerator.remote()}
    versions = iter(range(1, 1000))
    rows = interleave({
        "full": lambda: sync(full_model, publish_weights, generators["full"], next(versions)),
        "lora": lambda: sync(peft_model, publish_adapter, generators["lora"], next(versions)),
    }, args.reps, args.warmup)

    full_bytes, lora_bytes = rows["full"][0]["bytes"], rows["lora"][0]["bytes"]
    params = sum(q.numel() for q in full_model.parameters())
    print(f"\nmodel: {params / 1e6:.0f}M parameters; LoRA r={lora.r} on {', '.join(lora.target_modules)}; "
          f"engine {args.engine}")
    print(f"bytes per version: full {full_bytes / 2**20:.1f} MiB, lora {lora_bytes / 2**20:.2f} MiB "
          f"({lora_bytes / full_bytes:.2%})")
    table = print_table("sync (publish + generator load)", [
        ("full s", [r["s"] for r in rows["full"]], "s"),
        ("lora s", [r["s"] for r in rows["lora"]], "s"),
        ("lora / full", ratios(rows["lora"], rows["full"]), "x"),
    ])
    eight_b = counted_8b(lora)
    print(f"Llama-3-8B shape (counted, meta device): adapter {eight_b['adapter_params'] / 1e6:.1f}M of "
          f"{eight_b['params'] / 1e9:.2f}B parameters = {eight_b['bytes_ratio']:.2%} of the bytes")
    result = {
        "environment": env, "engine": args.engine, "lora": vars(lora), "params": params,
        "bytes": {"full": full_bytes, "lora": lora_bytes, "ratio": lora_bytes / full_bytes},
        "bytes_verdict": verdict("bytes per version, lora / full", lora_bytes / full_bytes, 0.02),
        "sync": table, "llama3_8b": eight_b,
    }
    write_json(args.json, result)
    ray.shutdown()


if __name__ == "__main__":
    main()
