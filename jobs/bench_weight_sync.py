"""Benchmark: weight sync through the object store against one in-memory copy.

    python jobs/bench_weight_sync.py [--json out.json] [--reps 3]
    ray job submit --working-dir . -- python jobs/bench_weight_sync.py --json out.json

Builds a Llama-style model from config (no download, fp32, >= 100M parameters) and
times, in the same process, after one warm-up round:

  (a) baseline: one in-memory copy of the weights, two ways:
      clone  - clone every state_dict tensor into fresh memory (what a snapshot costs)
      copy   - copy every state_dict tensor into a preallocated replica model
  (b) sync: `publish_weights` (snapshot + one ray.put) then `load_snapshot` in two
      generator actors on this node, from the start of the publish until both loads
      have finished. Split into put-only and get+load-only.

The ratio (b)/(a) is reported against both baselines; the target is <= 2.0. The data
path of (b) is two full memcpys in sequence (model -> shared memory, then shared
memory -> each replica, the two replicas in parallel) against one for (a), so 2.0 is
what a perfect implementation would measure on a machine with a core per replica.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import ray
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from iterft_ray.weights import load_snapshot, publish_weights, snapshot_from_model

# ~134M parameters, 0.54 GB in fp32; lm_head untied so every parameter is stored.
MODEL_CONFIG = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    tie_word_embeddings=False,
)


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**MODEL_CONFIG)).eval()


@ray.remote(num_cpus=1)
class BenchGenerator:
    """Stands in for a GeneratorActor: holds a replica model and loads snapshots into it."""

    def __init__(self):
        self.model = build_model()

    def load(self, refs: list[ray.ObjectRef]) -> dict:
        start = time.perf_counter()
        snapshot = ray.get(refs[0])  # nested ref so the get is timed here
        got = time.perf_counter()
        load_snapshot(self.model, snapshot)
        done = time.perf_counter()
        return {"get_s": got - start, "load_s": done - got}


def clone_state_dict(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def copy_into(dst: dict, model: torch.nn.Module) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            dst[k].copy_(v)


def sync_round(model: torch.nn.Module, generators: list, version: int) -> dict:
    start = time.perf_counter()
    ref = publish_weights(model, version)
    put_done = time.perf_counter()
    inside = ray.get([g.load.remote([ref]) for g in generators])
    done = time.perf_counter()
    del ref
    return {
        "sync_s": done - start,
        "put_s": put_done - start,
        "get_load_s": done - put_done,
        "actor_get_s": max(r["get_s"] for r in inside),
        "actor_load_s": max(r["load_s"] for r in inside),
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "all": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (default 3)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed rounds first (default 2: the first puts also fault in "
                             "fresh shared-memory pages, a one-off cost per store region)")
    parser.add_argument("--generators", type=int, default=2)
    parser.add_argument("--object-store-gb", type=float, default=2.0,
                        help="object store size when starting a local Ray (default 2)")
    parser.add_argument("--preallocate-store", action="store_true",
                        help="have Ray fault in all object store memory at start")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads in this process (default 1: on a 2-core machine "
                             "two threads made the baseline copy 5-8x slower, and each "
                             "generator actor runs one thread)")
    args = parser.parse_args()
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.torch_threads)

    if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`: use the cluster as it is
        ray.init()
    else:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.generators),
                 object_store_memory=int(args.object_store_gb * 2**30),
                 include_dashboard=False,
                 _system_config={"preallocate_plasma_memory": args.preallocate_store})

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    nbytes = snapshot_from_model(model, 0).nbytes
    generators = [BenchGenerator.remote() for _ in range(args.generators)]
    replica = clone_state_dict(build_model())

    rows: dict[str, list[float]] = {k: [] for k in (
        "clone", "copy", "sync", "put", "get_load", "actor_get", "actor_load")}
    for rep in range(args.warmup + args.reps):
        clone_s = timed(lambda: clone_state_dict(model))
        copy_s = timed(lambda: copy_into(replica, model))
        sync = sync_round(model, generators, version=rep)
        if rep < args.warmup:
            continue
        rows["clone"].append(clone_s)
        rows["copy"].append(copy_s)
        for k in ("sync", "put", "get_load", "actor_get", "actor_load"):
            rows[k].append(sync[f"{k}_s"])

    figures = {k: summary(v) for k, v in rows.items()}
    ratio_clone = figures["sync"]["median"] / figures["clone"]["median"]
    ratio_copy = figures["sync"]["median"] / figures["copy"]["median"]
    labels = {
        "clone": "(a) clone state_dict to fresh memory",
        "copy": "(a) copy into preallocated replica",
        "sync": f"(b) publish + load in {args.generators} actors",
        "put": "    put only (snapshot + ray.put)",
        "get_load": "    get+load only (wall, after put)",
        "actor_get": "    ray.get inside actor (slowest)",
        "actor_load": "    load_snapshot inside actor (slowest)",
    }
    print(f"\nmodel: Llama {n_params / 1e6:.0f}M params fp32, {nbytes / 1e9:.3f} GB; "
          f"{args.reps} reps after {args.warmup} warm-up; torch threads "
          f"{torch.get_num_threads()}; {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'':42s} {'median s':>9s} {'min s':>8s} {'max s':>8s} {'GB/s':>7s}")
    for key, label in labels.items():
        f = figures[key]
        gbps = nbytes / 1e9 / f["median"] if f["median"] > 0 else float("inf")
        print(f"{label:42s} {f['median']:9.3f} {f['min']:8.3f} {f['max']:8.3f} {gbps:7.2f}")
    print(f"ratio (b)/(a clone) = {ratio_clone:.2f}   ratio (b)/(a copy) = {ratio_copy:.2f}   "
          f"target <= 2.0")

    if args.json:
        result = {
            "model": {"config": MODEL_CONFIG, "n_params": n_params, "bytes": nbytes},
            "reps": args.reps,
            "warmup": args.warmup,
            "torch_threads": args.torch_threads,
            "preallocate_store": args.preallocate_store,
            "load_average": os.getloadavg()[0],
            "generators": args.generators,
            "cpus": os.cpu_count(),
            "seconds": figures,
            "gb_per_s": {k: nbytes / 1e9 / f["median"] for k, f in figures.items()
                         if f["median"] > 0},
            "ratio_sync_over_clone": ratio_clone,
            "ratio_sync_over_copy": ratio_copy,
            "target_ratio": 2.0,
        }
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.json}")
    ray.shutdown()


if __name__ == "__main__":
    main()
