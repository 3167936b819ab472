"""Scale model: a round's time and the best generator:trainer split, predicted from per-unit costs.

    python jobs/scale_model.py                        # the README's tables: 1B and 8B, 8..512 GPUs
    python jobs/scale_model.py --params 8e9 --gpus 64 128
    python jobs/scale_model.py --check [--rounds 3]   # measure the costs here, predict, compare with runs

A round is four phases: generate (tokens / (generators x tokens/s each)), filter (rows /
(filter processes x rows/s)), train (tokens / (ranks x tokens/s each), or the gradient
collectives when they take longer) and weight sync (bytes / bytes/s). Sync mode runs them
one after the other; async mode with staleness 1 samples round r+1 while round r trains,
so a round takes the longer of generate + filter and train + sync. Where actors share
devices (the cores of this machine), a round also takes at least all its work divided by
the devices.

`--check` measures the four costs on this machine from one round with 1 generator in sync
mode (the demo's model and round, after its warm-up), predicts rounds with 1-3 generators
in sync and async mode, runs them with the same loop, and prints predicted against
measured.

The GPU tables cannot be measured here. They use an H100's datasheet figures and stated
efficiencies, all overridable: training at `--train-mfu` of bf16 peak (6 x params FLOPs a
token); decoding as many sequences as a generator batches (`--decode-batch`), each step
reading the weights once from HBM or computing 2 x params FLOPs a sequence at
`--decode-mfu`, whichever is slower (the KV cache's reads are left out: an optimistic
decode); prefill at `--decode-mfu`; FSDP moving 8 bytes a parameter per optimizer step
(bf16 all-gathers forward and backward, fp32 reduce-scatter; `--rank-batch` sequences a
rank per step) over NVLink within 8 GPUs and InfiniBand beyond, overlapped with compute; weight sync broadcasting bf16 weights at
`--sync-gbps` (verl reports about 21 GB/s). A trainer needs at least enough GPUs for 16
bytes a parameter (fp32 master weights, gradients, Adam) with 30% headroom; a generator
is one GPU holding bf16 weights. The round grows with the cluster (`--prompts-per-gpu`).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

H100 = {"bf16_flops": 989e12, "hbm_bytes_per_s": 3.35e12, "memory_bytes": 80e9,
        "nvlink_bytes_per_s": 450e9, "network_bytes_per_s": 50e9, "gpus_per_node": 8}


@dataclass
class Costs:
    """Per-unit rates of one setting (a model on a kind of device)."""

    generate_tokens_per_s: float  # new tokens, one generator
    train_tokens_per_s: float  # prompt + completion tokens, one rank
    filter_rows_per_s: float  # one filter process
    sync_s: float  # one weight sync
    other_s: float = 0.0  # the driver's own share of a round (records, plot, waiting)


@dataclass
class Round:
    """One round's work, in totals."""

    rows: float  # samples generated and filtered
    generated_tokens: float
    train_tokens: float  # prompt + completion tokens of the accepted rows
    prompt_tokens: float = 0.0  # prefilled

    @classmethod
    def of(cls, prompts: int, samples: int, prompt_tokens: int, completion_tokens: int, accept: float) -> Round:
        rows = prompts * samples
        return cls(rows, rows * completion_tokens, rows * accept * (prompt_tokens + completion_tokens),
                   rows * prompt_tokens)


def predict(costs: Costs, work: Round, generators: int, ranks: int, async_mode: bool,
            filter_processes: int = 1, shared_devices: int | None = None, train_floor_s: float = 0.0) -> dict:
    """Phase times and the round time. `shared_devices`: all actors share that many devices (CPU cores).

    Each phase runs on its own actors; with shared devices a phase with k actors runs on
    min(k, devices) of them at once.
    """
    share = (lambda k: min(k, shared_devices)) if shared_devices else (lambda k: k)
    phases = {
        "generate": work.generated_tokens / (costs.generate_tokens_per_s * share(generators)),
        "filter": work.rows / (costs.filter_rows_per_s * share(filter_processes)),
        "train": max(work.train_tokens / (costs.train_tokens_per_s * share(ranks)), train_floor_s),
        "sync": costs.sync_s,
    }
    if async_mode:
        sample, learn = phases["generate"] + phases["filter"], phases["train"] + phases["sync"]
        busy = max(sample, learn)
        if shared_devices:
            # Each phase above keeps share(k) devices busy; overlapped, they cannot use more than there are.
            work_s = (phases["generate"] * share(generators) + phases["filter"] * share(filter_processes)
                      + phases["train"] * share(ranks) + phases["sync"])
            busy = max(busy, work_s / shared_devices)
    else:
        busy = sum(phases.values())
    return {**phases, "round": busy + costs.other_s}


# ---------------------------------------------------------------- GPUs, from datasheets and efficiencies


def gpu_costs(params: float, args: argparse.Namespace, gpu: dict = H100) -> Costs:
    """Rates of a `params`-parameter model on one GPU of kind `gpu` (see the module docstring)."""
    weight_bytes = 2 * params  # bf16
    step_s = max(weight_bytes / gpu["hbm_bytes_per_s"],
                 2 * params * args.decode_batch / (args.decode_mfu * gpu["bf16_flops"]))
    return Costs(
        generate_tokens_per_s=args.decode_batch / step_s,
        train_tokens_per_s=args.train_mfu * gpu["bf16_flops"] / (6 * params),
        filter_rows_per_s=args.filter_rows_per_s,
        sync_s=weight_bytes / (args.sync_gbps * 1e9),
    )


def min_trainer_gpus(params: float, gpu: dict = H100) -> int:
    return math.ceil(16 * params * 1.3 / gpu["memory_bytes"])


def collective_s(params: float, ranks: int, work: Round, args: argparse.Namespace, gpu: dict = H100) -> float:
    """FSDP's collectives for one round: 8 bytes a parameter per optimizer step, ring over `ranks`."""
    if ranks == 1:
        return 0.0
    link = gpu["nvlink_bytes_per_s"] if ranks <= gpu["gpus_per_node"] else gpu["network_bytes_per_s"]
    steps = math.ceil(work.rows * args.accept / (args.rank_batch * ranks))
    return steps * 8 * params * (ranks - 1) / ranks / link


def prefill_s(params: float, work: Round, generators: int, args: argparse.Namespace, gpu: dict = H100) -> float:
    return work.prompt_tokens * 2 * params / (args.decode_mfu * gpu["bf16_flops"] * generators)


def best_split(params: float, gpus: int, async_mode: bool, args: argparse.Namespace) -> dict | None:
    """The generator:trainer split of `gpus` with the shortest predicted round."""
    costs = gpu_costs(params, args)
    work = Round.of(args.prompts_per_gpu * gpus, args.samples, args.prompt_tokens, args.completion_tokens, args.accept)
    best = None
    for generators in range(1, gpus - min_trainer_gpus(params) + 1):
        ranks = gpus - generators
        result = predict(costs, work, generators, ranks, async_mode, filter_processes=args.filter_processes_per_gpu * gpus,
                         train_floor_s=collective_s(params, ranks, work, args))
        result["generate"] += prefill_s(params, work, generators, args)
        result["round"] = (max(result["generate"] + result["filter"], result["train"] + result["sync"]) if async_mode
                           else result["generate"] + result["filter"] + result["train"] + result["sync"])
        if best is None or result["round"] < best["round"]:
            best = {**result, "generators": generators, "ranks": ranks, "rows": work.rows}
    return best


def print_tables(args: argparse.Namespace) -> None:
    print(f"H100, train MFU {args.train_mfu:.0%}, decode batch {args.decode_batch}, {args.prompts_per_gpu} prompts "
          f"x {args.samples} samples per GPU, {args.prompt_tokens}+{args.completion_tokens} tokens, "
          f"accept {args.accept:.0%}, sync {args.sync_gbps:g} GB/s, {args.filter_processes_per_gpu} filter processes "
          f"per GPU at {args.filter_rows_per_s:g} rows/s")
    for params in args.params:
        print(f"\n{params / 1e9:g}B parameters (trainer needs >= {min_trainer_gpus(params)} GPUs)")
        print("| GPUs | mode | generators:trainer | generate s | filter s | train s | sync s | round s | samples/s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for gpus in args.gpus:
            for mode in ("sync", "async"):
                b = best_split(params, gpus, mode == "async", args)
                if b is None:
                    print(f"| {gpus} | {mode} | (too few GPUs) | | | | | | |")
                    continue
                print(f"| {gpus} | {mode} | {b['generators']}:{b['ranks']} | {b['generate']:.1f} | {b['filter']:.1f} "
                      f"| {b['train']:.1f} "
                      f"| {b['sync']:.2f} | {b['round']:.1f} | {b['rows'] / b['round']:.0f} |")


# ---------------------------------------------------------------- the check on this machine


def check(args: argparse.Namespace) -> None:
    """Measure costs from a 1-generator sync round, predict 1-3 generators in both modes, run them, compare."""
    import pyarrow.parquet as pq
    import ray
    import yaml

    from iterft_ray.config import load_config
    from iterft_ray.run.loop import IterativeLoop

    cores = os.cpu_count() or 1
    demo = yaml.safe_load((Path(__file__).parents[1] / "iterft_ray" / "configs" / "demo.yaml").read_text())
    settings = [(g, mode) for g in (1, 2, 3) for mode in ("sync", "async")]
    out = Path(tempfile.mkdtemp(prefix="scale-check-"))
    demo["loop"].update(output_dir=str(out), rounds=len(settings) * (args.rounds + 1) + 1,
                        eval_every=10**6, save_every=10**6)
    ray.init(address="local", num_cpus=6, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    loop = IterativeLoop(load_config(demo))
    loop.save_checkpoint = lambda: None  # no checkpoint I/O inside the timed rounds
    try:
        loop.warm_up()
        measured: dict[tuple[int, str], list[dict]] = {}
        for generators, mode in settings:
            loop.scale_generators(generators)
            loop.config.loop.async_mode = mode == "async"
            loop.round()  # untimed: new generators load weights; async fills its queue
            measured[(generators, mode)] = [loop.round() for _ in range(args.rounds)]
        rows = []
        for (generators, mode), stats in measured.items():
            for s in stats:
                table = pq.read_table(out / "rounds" / f"{s['round']:04d}" / "generations.parquet",
                                      columns=["completion_ids"])
                s["generated_tokens"] = sum(len(ids) for ids in table.column("completion_ids").to_pylist())
            rows.append((generators, mode, stats))
    finally:
        loop.shutdown()
        ray.shutdown()

    base = measured[(1, "sync")]
    mean = lambda key, stats=base: sum(s[key] for s in stats) / len(stats)  # noqa: E731
    costs = Costs(
        generate_tokens_per_s=mean("generated_tokens") / mean("generate_time"),
        train_tokens_per_s=mean("num_tokens") / mean("train_time"),
        filter_rows_per_s=mean("samples") / mean("filter_time"),
        sync_s=mean("sync_time"),
        other_s=mean("round_time") - sum(mean(k) for k in ("generate_time", "filter_time", "train_time", "sync_time")),
    )
    print(f"costs from 1 generator, sync ({cores} cores): generate {costs.generate_tokens_per_s:.0f} tokens/s, "
          f"train {costs.train_tokens_per_s:.0f} tokens/s, filter {costs.filter_rows_per_s:.0f} rows/s, "
          f"sync {costs.sync_s:.3f} s, other {costs.other_s:.3f} s")
    print("| generators | mode | predicted s | measured s (mean of rounds) | measured / predicted |")
    print("|---|---|---|---|---|")
    for generators, mode, stats in rows:
        # Each setting's own token counts, so that acceptance drifting between rounds is not counted as error.
        work = Round(mean("samples", stats), mean("generated_tokens", stats), mean("num_tokens", stats))
        p = predict(costs, work, generators, 1, mode == "async", shared_devices=cores)
        m = mean("round_time", stats)
        print(f"| {generators} | {mode} | {p['round']:.2f} | {m:.2f} | {m / p['round']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--check", action="store_true", help="measure here and compare predictions with runs")
    p.add_argument("--rounds", type=int, default=3, help="--check: timed rounds per setting")
    p.add_argument("--params", type=float, nargs="+", default=[1e9, 8e9])
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--prompts-per-gpu", type=int, default=64)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--completion-tokens", type=int, default=512)
    p.add_argument("--accept", type=float, default=0.3)
    p.add_argument("--rank-batch", type=int, default=16, help="sequences per rank per optimizer step")
    p.add_argument("--train-mfu", type=float, default=0.4)
    p.add_argument("--decode-mfu", type=float, default=0.5)
    p.add_argument("--decode-batch", type=int, default=256)
    p.add_argument("--sync-gbps", type=float, default=20.0)
    p.add_argument("--filter-rows-per-s", type=float, default=200.0, help="per filter process (a sandboxed test)")
    p.add_argument("--filter-processes-per-gpu", type=int, default=4, help="CPU filter processes per GPU")
    args = p.parse_args()
    check(args) if args.check else print_tables(args)


if __name__ == "__main__":
    main()
