"""Benchmark: the vllm engine against the hf engine, same prompts, same weights, in this process.

Sides, per model size (one size per run: a process holds one in-process vLLM engine):
  hf      HFEngine.sample      (transformers generate, sampled-token log-probs recorded)
  vllm    VLLMEngine.sample    (vllm.LLM in this process)
Both first load the same WeightSnapshot, so they sample from identical weights; figures are
completion tokens per second, interleaved repetitions (jobs/bench_common.py).

Weight updates: the vllm engine's in-place reload of a snapshot (`VLLMEngine.load`, what a
generator does per version) against a fresh copy of the same weights (`clone()` of every
tensor: the bare memcpy), the hf engine's `load_snapshot`, and starting a new engine (what a
restart per version would cost).

Sizes: `demo` is the demo's model (hidden 128, 2 layers, byte vocabulary) with 4 heads
instead of 32, because vLLM's CPU attention takes head_dim 32, not 4; `100m` is a 12-layer,
768-wide Llama with a 32000-token vocabulary (~110M parameters) and 128 new tokens.

    python jobs/bench_engines.py --size demo
    python jobs/bench_engines.py --size 100m --prompts 4 --num-samples 2 --reps 2
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIZES = {
    "demo": dict(overrides=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4), prompts=256, num_samples=8, max_new_tokens=4),
    "100m": dict(overrides=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                                num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=False),
                 prompts=4, num_samples=2, max_new_tokens=128),
}


def main() -> None:
    from bench_common import environment, interleave, parser, print_environment, print_table, write_json

    p = parser(__doc__, reps=3)
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    p.add_argument("--prompts", type=int, help="prompts per call (default per size)")
    p.add_argument("--num-samples", type=int, help="samples per prompt (default per size)")
    p.add_argument("--max-new-tokens", type=int, help="(default per size)")
    args = p.parse_args()
    size = SIZES[args.size]
    prompts_n = args.prompts or size["prompts"]
    num_samples = args.num_samples or size["num_samples"]
    max_new = args.max_new_tokens or size["max_new_tokens"]

    import pyarrow as pa
    import torch

    from iterft_ray.config import SamplingConfig
    from iterft_ray.engines.hf import HFEngine
    from iterft_ray.engines.vllm import VLLMEngine
    from iterft_ray.data.tasks import get_task
    from iterft_ray.tiny import tiny_model_path
    from iterft_ray.weights.snapshot import snapshot_from_model

    env = environment()
    print_environment(env)
    path = str(tiny_model_path("tiny-llama", **size["overrides"]))
    hf = HFEngine(path, None, False)
    params = sum(t.numel() for t in hf.model.parameters())
    torch.manual_seed(1)
    with torch.no_grad():  # weights the engines did not start from, so a load is a real change
        for t in hf.model.parameters():
            t.add_(torch.randn_like(t) * 0.01)
    snapshot = snapshot_from_model(hf.model, version=1)
    start = time.perf_counter()
    vllm = VLLMEngine(path, None, False)
    startup = time.perf_counter() - start

    task = get_task("addition", digits=2, num_train=max(prompts_n, 64))
    prompts = pa.Table.from_pylist(task.train_prompts[:prompts_n])
    # Stop tokens would end samples at different points on the two engines; count tokens either way.
    config = SamplingConfig(num_samples=num_samples, temperature=1.0, max_new_tokens=max_new,
                            batch_size=prompts_n * num_samples)
    print(f"model: {params / 1e6:.1f}M params, vocab {hf.model.config.vocab_size}, {size['overrides']}; "
          f"{prompts_n} prompts x {num_samples} samples, max_new_tokens {max_new}; vllm start-up {startup:.1f} s")

    def sampler(engine):
        def run():
            table = engine.sample(prompts, config, seed=7, weight_version=1, generator_id=0, round_index=0)
            return {"tokens": sum(map(len, table.column("completion_ids").to_pylist()))}
        return run

    hf.load(snapshot)
    vllm.load(snapshot)
    res = interleave({"hf": sampler(hf), "vllm": sampler(vllm)}, args.reps, args.warmup)
    tps = {name: [r["tokens"] / r["s"] for r in rows] for name, rows in res.items()}
    loads = interleave({
        "vllm in-place load": lambda: vllm.load(snapshot),
        "fresh copy (clone)": lambda: {"n": len({k: torch.from_numpy(a).clone() for k, a in snapshot.arrays.items()})},
        "hf load_snapshot": lambda: hf.load(snapshot),
    }, max(args.reps, 3), 1, log=False)
    table = print_table(f"{args.size}: tokens/s and weight updates", [
        ("hf tokens/s", tps["hf"], "tok/s"),
        ("vllm tokens/s", tps["vllm"], "tok/s"),
        ("vllm / hf tokens/s", [v / h for v, h in zip(tps["vllm"], tps["hf"])], "x"),
        *[(f"{name}: s", [r["s"] for r in rows], "s") for name, rows in loads.items()],
        ("vllm engine start-up (a restart per version)", [startup], "s"),
    ])
    ratio = statistics.median(tps["vllm"]) / statistics.median(tps["hf"])
    print(f"\nvllm / hf tokens/s: {ratio:.2f}x ({args.size}, {params / 1e6:.1f}M params, {max_new} new tokens)")
    write_json(args.json, {"size": args.size, "params": params, "environment": env, "table": table,
                           "startup_s": startup})


if __name__ == "__main__":  # vllm.LLM needs the guard where it spawns its engine process
    main()
