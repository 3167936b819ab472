"""The run directory: what belongs to a run in `loop.output_dir`, and whether a config may start there.

A fresh run needs a directory that holds no run (or `--overwrite`); a resume needs this very
run, its own config (but for the keys a resume may change) and a complete checkpoint. All of
it is checked before any actor starts, and nothing is written until `RunStart.prepare_directory`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from iterft_ray.config import CHANGEABLE_ON_RESUME, ConfigWarning, RunConfig, build, check_model_sources, save_config
from iterft_ray.data.chat import load_chat_tokenizer
from iterft_ray.data.prompts import PromptSource, load_prompts
from iterft_ray.data.tasks import Task
from iterft_ray.ray_internals import inside_ray_job
from iterft_ray.run.environment import describe_environment
from iterft_ray.run.evaluation import load_eval_prompts, load_validation_prompts
from iterft_ray.data.warmup import load_warmup_file
from iterft_ray.storage import StoragePath
from iterft_ray.train.checkpoint import META, is_checkpoint

RUN_RECORD = "run.json"
# Everything a run writes into loop.output_dir; --overwrite deletes these and nothing else.
RUN_FILES = (RUN_RECORD, "config.yaml", "metrics.jsonl", "plot.png", "rounds", "eval", "accepted", "checkpoints",
             "in_flight", "final", "tensorboard", "trainer")
# Files a run leaves from its first round on; with no complete checkpoint beside them the run
# can be neither resumed nor lost (a start that failed, a run killed before its first save).
RUN_RESULTS = ("metrics.jsonl", "rounds", "eval", "accepted", "checkpoints", "final", "tensorboard")


# Where a relative loop.output_dir goes under `ray job submit`: the job's working directory is a
# copy inside Ray's session directory, which goes when the session ends.
JOB_RUNS_DIR = "~/iterft-runs"


def resolve_output_dir(location: str) -> str:
    """loop.output_dir as the run will use it: `~` expanded, and under a Ray job a relative path put under
    JOB_RUNS_DIR on the job's driver node (the submitter's directory cannot be written from a job)."""
    if "://" in location:
        return location
    path = Path(location).expanduser()
    if path.is_absolute() or not inside_ray_job():
        return str(path)
    return str(Path(JOB_RUNS_DIR).expanduser() / path)


def base_weights_dir(out: StoragePath) -> StoragePath:
    """recipe.train_from: base: the weights round 1 starts from, which every round restarts from."""
    return out / "checkpoints" / "base"


def checkpoint_dir(out: StoragePath, round_index: int) -> StoragePath:
    """Where the checkpoint after `round_index` rounds lives: checkpoints/round-NNNN."""
    return out / "checkpoints" / f"round-{round_index:04d}"


@dataclass
class RunStart:
    """What starting a config means, decided before anything starts: its prompts, and fresh or resumed."""

    out: StoragePath
    run_id: str
    prompts: pa.Table | PromptSource  # a task's table, or a file or dataset opened to stream
    heldout: pa.Table | None  # the evaluation prompts (eval.prompts_file / eval.dataset / the task's held-out split)
    task: Task | None
    rounds: int  # loop.rounds of the config
    checkpoint: StoragePath | None = None  # resume from it
    rounds_done: int = 0
    overwrite: bool = False
    chat_tokenizer: Any = None  # the run's tokenizer, when data.chat_template is on
    # What the warm-up trains on: data.warmup_file's demonstrations, else the task's examples.
    warmup_examples: list[dict[str, str]] = field(default_factory=list)
    unfinished: str | None = None  # the leftovers of a run with no checkpoint that this fresh start replaces
    # Training questions left out because an evaluation split has them too (data.reasoning_gym).
    dropped_from_training: int = 0
    validation: pa.Table | None = None  # the prompts selection reads (eval.validation, a task's validation split)

    @property
    def complete(self) -> bool:
        """A resumed run that already has every round of its config."""
        return self.checkpoint is not None and self.rounds_done >= self.rounds

    def prepare_directory(self, config: RunConfig) -> None:
        """The only writes of a start: delete the old run (--overwrite), record the run and its config.

        run.json gains this start's machine (`describe_environment`); a resume keeps the earlier starts'."""
        if self.overwrite or self.unfinished:
            gone = [name for name in RUN_FILES if (self.out / name).exists()]
            described = _describe_run(self.out)
            for name in gone:
                (self.out / name).delete()
            if self.overwrite and gone:
                print(f"--overwrite: deleted the run in {self.out}{described}: {', '.join(gone)}", flush=True)
        if self.unfinished:
            print(f"{self.out}: replacing a run that stopped before its first checkpoint{self.unfinished}", flush=True)
        self.out.mkdir()
        record = self.out / RUN_RECORD
        resumed = self.checkpoint is not None and record.exists()
        starts = json.loads(record.read_text()).get("starts", []) if resumed else []
        record.write_text(json.dumps({"run_id": self.run_id, "starts": [*starts, describe_environment()]}, indent=2)
                          + "\n")
        save_config(config, self.out / "config.yaml")


def check_start(config: RunConfig, resume: bool = False, overwrite: bool = False) -> RunStart:
    """Check everything about starting `config` that needs no actor, and write nothing.

    Prompts load, warm-up has data, the model and tokenizer exist, and the output directory
    is either free (a fresh run), or holds this very run to resume. A directory whose run has
    no complete checkpoint (its start failed, or it was killed before the first save) counts
    as free: `--resume` could not continue it, so a fresh start replaces its files. Errors name the key.
    """
    if resume and overwrite:
        raise ValueError("--resume, --overwrite: resume continues the run in loop.output_dir, overwrite deletes it; "
                         "give one")
    prompts, _, task = _load_prompts(config)
    heldout = load_eval_prompts(config, task, prompts)
    validation = load_validation_prompts(config, task, prompts)
    _check_selection(config, validation)
    dropped = 0
    if config.data.reasoning_gym is not None:
        from iterft_ray.data.reasoning_gym import disjoint

        prompts, dropped = disjoint(prompts, [heldout, validation])
        if prompts.num_rows == 0:
            raise ValueError("data.reasoning_gym: every question is also in an evaluation or validation split; give "
                             "the splits seeds at least data.reasoning_gym.size apart, or a larger size")
    _warn_repeated_prompts(config, prompts.num_rows)
    if heldout is None and config.eval.filters is not None:
        raise ValueError("eval.filters: there are no evaluation prompts to grade; give eval.prompts_file or "
                         "eval.dataset (a data.task brings its held-out split)")
    check_model_sources(config.model)
    chat_tokenizer = load_chat_tokenizer(config.model) if config.data.chat_template else None
    config.loop.output_dir = resolve_output_dir(config.loop.output_dir)  # config.yaml records where it went
    out = _output_dir(config.loop.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"loop.output_dir: {out} is a file; expected a directory (or a path that does not exist)")
    warmup = (load_warmup_file(config.data.warmup_file) if config.data.warmup_file is not None
              else task.warmup_examples if task is not None else [])
    start = RunStart(out, uuid.uuid4().hex, prompts, heldout, task, config.loop.rounds, overwrite=overwrite,
                     chat_tokenizer=chat_tokenizer, warmup_examples=warmup, dropped_from_training=dropped,
                     validation=validation)
    if resume:
        _check_resume(config, start)
    elif not overwrite and any((out / name).exists() for name in RUN_RESULTS):
        if latest_checkpoint(out) is None:  # nothing to resume: not a run to protect, just its leftovers
            start.unfinished = _describe_run(out)
            return start
        raise ValueError(
            f"loop.output_dir: {out} already holds a run{_describe_run(out)}; continue it with --resume, "
            "choose another loop.output_dir, or start again with --overwrite (deletes that run's files)"
        )
    return start


def _check_selection(config: RunConfig, validation: pa.Table | None) -> None:
    """The rollback gate and `eval.final_model: best` choose by the validation split, never by the test split
    the run reports: without a validation split, asking for either is an error naming eval.validation."""
    if validation is not None:
        return
    asked = [key for key, on in (("eval.rollback_drop", config.eval.rollback_drop is not None),
                                 ("eval.final_model: best", config.eval.final_model == "best")) if on]
    if asked:
        raise ValueError(f"eval.validation: {' and '.join(asked)} select{'s' * (len(asked) == 1)} on a validation "
                         f"split, and this run has "
                         "none; give eval.validation {prompts_file | dataset | fraction | reasoning_gym} (or "
                         "data.task_options.num_validation for a built-in task)")


def _load_prompts(config: RunConfig) -> tuple[pa.Table | PromptSource, pa.Table | None, Task | None]:
    """The run's prompts, with the settings that cannot apply to them refused by name."""
    data, passes = config.data, config.loop.warmup_passes
    given = [k for k in ("prompts_file", "dataset", "reasoning_gym") if getattr(data, k) is not None]
    if given:
        key = f"data.{given[0]}"
        if data.task_options:
            raise ValueError(f"data.task_options: options of a task, but prompts come from {key}; remove them")
        if passes and data.warmup_file is None:
            raise ValueError(f"loop.warmup_passes: {passes} passes of warm-up need demonstrations (data.warmup_file) "
                             f"or a task's warm-up examples, and {key} has none; set loop.warmup_passes: 0, "
                             f"data.warmup_file, or use a data.task")
        if data.prompts_file is not None and not Path(data.prompts_file).is_file():
            raise ValueError(f"data.prompts_file: no such file {data.prompts_file}")
        try:
            prompts, heldout, task = load_prompts(data)
        except ValueError as e:
            raise ValueError(e if str(e).startswith(key) else f"{key}: {e}") from None
        if "messages" in prompts.column_names and not data.chat_template:
            raise ValueError(f"{key}: {prompts.name} has a 'messages' column, which needs the "
                             "tokenizer's chat template; set data.chat_template: true")
        return prompts, heldout, task
    try:
        prompts, heldout, task = load_prompts(data)
    except ValueError as e:  # the task's own message says which option
        raise ValueError(f"data.task, data.task_options: {e}") from None
    if passes and not task.warmup_examples and data.warmup_file is None:
        raise ValueError(f"loop.warmup_passes: {passes} passes of warm-up, but data.task {data.task!r} has no "
                         "warm-up examples with these data.task_options; set loop.warmup_passes: 0")
    return prompts, heldout, task


def _warn_repeated_prompts(config: RunConfig, num_prompts: int) -> None:
    """More prompts a round than the source has: the stream wraps within the round, so a round samples some
    prompts twice (and trains on them twice); said once at start, not found later in generations.parquet."""
    per_round = config.loop.prompts_per_round
    if per_round != "all" and per_round > num_prompts:
        source = next(f"data.{k}" for k in ("prompts_file", "dataset", "reasoning_gym", "task")
                      if getattr(config.data, k) is not None)
        warnings.warn(f"loop.prompts_per_round: {per_round} prompts a round, but {source} has {num_prompts}: each "
                      f"round repeats prompts; lower loop.prompts_per_round to at most {num_prompts} for each once",
                      ConfigWarning, stacklevel=3)


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


def trainer_output_dir(out: StoragePath, run_id: str) -> str:
    """TrainingArguments.output_dir: under the run on local disk; for a run in a store, a directory on the
    trainer's node (transformers makes it with plain file calls, and writes there only what trainer.report_to asks)."""
    if out.is_local:
        return os.fspath(out / "trainer")
    return os.path.join(tempfile.gettempdir(), f"iterft-trainer-{run_id}")
