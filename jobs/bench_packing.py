"""Benchmark: `trainer.packing` against padding, tokens per second on ragged batches.

    python jobs/bench_packing.py [--json out.json] [--reps 3] [--threads 1]

One process, no Ray. A Llama of ~10.6M parameters (hidden 384, 6 layers, built offline
with random weights) and a batch of random sequences with lengths drawn uniformly from
4..400 tokens, as rollouts are ragged. Two trainers with the same initial weights and the
same settings (micro-batch 8, sampling "sequential": the same micro-batches of the same
examples, so the same updates), run interleaved per repetition:

  padded   each micro-batch padded to its longest example (the default)
  packed   `packing=True`: each micro-batch's examples packed into rows no longer than its
           longest example, position_ids restarting per example (train/packing.py)

Target (issue 25): packed / padded tokens/s >= 1.3 (median of the per-repetition ratios;
the ratio of CPU time, which other processes' load inflates less, is shown beside it).
Both sides make the same updates, so their losses agree every repetition; the largest
difference is shown.
"""

from __future__ import annotations

import os
import statistics
import tempfile

import torch

from bench_common import (column, environment, interleave, parser, print_environment, print_table, ratios,
                          verdict, write_json)
from iterft_ray.tiny import build_tiny_model
from iterft_ray.train.models import load_model
from iterft_ray.train.trainer import IterativeSFTConfig, IterativeSFTTrainer

MODEL = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=6, max_position_embeddings=512)
TARGET = 1.3


def ragged_batch(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(4, vocab, (length,), generator=g) for length in lengths]


def main() -> None:
    p = parser(__doc__, reps=3, warmup=1)
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--min-len", type=int, default=4)
    p.add_argument("--max-len", type=int, default=400)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1, as bench_step.py: on a shared 2-core machine more spin-wait)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)

    tmp = tempfile.mkdtemp(prefix="bench_packing_")
    path = build_tiny_model("tiny-llama", os.path.join(tmp, "model"), **MODEL)
    trainers = {}
    for side in ("padded", "packed"):
        cfg = IterativeSFTConfig(
            output_dir=os.path.join(tmp, side), report_to="none", learning_rate=1e-4,
            per_device_train_batch_size=args.micro_batch, train_sampling_strategy="sequential",
            logging_strategy="no", save_strategy="no", use_cpu=True, packing=side == "packed",
        )
        trainers[side] = IterativeSFTTrainer(load_model(str(path)), cfg, processing_class=_tokenizer(path))
    n_params = sum(p.numel() for p in trainers["padded"].model.parameters())
    seqs = ragged_batch(args.sequences, args.min_len, args.max_len, trainers["padded"].model.config.vocab_size)
    print(f"model: llama {n_params / 1e6:.2f}M params {MODEL}; batch {len(seqs)} sequences of {args.min_len}-"
          f"{args.max_len} tokens ({sum(len(s) for s in seqs)} tokens), micro-batch {args.micro_batch}; "
          f"{args.reps} reps after {args.warmup} warm-up")

    def run(side):
        def fn():
            s = trainers[side].step(input_ids=seqs)
            return {"loss": s["loss"], "pad_fraction": s["pad_fraction"], "tokens": s["num_tokens"]}
        return fn

    res = interleave({side: run(side) for side in trainers}, args.reps, args.warmup)
    for rows in res.values():
        for r in rows:
            r["tokens_per_s"] = r["tokens"] / r["s"]
    speedup = ratios(res["padded"], res["packed"])  # same tokens: time ratio = tokens/s ratio
    cpu_speedup = ratios(res["padded"], res["packed"], "cpu_s")
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(res["padded"], res["packed"]))
    table = print_table("per step() call (median of the timed repetitions)", [
        ("padded: tokens/s", column(res["padded"], "tokens_per_s"), "tok/s"),
        ("packed: tokens/s", column(res["packed"], "tokens_per_s"), "tok/s"),
        ("padded: pad fraction", column(res["padded"], "pad_fraction"), ""),
        ("packed: pad fraction", column(res["packed"], "pad_fraction"), ""),
        ("padded: CPU s", column(res["padded"], "cpu_s"), "cpu s"),
        ("packed: CPU s", column(res["packed"], "cpu_s"), "cpu s"),
        ("speed-up packed over padded (per rep)", speedup, "x"),
        ("CPU-time speed-up packed over padded", cpu_speedup, "x"),
    ])
    print(f"largest |loss(packed) - loss(padded)| over the reps: {loss_diff:.2e} (same updates on both sides); "
          f"load average now {os.getloadavg()[0]:.1f}")
    result = verdict("packed / padded tokens/s (wall)", statistics.median(speedup), TARGET, at_most=False,
                     per_rep=speedup)
    cpu_result = verdict("packed / padded tokens/s (CPU time)", statistics.median(cpu_speedup), TARGET,
                         at_most=False, per_rep=cpu_speedup)
    write_json(args.json, {
        "benchmark": "packing", "environment": env, "model": {**MODEL, "n_params": n_params},
        "batch": {"sequences": len(seqs), "min_len": args.min_len, "max_len": args.max_len,
                  "micro_batch": args.micro_batch},
        "reps": args.reps, "warmup": args.warmup, "table": table, "max_loss_difference": loss_diff,
        "raw": res, "target": result, "target_cpu_time": cpu_result,
    })


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


if __name__ == "__main__":
    main()
