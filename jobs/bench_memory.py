"""Benchmark: memory over a 20-round run (tiny config, sync mode) must stay flat.

    python jobs/bench_memory.py [--json out.json] [--reps 1] [--rounds 20]
    ray job submit --working-dir . -- python jobs/bench_memory.py --json out.json

Runs iterft_ray/configs/tiny.yaml (a random tiny Llama, 16 prompts x 2 samples a round,
held-out evaluation every round, a checkpoint every 2 rounds) for `--rounds` rounds
in sync mode, as `IterativeLoop.run()` does (warm-up first), with one change: the
filter accepts every sample (length_bounds), so every round trains and publishes a new
weight snapshot. With the config's own checker the random model gets nothing right, no
update happens, no new snapshot is made and there is nothing to free
(`--config-filters` runs it that way). After every round it reads:

  driver RSS               psutil, this process
  driver references        object references this process holds a count on
                           (CoreWorker.get_all_reference_counts)
  driver memory store      objects stored inline in this process (small objects, under
                           100 KiB, never reach the shared-memory store)
  object store             bytes and objects in the shared-memory (plasma) store, from the
                           raylet's FormatGlobalMemoryInfo reply (what `ray memory --stats-only`
                           prints). ray.available_resources()["object_store_memory"] is not
                           used: Ray 2.x does not lower it when objects are stored.
  actor RSS                psutil, the trainer, generator and filter processes

Old weight snapshots and rollouts must be freed, so from round 10 to the last round the
object store and the reference count must not grow, and the RSS figures may grow only
by allocator noise (limits in LIMITS). Growth is the median of the last 5 rounds minus
the median of rounds 6-10, so an object whose free is still in flight at one reading
does not count. One tiny-config weight snapshot is ~0.3 MiB, one object: a leaked
snapshot per round would add ~3 MiB and 10 objects by round 20. If something grows, the references still held are
listed (`ray memory` with creation call sites, RAY_record_ref_creation_sites=1).
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time

# Call sites of references in the final listing; read by the Ray processes this starts.
os.environ.setdefault("RAY_record_ref_creation_sites", "1")

import psutil  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray._private.internal_api import get_memory_info_reply, get_state_from_address  # noqa: E402

from bench_common import (actor_info, add_niceness_option, environment, init_ray_from_args, parser,  # noqa: E402
                          print_environment, write_json)
from iterft_ray.config import resolve_config  # noqa: E402
from iterft_ray.run.loop import IterativeLoop  # noqa: E402

MIB = 2**20
# Allowed growth from round 10 to the last round.
LIMITS = {"object_store_bytes": 1 * MIB, "object_store_objects": 1, "driver_refs": 0,
          "driver_memory_store_objects": 0, "driver_rss": 20 * MIB, "actor_rss": 20 * MIB}


def reading(state, procs: dict[str, psutil.Process]) -> dict[str, float]:
    core = ray._private.worker.global_worker.core_worker
    store = get_memory_info_reply(state).store_stats
    out = {
        "driver_rss": psutil.Process().memory_info().rss,
        "driver_refs": len(core.get_all_reference_counts()),
        "driver_memory_store_objects": core.get_memory_store_size(),
        "object_store_bytes": store.object_store_bytes_used,
        "object_store_objects": store.num_local_objects,
    }
    for name, proc in procs.items():
        out[f"rss {name}"] = proc.memory_info().rss
    return out


def run_once(cfg: dict, rounds: int, state, out_dir: str) -> tuple[list[dict], IterativeLoop]:
    loop = IterativeLoop({**cfg, "loop": {**cfg["loop"], "rounds": rounds, "async_mode": False,
                                          "output_dir": out_dir}})
    loop.warm_up()
    rl = loop.rl
    handles = {"trainer": rl.trainer.ranks[0], "generator": rl.generators[0], "filter": rl.filter_pool.actors[0]}
    procs = {name: psutil.Process(info["pid"]) for name, info in actor_info(handles).items()}
    readings = []
    for r in range(rounds):
        start = time.perf_counter()
        loop.round()
        gc.collect()
        readings.append({"round": r + 1, "round_s": time.perf_counter() - start, "version": loop.rl.version,
                         **reading(state, procs)})
    return readings, loop


def main() -> None:
    p = parser(__doc__, reps=1, warmup=0)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--config", default="tiny")
    p.add_argument("--config-filters", action="store_true", help="keep the config's filters (see above)")
    add_niceness_option(p)
    args = p.parse_args()
    if args.rounds < 10:
        p.error("--rounds must be at least 10 (growth is measured from round 10)")
    with open(resolve_config(args.config), encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    if not args.config_filters:
        cfg["filters"] = [{"name": "length_bounds"}]
    nice = init_ray_from_args(args, num_cpus=4)
    env = {**environment(), **nice}
    print_environment(env)
    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    print(f"config {args.config}: {args.rounds} rounds, sync mode; {args.reps} run(s)")

    runs = []
    loop = None
    for rep in range(args.reps):
        readings, loop = run_once(cfg, args.rounds, state, tempfile.mkdtemp(prefix="bench_memory_"))
        runs.append(readings)
        if rep < args.reps - 1:
            loop.shutdown()

    keys = [k for k in runs[0][0] if k not in ("round", "round_s", "version")]
    marks = sorted({1, 10, args.rounds})
    print(f"\nmedian over {args.reps} run(s); MiB for bytes")
    print(f"  {'':30s}" + "".join(f"{'round ' + str(m):>12s}" for m in marks) + f"{'growth':>12s}  verdict")
    growth, verdicts = {}, {}
    for key in keys:
        values = [statistics.median(run[m - 1][key] for run in runs) for m in marks]
        early = statistics.median(r[key] for run in runs for r in run[5:10])
        late = statistics.median(r[key] for run in runs for r in run[-5:])
        growth[key] = late - early
        limit = LIMITS.get(key, LIMITS["actor_rss"])
        verdicts[key] = growth[key] <= limit
        scale = MIB if ("rss" in key or "bytes" in key) else 1
        cells = "".join(f"{v / scale:12.1f}" for v in values)
        print(f"  {key:30s}{cells}{growth[key] / scale:+12.1f}  {'FLAT' if verdicts[key] else 'GROWS'}")
    per_round = statistics.median(r["round_s"] for run in runs for r in run)
    print(f"round time: median {per_round:.2f} s; weight version after round 1: {runs[0][0]['version']}, "
          f"after round {args.rounds}: {runs[0][-1]['version']} (one new snapshot per update)")
    flat = all(verdicts.values())
    print(f"memory flat from round 10 to round {args.rounds} (limits {LIMITS}): {'PASS' if flat else 'MISS'}")

    held = None
    if not flat or args.json:
        # What is still referenced at the end: every object with its holder and call site.
        from ray._private.internal_api import memory_summary

        held = memory_summary(ray.get_runtime_context().gcs_address, group_by="STACK_TRACE", sort_by="OBJECT_SIZE",
                              units="KB", line_wrap=False, num_entries=25)
        if not flat:
            lines = [line for line in held.splitlines() if line.strip()]
            print("\nreferences held after the last round (`ray memory`, first 60 lines; all in the JSON):")
            print("\n".join(lines[:60]))
    write_json(args.json, {"benchmark": "memory", "environment": env, "config": cfg, "rounds": args.rounds,
                           "reps": args.reps, "limits": LIMITS, "runs": runs, "growth_10_to_last": growth,
                           "verdicts": verdicts, "pass": flat, "round_s_median": per_round,
                           "references_at_end": held})
    loop.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
