"""Benchmark: a whole round on Ray (IterativeLoop) against the same round in one process, no Ray.

    python jobs/bench_round.py [--json out.json] [--reps 3] [--rounds-per-rep 2] [--accept-all]
    ray job submit --working-dir . -- python jobs/bench_round.py --json out.json

At the demo's size, read from iterft_ray/configs/demo.yaml (its tiny Llama, prompts per
round, samples per prompt, max_new_tokens, filters, trainer settings), starting from the
model warm-started as the demo does (its warm-up passes, done once and cached, so every
side starts from the same weights and accepts real rows). Sides, interleaved per
repetition, each repetition `--rounds-per-rep` consecutive rounds, after one untimed
warm-up round per side:

  inproc     sample_rollouts -> score_rollouts -> train_examples on the accepted rows'
             token ids with the prompt masked (what TrainerRank.step_rollouts does), in
             this process, sampling with the trainer's own model (no sync needed)
  ray_sync   IterativeLoop.round(): 1 generator, filter pool of 1, sync mode
  ray_async  IterativeLoop.round(): 2 generators, async mode, max_staleness 1

Both loops run as `iterft run` would, with three changes that keep the rounds comparable:
no held-out evaluation (eval_every is huge), no checkpoints (save_checkpoint is a no-op
here), and `loop.rounds` set to the end of each repetition, so async mode never starts
sampling a round that belongs to the next repetition while the other sides are timed
(so only rounds 2..k of a repetition overlap generation with training). They still
write generations.parquet, metrics.jsonl, TensorBoard and plot.png every round; that
shows up as "record" and "other". ray_sync and inproc sample the same tokens (same
seeds, same weights), so they accept the same rows: the same work.

Threads: each actor asks for 1 CPU and Ray gives it OMP_NUM_THREADS=1, so torch in the
trainer and the generator runs one thread; in sync mode the phases run one after the
other, so the busiest process uses one thread at a time. This process samples and
trains with torch.set_num_threads(1): the same compute with the same parallelism.

Target: ray_sync / inproc <= 1.15 per round (median of per-repetition ratios). The
split compares each phase with the in-process one; Ray overhead = Ray round time minus
the in-process generate + filter + train time of the same rounds. CPU seconds per
process (psutil, this process and every process under it) show where the work went
whatever the load: "CPU-time ratio" is the driver's and the side's actors' CPU over
the in-process CPU. "rest of Ray" is Ray's own processes, busy even when idle.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
import yaml
from transformers import AutoTokenizer

import iterft_ray.run.records as records
from bench_common import (CpuMeter, actor_info, add_niceness_option, environment, init_ray_from_args, interleave,
                          parser, print_environment, print_table, ratios, verdict, write_json)
from iterft_ray.train.batching import IGNORE_INDEX, examples_from_tensors
from iterft_ray.config import resolve_config
from iterft_ray.config import load_config
from iterft_ray.run.loop import IterativeLoop
from iterft_ray.verify.scoring import RolloutScorer
from iterft_ray.engines.hf_sampling import sample_rollouts
from iterft_ray.data.tasks import get_task
from iterft_ray.engines.seeding import shard_seed
from iterft_ray.tiny import resolve_model_path
from iterft_ray.train.models import load_model
from iterft_ray.train.trainer import IterativeSFTConfig, IterativeSFTTrainer

TARGET = 1.15


def warm_started_model(cfg: dict) -> str:
    """The config's model after its warm-up passes (model + tokenizer), built once into a cache directory."""
    key = {k: cfg[k] for k in ("model", "data", "trainer")}
    key.update(passes=cfg["loop"].get("warmup_passes", 0), seed=cfg["loop"].get("seed", 0))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get("ITERFT_CACHE", Path.home() / ".cache" / "iterft_ray"))
    out = root / f"bench-round-warm-{digest}"
    if not (out / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=out.name + ".tmp", dir=root)
        _warm_start(cfg, tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # built by another run meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _warm_start(cfg: dict, out: str) -> None:
    path = resolve_model_path(cfg["model"]["name_or_path"], **cfg["model"].get("tiny_overrides", {}))
    tokenizer = AutoTokenizer.from_pretrained(path)
    trainer = IterativeSFTTrainer(load_model(path), IterativeSFTConfig(
        output_dir=os.path.join(out, "warmup"), report_to="none", seed=cfg["loop"].get("seed", 0), **cfg["trainer"]),
        processing_class=tokenizer)
    task = get_task(cfg["data"]["task"], **cfg["data"].get("task_options", {}))
    prompts = [e["prompt"] for e in task.warmup_examples]
    completions = [e["completion"] + tokenizer.eos_token for e in task.warmup_examples]
    for _ in range(cfg["loop"].get("warmup_passes", 0)):
        trainer.step(texts=prompts, texts_labels=completions)
    trainer.save_model(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(os.path.join(out, "warmup"), ignore_errors=True)


class InProcessRounds:
    """The rounds with no Ray: sample, score, train, in this process."""

    def __init__(self, path: str, cfg, out: str):
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.trainer = IterativeSFTTrainer(load_model(path), IterativeSFTConfig(
            output_dir=os.path.join(out, "trainer"), report_to="none", seed=cfg.loop.seed, **cfg.trainer),
            processing_class=self.tokenizer)
        self.scorer = RolloutScorer(cfg.filters, cfg.loop.filter_timeout_s)  # its processes live as a FilterActor's do
        self.params = cfg.sampling
        self.round_index = 0

    def round(self, prompts: pa.Table) -> dict:
        r, t = self.round_index, [time.perf_counter()]
        model = self.trainer.model
        model.eval()
        # The seed IterativeLoop gives generator shard 0 of round r.
        table = sample_rollouts(model, self.tokenizer, prompts, self.params, shard_seed(self.cfg.loop.seed, r, 0),
                                self.trainer.state.global_step, 0, r)
        t.append(time.perf_counter())
        scored = self.scorer.score(table)
        t.append(time.perf_counter())
        stats = self.train(scored)
        t.append(time.perf_counter())
        self.round_index += 1
        return {"generate": t[1] - t[0], "filter": t[2] - t[1], "train": t[3] - t[2],
                "accepted": int(pc.sum(scored["accepted"]).as_py() or 0), "loss": stats["loss"]}

    def train(self, scored: pa.Table) -> dict:
        """TrainerRank.step_rollouts for one rank: accepted rows, prompt ids masked with -100."""
        table = scored.filter(scored["accepted"])
        table = table.filter(pc.greater(pc.list_value_length(table["completion_ids"]), 0))
        input_ids, labels = [], []
        for prompt, completion in zip(table["prompt_ids"].to_pylist(), table["completion_ids"].to_pylist()):
            input_ids.append(torch.tensor(prompt + completion))
            labels.append(torch.tensor([IGNORE_INDEX] * len(prompt) + completion))
        examples = examples_from_tensors(input_ids, None, labels, False, self.trainer.max_length,
                                         self.trainer.truncation_mode)
        return self.trainer.train_examples(examples)


TIMING = {"record": 0.0, "plot": 0.0}


def _timed(fn, key):
    def wrapper(*a, **kw):
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            TIMING[key] += time.perf_counter() - start
    return wrapper


# RunRecorder.record has plot.png redrawn on a thread through this module-level name: time it apart.
records.plot_metrics = _timed(records.plot_metrics, "plot")


def make_loop(cfg: dict, out: str) -> IterativeLoop:
    loop = IterativeLoop({**cfg, "loop": {**cfg["loop"], "output_dir": out}})
    loop.save_checkpoint = lambda: None  # no checkpoints in the timed rounds
    loop.heldout = None  # no held-out evaluation (else it runs after the last round of each repetition)
    loop.recorder.record = _timed(loop.recorder.record, "record")
    return loop


def loop_actors(name: str, loop: IterativeLoop) -> dict[str, list]:
    rl = loop.rl
    return {f"{name} trainer": rl.trainer.ranks, f"{name} generator": rl.generators,
            f"{name} filter": rl.filter_pool.actors}


def ray_block(loop: IterativeLoop, k: int) -> dict:
    """k rounds of a loop; `loop.rounds` ends with them so async mode prefetches nothing beyond."""
    loop.config.loop.rounds = loop.round_index + k
    TIMING.update(record=0.0, plot=0.0)
    parts = {"generate": 0.0, "filter": 0.0, "train": 0.0, "sync": 0.0, "accepted": [], "loss": []}
    for _ in range(k):
        s = loop.round()
        for key in ("generate", "filter", "train", "sync"):
            parts[key] += s[f"{key}_time"]
        parts["accepted"].append(s["accepted"])
        parts["loss"].append(s["loss"])
    loop.recorder.flush()  # the last round's plot.png, drawn in the background, is this side's work too
    return {**parts, **TIMING}


def main() -> None:
    p = parser(__doc__, reps=3, warmup=1)
    p.add_argument("--rounds-per-rep", type=int, default=2)
    p.add_argument("--config", default="demo", help="built-in config name or YAML path (default demo)")
    p.add_argument("--no-async", action="store_true", help="skip the async, 2-generator side")
    p.add_argument("--accept-all", action="store_true",
                   help="filter with length_bounds (accepts every sample) instead of the config's filters: "
                        "a late round of the demo, where most samples pass and training is the biggest phase")
    add_niceness_option(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    k = args.rounds_per_rep

    with open(resolve_config(args.config), encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    cfg["loop"].update(eval_every=10**9, save_every=10**9, async_mode=False, max_staleness=1)
    cfg["resources"].update(num_generators=1, filter_pool_size=1)
    if args.accept_all:
        cfg["filters"] = [{"name": "length_bounds"}]
    tmp = tempfile.mkdtemp(prefix="bench_round_")
    start = time.perf_counter()
    cfg["model"] = {"name_or_path": warm_started_model(cfg), "tiny_overrides": {}}
    # Warm-started already: a loop's first round() would otherwise run the warm-up passes again on the Ray sides.
    cfg["loop"]["warmup_passes"] = 0
    print(f"warm-started model (cached): {cfg['model']['name_or_path']} ({time.perf_counter() - start:.1f} s)")
    async_cfg = copy.deepcopy(cfg)
    async_cfg["loop"]["async_mode"] = True
    async_cfg["resources"]["num_generators"] = 2

    nice = init_ray_from_args(args, num_cpus=8)  # room for both loops' actors (2.5 + 3.5 CPUs)
    env = {**environment(), **nice}
    print_environment(env)
    start = time.perf_counter()
    sync_loop = make_loop(cfg, os.path.join(tmp, "ray_sync"))
    loops = {"ray_sync": sync_loop}
    if not args.no_async:
        loops["ray_async"] = make_loop(async_cfg, os.path.join(tmp, "ray_async"))
    print(f"started {len(loops)} loops in {time.perf_counter() - start:.1f} s")
    groups, actors = {}, {}
    for name, lp in loops.items():
        for group, handles in loop_actors(name, lp).items():
            for i, h in enumerate(handles):
                actors[f"{group} {i}"] = h
    infos = actor_info(actors)
    for label, info in infos.items():
        groups.setdefault(label.rsplit(" ", 1)[0], []).append(info["pid"])
        print(f"  {label:28s} pid {info['pid']:7d}  torch threads {info['torch_threads']}  nice {info['nice']}")
    meter = CpuMeter(groups)
    inproc = InProcessRounds(cfg["model"]["name_or_path"], load_config(cfg), os.path.join(tmp, "inproc"))
    c = sync_loop.config
    # The in-process side's own cursor over the same prompts: its round i gets the Ray sync side's round i's.
    inproc_prompts = copy.deepcopy(sync_loop.prompts)
    next_prompts = lambda: inproc_prompts.next_rows(c.loop.prompts_per_round)  # noqa: E731
    print(f"config {args.config}: {c.loop.prompts_per_round} prompts x {c.sampling.num_samples} samples, "
          f"max_new_tokens {c.sampling.max_new_tokens}, sampling batch {c.sampling.batch_size}, filters {c.filters}, "
          f"trainer {c.trainer}; {k} rounds per rep, {args.reps} reps after {args.warmup} warm-up round(s); "
          f"torch threads here {torch.get_num_threads()}")

    def inproc_block():
        parts = {"generate": 0.0, "filter": 0.0, "train": 0.0, "accepted": [], "loss": []}
        for _ in range(k):
            s = inproc.round(next_prompts())
            for key in ("generate", "filter", "train"):
                parts[key] += s[key]
            parts["accepted"].append(s["accepted"])
            parts["loss"].append(s["loss"])
        return parts

    def metered(fn):
        def wrapper():
            before = meter.read()
            parts = fn()
            return {**parts, "cpu": meter.delta(before, meter.read())}
        return wrapper

    sides = {"inproc": metered(inproc_block)}
    sides.update({name: metered(lambda lp=lp: ray_block(lp, k)) for name, lp in loops.items()})
    # Warm-up: untimed single rounds of every side (first calls: weight loads, imports, plot.png setup).
    for _ in range(args.warmup):
        inproc.round(next_prompts())
        for lp in loops.values():
            lp.config.loop.rounds = lp.round_index + 1
            lp.round()
    res = interleave(sides, args.reps, 0)
    for rows in res.values():
        for row in rows:
            row["round_s"] = row["s"] / k
            base = ("generate", "filter", "train", "sync", "record")
            row["other"] = row["s"] - sum(row.get(key, 0.0) for key in base)

    per_round = lambda name, key: [r[key] / k for r in res[name]]  # noqa: E731

    def cpu_ratio(name: str) -> list[float]:
        """CPU seconds of the driver and the side's own actors over this process's CPU seconds in-process."""
        own = [g for g in meter.names if g == "driver" or g.startswith(name + " ")]
        return [sum(r["cpu"][g] for g in own) / b["cpu"]["driver"] for r, b in zip(res[name], res["inproc"])]

    inproc_parts = [r["generate"] + r["filter"] + r["train"] for r in res["inproc"]]
    rows = [("inproc: round", per_round("inproc", "s"), "s"),
            ("  generate", per_round("inproc", "generate"), "s"),
            ("  filter", per_round("inproc", "filter"), "s"),
            ("  train", per_round("inproc", "train"), "s")]
    for name in loops:
        rows += [(f"{name}: round", per_round(name, "s"), "s"),
                 ("  generate (until all rollouts are in)", per_round(name, "generate"), "s"),
                 ("  filter", per_round(name, "filter"), "s"),
                 ("  train", per_round(name, "train"), "s"),
                 (f"  sync ({'publish' if name == 'ray_async' else 'publish + load'})", per_round(name, "sync"), "s"),
                 ("  record: metrics.jsonl + TensorBoard", per_round(name, "record"), "s"),
                 ("  (plot.png redraw, on a background thread)", per_round(name, "plot"), "s"),
                 ("  other (parquet wait, last plot.png, bookkeeping)", per_round(name, "other"), "s"),
                 ("  Ray overhead = round - inproc parts", [(r["s"] - b) / k for r, b in zip(res[name], inproc_parts)],
                  "s")]
    sync_ratio = ratios(res["ray_sync"], res["inproc"])
    rows += [("ratio ray_sync / inproc (per rep)", sync_ratio, "x"),
             ("CPU-time ratio ray_sync / inproc", cpu_ratio("ray_sync"), "x")]
    if "ray_async" in loops:
        async_ratio = ratios(res["ray_async"], res["inproc"])
        rows += [("ratio ray_async (2 generators) / inproc", async_ratio, "x"),
                 ("CPU-time ratio ray_async / inproc", cpu_ratio("ray_async"), "x")]
    rows += [("accepted rows per round: inproc", [a for r in res["inproc"] for a in r["accepted"]], "rows"),
             ("accepted rows per round: ray_sync", [a for r in res["ray_sync"] for a in r["accepted"]], "rows")]
    table = print_table(f"seconds per round ({k} rounds per repetition)", rows)
    cpu_rows = []
    for name in res:
        for group in meter.names:
            values = [r["cpu"][group] / k for r in res[name]]
            if max(values) >= 0.005:
                cpu_rows.append((f"{name}: {group}", values, "cpu s"))
    table["cpu"] = print_table("CPU seconds per round by process, while each side ran (user + system)", cpu_rows)
    same = [r["accepted"] for r in res["inproc"]] == [r["accepted"] for r in res["ray_sync"]]
    print(f"inproc and ray_sync accepted the same rows every round (same samples, same work): {same}")
    result = verdict("ray_sync round / inproc round", statistics.median(sync_ratio), TARGET, per_rep=sync_ratio)
    async_result = None
    if "ray_async" in loops:
        async_result = verdict("ray_async (2 generators) round / inproc round", statistics.median(async_ratio), TARGET,
                               per_rep=async_ratio)
    write_json(args.json, {
        "benchmark": "round", "environment": env, "config": cfg, "rounds_per_rep": k, "reps": args.reps,
        "warmup": args.warmup, "accept_all": args.accept_all, "actors": infos, "same_accepted": same,
        "table": table, "raw": res, "target": result, "async": async_result,
    })
    for lp in loops.values():
        lp.shutdown()


if __name__ == "__main__":
    main()
