"""Benchmark: a weight version's sync (publish + load into 2 generators) against one copy of the weights.

    python jobs/bench_weight_sync.py [--json out.json] [--reps 7] [--generators 2]
    ray job submit --working-dir . -- python jobs/bench_weight_sync.py --json out.json

Builds a Llama-style model (no download, fp32, ~134M parameters, 0.54 GB, lm_head
untied so every parameter is stored), saves it once to a temporary directory, and
starts real `GeneratorActor`s (hf engine) from it. Then, in this process, interleaved
repetition by repetition after untimed warm-up repetitions:

  floor - one copy of the weights into already allocated memory: every state_dict
          tensor `copy_`-ed into a replica model whose pages are already faulted in.
  sync  - what the loop does for a new version with one trainer rank: `publish_weights`
          (the trainer's `publish`) and every generator's `sync` of that version, from
          the start of the publish until the last generator has loaded it. Between
          repetitions the model changes (one parameter moves), so every repetition is
          a new version and every generator really loads it.

It prints both, the publish (put) and the loads after it separately, and the ratio
`ratio vs preallocated copy: X` = median sync / median floor (target <= 1.5), with the
per-repetition ratios' range. Two checks keep it honest: after the last repetition a
generator's weights are checksummed against the model's, and each repetition times one
read of every weight inside a generator right after the load and once more after that:
a load that defers its cost (page faults on first touch) shows as a first read slower
than the second.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from iterft_ray.actors.generator import GeneratorActor
from iterft_ray.config import ModelConfig, SamplingConfig
from iterft_ray.tiny import build_tiny_model
from iterft_ray.train.models import load_model
from iterft_ray.weights.snapshot import publish_weights, snapshot_from_model, weights_checksum

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import (  # noqa: E402
    column, environment, init_ray, interleave, parser, print_environment, print_table, verdict, write_json,
)

# ~134M parameters, 0.54 GB in fp32; lm_head untied so every parameter is stored.
MODEL_CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
TARGET = 1.5


def copy_into(dst: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, t in model.state_dict().items():
            dst[name].copy_(t)


def read_weights(actor) -> float:
    """Seconds for one read of every weight of the generator's model (run inside the actor)."""
    start = time.perf_counter()
    with torch.no_grad():
        for p in actor.engine.model.state_dict().values():
            p.sum()
    return time.perf_counter() - start


def main() -> None:
    p = parser(__doc__, reps=7, warmup=2)
    p.add_argument("--generators", type=int, default=2)
    p.add_argument("--object-store-gb", type=float, default=3.0,
                   help="object store size of a local Ray (default 3: a few versions in flight)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads here (default 1, as each generator actor has one CPU)")
    args = p.parse_args()
    if args.reps < 1 or args.warmup < 0 or args.generators < 1:
        p.error("--reps and --generators must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.torch_threads)
    nice = init_ray(num_cpus=max(os.cpu_count() or 1, args.generators),
                    object_store_memory=int(args.object_store_gb * 2**30))

    with tempfile.TemporaryDirectory(prefix="bench_weight_sync_") as tmp:
        path = str(build_tiny_model("tiny-llama", tmp, **MODEL_CONFIG))
        model = load_model(path).eval()
        generators = [GeneratorActor.options(num_cpus=1).remote(ModelConfig(path), i, SamplingConfig(engine="hf"))
                      for i in range(args.generators)]
        ray.get([g.__ray_ready__.remote() for g in generators])
    n_params = sum(t.numel() for t in model.state_dict().values())
    nbytes = snapshot_from_model(model, 0).nbytes
    replica = {name: t.clone() for name, t in model.state_dict().items()}
    probe = next(iter(model.parameters()))
    version = 0

    def floor() -> None:
        copy_into(replica, model)

    def sync() -> dict:
        nonlocal version
        with torch.no_grad():  # "training": the next version differs from this one
            probe.add_(1e-3)
        version += 1
        start = time.perf_counter()
        ref = publish_weights(model, version)
        put = time.perf_counter()
        held = ray.get([g.sync.remote([ref], version) for g in generators])
        done = time.perf_counter()
        assert held == [version] * len(generators), held
        reads = [ray.get(g.__ray_call__.remote(read_weights)) for g in generators]
        again = [ray.get(g.__ray_call__.remote(read_weights)) for g in generators]
        return {"sync_s": done - start, "put_s": put - start, "loads_s": done - put,
                "first_read_s": max(reads), "second_read_s": max(again)}

    print(f"model: Llama {n_params / 1e6:.0f}M params fp32, {nbytes / 1e9:.3f} GB; {args.generators} generators "
          f"(hf engine); {args.reps} reps after {args.warmup} warm-up; torch threads here {torch.get_num_threads()}")
    print_environment(environment())
    rows = interleave({"floor": floor, "sync": sync}, args.reps, args.warmup)

    # The measured path loaded exactly the model's last version into every generator.
    loaded = ray.get(generators[0].info.remote())["checksum"]
    assert loaded == weights_checksum(model), "a generator's weights differ from the published version"
    print("checked: generator 0 holds exactly the last published weights")

    floor_s, sync_s = column(rows["floor"], "s"), column(rows["sync"], "sync_s")
    table = print_table(f"{nbytes / 1e9:.3f} GB per version, seconds", [
        ("floor: copy into preallocated memory", floor_s, "s"),
        ("sync: publish + load into the generators", sync_s, "s"),
        ("  publish (snapshot + ray.put)", column(rows["sync"], "put_s"), "s"),
        ("  generators' sync, after the publish", column(rows["sync"], "loads_s"), "s"),
        ("check: first read of the weights after a load", column(rows["sync"], "first_read_s"), "s"),
        ("check: second read", column(rows["sync"], "second_read_s"), "s"),
        ("floor GB/s", [nbytes / 1e9 / s for s in floor_s], "GB/s"),
        ("sync GB/s", [nbytes / 1e9 / s for s in sync_s], "GB/s"),
    ])
    per_rep = [s / f for s, f in zip(sync_s, floor_s)]
    ratio = statistics.median(sync_s) / statistics.median(floor_s)
    print(f"\nratio vs preallocated copy: {ratio:.2f}")
    result = verdict("sync / floor", ratio, TARGET, per_rep=per_rep)
    write_json(args.json, {"model": {"config": MODEL_CONFIG, "n_params": n_params, "bytes": nbytes},
                           "generators": args.generators, "reps": args.reps, "warmup": args.warmup,
                           "environment": environment(), "niceness": nice, "seconds": table,
                           "ratio_vs_preallocated_copy": result})
    ray.shutdown()


if __name__ == "__main__":
    main()
