"""`iterft run CONFIG | demo | plot RUN_DIR`: the command line (also `python -m iterft_ray`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

BUILTIN_CONFIGS = Path(__file__).parent / "configs"
# What the demo promises on a 2-core CPU machine; it exits non-zero when it falls short.
DEMO_MAX_START, DEMO_MIN_END, DEMO_MAX_MINUTES = 0.30, 0.80, 10.0


def resolve_config(name_or_path: str) -> Path:
    """A YAML path, or the name of a built-in config (`demo`, `tiny`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = BUILTIN_CONFIGS / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    names = sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml"))
    raise SystemExit(f"config: {name_or_path!r} is neither a file nor a built-in config {names}")


def config_data(name_or_path: str, overrides: list[str]) -> dict[str, Any]:
    """Read a config and apply `--set section.key=value` overrides (values parsed as YAML)."""
    with open(resolve_config(name_or_path), encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set: expected section.key=value, got {item!r}")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return data


def run(config: str, overrides: list[str], address: str | None = None, resume: bool = False) -> tuple[Any, list[dict]]:
    """Run every round of a config on Ray (a local one unless `address` or RAY_ADDRESS says otherwise).

    `resume` continues from the newest checkpoint in the config's output directory.
    """
    from .config import load_config
    from .driver import IterativeLoop
    from .ray_trainer import init_ray

    run_config = load_config(config_data(config, overrides))  # fail on a bad config before starting Ray
    init_ray(run_config.resources, address)
    loop = IterativeLoop(run_config, resume=resume)
    try:
        stats = loop.run()
    finally:
        loop.shutdown()
    print(f"run written to {loop.out}", flush=True)
    return loop, stats


def demo(overrides: list[str], address: str | None, resume: bool = False) -> int:
    """Expert iteration from a weak warm-started tiny model; checks the held-out accuracy it promises."""
    start = time.perf_counter()
    loop, stats = run("demo", overrides, address, resume)
    minutes = (time.perf_counter() - start) / 60
    before, after = loop.initial_heldout_accuracy, stats[-1].get("heldout_accuracy", float("nan"))
    print(f"held-out accuracy: {before:.1%} before round 1 -> {after:.1%} after round {stats[-1]['round']} "
          f"in {minutes:.1f} min")
    failures = []
    if before > DEMO_MAX_START:
        failures.append(f"start accuracy {before:.1%} is above {DEMO_MAX_START:.0%}")
    if not after >= DEMO_MIN_END:
        failures.append(f"final accuracy {after:.1%} is below {DEMO_MIN_END:.0%}")
    if minutes > DEMO_MAX_MINUTES:
        failures.append(f"took {minutes:.1f} min, over {DEMO_MAX_MINUTES:.0f}")
    for failure in failures:
        print(f"demo fell short: {failure}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iterft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a config (a YAML path or a built-in name)")
    p_run.add_argument("config")
    p_demo = sub.add_parser("demo", help="expert iteration on addition with a tiny model, checked")
    for p in (p_run, p_demo):
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. loop.rounds=2")
        p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    p_plot = sub.add_parser("plot", help="redraw RUN_DIR/plot.png from RUN_DIR/metrics.jsonl")
    p_plot.add_argument("run_dir")
    args = parser.parse_args(argv)
    sys.path.insert(0, "")  # as under `python -m`: modules in the working directory import (filters: ["mymod:check"])

    if args.command == "run":
        run(args.config, args.set, args.address, args.resume)
        return 0
    if args.command == "demo":
        return demo(args.set, args.address, args.resume)
    from .records import plot_metrics

    path, names = plot_metrics(args.run_dir)
    print(f"{path}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
