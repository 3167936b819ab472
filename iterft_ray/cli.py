"""`iterft run CONFIG | check CONFIG | config show CONFIG | demo | eval RUN_DIR | plot RUN_DIR`: the command line
(also `python -m iterft_ray`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

import yaml

# What each demo promises on a 2-core CPU machine (its built-in config, held-out accuracy at most this before
# round 1, at least this for the final model, within these minutes); it exits non-zero when it falls short.
DEMOS = {
    "addition": ("demo", 0.30, 0.90, 10.0),  # expert iteration on addition
    "tools": ("demo_tools", 0.30, 0.80, 15.0),  # a multi-turn environment: the calculator, called to multiply
}


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2, nothing started or written."""


class RunFailed(Exception):
    """A run stopped for a reason the user must see (a broken filter, an actor that keeps dying, a round past
    its timeout, actors the cluster cannot hold): one line, exit status 1."""


class CtrlC:
    """Ctrl-C that is not lost, while installed (`with CtrlC() as ctrl_c`). Python raises KeyboardInterrupt
    wherever the main thread is; where that is code Python cannot pass an exception on from (a destructor, a
    callback from Ray's C++ core: "Exception ignored in ..."), it is dropped and a run would go on. Remembered
    here (`pressed`), it stops the loop before its next round instead."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():  # only there can a handler be set
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def config_data(name_or_path: str, overrides: list[str]) -> dict[str, Any]:
    """Read a config and apply `--set section.key=value` overrides (values parsed as YAML).

    Input paths in a config file are relative to the file (those given with --set, to the
    working directory); built-in configs hold none.
    """
    from iterft_ray.config import resolve_config, resolve_input_paths

    path = resolve_config(name_or_path)
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config: {path} is not valid YAML ({e})".replace("\n", " ")) from None
    data = resolve_input_paths(data, path.parent)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set: expected section.key=value, got {item!r}")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def run(config: str, overrides: list[str], address: str | None = None, resume: bool = False,
        overwrite: bool = False) -> tuple[Any, list[dict]] | None:
    """Run every round of a config on Ray (a local one unless `address` or RAY_ADDRESS says otherwise).

    `resume` continues the run in the config's output directory from its newest checkpoint;
    `overwrite` deletes the run there first. Returns None when a resumed run is already
    complete. Bad input raises UserError before Ray starts; a local Ray started here is
    stopped on the way out, however the run ends.
    """
    from iterft_ray.config import load_config

    try:
        # Before torch, transformers and Ray are imported (seconds): a mistake in the config's own keys, types
        # and bounds is answered at once; the checks that need transformers (trainer.*) follow within.
        run_config = load_config(config_data(config, overrides))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from e

    import ray

    from iterft_ray.run.loop import FilterErrorsError, IterativeLoop
    from iterft_ray.run.run_dir import check_start
    from iterft_ray.actors.failures import ActorFailedError, RoundTimeoutError
    from iterft_ray.actors.placement import PlacementError
    from iterft_ray.data.prompts import PromptDataError
    from iterft_ray.ray_start import RayAddressError, init_ray

    try:
        start = check_start(run_config, resume, overwrite)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from e
    if start.complete:
        print(f"run {start.out} is complete: {start.rounds_done} of {run_config.loop.rounds} rounds done "
              f"(checkpoint {start.checkpoint}); raise loop.rounds to train on", flush=True)
        return None
    started_ray = not ray.is_initialized()
    if started_ray and address is None and not os.environ.get("RAY_ADDRESS"):
        check_fits_here(run_config)
    print(f"{'resuming' if start.checkpoint else 'starting'} run {start.run_id[:8]} in {start.out}", flush=True)
    if start.dropped_from_training:
        print(f"data.reasoning_gym: {start.dropped_from_training} questions are in the evaluation split too; "
              f"training leaves them out ({start.prompts.num_rows} left)", flush=True)
    try:
        init_ray(address)
    except RayAddressError as e:
        raise UserError(str(e)) from e
    stopped = (FilterErrorsError, ActorFailedError, PlacementError, RoundTimeoutError, PromptDataError)
    try:
        with CtrlC() as ctrl_c:
            loop = IterativeLoop(run_config, start=start)
            try:
                stats = loop.run(stop=lambda: ctrl_c.pressed)
            finally:
                loop.shutdown()
    except stopped as e:
        raise RunFailed(str(e)) from e
    finally:
        if started_ray:
            ray.shutdown()
    print(f"run written to {loop.out}", flush=True)
    return loop, stats


def check_fits_here(config: Any) -> None:
    """Refuse, before a local Ray starts, a run this machine could never hold (`placement.check_machine_fits`)."""
    from iterft_ray.actors.placement import PlacementError, check_machine_fits, run_requests

    try:
        check_machine_fits(run_requests(config.model, config.sampling, config.resources, config.filters,
                                        config.env is not None))
    except PlacementError as e:
        raise UserError(str(e)) from e


def check(config: str, overrides: list[str], address: str | None) -> None:
    """`iterft check`: everything `iterft run` checks before it starts anything (keys, types, bounds, trainer
    arguments, filters, prompts, model, output directory; on the local machine, whether the actors fit), with
    nothing written or started."""
    from iterft_ray.config import load_config
    from iterft_ray.run.run_dir import check_start

    try:
        run_config = load_config(config_data(config, overrides))
        start = check_start(run_config)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from e
    local = address is None and not os.environ.get("RAY_ADDRESS")
    if local:
        check_fits_here(run_config)
    where = "fits this machine" if local else "fit on the cluster not checked (it is checked when the run starts)"
    print(f"{config}: ok; {start.rounds} rounds into {start.out}{' (its run files will be replaced)' * bool(start.unfinished)}; "
          f"{where}")


def show_config(config: str, overrides: list[str]) -> None:
    """`iterft config show`: the config as a run would use it, every default and the preset's keys filled in."""
    from iterft_ray.config import load_config

    try:
        run_config = load_config(config_data(config, overrides))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from e
    print(yaml.safe_dump(run_config.to_dict(), sort_keys=False), end="")


def evaluate(run_dir: str, checkpoint: str | None, output: str | None, overrides: list[str],
             address: str | None) -> dict[str, Any]:
    """`iterft eval`: evaluate a run's checkpoint (its newest by default), or a config's base model, without
    training; prints the metrics as one JSON line, last."""
    import json

    import ray

    from pathlib import Path

    from iterft_ray.config import builtin_configs
    from iterft_ray.ray_start import init_ray
    from iterft_ray.run.eval_command import eval_target, evaluate as run_evaluation, is_run_dir

    try:
        if Path(run_dir).suffix not in (".yaml", ".yml") and "://" not in run_dir and not Path(run_dir).exists() \
                and run_dir not in builtin_configs():
            raise ValueError(f"RUN_DIR: {run_dir} does not exist; expected a run's loop.output_dir, or a config "
                             f"(a YAML file or a built-in: {', '.join(builtin_configs())}) to evaluate its base model")
        if is_run_dir(run_dir):
            if overrides:
                raise ValueError("--set: a run is evaluated with its own config; --set applies to a config only")
            target = eval_target(run_dir, checkpoint, output)
        else:
            target = eval_target(run_dir, checkpoint, output, config_data(run_dir, overrides))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from e
    print(f"evaluating {target.checkpoint or 'the base model'} on {target.rows}", flush=True)
    started_ray = not ray.is_initialized()
    init_ray(address)
    try:
        result = run_evaluation(target)
    finally:
        if started_ray:
            ray.shutdown()
    print(json.dumps(result), flush=True)
    return result


def demo(name: str, overrides: list[str], address: str | None, resume: bool = False, overwrite: bool = False) -> int:
    """Expert iteration from a weak warm-started tiny model; checks the held-out accuracy it promises (`DEMOS`).

    The demo is a showcase that reruns the same way every time, so unless `resume` is
    given it starts afresh in its run directory (runs/demo), replacing the last demo there.
    """
    if name not in DEMOS:
        raise UserError(f"demo: expected one of {sorted(DEMOS)}, got {name!r}")
    config, max_start, min_end, max_minutes = DEMOS[name]
    start = time.perf_counter()
    result = run(config, overrides, address, resume, overwrite or not resume)
    if result is None:
        return 0
    loop, stats = result
    minutes = (time.perf_counter() - start) / 60
    # The final model's accuracy: after a rollback in the last round, the restored best checkpoint's.
    final = loop.final_evaluation or {}
    before, after = loop.initial_heldout_accuracy, final.get("eval_greedy", float("nan"))
    rolled = f"; rolled back to round {loop.best['round']}" if stats[-1].get("rolled_back_to") is not None else ""
    print(f"held-out accuracy: {before:.1%} before round 1 -> {after:.1%} for the final model (after round "
          f"{stats[-1]['round']}{rolled}) in {minutes:.1f} min")
    failures = []
    if before > max_start:
        failures.append(f"start accuracy {before:.1%} is above {max_start:.0%}")
    if not after >= min_end:
        failures.append(f"final accuracy {after:.1%} is below {min_end:.0%}")
    if minutes > max_minutes:
        failures.append(f"took {minutes:.1f} min, over {max_minutes:.0f}")
    for failure in failures:
        print(f"demo fell short: {failure}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """The `iterft` command; returns its exit status: 0 done, 1 the run failed, 2 bad input (one line on stderr),
    130 interrupted (Ctrl-C: one line, the run's checkpoints kept for --resume)."""
    from iterft_ray.config import RunConfig, builtin_configs

    configs = (f"CONFIG is a YAML file or a built-in config: {', '.join(builtin_configs())}.\n"
               f"Its sections: {', '.join(RunConfig.__dataclass_fields__)}.\n"
               "--set section.key=value overrides one value (README.md, Configs, lists every key).")
    parser = argparse.ArgumentParser(prog="iterft", description=__doc__, epilog=configs,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a config (a YAML path or a built-in name: see below)", epilog=configs,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p_run.add_argument("config")
    p_demo = sub.add_parser("demo", help="expert iteration with a tiny model, checked: addition (default), or tools "
                                         "(a calculator environment, multi-turn)")
    p_demo.add_argument("name", nargs="?", default="addition", choices=sorted(DEMOS))
    p_eval = sub.add_parser("eval", help="evaluate a run's checkpoint (or a config's base model) without training")
    p_eval.add_argument("run_dir", metavar="RUN_DIR", help="a run's loop.output_dir, or a config for its base model")
    p_eval.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the run's newest)")
    p_eval.add_argument("--output", default=None, help="where the rows and metrics go (default: RUN_DIR/eval)")
    p_plot = sub.add_parser("plot", help="redraw RUN_DIR/plot.png from RUN_DIR/metrics.jsonl (a path or a URI)")
    p_plot.add_argument("run_dir")
    p_check = sub.add_parser("check", help="check a config as `run` would before it starts anything, and stop: "
                                           "exit 0 (fine) or 2 (one line saying what is wrong)", epilog=configs,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p_check.add_argument("config")
    p_config = sub.add_parser("config", help="`config show CONFIG`: print the config with every default filled in")
    p_config.add_argument("action", choices=["show"])
    p_config.add_argument("config")
    p_config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. loop.rounds=2")
    for p in (p_run, p_demo, p_eval, p_check):
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. loop.rounds=2")
        p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    for p in (p_run, p_demo):
        how = p.add_mutually_exclusive_group()
        how.add_argument("--resume", action="store_true",
                         help="continue the run in loop.output_dir from its newest checkpoint")
        how.add_argument("--overwrite", action="store_true", help="delete the run in loop.output_dir and start afresh")
    for p in (p_run, p_demo, p_eval, p_plot, p_check, p_config):
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    sys.path.insert(0, "")  # as under `python -m`: modules in the working directory import (filters: ["mymod:check"])

    try:
        return _command(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("\ninterrupted; resume with --resume", file=sys.stderr)
        return 130
    except (UserError, RunFailed) as e:
        if args.debug:
            raise
        print(f"iterft: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iterft_ray")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown (not installed)"


def _command(args: argparse.Namespace) -> int:
    if args.command == "run":
        run(args.config, args.set, args.address, args.resume, args.overwrite)
        return 0
    if args.command == "demo":
        return demo(args.name, args.set, args.address, args.resume, args.overwrite)
    if args.command == "eval":
        evaluate(args.run_dir, args.checkpoint, args.output, args.set, args.address)
        return 0
    if args.command == "check":
        check(args.config, args.set, args.address)
        return 0
    if args.command == "config":
        show_config(args.config, args.set)
        return 0
    from iterft_ray.run.records import plot_metrics

    try:
        path, names = plot_metrics(args.run_dir)
    except (FileNotFoundError, ValueError) as e:  # no run there, or a URI pyarrow.fs cannot open
        raise UserError(str(e)) from e
    print(f"{path}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
