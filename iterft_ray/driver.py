"""IterativeLoop: the driver. One round = generate -> filter -> step -> sync -> record.

The driver decides everything and holds only references and small statistics; rollout
rows move from generators to filters to the trainer (and to disk) through the object
store. In async mode the generation of the next rounds runs on the weights at hand
while the trainer trains, at most `loop.max_staleness` rounds behind.
"""

from __future__ import annotations

import random
import time
from collections import deque
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from tqdm.auto import tqdm

from .checkpoint import is_checkpoint
from .config import RunConfig, load_config, save_config
from .prompts import load_prompts
from .ray_trainer import RayIterativeSFTTrainer, ScoredRollouts
from .records import RunRecorder, write_generations


class IterativeLoop:
    """Runs the rounds of one config; `.round()` for notebooks, `.run()` for all of them."""

    def __init__(self, config: RunConfig | str | Path | dict, resume: bool = False):
        """`resume=True` continues from the newest checkpoint in `loop.output_dir`, if there is one."""
        self.config = config if isinstance(config, RunConfig) else load_config(config)
        c = self.config
        self.prompts, self.heldout, self.task = load_prompts(c.data)
        self.out = Path(c.loop.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint = latest_checkpoint(self.out) if resume else None
        save_config(c, self.out / "config.yaml")
        self.rl = RayIterativeSFTTrainer(
            c.model.name_or_path,
            {"output_dir": str(self.out / "trainer"), "report_to": "none", "seed": c.loop.seed, **c.trainer},
            tokenizer=c.model.tokenizer,
            resources=c.resources,
            sampling=c.sampling,
            filters=c.filters,
            filter_timeout_s=c.loop.filter_timeout_s,
            trust_remote_code=c.model.trust_remote_code,
            tiny_overrides=c.model.tiny_overrides,
            checkpoint=str(checkpoint) if checkpoint else None,
        )
        self.recorder = RunRecorder(self.out)
        self.round_index = 0
        self.initial_heldout_accuracy: float | None = None
        self._rounds_at_version = {self.rl.version: 0}  # weight version -> rounds trained into it
        self._pending: deque[tuple[int, list[ray.ObjectRef]]] = deque()  # async: (round, rollouts) in flight
        if checkpoint is not None:
            self._restore_loop_state(self.rl.trainer.restored)
            print(f"resumed from {checkpoint}: next round {self.round_index + 1}", flush=True)
        else:
            self.recorder.reset()

    # ---------------------------------------------------------------- a round

    def round(self) -> dict[str, Any]:
        """Run one round and return its statistics (also appended to metrics.jsonl)."""
        r, c, t = self.round_index, self.config, {"start": time.perf_counter()}
        rollouts = self._rollouts_for(r)
        scored = self.rl.filter(rollouts)
        self._prefetch(r)
        _wait_all(rollouts, f"round {r + 1} generate")
        t["generated"] = time.perf_counter()
        _wait_all(scored.summaries, f"round {r + 1} filter")
        summary = scored.summary()
        t["filtered"] = time.perf_counter()
        written = write_generations(self.out / "rounds" / f"{r + 1:04d}" / "generations.parquet", scored.tables)
        train = _wait_all([self.rl.step_async(scored)], f"round {r + 1} train")[0]
        t["trained"] = time.perf_counter()
        if c.loop.async_mode:
            self.rl.publish_weights()
        else:
            self.rl.sync_weights()
        t["synced"] = time.perf_counter()
        self.round_index += 1
        self._rounds_at_version.setdefault(self.rl.version, self.round_index)
        last = self.round_index == c.loop.rounds
        heldout = self.heldout_accuracy() if self.heldout is not None and (self._due(c.loop.eval_every) or last) else None
        ray.get(written)
        stats = self._round_stats(r, summary, train, heldout, t)
        self.recorder.record(stats)
        print(_summary_line(stats), flush=True)
        # Last, so that a checkpoint of round r means round r's files are complete.
        if self._due(c.loop.save_every) or last:
            self.save_checkpoint()
        return stats

    def run(self) -> list[dict[str, Any]]:
        """Run the remaining rounds (after the warm-up, on a fresh run); returns their statistics.

        If the trainer dies, it is restored from the newest checkpoint and the rounds
        after it are run again; with no checkpoint yet the run stops and says so.
        """
        if self.round_index == 0:
            self.warm_up()
            if self.heldout is not None:
                self.initial_heldout_accuracy = self.heldout_accuracy()
                self.recorder.record({"round": 0, "heldout_accuracy": self.initial_heldout_accuracy})
                print(f"held-out accuracy before round 1: {self.initial_heldout_accuracy:.1%}", flush=True)
        stats: dict[int, dict[str, Any]] = {}
        while self.round_index < self.config.loop.rounds:
            try:
                s = self.round()
                stats[s["round"]] = s
            except ray.exceptions.RayActorError as error:
                if not self._trainer_lost(error):
                    raise
                self.recover_trainer()
        return [stats[k] for k in sorted(stats)]

    def _trainer_lost(self, error: Exception) -> bool:
        try:
            ray.get([r.version.remote() for r in self.rl.trainer.ranks], timeout=30)
            return False
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return True

    def recover_trainer(self) -> Path:
        """Bring back a dead trainer from the newest checkpoint and rewind the loop to it."""
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is None:
            raise RuntimeError(
                f"the trainer died before the first checkpoint of {self.out}; nothing to restore. "
                "Start the run again (lower loop.save_every to checkpoint sooner)."
            )
        print(f"trainer lost: restoring {checkpoint} and running the rounds after it again", flush=True)
        self._pending.clear()
        self._restore_loop_state(self.rl.restore_trainer(str(checkpoint)))
        return checkpoint

    def _restore_loop_state(self, state: dict[str, Any]) -> None:
        self.round_index = state["round_index"]
        self.initial_heldout_accuracy = state.get("initial_heldout_accuracy")
        self._rounds_at_version = {int(k): v for k, v in state["rounds_at_version"].items()}
        self._rounds_at_version.setdefault(self.rl.version, self.round_index)
        self.recorder.truncate(self.round_index)

    def warm_up(self) -> dict[str, Any] | None:
        """Supervised warm-up on the task's warm-up examples: the only reference answers the trainer sees."""
        passes = self.config.loop.warmup_passes
        if not passes or self.task is None or not self.task.warmup_examples:
            return None
        prompts = [e["prompt"] for e in self.task.warmup_examples]
        completions = [e["completion"] + (self.rl.eos_token or "") for e in self.task.warmup_examples]
        for _ in _bar(range(passes), "warm-up"):
            stats = self.rl.step(texts=prompts, texts_labels=completions)
        self.rl.sync_weights()
        self._rounds_at_version[self.rl.version] = 0
        print(f"warm-up: {passes} passes, {stats['global_step']} updates, loss {stats['loss']:.3f}", flush=True)
        return stats

    # ---------------------------------------------------------------- pieces

    def _rollouts_for(self, r: int) -> list[ray.ObjectRef]:
        """This round's rollouts: prefetched in async mode, else sampled now with the latest weights."""
        if self._pending and self._pending[0][0] == r:
            return self._pending.popleft()[1]
        return self._generate(r)

    def _prefetch(self, r: int) -> None:
        """Async mode: start rounds r+1 .. r+max_staleness on the weights at hand, before training r."""
        loop = self.config.loop
        if not loop.async_mode:
            return
        queued = {p[0] for p in self._pending}
        for ahead in range(r + 1, min(r + loop.max_staleness, loop.rounds - 1) + 1):
            if ahead not in queued:
                self._pending.append((ahead, self._generate(ahead)))

    def _generate(self, r: int) -> list[ray.ObjectRef]:
        return self.rl.generate(self._round_prompts(r), seed=self.config.loop.seed, round_index=r)

    def _round_prompts(self, r: int) -> pa.Table:
        """Round r's prompts: consecutive windows over a seeded shuffle of the train prompts, per epoch."""
        n, total, seed = self.config.loop.prompts_per_round, self.prompts.num_rows, self.config.loop.seed
        indices = []
        for epoch in range(r * n // total, ((r + 1) * n - 1) // total + 1):
            order = _permutation(total, seed + epoch)
            indices += [order[k - epoch * total] for k in range(max(r * n, epoch * total), min((r + 1) * n, (epoch + 1) * total))]
        return self.prompts.take(pa.array(indices))

    def scale_generators(self, count: int) -> None:
        """Change the number of generators between rounds; new ones load the current weights before sampling."""
        if count < 1:
            raise ValueError(f"count: expected at least 1 generator, got {count}")
        self.rl.scale_generators(count)
        self.config.resources.num_generators = count

    def heldout_accuracy(self) -> float:
        """Greedy accuracy on the task's held-out prompts with the current weights (never trained on)."""
        rollouts = self.rl.generate(self.heldout, temperature=0.0, num_samples=1, round_index=-1)
        scored = self.rl.filter(rollouts, [{"name": "exact_answer", "task": self.task.name}])
        return scored.summary()["accept_rate"]

    def save_checkpoint(self) -> Path:
        """Checkpoint under checkpoints/round-NNNN: Hugging Face model + training state + loop state."""
        target = self.out / "checkpoints" / f"round-{self.round_index:04d}"
        self.rl.save(str(target), {
            "round_index": self.round_index,
            "initial_heldout_accuracy": self.initial_heldout_accuracy,
            "rounds_at_version": {str(k): v for k, v in self._rounds_at_version.items()},
        })
        return target

    def _due(self, every: int) -> bool:
        return self.round_index % every == 0

    def _round_stats(self, r, summary, train, heldout, t) -> dict[str, Any]:
        versions = summary["weight_versions"]
        stats = {
            "round": r + 1,
            "accept_rate": summary["accept_rate"],
            "reward_mean": summary["reward_mean"],
            "samples": summary["rows"],
            "accepted": summary["accepted"],
            "filter_errors": summary["filter_errors"],
            "loss": train["loss"],
            "num_target_tokens": train["num_target_tokens"],
            "num_tokens": train["num_tokens"],
            "updates": train["updates"],
            "global_step": train["global_step"],
            "learning_rate": train["learning_rate"],
            "weight_version": self.rl.version,
            "sample_weight_versions": {str(k): v for k, v in sorted(versions.items())},
            "staleness": max((r - self._rounds_at_version[v] for v in versions), default=0),
            "generate_time": t["generated"] - t["start"],
            "filter_time": t["filtered"] - t["generated"],
            "train_time": t["trained"] - t["filtered"],
            "sync_time": t["synced"] - t["trained"],
            "round_time": time.perf_counter() - t["start"],
        }
        if heldout is not None:
            stats["heldout_accuracy"] = heldout
        return stats

    def shutdown(self) -> None:
        self.recorder.close()
        self.rl.shutdown()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (a crash while saving leaves only a .tmp beside it)."""
    found = [p for p in (run_dir / "checkpoints").glob("round-[0-9][0-9][0-9][0-9]") if is_checkpoint(p)]
    return max(found, default=None)


def _bar(iterable, desc: str, total: int | None = None):
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)


def _wait_all(refs: list[ray.ObjectRef], desc: str) -> list[Any]:
    """Wait for references with a progress bar that ticks as each one completes; returns their values."""
    pending, bar = list(refs), _bar(None, desc, total=len(refs))
    while pending:
        done, pending = ray.wait(pending, num_returns=1, fetch_local=False)
        bar.update(len(done))
    bar.close()
    return ray.get(list(refs))


def _permutation(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _summary_line(s: dict[str, Any]) -> str:
    line = (
        f"round {s['round']:3d} | accept {s['accept_rate']:6.1%} | reward {s['reward_mean']:.3f} | "
        f"loss {s['loss']:.3f} | v{s['weight_version']} | gen {s['generate_time']:.1f}s "
        f"filter {s['filter_time']:.1f}s train {s['train_time']:.1f}s sync {s['sync_time']:.1f}s"
    )
    if "heldout_accuracy" in s:
        line += f" | held-out {s['heldout_accuracy']:.1%}"
    return line
