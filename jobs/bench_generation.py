"""Benchmark: sampling in a GeneratorActor through Ray against sampling in this process.

    python jobs/bench_generation.py [--json out.json] [--reps 8]
    ray job submit --working-dir . -- python jobs/bench_generation.py --json out.json

The demo's tiny Llama (the overrides in iterft_ray/configs/demo.yaml) and addition prompts;
256 prompts x 4 samples, max_new_tokens 16, temperature 1.0, batch_size 256 sequences
(64 prompts per model.generate call). Three sides, interleaved per repetition, same
weights, same prompts, same seed (so the same tokens):

  actor        ray.get(actor.generate.remote(prompts, [weights_ref], version, params, seed, 0)),
               timed from the driver: submit, sampling in the actor, Arrow result back
  direct       iterft_ray.engines.hf_sampling.sample_rollouts(...) in this process (what the actor runs)
  bare         model.generate(...) in this process on the same padded batches (tokenised
               before the timer) with the same arguments: no Arrow, no decoding, no
               log-prob sums, so (direct - bare) is the cost of building the rollout table

Threads: Ray gives an actor OMP_NUM_THREADS = its num_cpus (1 here), so torch in the
actor runs one intra-op thread; this process is set to the same number
(torch.set_num_threads), otherwise the comparison would be of thread counts, not of
Ray. The probe line below shows the thread count a num_cpus=1 actor gets.

Target: tokens/s of actor >= 0.95 x tokens/s of direct (median of per-repetition ratios).
CPU seconds per call (the actor process's, read with psutil, against this process's)
are shown too: they say whether Ray adds work, where wall time on a shared machine also
says how much of a core each process got. Ray's own share of a call (submit, argument
and result transfer, ray.get) is measured apart at the end: three calls of the same
generate() timed inside the actor, against the driver's wall time of each call.
"""

from __future__ import annotations

import statistics
import time

import psutil
import pyarrow as pa
import ray
import torch
import yaml
from transformers import AutoTokenizer

from bench_common import (add_niceness_option, column, environment, init_ray_from_args, interleave, parser,
                          print_environment, print_table, verdict, write_json)
from iterft_ray.actors.generator import GeneratorActor
from iterft_ray.config import resolve_config
from iterft_ray.config import ModelConfig, SamplingConfig
from iterft_ray.engines.hf_sampling import sample_rollouts
from iterft_ray.data.tasks import get_task
from iterft_ray.tiny import resolve_model_path
from iterft_ray.train.models import load_model
from iterft_ray.weights.snapshot import publish_weights

TARGET = 0.95


def demo_model_overrides() -> dict:
    """The tiny Llama of the demo config (iterft_ray/configs/demo.yaml)."""
    with open(resolve_config("demo"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)["model"].get("tiny_overrides", {})


@ray.remote
class ThreadProbe:
    def threads(self) -> dict:
        import os

        return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def bare_generate(model, batches: list[dict], params: SamplingConfig, seed: int, pad_id: int, eos: int) -> int:
    """model.generate on pre-padded batches with sample_rollouts' arguments; returns completion tokens."""
    torch.manual_seed(seed)
    tokens = 0
    for batch in batches:
        out = model.generate(
            **batch, do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            max_new_tokens=params.max_new_tokens, num_return_sequences=params.num_samples, pad_token_id=pad_id,
            eos_token_id=eos, output_scores=True, return_dict_in_generate=True,
        )
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        # Tokens up to and including the first EOS, as sample_rollouts counts them.
        is_eos = (new == eos).int()
        before_eos = (is_eos.cumsum(1) - is_eos) == 0
        tokens += int(before_eos.sum())
    return tokens


def main() -> None:
    p = parser(__doc__, reps=8, warmup=1)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256, help="sequences per model.generate call")
    p.add_argument("--actor-cpus", type=int, default=1, help="num_cpus of the actor = torch threads here")
    add_niceness_option(p)
    args = p.parse_args()
    torch.set_num_threads(args.actor_cpus)
    nice = init_ray_from_args(args, num_cpus=max(2, args.actor_cpus + 1))
    env = {**environment(), **nice}
    print_environment(env)
    probe = ThreadProbe.options(num_cpus=args.actor_cpus).remote()
    probe_threads = ray.get(probe.threads.remote())
    ray.kill(probe)
    print(f"a num_cpus={args.actor_cpus} actor gets: {probe_threads}; this process: "
          f"{torch.get_num_threads()} torch threads; nice: workers {nice['worker_nice']}, here {nice['driver_nice']}")

    model_overrides = demo_model_overrides()
    path = resolve_model_path("tiny-llama", **model_overrides)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_model(path).eval()
    actor = GeneratorActor.options(num_cpus=args.actor_cpus).remote(
        ModelConfig("tiny-llama", tiny_overrides=model_overrides), 0, SamplingConfig())
    weights = publish_weights(model, 0)

    task = get_task("addition", digits=2, num_train=max(args.prompts, 512))
    prompts = pa.Table.from_pylist(task.train_prompts[: args.prompts])
    params = SamplingConfig(num_samples=args.num_samples, temperature=1.0, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size)
    per_batch = max(1, params.batch_size // params.num_samples)
    ids = tokenizer(prompts.column("prompt").to_pylist())["input_ids"]
    batches = [dict(tokenizer.pad({"input_ids": ids[i : i + per_batch]}, padding=True, return_tensors="pt",
                                  padding_side="left")) for i in range(0, len(ids), per_batch)]
    seed = 1234
    print(f"model: tiny-llama {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M params {model_overrides}; "
          f"{args.prompts} prompts x {args.num_samples} samples, max_new_tokens {args.max_new_tokens}, "
          f"batch {per_batch * params.num_samples} sequences per generate call ({len(batches)} calls); "
          f"{args.reps} reps after {args.warmup} warm-up (the first actor call also loads the weights)")

    last = {}
    actor_proc = psutil.Process(ray.get(actor.info.remote())["pid"])

    def actor_side():
        cpu = sum(actor_proc.cpu_times()[:2])
        table = ray.get(actor.generate.remote(prompts, [weights], 0, params, seed, 0))
        last["actor"] = table
        return {"tokens": sum(len(c) for c in table.column("completion_ids").to_pylist()),
                "actor_cpu_s": sum(actor_proc.cpu_times()[:2]) - cpu}

    def direct_side():
        cpu = sum(actor_proc.cpu_times()[:2])
        table = sample_rollouts(model, tokenizer, prompts, params, seed, 0, 0, 0)
        last["direct"] = table
        return {"tokens": sum(len(c) for c in table.column("completion_ids").to_pylist()),
                "actor_idle_cpu_s": sum(actor_proc.cpu_times()[:2]) - cpu}

    def bare_side():
        cpu = sum(actor_proc.cpu_times()[:2])
        tokens = bare_generate(model, batches, params, seed, tokenizer.pad_token_id, tokenizer.eos_token_id)
        return {"tokens": tokens, "actor_idle_cpu_s": sum(actor_proc.cpu_times()[:2]) - cpu}

    res = interleave({"actor": actor_side, "direct": direct_side, "bare": bare_side}, args.reps, args.warmup)

    # Ray's own share of an actor call: the same generate() timed inside the actor (run there
    # through __ray_call__) against the driver's wall time of the whole call.
    def timed_generate(gen, *call_args):
        import time

        start = time.perf_counter()
        table = gen.generate(*call_args)
        return table, time.perf_counter() - start

    transport = []
    for _ in range(3):
        start = time.perf_counter()
        _, inner = ray.get(actor.__ray_call__.remote(timed_generate, prompts, [weights], 0, params, seed, 0))
        transport.append(time.perf_counter() - start - inner)
    for rows in res.values():
        for r in rows:
            r["tokens_per_s"] = r["tokens"] / r["s"]
    same = last["actor"].column("completion_ids").to_pylist() == last["direct"].column("completion_ids").to_pylist()
    vs_direct = [a["tokens_per_s"] / d["tokens_per_s"] for a, d in zip(res["actor"], res["direct"])]
    vs_bare = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(res["actor"], res["bare"])]
    direct_vs_bare = [d["tokens_per_s"] / b["tokens_per_s"] for d, b in zip(res["direct"], res["bare"])]
    overhead = [a["s"] - d["s"] for a, d in zip(res["actor"], res["direct"])]
    cpu_ratio = [a["actor_cpu_s"] / d["cpu_s"] for a, d in zip(res["actor"], res["direct"])]
    # What the actor process burns while it has no call (Ray's threads in it), per second.
    idle_rate = [r["actor_idle_cpu_s"] / r["s"] for r in res["direct"] + res["bare"]]
    table = print_table(f"sampling {res['actor'][0]['tokens']} completion tokens per call "
                        f"(batch {per_batch * params.num_samples} sequences)", [
        ("actor (Ray, from the driver): s", column(res["actor"], "s"), "s"),
        ("direct sample_rollouts: s", column(res["direct"], "s"), "s"),
        ("bare model.generate: s", column(res["bare"], "s"), "s"),
        ("actor: tokens/s", column(res["actor"], "tokens_per_s"), "tok/s"),
        ("direct: tokens/s", column(res["direct"], "tokens_per_s"), "tok/s"),
        ("bare: tokens/s", column(res["bare"], "tokens_per_s"), "tok/s"),
        ("actor - direct (Ray overhead per call)", overhead, "s"),
        ("driver wall - in-actor generate() (Ray's share)", transport, "s"),
        ("CPU time: actor process (all its threads)", column(res["actor"], "actor_cpu_s"), "s"),
        ("CPU time: direct, this process", column(res["direct"], "cpu_s"), "s"),
        ("CPU time: bare, this process", column(res["bare"], "cpu_s"), "s"),
        ("CPU-time ratio actor / direct", cpu_ratio, "x"),
        ("idle actor process: CPU s per wall s", idle_rate, "cpu s/s"),
        ("tokens/s ratio actor / direct", vs_direct, "x"),
        ("tokens/s ratio actor / bare", vs_bare, "x"),
        ("tokens/s ratio direct / bare", direct_vs_bare, "x"),
    ])
    print(f"actor and direct sampled identical tokens: {same}")
    result = verdict("actor tokens/s / direct sample_rollouts tokens/s", statistics.median(vs_direct), TARGET,
                     at_most=False, per_rep=vs_direct)
    implied = statistics.median(column(res["direct"], "s")) / (
        statistics.median(column(res["direct"], "s")) + statistics.median(transport))
    implied_result = verdict("implied by Ray's share alone: direct s / (direct s + Ray's share)", implied, TARGET,
                             at_most=False)
    bare_result = verdict("actor tokens/s / bare model.generate tokens/s", statistics.median(vs_bare), TARGET,
                          at_most=False, per_rep=vs_bare)
    write_json(args.json, {
        "benchmark": "generation", "environment": env, "probe": probe_threads, "model": model_overrides,
        "prompts": args.prompts, "num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
        "batch_sequences": per_batch * params.num_samples, "reps": args.reps, "warmup": args.warmup,
        "identical_samples": same, "table": table, "raw": res, "transport_s": transport, "target": result,
        "target_implied_by_ray_share": implied_result,
        "vs_bare": bare_result,
    })
    ray.shutdown()


if __name__ == "__main__":
    main()
