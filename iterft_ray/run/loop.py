"""IterativeLoop: the driver. One round = generate -> filter -> step -> sync -> record.

The driver decides everything and holds only references and small statistics; rollout
rows move from generators to filters to the trainer (and to disk) through the object
store. In async mode the generation of the next rounds runs on the weights at hand
while the trainer trains, at most `loop.max_staleness` rounds behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import torch
import yaml
from tqdm.auto import tqdm

from iterft_ray.train.checkpoint import META, is_checkpoint
from iterft_ray.config import CHANGEABLE_ON_RESUME, RunConfig, build, check_model_sources, load_config, save_config
from iterft_ray.failures import Deadline, wait_for
from iterft_ray.data.prompt_stream import open_prompts, stream_position, stream_row
from iterft_ray.data.prompts import (PromptDataError, PromptSource, chat_example_ids, load_chat_tokenizer, load_prompts,
                      with_chat_template)
from iterft_ray.ray_trainer import RayIterativeSFTTrainer, combine_summaries
from iterft_ray.run.records import RunRecorder, write_generations
from iterft_ray.storage import StoragePath
from iterft_ray.data.tasks import Task

RUN_RECORD = "run.json"
# Everything a run writes into loop.output_dir; --overwrite deletes these and nothing else.
RUN_FILES = (RUN_RECORD, "config.yaml", "metrics.jsonl", "plot.png", "rounds", "checkpoints", "tensorboard", "trainer")
# A directory with any of these holds a run's results (a run that stopped while starting left none).
RUN_RESULTS = ("metrics.jsonl", "rounds", "checkpoints", "tensorboard")


class FilterErrorsError(RuntimeError):
    """A round in which at least loop.max_filter_error_rate of the rows failed in a filter."""


class IterativeLoop:
    """Runs the rounds of one config; `.round()` for notebooks, `.run()` for all of them."""

    def __init__(self, config: RunConfig | str | Path | dict, resume: bool = False, overwrite: bool = False,
                 start: RunStart | None = None):
        """`resume=True` continues the run in `loop.output_dir` from its newest checkpoint; `overwrite=True`
        deletes the run there and starts afresh. Without either, a directory that holds a run is refused.

        Everything a user can get wrong is checked (`check_start`) before any actor starts, and a
        start that fails leaves no actor behind and nothing written. `start` is that check's
        result when the caller has already made it (the CLI does, before it starts Ray).
        """
        self.config = config if isinstance(config, RunConfig) else load_config(config)
        c = self.config
        start = start if start is not None else check_start(c, resume, overwrite)
        self.prompts = open_prompts(start.prompts, c.loop.seed)  # a file or a dataset streams through Ray Data
        self.heldout, self.task = start.heldout, start.task
        self.chat_tokenizer = start.chat_tokenizer  # data.chat_template: prompts become its template's tokens
        if self.chat_tokenizer is not None and self.heldout is not None:
            self.heldout = with_chat_template(self.heldout, self.chat_tokenizer, c.data.system_prompt)
        self.out, self.run_id = start.out, start.run_id
        self.rl = RayIterativeSFTTrainer(
            c.model.name_or_path,
            {"output_dir": _trainer_output_dir(self.out, self.run_id), "report_to": "none", "seed": c.loop.seed,
             **c.trainer},
            tokenizer=c.model.tokenizer,
            resources=c.resources,
            sampling=c.sampling,
            filters=c.filters,
            filter_timeout_s=c.loop.filter_timeout_s,
            trust_remote_code=c.model.trust_remote_code,
            tiny_overrides=c.model.tiny_overrides,
            checkpoint=start.checkpoint,
            lora=c.model.lora,
        )
        try:
            start.prepare_directory(c)
            self.recorder = RunRecorder(self.out)
            self.round_index = 0
            self.initial_heldout_accuracy: float | None = None
            self._rounds_at_version = {self.rl.version: 0}  # weight version -> rounds trained into it
            self._pending: deque[tuple[int, list[ray.ObjectRef]]] = deque()  # async: (round, rollouts) in flight
            self._prompts_from = (0, 0)  # (round, row): round `round` takes the prompts from row `row` of the stream
            if start.checkpoint is not None:
                self._restore_loop_state(self.rl.trainer.restored)
                print(f"resumed from {start.checkpoint}: next round {self.round_index + 1}", flush=True)
            else:
                self.recorder.reset()
        except BaseException:
            self.rl.shutdown()
            raise

    # ---------------------------------------------------------------- a round

    def round(self) -> dict[str, Any]:
        """Run one round and return its statistics (also appended to metrics.jsonl).

        The driver fetches only the filters' summaries and the step's statistics; the round
        stops with `RoundTimeoutError` past `loop.round_timeout_s`, and with `ActorFailedError`
        when a generator or filter actor dies past its restart limits.
        """
        r, c, t = self.round_index, self.config, {"start": time.perf_counter()}
        deadline = self._round_deadline()
        rollouts = self._rollouts_for(r)
        scored = self.rl.filter(rollouts)
        self._prefetch(r)
        self._wait(rollouts, f"round {r + 1} generate", deadline)
        t["generated"] = time.perf_counter()
        summary = combine_summaries(self._wait(scored.summaries, f"round {r + 1} filter", deadline, fetch=True))
        t["filtered"] = time.perf_counter()
        generations = self.out / "rounds" / f"{r + 1:04d}" / "generations.parquet"
        written = write_generations(generations, scored.tables)
        if summary["filter_errors"]:
            summary["first_filter_error"] = _one_line(summary["first_filter_error"])
            self._stop_on_filter_errors(r, summary, generations, written)
        train = self.rl.step(scored, deadline=deadline)
        t["trained"] = time.perf_counter()
        if c.loop.async_mode:
            self.rl.publish_weights(train["version"])
        else:
            self.rl.sync_weights(train["version"], deadline)
        t["synced"] = time.perf_counter()
        self.round_index += 1
        self._rounds_at_version.setdefault(self.rl.version, self.round_index)
        last = self.round_index == c.loop.rounds
        due = self.heldout is not None and (self._due(c.loop.eval_every) or last)
        heldout = self.heldout_accuracy(deadline) if due else None
        self._wait([written], f"round {r + 1} write", deadline, fetch=True)
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

    def recover_trainer(self) -> StoragePath:
        """Bring back a dead trainer from the newest checkpoint and rewind the loop to it."""
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is None:
            raise RuntimeError(
                f"the trainer died before the first checkpoint of {self.out}; nothing to restore. "
                "Start the run again (lower loop.save_every to checkpoint sooner)."
            )
        print(f"trainer lost: restoring {checkpoint} and running the rounds after it again", flush=True)
        self._pending.clear()
        self._restore_loop_state(self.rl.restore_trainer(checkpoint))
        return checkpoint

    def _restore_loop_state(self, state: dict[str, Any]) -> None:
        self.round_index = state["round_index"]
        self.initial_heldout_accuracy = state.get("initial_heldout_accuracy")
        self._rounds_at_version = {int(k): v for k, v in state["rounds_at_version"].items()}
        self._rounds_at_version.setdefault(self.rl.version, self.round_index)
        position = state.get("prompt_position")  # absent in checkpoints from before streamed prompts
        self._prompts_from = (self.round_index, stream_row(position, self.prompts.num_rows) if position
                              else self.round_index * self.config.loop.prompts_per_round)
        self.recorder.truncate(self.round_index)

    def warm_up(self) -> dict[str, Any] | None:
        """Supervised warm-up on the task's warm-up examples: the only reference answers the trainer sees."""
        passes = self.config.loop.warmup_passes
        if not passes or self.task is None or not self.task.warmup_examples:
            return None
        if self.chat_tokenizer is not None:  # the prompts as sampling sees them: the same template's tokens
            pairs = [chat_example_ids(self.chat_tokenizer, e["prompt"], e["completion"], self.config.data.system_prompt)
                     for e in self.task.warmup_examples]
            batch = {"input_ids": [torch.tensor(ids) for ids, _ in pairs],
                     "labels": [torch.tensor(labels) for _, labels in pairs]}
        else:
            batch = {"texts": [e["prompt"] for e in self.task.warmup_examples],
                     "texts_labels": [e["completion"] + (self.rl.eos_token or "") for e in self.task.warmup_examples]}
        for _ in _bar(range(passes), "warm-up"):
            stats = self.rl.step(**batch)
        self.rl.sync_weights()
        self._rounds_at_version[self.rl.version] = 0
        print(f"warm-up: {passes} passes, {stats['global_step']} updates, loss {stats['loss']:.3f}", flush=True)
        return stats

    # ---------------------------------------------------------------- pieces

    def _rollouts_for(self, r: int) -> list[ray.ObjectRef]:
        """This round's rollouts: prefetched in async mode, else sampled now with the latest weights.

        A bad row in a streamed prompts file stops the run here, between rounds, with the rounds
        before it checkpointed: fix the row and `--resume` goes on at the same place in the stream.
        """
        if self._pending and self._pending[0][0] == r:
            return self._pending.popleft()[1]
        try:
            return self._generate(r)
        except PromptDataError as error:
            checkpoint = self.out / "checkpoints" / f"round-{self.round_index:04d}"
            if self.round_index and latest_checkpoint(self.out) != checkpoint:
                self.save_checkpoint()
            saved = f"rounds 1-{self.round_index} are saved in {self.out}; " if self.round_index else ""
            raise PromptDataError(f"{error} (round {r + 1} stopped before it started; {saved}"
                                  "fix the row and continue with --resume)") from None

    def _prefetch(self, r: int) -> None:
        """Async mode: start rounds r+1 .. r+max_staleness on the weights at hand, before training r."""
        loop = self.config.loop
        if not loop.async_mode:
            return
        queued = {p[0] for p in self._pending}
        for ahead in range(r + 1, min(r + loop.max_staleness, loop.rounds - 1) + 1):
            if ahead not in queued:
                try:
                    self._pending.append((ahead, self._generate(ahead)))
                except PromptDataError:
                    return  # round `ahead` meets the bad row again when it starts, after this round is saved

    def _generate(self, r: int) -> list[ray.ObjectRef]:
        prompts = self._round_prompts(r)
        if self.chat_tokenizer is not None:
            prompts = with_chat_template(prompts, self.chat_tokenizer, self.config.data.system_prompt)
        return self.rl.generate(prompts, seed=self.config.loop.seed, round_index=r)

    def _round_prompts(self, r: int) -> pa.Table:
        """Round r's prompts: the next window of the prompt stream (a seeded shuffle per epoch)."""
        return self.prompts.rows(self._prompt_row(r), self.config.loop.prompts_per_round)

    def _prompt_row(self, r: int) -> int:
        """Where round r's prompts start in the stream: counted from the position the run started or resumed at."""
        first_round, first_row = self._prompts_from
        return first_row + (r - first_round) * self.config.loop.prompts_per_round

    def scale_generators(self, count: int) -> None:
        """Change the number of generators between rounds; new ones load the current weights before sampling."""
        if count < 1:
            raise ValueError(f"count: expected at least 1 generator, got {count}")
        self.rl.scale_generators(count)
        self.config.resources.num_generators = count

    def heldout_accuracy(self, deadline: Deadline | None = None) -> float:
        """Greedy accuracy on the task's held-out prompts with the current weights (never trained on).

        Bounded by `deadline` (the round's), else by a `loop.round_timeout_s` of its own.
        """
        rollouts = self.rl.generate(self.heldout, temperature=0.0, num_samples=1, round_index=-1)
        scored = self.rl.filter(rollouts, [{"name": "exact_answer", "task": self.task.name}])
        parts = self._wait(scored.summaries, "held-out check", deadline or self._round_deadline(), fetch=True)
        return combine_summaries(parts)["accept_rate"]

    def save_checkpoint(self) -> StoragePath:
        """Checkpoint under checkpoints/round-NNNN: Hugging Face model + training state + loop state."""
        target = self.out / "checkpoints" / f"round-{self.round_index:04d}"
        self.rl.save(target, {
            "round_index": self.round_index,
            "initial_heldout_accuracy": self.initial_heldout_accuracy,
            "rounds_at_version": {str(k): v for k, v in self._rounds_at_version.items()},
            "run_id": self.run_id,
            # The next round's place in the prompt stream, {epoch, rows}: a resume goes on from it.
            "prompt_position": stream_position(self._prompt_row(self.round_index), self.prompts.num_rows),
        })
        return target

    def _stop_on_filter_errors(self, r: int, summary: dict[str, Any], generations: StoragePath,
                               written: ray.ObjectRef) -> None:
        """A round whose rows mostly fail in a filter is a broken filter, not a bad model: stop and say so."""
        errors, rows, limit = summary["filter_errors"], summary["rows"], self.config.loop.max_filter_error_rate
        if errors / rows >= limit:
            ray.get(written)  # the file the message points to
            raise FilterErrorsError(
                f"round {r + 1}: {errors} of {rows} rows failed in the filters ({errors / rows:.0%}, "
                f"loop.max_filter_error_rate is {limit:g}); first error: {summary['first_filter_error']} "
                f"(every row and its error: {generations})"
            )

    def _due(self, every: int) -> bool:
        return self.round_index % every == 0

    def _round_deadline(self) -> Deadline:
        return Deadline.after(self.config.loop.round_timeout_s, "loop.round_timeout_s")

    def _wait(self, refs: list[ray.ObjectRef], desc: str, deadline: Deadline, fetch: bool = False) -> list[Any] | None:
        """`wait_for` with a progress bar that ticks as each call completes (values only with `fetch`)."""
        bar = _bar(None, desc, total=len(refs))
        try:
            return wait_for(refs, deadline, desc, self.rl.actor_roster(), fetch, on_done=bar.update)
        finally:
            bar.close()

    def _round_stats(self, r, summary, train, heldout, t) -> dict[str, Any]:
        versions = summary["weight_versions"]
        stats = {
            "round": r + 1,
            "accept_rate": summary["accept_rate"],
            "reward_mean": summary["reward_mean"],
            "samples": summary["rows"],
            "accepted": summary["accepted"],
            "filter_errors": summary["filter_errors"],
            **({"first_filter_error": summary["first_filter_error"]} if summary["filter_errors"] else {}),
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
        self.prompts.close()
        self.recorder.close()
        self.rl.shutdown()


@dataclass
class RunStart:
    """What starting a config means, decided before anything starts: its prompts, and fresh or resumed."""

    out: StoragePath
    run_id: str
    prompts: pa.Table | PromptSource  # a task's table, or a file or dataset opened to stream
    heldout: pa.Table | None
    task: Task | None
    rounds: int  # loop.rounds of the config
    checkpoint: StoragePath | None = None  # resume from it
    rounds_done: int = 0
    overwrite: bool = False
    chat_tokenizer: Any = None  # the run's tokenizer, when data.chat_template is on

    @property
    def complete(self) -> bool:
        """A resumed run that already has every round of its config."""
        return self.checkpoint is not None and self.rounds_done >= self.rounds

    def prepare_directory(self, config: RunConfig) -> None:
        """The only writes of a start: delete the old run (--overwrite), record the run and its config."""
        if self.overwrite:
            for name in RUN_FILES:
                (self.out / name).delete()
        self.out.mkdir()
        (self.out / RUN_RECORD).write_text(json.dumps({"run_id": self.run_id}) + "\n")
        save_config(config, self.out / "config.yaml")


def check_start(config: RunConfig, resume: bool = False, overwrite: bool = False) -> RunStart:
    """Check everything about starting `config` that needs no actor, and write nothing.

    Prompts load, warm-up has data, the model and tokenizer exist, and the output directory
    is either free (a fresh run), or holds this very run to resume. Errors name the key.
    """
    if resume and overwrite:
        raise ValueError("--resume, --overwrite: resume continues the run in loop.output_dir, overwrite deletes it; "
                         "give one")
    prompts, heldout, task = _load_prompts(config)
    check_model_sources(config.model)
    chat_tokenizer = load_chat_tokenizer(config.model) if config.data.chat_template else None
    out = _output_dir(config.loop.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"loop.output_dir: {out} is a file; expected a directory (or a path that does not exist)")
    start = RunStart(out, uuid.uuid4().hex, prompts, heldout, task, config.loop.rounds, overwrite=overwrite,
                     chat_tokenizer=chat_tokenizer)
    if resume:
        _check_resume(config, start)
    elif not overwrite and any((out / name).exists() for name in RUN_RESULTS):
        raise ValueError(
            f"loop.output_dir: {out} already holds a run{_describe_run(out)}; continue it with --resume, "
            "choose another loop.output_dir, or start again with --overwrite (deletes that run's files)"
        )
    return start


def _load_prompts(config: RunConfig) -> tuple[pa.Table | PromptSource, pa.Table | None, Task | None]:
    """The run's prompts, with the settings that cannot apply to them refused by name."""
    data, passes = config.data, config.loop.warmup_passes
    if data.prompts_file is not None or data.dataset is not None:
        key = "data.prompts_file" if data.prompts_file is not None else "data.dataset"
        if data.task_options:
            raise ValueError(f"data.task_options: options of a task, but prompts come from {key}; remove them")
        if passes:
            raise ValueError(f"loop.warmup_passes: {passes} passes of warm-up need a task's warm-up examples, and "
                             f"{key} has none; set loop.warmup_passes: 0 or use a data.task")
        if data.prompts_file is not None and not Path(data.prompts_file).is_file():
            raise ValueError(f"data.prompts_file: no such file {data.prompts_file}")
        try:
            prompts, heldout, task = load_prompts(data)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        if "messages" in prompts.column_names and not data.chat_template:
            raise ValueError(f"{key}: {prompts.name} has a 'messages' column, which needs the "
                             "tokenizer's chat template; set data.chat_template: true")
        return prompts, heldout, task
    try:
        prompts, heldout, task = load_prompts(data)
    except ValueError as e:  # the task's own message says which option
        raise ValueError(f"data.task, data.task_options: {e}") from None
    if passes and not task.warmup_examples:
        raise ValueError(f"loop.warmup_passes: {passes} passes of warm-up, but data.task {data.task!r} has no "
                         "warm-up examples with these data.task_options; set loop.warmup_passes: 0")
    return prompts, heldout, task


def _check_resume(config: RunConfig, start: RunStart) -> None:
    """A resume continues the run in loop.output_dir, from its own newest checkpoint, with its own config."""
    out = start.out
    if not out.is_dir():
        raise ValueError(f"loop.output_dir: {out} does not exist, so there is no run to resume; "
                         "check the path, or start a run there without --resume")
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        raise ValueError(f"loop.output_dir: {out} holds no checkpoint to resume from; "
                         "start the run again with --overwrite")
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        raise ValueError(f"loop.output_dir: {out} has a checkpoint but no config.yaml, so it is not a run to resume")
    saved = _flatten(build(RunConfig, yaml.safe_load(saved_path.read_text())).to_dict())
    given = _flatten(config.to_dict())
    differ = [k for k in sorted(saved.keys() | given.keys())
              if saved.get(k) != given.get(k) and k not in CHANGEABLE_ON_RESUME]
    if differ:
        changes = "; ".join(f"{k}: {saved.get(k)!r} in the run, {given.get(k)!r} now" for k in differ)
        raise ValueError(f"{', '.join(differ)}: differ from the config of the run in {out} ({changes}); "
                         f"a resume may change only {', '.join(CHANGEABLE_ON_RESUME)}")
    extra = json.loads((checkpoint / META).read_text())["extra"]
    record = out / RUN_RECORD
    run_id = json.loads(record.read_text())["run_id"] if record.is_file() else extra.get("run_id")
    if extra.get("run_id") not in (None, run_id):
        raise ValueError(f"loop.output_dir: the newest checkpoint {checkpoint} belongs to another run than {out} "
                         f"records ({extra['run_id']} vs {run_id}); the directory mixes runs, start again with "
                         "--overwrite")
    start.run_id = run_id or start.run_id
    start.checkpoint, start.rounds_done = checkpoint, extra["round_index"]


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """`{"loop": {"rounds": 2}}` -> `{"loop.rounds": 2}`: one level, as keys are written in errors."""
    flat = {}
    for name, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{key}": v for key, v in value.items()})
        else:
            flat[name] = value
    return flat


def _describe_run(out: StoragePath) -> str:
    """` (run 1a2b3c, 3 rounds recorded)`, as far as the directory says."""
    parts = []
    record = out / RUN_RECORD
    if record.is_file():
        parts.append(f"run {json.loads(record.read_text())['run_id'][:8]}")
    rounds = out / "rounds"
    if rounds.is_dir():
        parts.append(f"rounds recorded: {len(list(rounds.iterdir()))}")
    return f" ({', '.join(parts)})" if parts else ""


def latest_checkpoint(run_dir: StoragePath | str | Path) -> StoragePath | None:
    """The newest complete checkpoint of a run, read from where the run lives (a crash while saving leaves
    a .tmp beside it on local disk, and a checkpoint without its training_state.json in a store)."""
    found = [p for p in (StoragePath.of(run_dir) / "checkpoints").iterdir()
             if re.fullmatch(r"round-\d{4}", p.name) and is_checkpoint(p)]
    return max(found, key=lambda p: p.name, default=None)


def _output_dir(location: str) -> StoragePath:
    """loop.output_dir as a StoragePath, the store asked once here so a bad URI or credentials fail at the start."""
    try:
        out = StoragePath(location)
        out.check_reachable()
    except (ValueError, OSError) as e:
        raise ValueError(f"loop.output_dir: {location} cannot be used: {e}") from None
    return out


def _trainer_output_dir(out: StoragePath, run_id: str) -> str:
    """TrainingArguments.output_dir: under the run on local disk; for a run in a store, a directory on the
    trainer's node (transformers makes it with plain file calls, and writes there only what trainer.report_to asks)."""
    if out.is_local:
        return os.fspath(out / "trainer")
    return os.path.join(tempfile.gettempdir(), f"iterft-trainer-{run_id}")


def _bar(iterable, desc: str, total: int | None = None):
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)




def _one_line(text: str | None, limit: int = 300) -> str | None:
    """An error message for a console line: newlines folded, cut at `limit` characters (the Parquet keeps it whole)."""
    if text is None:
        return None
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summary_line(s: dict[str, Any]) -> str:
    """One line per round; a round that accepted nothing trained on nothing, so its loss is `-`, not nan."""
    loss = "-" if s["loss"] is None or math.isnan(s["loss"]) else f"{s['loss']:.3f}"
    line = (
        f"round {s['round']:3d} | accept {s['accept_rate']:6.1%} | reward {s['reward_mean']:.3f} | "
        f"loss {loss} | v{s['weight_version']} | gen {s['generate_time']:.1f}s "
        f"filter {s['filter_time']:.1f}s train {s['train_time']:.1f}s sync {s['sync_time']:.1f}s"
    )
    if "heldout_accuracy" in s:
        line += f" | held-out {s['heldout_accuracy']:.1%}"
    if s["filter_errors"]:
        line += f" | filter errors {s['filter_errors']}, first: {s['first_filter_error']}"
    return line
