"""The expert-iteration family side by side: same task, same model, same budget of generated samples.

    python jobs/compare_algorithms.py                 # every method, seeds 0 and 1 (about 40 minutes here)
    python jobs/compare_algorithms.py --methods rft star --seeds 0 --budget 40000

Each method is a preset (`algorithm: rft | raft | rest_em | star`) or sequential best-of-n
(`sampling.until_accepted` / `max_samples`) on the demo's model, task and trainer (see TASK for why
not 3 digits). A run stops once it has generated
`--budget` samples (every sample counts, kept or not: hinted second passes and extra waves too),
and is evaluated on the same held-out prompts every `--eval-every` rounds and at the end.

RAFT runs twice: with a reward model this job first trains on the task's checker labels (a learned
verifier; its false-accept rate on held-out answers is reported) and with the exact checker as the
reward (RAFT's best-of-k selection on a 0/1 score). Writes, under --out:

    compare.png   held-out greedy accuracy against samples generated, one curve per method
                  (the mean over seeds, the band from the lowest to the highest seed)
    compare.md    the table for the README, with the versions it came from
    compare.json  every evaluation of every run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed
sys.path.insert(0, str(Path(__file__).resolve().parent))

from iterft_ray.config import BUILTIN_CONFIGS  # noqa: E402
from iterft_ray.ray_start import init_ray  # noqa: E402

# The demo's task. 3-digit addition was tried first: from the same warm-up (3000 examples) the demo's recipe climbed
# from 3% to 5% held-out accuracy in 170k samples, too slowly for any method to part from another in a budget
# this machine runs in 40 minutes. The demo's 2 digits rise from 3% to 90% within 200k samples instead: a
# budget that ends mid-rise shows which method climbs faster.
TASK = yaml.safe_load((BUILTIN_CONFIGS / "demo.yaml").read_text())["data"]["task_options"]
EXACT = {"name": "exact_answer"}


def methods(reward_model: str | None) -> dict[str, dict]:
    """Each method's config keys over the shared base (`base_config`)."""
    found = {
        "rft": {"algorithm": "rft", "filters": [EXACT, {"name": "best_of_k", "k": 4}]},
        "raft (exact checker)": {"algorithm": "rft", "filters": [EXACT, {"name": "best_of_k", "k": 1}]},
        "rest_em": {"algorithm": "rest_em", "filters": [EXACT, {"name": "best_of_k", "k": 4}]},
        "star": {"algorithm": "star", "filters": [EXACT, {"name": "best_of_k", "k": 4}]},
        "sequential best-of-n": {"algorithm": "rft", "filters": [EXACT],
                                 "sampling": {"num_samples": 4, "until_accepted": 4, "max_samples": 16}},
    }
    if reward_model is not None:
        found["raft (learned RM)"] = {"algorithm": "raft",
                                      "filters": [{"name": "reward_model", "model": reward_model},
                                                  {"name": "best_of_k", "k": 1}]}
    return found


def base_config(out: Path, seed: int, eval_every: int, budget: int) -> dict:
    """The demo's config, rounds ended by the budget instead, evaluated greedily by the exact checker (a reward
    model accepts every answer: it only scores), without rollbacks."""
    config = yaml.safe_load((BUILTIN_CONFIGS / "demo.yaml").read_text())
    rounds = budget // config["loop"]["prompts_per_round"] + 1  # more than any method runs: one sample per prompt
    config["loop"] = {**config["loop"], "rounds": rounds, "eval_every": eval_every, "save_every": 1000, "seed": seed,
                      "output_dir": str(out)}
    config["eval"] = {"num_samples": 0, "filters": [EXACT]}  # every method graded by the exact checker
    return config


def merged(base: dict, keys: dict) -> dict:
    config = copy.deepcopy(base)
    for key, value in keys.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    return config


def run_method(config: dict, budget: int) -> dict:
    """One run until `budget` samples are generated: its evaluations as (samples so far, greedy accuracy)."""
    from iterft_ray.run.loop import IterativeLoop

    start = time.perf_counter()
    loop = IterativeLoop(config, overwrite=True)
    generated, accepted, points = 0, 0, []
    try:
        while generated < budget:
            stats = loop.round()
            if not points:
                points.append((0, loop.initial_heldout_accuracy))
            generated += stats["samples"]
            accepted += stats["accepted"]
            if "eval_greedy" in stats:
                points.append((generated, stats["eval_greedy"]))
        if points[-1][0] != generated:
            points.append((generated, loop.evaluate()["eval_greedy"]))
    finally:
        loop.shutdown()
    return {"points": points, "generated": generated, "accepted": accepted, "rounds": loop.round_index,
            "minutes": (time.perf_counter() - start) / 60}


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "")


def plot(results: dict[str, list[dict]], path: Path, budget: int) -> None:
    """One curve per method: the mean over seeds of accuracy at each evaluation, the band min..max."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    grid = np.linspace(0, budget, 41)
    for name, runs in results.items():
        curves = np.array([np.interp(grid, *zip(*r["points"])) for r in runs]) * 100
        line, = ax.plot(grid, curves.mean(0), label=f"{name} ({len(runs)} seeds)")
        ax.fill_between(grid, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("samples generated")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_title("2-digit addition (the demo's task), the same budget of generated samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def table(results: dict[str, list[dict]], seeds: list[int], reward: dict | None) -> str:
    """The README's table: final accuracy (mean and per seed), samples, accepted, minutes."""
    rows = ["| method | held-out accuracy at the budget (mean) | per seed | samples generated | accepted | "
            "minutes per run |", "|---|---|---|---|---|---|"]
    for name, runs in sorted(results.items(), key=lambda kv: -sum(r["points"][-1][1] for r in kv[1])):
        finals = [r["points"][-1][1] * 100 for r in runs]
        rows.append(f"| {name} | {sum(finals) / len(finals):.1f}% | {' / '.join(f'{f:.1f}' for f in finals)} | "
                    f"{sum(r['generated'] for r in runs) // len(runs)} | {sum(r['accepted'] for r in runs) // len(runs)}"
                    f" | {sum(r['minutes'] for r in runs) / len(runs):.1f} |")
    lines = [*rows, "", f"Seeds {', '.join(map(str, seeds))}; "
             f"torch {version('torch')}, transformers {version('transformers')}, ray {version('ray')}, "
             f"Python {platform.python_version()}, {platform.machine()}."]
    if reward is not None:
        lines.append(f"The learned reward model accepts {reward['false_accept_rate']:.1%} of wrong answers and rejects "
                     f"{reward['false_reject_rate']:.1%} of right ones on held-out pairs (threshold "
                     f"{reward['threshold']:.2f}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare", help="where the runs and the figures go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--budget", type=int, default=180000, help="samples generated per run")
    p.add_argument("--eval-every", type=int, default=2, help="rounds between evaluations")
    p.add_argument("--methods", nargs="+", help="a subset of the methods (default: all)")
    p.add_argument("--reward-steps", type=int, default=3000, help="updates of the learned reward model")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    reward = None
    wanted = args.methods or list(methods("RM"))
    if "raft (learned RM)" in wanted or "raft" in wanted:
        from checker_reward_model import train_checker_reward_model

        print("training the reward model on the checker's labels", flush=True)
        # The demo model's shape and 3000 updates (about 80 s): 24% false accepts, 1% false rejects here, where the
        # default tiny shape at 1500 updates gave 28% / 3.5%.
        shape = yaml.safe_load((BUILTIN_CONFIGS / "demo.yaml").read_text())["model"]["tiny_overrides"]
        reward = train_checker_reward_model(TASK, str(out / "reward_model"), seed=0, steps=args.reward_steps, max_seconds=300,
                                            **shape)
        print(f"reward model: false accepts {reward['false_accept_rate']:.1%}, "
              f"false rejects {reward['false_reject_rate']:.1%}", flush=True)
    chosen = {name: keys for name, keys in methods(reward and reward["path"]).items()
              if args.methods is None or name in args.methods or name.split(" (")[0] in args.methods}
    configs = {(name, seed): merged(base_config(out / "runs" / f"{_slug(name)}-seed{seed}", seed, args.eval_every,
                                                 args.budget), keys)
               for name, keys in chosen.items() for seed in args.seeds}
    init_ray()  # one local Ray for every run
    results: dict[str, list[dict]] = {}
    for (name, seed), config in configs.items():
        print(f"== {name}, seed {seed}", flush=True)
        result = run_method(config, args.budget)
        print(f"== {name}, seed {seed}: {result['points'][-1][1]:.1%} after {result['generated']} samples "
              f"({result['rounds']} rounds, {result['minutes']:.1f} min)", flush=True)
        results.setdefault(name, []).append(result)
        (out / "compare.json").write_text(json.dumps({"budget": args.budget, "results": results,
                                                      "reward_model": reward}, indent=1))
    plot(results, out / "compare.png", args.budget)
    (out / "compare.md").write_text(table(results, args.seeds, reward))
    print((out / "compare.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
