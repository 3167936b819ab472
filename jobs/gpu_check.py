"""GPU check: the paths that need neither Ray nor vLLM, on one CUDA GPU, in a few minutes.

    make gpu-check                      # = PYTHONPATH=. python3 jobs/gpu_check.py
    python3 jobs/gpu_check.py [--json gpu_check.json] [--steps 3]

For a GPU machine whose Python has torch + CUDA, transformers, peft, accelerate (and pyarrow)
but no Ray and no vLLM: run from the checkout (no `pip install`, which would bring Ray). It
builds a Llama of ~1B parameters with random weights (Llama-3.2-1B's shape, byte vocabulary),
then:

  train      `IterativeSFTTrainer.step()` in bf16 (fp32 master weights) on ragged sequences
             (64..512 tokens), padded and with `packing=True`: tokens/s of each and their MFU,
             6 * parameters * tokens/s over the GPU's peak dense bf16 FLOP/s (PEAK_BF16 by
             `torch.cuda.get_device_name()`; FLOP/s alone for a GPU not in the table)
  sampling   the hf engine (`iterft_ray.engines.hf.HFEngine`, bf16) sampling completions:
             generated tokens/s

and prints one line of figures (and writes them as JSON with --json). Without CUDA it stops at
once with one line and exit status 1; so does a missing or too old package. The functions here
take a device, so tests/test_gpu_check.py runs the same path on the CPU with a tiny model, with
Ray and vLLM made unimportable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Llama-3.2-1B's shape (16 layers, hidden 2048, GQA 32/8) with the byte tokenizer's vocabulary:
# ~0.97B parameters, nearly all in the decoder layers.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True)
# Peak dense bf16 FLOP/s (no sparsity), by a name `torch.cuda.get_device_name()` contains.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
# What the import chain needs besides torch (import name: pip name).
NEEDED = {"transformers": "transformers", "peft": "peft", "accelerate": "accelerate", "pyarrow": "pyarrow",
          "yaml": "pyyaml", "tokenizers": "tokenizers", "safetensors": "safetensors"}


def fail(message: str) -> None:
    """The check's one line of failure, and exit status 1."""
    print(f"gpu_check: {message}", file=sys.stderr)
    raise SystemExit(1)


def require_cuda() -> str:
    """The GPU's name; without CUDA, `fail` with what torch says about its build."""
    import torch

    if not torch.cuda.is_available():
        fail(f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
             "this check needs an NVIDIA GPU and a CUDA build of torch")
    return torch.cuda.get_device_name()


def require_packages() -> dict[str, str]:
    """Versions of the packages the import chain needs; `fail` on one missing or older than pyproject.toml's."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    missing = [pip for name, pip in NEEDED.items() if importlib.util.find_spec(name) is None]
    if missing:
        fail(f"missing {', '.join(missing)}: pip install {' '.join(missing)}")
    # pyproject's `dependencies = [...]` read with a pattern: tomllib is Python 3.11+, the project 3.10+.
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    wanted = {r.name: r for r in map(Requirement, re.findall(r'"([^"]+)"', block))}
    found = {}
    for pip in ("torch", *NEEDED.values()):
        found[pip] = version(pip)
        if pip in wanted and not wanted[pip].specifier.contains(found[pip], prereleases=True):
            fail(f"{pip} {found[pip]} does not satisfy iterft_ray's {pip}{wanted[pip].specifier} (pyproject.toml): "
                 f"pip install '{pip}{wanted[pip].specifier}'")
    return found


def build_llama(out_dir: str, **shape) -> str:
    """A Llama of `shape` with random weights and the byte tokenizer, made and saved in bf16 (`tiny.build_tiny_model`)."""
    from iterft_ray.tiny import build_tiny_model

    return str(build_tiny_model("tiny-llama", out_dir, dtype="bfloat16", **shape))


def ragged_sequences(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (int(length),), generator=g)
            for length in torch.randint(min_len, max_len + 1, (n,), generator=g)]


def train_figures(model_path: str, device: str, packing: bool, bf16: bool, sequences: list, micro_batch: int,
                  steps: int, out_dir: str, peak_flops: float | None = None) -> dict:
    """tokens/s of `IterativeSFTTrainer.step()` on `sequences`, after one untimed warm-up call; MFU with `peak_flops`."""
    import torch
    from transformers import AutoTokenizer

    from iterft_ray.train.models import load_model
    from iterft_ray.train.trainer import IterativeSFTConfig, IterativeSFTTrainer

    args = IterativeSFTConfig(
        output_dir=out_dir, report_to="none", disable_tqdm=True, learning_rate=1e-5, bf16=bf16,
        per_device_train_batch_size=micro_batch, train_sampling_strategy="sequential", logging_strategy="no",
        save_strategy="no", use_cpu=device == "cpu", packing=packing,
    )
    trainer = IterativeSFTTrainer(load_model(model_path), args, processing_class=AutoTokenizer.from_pretrained(model_path))
    params = sum(p.numel() for p in trainer.model.parameters())
    first = trainer.step(input_ids=sequences)
    tokens, elapsed, losses = 0, 0.0, []
    for _ in range(steps):
        start = time.perf_counter()
        stats = trainer.step(input_ids=sequences)  # returns after the statistics are read back: synchronised
        elapsed += time.perf_counter() - start
        tokens += stats["num_tokens"]
        losses.append(stats["loss"])
    rate = tokens / elapsed
    figures = {"tokens_per_s": rate, "flops_per_s": 6 * params * rate, "params": params,
               "pad_fraction": stats["pad_fraction"], "first_loss": first["loss"], "losses": losses,
               "attn_implementation": trainer.model.config._attn_implementation,
               "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None}
    figures["mfu"] = figures["flops_per_s"] / peak_flops if peak_flops else None
    del trainer
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return figures


def sampling_figures(model_path: str, prompts: int, num_samples: int, max_new_tokens: int) -> dict:
    """Generated tokens/s of the hf engine (on the GPU when there is one), after one untimed warm-up batch."""
    import pyarrow as pa

    from iterft_ray.config import SamplingConfig
    from iterft_ray.engines.hf import HFEngine

    engine = HFEngine(model_path, None, trust_remote_code=False)
    table = pa.table({"prompt_id": list(range(prompts)), "prompt": [f"{i}+{i * 7}=" for i in range(prompts)]})
    config = SamplingConfig(num_samples=num_samples, max_new_tokens=max_new_tokens, batch_size=prompts * num_samples)
    engine.sample(table.slice(0, 1), config, seed=0, weight_version=0, generator_id=0, round_index=0)
    start = time.perf_counter()
    rollouts = engine.sample(table, config, seed=1, weight_version=0, generator_id=0, round_index=0)
    elapsed = time.perf_counter() - start
    generated = sum(len(ids) for ids in rollouts.column("completion_ids").to_pylist())
    return {"tokens_per_s": generated / elapsed, "rows": rollouts.num_rows, "generated_tokens": generated,
            "device": str(engine.model.device), "dtype": str(engine.model.dtype)}


def figures_line(figures: dict) -> str:
    """The check's one line: GPU, training padded and packed (tokens/s, MFU), sampling, time, versions."""
    pad, pack, sampling = figures["train"]["padded"], figures["train"]["packed"], figures["sampling"]

    def mfu(f: dict) -> str:
        return f"MFU {f['mfu']:.1%}" if f["mfu"] is not None else f"{f['flops_per_s'] / 1e12:.1f} TFLOP/s"

    memory = f", peak memory {pad['max_memory_gb']:.1f} GB" if pad["max_memory_gb"] is not None else ""
    return (f"gpu_check OK: {figures['gpu']}, Llama {pad['params'] / 1e9:.2f}B bf16 ({pad['attn_implementation']}): "
            f"train padded {pad['tokens_per_s']:.0f} tok/s {mfu(pad)}, packed {pack['tokens_per_s']:.0f} tok/s "
            f"{mfu(pack)} ({pack['tokens_per_s'] / pad['tokens_per_s']:.2f}x, pad fraction "
            f"{pad['pad_fraction']:.2f} -> {pack['pad_fraction']:.2f}, loss {pad['losses'][-1]:.4f} vs "
            f"{pack['losses'][-1]:.4f}){memory}; hf sampling {sampling['tokens_per_s']:.0f} tok/s "
            f"({sampling['rows']} rows); {figures['wall_s']:.0f} s; transformers {figures['versions']['transformers']}, "
            f"torch {figures['versions']['torch']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--steps", type=int, default=3, help="timed step() calls per side (default 3)")
    p.add_argument("--sequences", type=int, default=64, help="sequences per step() call (default 64)")
    p.add_argument("--micro-batch", type=int, default=8)
    args = p.parse_args()
    gpu = require_cuda()  # first: nothing else is worth importing without it
    versions = require_packages()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()  # the loading and saving bars of a 1B model, on stderr
    started = time.perf_counter()
    peak = next((flops for name, flops in PEAK_BF16.items() if name in gpu), None)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        path = build_llama(os.path.join(tmp, "llama-1b"), **LLAMA_1B)
        seqs = ragged_sequences(args.sequences, 64, 512, vocab=260)
        train = {side: train_figures(path, "cuda", packing=side == "packed", bf16=True, sequences=seqs,
                                     micro_batch=args.micro_batch, steps=args.steps,
                                     out_dir=os.path.join(tmp, side), peak_flops=peak)
                 for side in ("padded", "packed")}
        sampling = sampling_figures(path, prompts=32, num_samples=4, max_new_tokens=128)
    figures = {"gpu": gpu, "peak_bf16_flops": peak, "versions": versions, "train": train, "sampling": sampling,
               "wall_s": time.perf_counter() - started}
    print(figures_line(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
