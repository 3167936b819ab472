"""Benchmark: how long a user waits, exec to exit, for the smallest things the CLI does.

    python jobs/bench_startup.py [--json out.json] [--reps 3]

Each repetition runs, as a user would type them, in fresh processes on the embedded Ray:

  config typo - `iterft run tiny --set lop.rounds=1`: the one-line error (exit 2); target < 2 s
  tiny run    - `iterft run tiny` into a new directory: Ray, the actors, warm-up, two rounds, the files;
                target < 25 s
  eval        - `iterft eval` of that run's newest checkpoint; target < 25 s

The tiny model is built once first (it is cached, as after a user's first run). Figures are medians over
the repetitions; nearly all of a tiny run is start-up (imports in each actor process, Ray's own
processes), not work.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"config typo": 2.0, "tiny run": 25.0, "eval": 25.0}


def timed(args: list[str], expect: int) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != expect:
        raise SystemExit(f"{' '.join(args)}: exit {done.returncode}, expected {expect}\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_common import environment, parser, print_environment, print_table, verdict, write_json

    from iterft_ray.config import load_config
    from iterft_ray.tiny import tiny_model_path

    args = parser(__doc__, reps=3, warmup=0).parse_args()
    print_environment(environment())
    tiny_model_path(load_config("tiny").model.name_or_path)  # cached, as after a user's first run
    iterft = str(Path(sys.executable).parent / "iterft")
    times: dict[str, list[float]] = {name: [] for name in TARGETS}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        for rep in range(args.reps):
            run = Path(tmp) / f"run-{rep}"
            times["config typo"].append(timed([iterft, "run", "tiny", "--set", "lop.rounds=1"], 2))
            times["tiny run"].append(timed([iterft, "run", "tiny", "--set", f"loop.output_dir={run}"], 0))
            times["eval"].append(timed([iterft, "eval", str(run)], 0))
            print(f"  rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
                  flush=True)
    table = print_table("exec to exit, embedded Ray", [(name, values, "s") for name, values in times.items()])
    verdicts = {name: verdict(f"{name} median seconds", statistics.median(values), TARGETS[name], per_rep=values)
                for name, values in times.items()}
    write_json(args.json, {"environment": environment(), "figures": table, "verdicts": verdicts})


if __name__ == "__main__":
    main()
