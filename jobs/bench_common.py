"""Shared helpers of the jobs/bench_*.py benchmarks: Ray start, interleaved timing, tables, JSON.

Every benchmark compares two (or more) sides doing the same work. On a small shared
machine the load drifts, so the sides run interleaved repetition by repetition
(A, B, A, B, ...) after untimed warm-up repetitions, and the figures are medians with
their spread ((max - min) / median).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


def parser(doc: str, reps: int, warmup: int = 1) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has: --json, --reps, --warmup."""
    p = argparse.ArgumentParser(description=doc.strip().split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--reps", type=int, default=reps, help=f"timed repetitions per side (default {reps})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed repetitions first (default {warmup})")
    return p


def add_niceness_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-default-niceness", action="store_true",
                   help="start the local Ray with Ray's default worker niceness (15) and leave this process "
                        "at its own: what a user of the defaults gets on a busy machine (see init_ray)")


def init_ray_from_args(args: argparse.Namespace, num_cpus: int | None = None, **kwargs: Any) -> dict[str, int]:
    if args.ray_default_niceness:
        return init_ray(num_cpus, worker_niceness=None, match=False, **kwargs)
    return init_ray(num_cpus, **kwargs)


def init_ray(num_cpus: int | None = None, worker_niceness: int | None = 0, match: bool = True,
             **kwargs: Any) -> dict[str, int]:
    """`ray.init()` under `ray job submit` (RAY_ADDRESS set), else a fresh local Ray on loopback only.

    Then the in-process sides are put at the same scheduling priority as Ray's workers.
    Ray starts workers at nice 15 by default, and on a machine shared with other work a
    nice-15 actor gets a small share of a core next to nice-0 processes, so the
    comparison would measure niceness, not Ray. A local Ray is started with workers at
    `worker_niceness` (0 by default; None keeps Ray's 15); under an existing cluster the
    driver lowers its own priority to its workers' instead (`match=False`: neither, to
    see what a user of Ray's defaults gets on a busy machine). Returns both nice values.
    """
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        from iterft_ray.ray_internals import FREE_OBJECTS_SOON, listen_on_loopback_only

        listen_on_loopback_only()
        # As the package's own local Ray (`iterft_ray.ray_start.init_ray`).
        kwargs["_system_config"] = {**FREE_OBJECTS_SOON, **kwargs.get("_system_config", {})}
        if worker_niceness is not None:
            kwargs["_system_config"]["worker_niceness"] = worker_niceness
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    workers = ray.get(niceness.remote())
    if match and os.nice(0) < workers:
        os.nice(workers - os.nice(0))
    return {"driver_nice": os.nice(0), "worker_nice": workers}


def interleave(sides: dict[str, Callable[[], dict | None]], reps: int, warmup: int,
               log: bool = True) -> dict[str, list[dict]]:
    """Run each side `warmup + reps` times, alternating sides within each repetition.

    A side returns a dict of figures (or None); its wall time is added as `s` and this
    process's CPU time (all its threads) as `cpu_s`, which other processes' load does
    not inflate the way it inflates wall time. The warm-up repetitions are dropped.
    Returns {side: [figures of each timed rep]}.
    """
    out: dict[str, list[dict]] = {name: [] for name in sides}
    for rep in range(warmup + reps):
        # Alternate which side goes first, so neither always runs after the same one.
        names = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for name in names:
            start, cpu = time.perf_counter(), time.process_time()
            figures = sides[name]() or {}
            figures = {"s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, **figures}
            if rep >= warmup:
                out[name].append(figures)
            if log:
                tag = "warm-up" if rep < warmup else f"rep {rep - warmup + 1}/{reps}"
                print(f"  {tag:12s} {name:28s} {figures['s']:8.3f} s  (cpu here {figures['cpu_s']:.3f} s, "
                      f"load {os.getloadavg()[0]:.1f})", flush=True)
    return out


def actor_info(handles: dict[str, Any]) -> dict[str, dict]:
    """pid, torch threads and nice value inside each actor (run in the actor with `__ray_call__`)."""
    import ray

    def info(_actor_self) -> dict:
        import os

        import torch

        return {"pid": os.getpid(), "torch_threads": torch.get_num_threads(), "nice": os.nice(0)}

    refs = {name: h.__ray_call__.remote(info) for name, h in handles.items()}
    return {name: ray.get(ref) for name, ref in refs.items()}


class CpuMeter:
    """CPU seconds (user + system, all threads) of named process groups between two readings.

    `groups` maps a name to pids; "driver" is this process and "rest of Ray" every other
    process under it (a local Ray's system processes and its other workers). A process
    that exits between the readings is left out of the difference.
    """

    def __init__(self, groups: dict[str, list[int]]):
        self.known = {pid: name for name, pids in {"driver": [os.getpid()], **groups}.items() for pid in pids}
        self.names = [*dict.fromkeys(self.known.values()), "rest of Ray"]

    def read(self) -> dict[int, float]:
        import psutil

        out = {}
        # Under `ray job submit` the actors are not under this process: read them by pid too.
        procs = {p.pid: p for p in [psutil.Process(), *psutil.Process().children(recursive=True)]}
        for pid in self.known:
            if pid not in procs and psutil.pid_exists(pid):
                procs[pid] = psutil.Process(pid)
        for pid, proc in procs.items():
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            out[pid] = t.user + t.system
        return out

    def delta(self, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
        out = {name: 0.0 for name in self.names}
        for pid, cpu in after.items():
            out[self.known.get(pid, "rest of Ray")] += cpu - before.get(pid, 0.0)
        return out


def summary(values: list[float]) -> dict[str, Any]:
    """Median, min, max and spread ((max - min) / median) of a list of numbers."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "n": len(values),
            "all": values}


def column(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows]


def ratios(a: list[dict], b: list[dict], key: str = "s") -> list[float]:
    """Per-repetition ratios a/b (the two were measured side by side)."""
    return [x[key] / y[key] for x, y in zip(a, b)]


def print_table(title: str, rows: list[tuple[str, list[float], str]]) -> dict[str, dict]:
    """Print `label | median | min | max | spread` for (label, values, unit) rows; return the summaries."""
    print(f"\n{title}")
    print(f"  {'':44s} {'median':>10s} {'min':>10s} {'max':>10s} {'spread':>7s}  unit")
    out = {}
    for label, values, unit in rows:
        s = summary(values)
        out[label] = {**s, "unit": unit}
        print(f"  {label:44s} {_num(s['median'])} {_num(s['min'])} {_num(s['max'])} "
              f"{s['spread']:6.0%}  {unit}")
    return out


def _num(x: float) -> str:
    return f"{x:10.4f}" if abs(x) < 10 else f"{x:10.1f}"


def verdict(name: str, ratio: float, target: float, at_most: bool = True,
            per_rep: list[float] | None = None) -> dict[str, Any]:
    """Print and return `name: ratio vs target -> PASS/MISS` (at_most: the ratio must be <= target)."""
    ok = ratio <= target if at_most else ratio >= target
    spread = f" (per-rep {min(per_rep):.3f}..{max(per_rep):.3f})" if per_rep else ""
    print(f"{name}: {ratio:.3f}{spread}  target {'<=' if at_most else '>='} {target}  "
          f"-> {'PASS' if ok else 'MISS'}")
    return {"ratio": ratio, "target": target, "at_most": at_most, "pass": ok, "per_rep": per_rep}


def environment(torch_threads: int | None = None) -> dict[str, Any]:
    """Machine and load facts to store with the figures."""
    import ray
    import torch
    import transformers

    env = {"cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__,
           "torch_threads": torch_threads if torch_threads is not None else torch.get_num_threads()}
    return env


def print_environment(env: dict[str, Any]) -> None:
    print(f"{env['cpus']} CPUs, load average {env['load_average_1m']:.1f}, torch {env['torch']} "
          f"({env['torch_threads']} threads here), transformers {env['transformers']}, ray {env['ray']}")


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=str)
        print(f"wrote {path}")
