"""Benchmark: memory per trainer rank and step time, one rank vs two FSDP2-sharded ranks.

    python jobs/bench_ranks.py [--json out.json] [--reps 2] [--layers 16] [--sequences 8]
    ray job submit --working-dir . -- python jobs/bench_ranks.py --json out.json

A random Llama of ~55M parameters (tiny-llama with hidden 512, 16 layers), AdamW,
fp32, `--sequences` (8) sequences of 64 tokens per update: one rank with batch 8, and two
ranks with per-device batch 4 (the same update). For each rank it reports

  state MB     bytes of the parameters, gradients and AdamW moments this rank holds
               (its shards: counted from the tensors after an update; gradients are as
               large as the parameters they belong to)
  peak RSS MB  the rank process's peak resident memory (ru_maxrss) over loading, the
               updates and then one checkpoint save: the state above, plus activations
               and torch itself (rank 0 loads the whole model before it shards it; the
               other ranks start on the meta device; the save streams weights a
               parameter at a time and each rank writes its own optimizer shard)
  steps MB     the same peak before the checkpoint save
  step s       median wall time of one update (`step()` on those sequences)

and the ratios of the two-rank figures to the one-rank ones. Goal: state <= 0.55x.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import init_ray, parser  # noqa: E402

OVERRIDES = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8)


def rank_state(actor) -> dict:
    """Parameters, gradients (sized as their parameters) and optimizer state held by this rank, in MB."""
    import torch

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * local(p).element_size() for p in actor.trainer.model.parameters())
    optimizer = actor.trainer.optimizer.optimizer
    moments = sum(local(v).numel() * local(v).element_size()
                  for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim())
    return {"params_mb": params / 2**20, "grads_mb": params / 2**20, "optimizer_mb": moments / 2**20,
            "state_mb": (2 * params + moments) / 2**20}


def measure(ranks: int, layers: int, sequences: int, reps: int, warmup: int) -> dict:
    import ray

    from iterft_ray.actors.trainer_group import TrainerGroup
    from iterft_ray.config import ModelConfig, ResourcesConfig

    texts = [(("%d+%d=%d;" % (i, 7 * i, 8 * i)) * 8)[:63] for i in range(sequences)]  # 64 tokens with BOS
    args = {"optim": "adamw_torch", "learning_rate": 1e-4, "per_device_train_batch_size": sequences // ranks,
            "train_sampling_strategy": "sequential", "report_to": "none", "output_dir": "runs/bench-ranks"}
    model = ModelConfig("tiny-llama", tiny_overrides={**OVERRIDES, "num_hidden_layers": layers})
    group = TrainerGroup(model, args, ResourcesConfig(trainer_ranks=ranks))
    try:
        times = []
        for rep in range(warmup + reps):
            start = time.perf_counter()
            stats = group.step(texts=texts)
            if rep >= warmup:
                times.append(time.perf_counter() - start)
            print(f"  {ranks} rank(s) rep {rep + 1}: {time.perf_counter() - start:.2f} s "
                  f"(updates {stats['updates']})", flush=True)
        states = group.call(rank_state)
        before_save = group.peak_memory()
        with tempfile.TemporaryDirectory() as checkpoint:
            group.save(checkpoint)
        peaks = group.peak_memory()
        total = ray.get(group.ranks[0].__ray_call__.remote(
            lambda a: sum(p.numel() for p in a.trainer.model.parameters()) * (a.world_size if a.trainer.sharded else 1)))
        return {"ranks": ranks, "parameters": total, "step_s": statistics.median(times), "step_s_all": times,
                "per_rank": [{**s, "peak_rss_mb": p["rss_mb"], "steps_rss_mb": b["rss_mb"]}
                             for s, p, b in zip(states, peaks, before_save)]}
    finally:
        group.shutdown()


def main() -> None:
    p = parser(__doc__, reps=2)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--sequences", type=int, default=8, help="sequences per update (even)")
    args = p.parse_args()
    init_ray(num_cpus=4)
    one = measure(1, args.layers, args.sequences, args.reps, args.warmup)
    two = measure(2, args.layers, args.sequences, args.reps, args.warmup)
    print(f"\nmodel: {one['parameters'] / 1e6:.1f}M parameters, AdamW, fp32; {args.sequences} sequences x 64 tokens per update")
    print(f"{'ranks':>5} {'rank':>4} {'params MB':>10} {'grads MB':>9} {'AdamW MB':>9} {'state MB':>9} "
          f"{'peak RSS MB':>11} {'steps MB':>9} {'step s':>7}")
    for side in (one, two):
        for rank, r in enumerate(side["per_rank"]):
            print(f"{side['ranks']:>5} {rank:>4} {r['params_mb']:>10.0f} {r['grads_mb']:>9.0f} {r['optimizer_mb']:>9.0f} "
                  f"{r['state_mb']:>9.0f} {r['peak_rss_mb']:>11.0f} {r['steps_rss_mb']:>9.0f} {side['step_s']:>7.2f}")
    base = one["per_rank"][0]
    ratios = {
        "state_ratio": max(r["state_mb"] for r in two["per_rank"]) / base["state_mb"],
        "peak_rss_ratio": max(r["peak_rss_mb"] for r in two["per_rank"]) / base["peak_rss_mb"],
        "step_time_ratio": two["step_s"] / one["step_s"],
        "peak_below_one_rank_mb": min(base["peak_rss_mb"] - r["peak_rss_mb"] for r in two["per_rank"]),
    }
    below = ratios["peak_below_one_rank_mb"]
    print(f"\neach of two ranks peaks at least {below:.0f} MB below one rank: {below / base['state_mb']:.2f}x the "
          f"one-rank model state (goal >= 0.3x)")
    print(f"two ranks vs one: state {ratios['state_ratio']:.2f}x (goal <= 0.55x), peak RSS "
          f"{ratios['peak_rss_ratio']:.2f}x, step time {ratios['step_time_ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"one": one, "two": two, **ratios}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
