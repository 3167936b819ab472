"""IterativeLoop: the driver. One round = generate -> filter -> step -> sync -> record.

The driver decides everything and holds only references and small statistics; rollout
rows move from generators to filters to the trainer (and to disk) through the object
store. In async mode the generation of the next rounds runs on the weights at hand
while the trainer trains, at most `loop.max_staleness` rounds behind.
"""

from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import ray
import torch
from tqdm.auto import tqdm

from iterft_ray.actors.failures import Deadline, wait_for
from iterft_ray.config import RunConfig, load_config
from iterft_ray.data.prompt_stream import open_prompts
from iterft_ray.data.chat import chat_example_ids, with_chat_template
from iterft_ray.data.warmup import is_conversation
from iterft_ray.data.prompts import PromptDataError
from iterft_ray.data.curriculum import PassRecord
from iterft_ray.data.rollouts import ScoredRollouts
from iterft_ray.engines.seeding import wave_seed
from iterft_ray.envs.turns import TurnTemplate
from iterft_ray.ray_trainer import RayIterativeSFTTrainer
from iterft_ray.run.evaluation import Evaluation, eval_path, evaluation_filters, held_out_rule
from iterft_ray.run.in_flight import delete_in_flight, load_in_flight, save_in_flight
from iterft_ray.run.ledger import describe_filters, write_accepted
from iterft_ray.run.records import RunRecorder, write_generations
from iterft_ray.run.trackers import open_trackers, trainer_report_to
from iterft_ray.run.training_set import training_set
from iterft_ray.run.waves import RoundSampler, check_rationalize
from iterft_ray.run.run_dir import (RunStart, base_weights_dir, check_start, checkpoint_dir, latest_checkpoint,
                                    trainer_output_dir)
from iterft_ray.storage import StoragePath
from iterft_ray.train.checkpoint import copy_model_files


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
        check_rationalize(c.recipe, start.prompts.column_names)  # recipe.rationalize needs an answer column
        # A file or a dataset streams through Ray Data; eval.heldout_fraction's prompts are skipped.
        self.prompts = open_prompts(start.prompts, c.loop.seed, held_out_rule(c))
        # The pass-rate record; with a curriculum rule, the cursor skips the prompts it sets aside.
        self.pass_record = PassRecord(c.curriculum)
        if self.pass_record.active:
            self.prompts.set_aside = self.pass_record
        self.task, self.warmup_examples = start.task, start.warmup_examples
        self.chat_tokenizer = start.chat_tokenizer  # data.chat_template: prompts become its template's tokens
        self.evaluation: Evaluation | None = None
        if start.heldout is not None:
            heldout = start.heldout
            if self.chat_tokenizer is not None:
                heldout = with_chat_template(heldout, self.chat_tokenizer, c.data.system_prompt)
            self.evaluation = Evaluation(heldout, evaluation_filters(c), c.eval.num_samples, c.loop.seed)
        # The validation split: what the rollback gate, the best checkpoint and final_model: best read (val_*).
        self.validation: Evaluation | None = None
        if start.validation is not None:
            validation = start.validation
            if self.chat_tokenizer is not None:
                validation = with_chat_template(validation, self.chat_tokenizer, c.data.system_prompt)
            self.validation = Evaluation(validation, evaluation_filters(c), c.eval.num_samples, c.loop.seed, "val")
        self._ledger_filters = describe_filters(c.filters)
        self.out, self.run_id = start.out, start.run_id
        self.rl = RayIterativeSFTTrainer(
            c.model,
            {"output_dir": trainer_output_dir(self.out, self.run_id), "seed": c.loop.seed, **c.trainer,
             "report_to": trainer_report_to(c.trainer)},  # the trackers are the driver's (run/trackers.py)
            resources=c.resources,
            sampling=c.sampling,
            filters=c.filters,
            filter_timeout_s=c.loop.filter_timeout_s,
            checkpoint=start.checkpoint,
            env=c.env,
            system_prompt=c.data.system_prompt,
        )
        try:
            start.prepare_directory(c)
            self.recorder = RunRecorder(self.out, open_trackers(c, self.out.name, self.run_id))
            self.round_index = 0
            self.warmed_up = False
            self.initial_heldout_accuracy: float | None = None
            self.best: dict[str, Any] | None = None  # {"round", "value", "eval"} of the best evaluation so far
            # The evaluation of the weights the trainer holds now (after a rollback: the best one's).
            self.current_evaluation: dict[str, float] | None = None
            self.rollbacks = 0  # each one moves the sampling seed on
            self._rounds_at_version = {self.rl.version: 0}  # weight version -> rounds trained into it
            self._pending: deque[tuple[int, list[ray.ObjectRef]]] = deque()  # async: (round, rollouts) in flight
            self._sampling_stats: dict[str, Any] = {}  # the last round's waves, hinted samples, set-aside prompts
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
        when a generator or filter actor dies past its restart limits. A fresh run's first round, whether
        `round()` or `run()` comes first, is preceded by the warm-up and the evaluation before training.
        """
        if self.round_index == 0 and not self.warmed_up:
            self.warm_up()
            if self.config.recipe.train_from == "base":  # before any checkpoint: one of round 0 implies this one
                self.rl.save(base_weights_dir(self.out))
            self.warmed_up = True
            if self.evaluation is not None or self.validation is not None:
                evaluated = self.evaluate()
                self.initial_heldout_accuracy = evaluated.get("eval_greedy")
                self.recorder.record({"round": 0, **evaluated})
                print(f"evaluation before round 1: {_evaluation_line(evaluated)}", flush=True)
                if self._judge(evaluated)[0]:
                    self.save_checkpoint()
        r, c, t = self.round_index, self.config, {"start": time.perf_counter()}
        deadline = self._round_deadline()
        rollouts = self._rollouts_for(r)
        scored = self.rl.filter(rollouts)
        self._prefetch(r)
        self._wait(rollouts, f"round {r + 1} generate", deadline)
        t["generated"] = time.perf_counter()
        summaries = self._wait(scored.summaries, f"round {r + 1} filter", deadline, fetch=True)
        scored, summary = self._sample_rest(r, scored, summaries, deadline)  # later waves, hinted pass (run/waves.py)
        t["filtered"] = time.perf_counter()
        generations = self.out / "rounds" / f"{r + 1:04d}" / "generations.parquet"
        written = write_generations(generations, scored.tables)
        ledger = write_accepted(self.out, r + 1, self._ledger_filters, scored.tables)
        if summary["filter_errors"] or summary.get("env", {}).get("env_errors"):
            summary["first_filter_error"] = _one_line(summary["first_filter_error"])
            self._stop_on_filter_errors(r, summary, generations, written)
        recipe = c.recipe
        updates = None if recipe.steps_first is None else round(recipe.steps_first * recipe.steps_growth ** r)
        train = self.rl.step(training_set(recipe, self.out, r + 1, scored), deadline=deadline, epochs=recipe.epochs,
                             updates=updates,
                             restart_from=base_weights_dir(self.out) if recipe.train_from == "base" else None,
                             train_turns=c.env.train_turns if c.env else "all")
        t["trained"] = time.perf_counter()
        if c.loop.async_mode:
            self.rl.publish_weights(train["version"])
        else:
            self.rl.sync_weights(train["version"], deadline)
        t["synced"] = time.perf_counter()
        self.round_index += 1
        self._rounds_at_version.setdefault(self.rl.version, self.round_index)
        last = self.round_index == c.loop.rounds
        due = (self.evaluation is not None or self.validation is not None) and (self._due(c.loop.eval_every) or last)
        evaluated = self.evaluate(deadline) if due else {}
        self._wait([written, ledger], f"round {r + 1} write", deadline, fetch=True)
        stats = {**self._round_stats(r, summary, train, t), **evaluated}
        new_best, rollback = self._judge(evaluated)
        if rollback:
            stats["rolled_back_to"] = self.best["round"]
        self.recorder.record(stats, train)
        print(_summary_line(stats), flush=True)
        # Last, so that a checkpoint of round r means round r's files are complete.
        if self._due(c.loop.save_every) or last or new_best:
            self.save_checkpoint()
        if rollback:
            self.roll_back()
        if last:
            self.write_final_model()
        return stats

    def run(self, stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
        """Run the remaining rounds (the first of a fresh run after the warm-up); returns their statistics.

        If the trainer dies, it is restored from the newest checkpoint and the rounds
        after it are run again; with no checkpoint yet the run stops and says so.
        `stop` is asked before each round: True stops the run there as Ctrl-C does (KeyboardInterrupt), for
        the command line's Ctrl-C that Python dropped where it landed (`cli.CtrlC`).
        """
        stats: dict[int, dict[str, Any]] = {}
        while self.round_index < self.config.loop.rounds:
            if stop is not None and stop():
                raise KeyboardInterrupt
            try:
                s = self.round()
                stats[s["round"]] = s
            except ray.exceptions.RayActorError:
                if self.rl.trainer_alive():
                    raise
                self.recover_trainer()
        return [stats[k] for k in sorted(stats)]

    def recover_trainer(self) -> StoragePath:
        """Bring back a dead trainer from the newest checkpoint and rewind the loop to it."""
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is None:
            raise RuntimeError(
                f"the trainer died before the first checkpoint of {self.out}; nothing to restore. "
                "Start the run again (lower loop.save_every to checkpoint sooner)."
            )
        print(f"trainer lost: restoring {checkpoint} and running the rounds after it again", flush=True)
        self._restore_loop_state(self.rl.restore_trainer(checkpoint))
        return checkpoint

    def _restore_loop_state(self, state: dict[str, Any]) -> None:
        self.round_index = state["round_index"]
        self.warmed_up = state.get("warmed_up", True)
        self.initial_heldout_accuracy = state.get("initial_heldout_accuracy")
        self.best = state.get("best")
        self.current_evaluation = state.get("current_evaluation")
        self.rollbacks = state.get("rollbacks", 0)
        self._rounds_at_version = {int(k): v for k, v in state["rounds_at_version"].items()}
        self._rounds_at_version.setdefault(self.rl.version, self.round_index)
        self._pending = load_in_flight(self.out, self.round_index, state.get("in_flight", []))
        self.pass_record.restore(state.get("pass_record"))
        if "prompt_position" in state:
            self.prompts.seek(state["prompt_position"])
        else:  # checkpoints from before streamed prompts: every round took the next prompts_per_round
            per_round = self.config.loop.prompts_per_round
            self.prompts.cursor = self.round_index * (self.prompts.num_rows if per_round == "all" else per_round)
        self.recorder.truncate(self.round_index)

    def warm_up(self) -> dict[str, Any] | None:
        """Supervised warm-up on data.warmup_file's demonstrations or the task's warm-up examples: the only
        reference answers the trainer sees."""
        passes, examples = self.config.loop.warmup_passes, self.warmup_examples
        if not passes or not examples:
            return None
        if self.chat_tokenizer is not None:  # the prompts as sampling sees them: the same template's tokens
            system = self.config.data.system_prompt
            turns = TurnTemplate(self.chat_tokenizer, self.chat_tokenizer.all_special_ids)
            pairs = [turns.conversation_ids(e["messages"]) if is_conversation(e) else
                     chat_example_ids(self.chat_tokenizer, e["prompt"], e["completion"], system) for e in examples]
            batch = {"input_ids": [torch.tensor(ids) for ids, _ in pairs],
                     "labels": [torch.tensor(labels) for _, labels in pairs]}
        else:
            batch = {"texts": [e["prompt"] for e in examples],
                     "texts_labels": [e["completion"] + (self.rl.eos_token or "") for e in examples]}
        for _ in _bar(range(passes), "warm-up"):
            stats = self.rl.step(**batch)
        self.rl.sync_weights()
        self._rounds_at_version[self.rl.version] = 0
        self.recorder.track(0, stats, {}, prefix="warmup/")
        print(f"warm-up: {passes} pass{'es' * (passes != 1)}, {stats['global_step']} updates, "
              f"loss {stats['loss']:.3f}", flush=True)
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
            if self.round_index and latest_checkpoint(self.out) != checkpoint_dir(self.out, self.round_index):
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
        """Sample round r on the weights at hand, from the next prompts of the source (rounds come in order)."""
        per_round = self.config.loop.prompts_per_round
        prompts = self.prompts.next_pass() if per_round == "all" else self.prompts.next_rows(per_round)
        if self.chat_tokenizer is not None:
            prompts = with_chat_template(prompts, self.chat_tokenizer, self.config.data.system_prompt)
        return self._sample_wave(r, prompts, 0)

    def _sample_wave(self, r: int, prompts: pa.Table, wave: int, num_samples: int | None = None) -> list[ray.ObjectRef]:
        """Sample prompt rows for round r's `wave`-th sampling call on the weights at hand (its own seeds), each
        `num_samples` times (None: sampling.num_samples)."""
        counts = {} if num_samples is None else {"num_samples": num_samples}
        return self.rl.generate(prompts, seed=wave_seed(self.config.loop.seed + self.rollbacks, wave), round_index=r,
                                **counts)

    def _sample_rest(self, r: int, scored: ScoredRollouts, summaries: list[dict],
                     deadline: Deadline) -> tuple[ScoredRollouts, dict[str, Any]]:
        """Round r's later waves and hinted pass after its first wave (`iterft_ray.run.waves`), and the pass-rate
        record updated from their per-prompt counts; returns every scored table of the round and their totals."""
        c = self.config
        sampler = RoundSampler(
            c.sampling, c.recipe,
            sample=lambda prompts, wave, num_samples=None: self._sample_wave(r, prompts, wave, num_samples),
            score=self.rl.filter,
            fetch=lambda refs, desc: self._wait(refs, desc, deadline, fetch=True),
            chat=None if self.chat_tokenizer is None else
            (lambda prompts: with_chat_template(prompts, self.chat_tokenizer, c.data.system_prompt)))
        samples = sampler.complete(r + 1, scored, summaries)
        self.pass_record.update(r + 1, samples.counts)
        self._sampling_stats = {
            **({"waves": samples.waves, "passed_before_cap": sum(a for _, a in samples.counts.values())}
               if sampler.in_waves else {}),
            **({"hinted": samples.hinted, "hinted_accepted": samples.hinted_accepted} if c.recipe.rationalize else {}),
            **({"set_aside": len(self.pass_record.set_aside), "brought_back": self.pass_record.brought_back}
               if self.pass_record.active else {}),
        }
        return samples.scored, samples.summary

    def scale_generators(self, count: int) -> None:
        """Change the number of generators between rounds; new ones load the current weights before sampling."""
        if count < 1:
            raise ValueError(f"count: expected at least 1 generator, got {count}")
        self.rl.scale_generators(count)
        self.config.resources.num_generators = count

    def evaluate(self, deadline: Deadline | None = None) -> dict[str, float]:
        """Evaluate the current weights (see `iterft_ray.run.evaluation`): eval_greedy, eval_pass@k, eval_maj@n,
        eval_score_mean, and `heldout_accuracy` (the greedy accuracy, as before evaluations had a section).

        Bounded by `deadline` (the round's), else by a `loop.round_timeout_s` of its own.
        """
        splits = [e for e in (self.evaluation, self.validation) if e is not None]
        if not splits:
            raise ValueError("evaluate: this run has no evaluation prompts (eval.prompts_file, eval.dataset or a "
                             "data.task with a held-out split)")
        refs = [e.start(self.rl, eval_path(self.out, self.round_index, e.split), self.round_index) for e in splits]
        desc = f"round {self.round_index} evaluate" if self.round_index else "evaluate before round 1"
        metrics = {k: v for m in self._wait(refs, desc, deadline or self._round_deadline(), fetch=True)
                   for k, v in m.items()}
        return {**metrics, **({"heldout_accuracy": metrics["eval_greedy"]} if "eval_greedy" in metrics else {})}

    def _judge(self, evaluated: dict[str, float]) -> tuple[bool, bool]:
        """(a new best, a rollback due) for an evaluation just made; a new best is remembered here. Only the
        validation split's metric counts: without one no best is tracked."""
        if not evaluated:
            return False, False
        self.current_evaluation = evaluated
        if self.validation is None:
            return False, False
        value = evaluated[self.config.eval.best_metric]
        if self.best is None or value > self.best["value"]:
            self.best = {"round": self.round_index, "value": value, "eval": evaluated}
            return True, False
        drop = self.config.eval.rollback_drop
        return False, drop is not None and self.best["value"] - value > drop

    def roll_back(self) -> None:
        """Restore the best checkpoint's weights and optimizer state, move the sampling seed on, and go on
        from this round (its checkpoint is then rewritten to the restored state, so a resume goes on alike)."""
        best = checkpoint_dir(self.out, self.best["round"])
        print(f"round {self.round_index}: {self.config.eval.best_metric} fell more than "
              f"{self.config.eval.rollback_drop:g} below its best ({self.best['value']:.3f} after round "
              f"{self.best['round']}); rolling back to {best}", flush=True)
        self.rl.restore_trainer(best)
        self.current_evaluation = self.best.get("eval")  # rounds already sampling (async mode) are kept: their prompts are drawn
        self.rollbacks += 1
        self._rounds_at_version[self.rl.version] = self.round_index
        self.save_checkpoint()

    @property
    def final_evaluation(self) -> dict[str, float] | None:
        """The evaluation of the model final/ holds (eval.final_model: the best one's, else the last weights')."""
        if self.config.eval.final_model == "best" and self.best is not None:
            return self.best.get("eval")
        return self.current_evaluation

    def write_final_model(self) -> StoragePath:
        """final/: the model of the last round or of the best checkpoint (eval.final_model), a Hugging Face
        directory (model, tokenizer; no training state)."""
        source = self.round_index
        if self.config.eval.final_model == "best" and self.best is not None:
            source = self.best["round"]
        final = self.out / "final"
        copy_model_files(checkpoint_dir(self.out, source), final)
        return final

    def save_checkpoint(self) -> StoragePath:
        """Checkpoint under checkpoints/round-NNNN: Hugging Face model + training state + loop state, and
        the rollouts of rounds already sampling (async mode; `iterft_ray.run.in_flight`)."""
        target = checkpoint_dir(self.out, self.round_index)
        in_flight = save_in_flight(self.out, self.round_index, self._pending)
        self.rl.save(target, {
            "round_index": self.round_index,
            "warmed_up": self.warmed_up,
            "initial_heldout_accuracy": self.initial_heldout_accuracy,
            "best": self.best,
            "current_evaluation": self.current_evaluation,
            "rollbacks": self.rollbacks,
            "rounds_at_version": {str(k): v for k, v in self._rounds_at_version.items()},
            "run_id": self.run_id,
            "prompt_position": self.prompts.position,  # after the prompts of the rounds in flight
            "in_flight": in_flight,
            "pass_record": self.pass_record.state(),  # small JSON: a few numbers per prompt drawn so far
        })
        delete_in_flight(self.out, self.round_index)
        return target

    def _stop_on_filter_errors(self, r: int, summary: dict[str, Any], generations: StoragePath,
                               written: ray.ObjectRef) -> None:
        """A round whose rows mostly fail in a filter or an environment is a broken filter or environment, not a
        bad model: stop and say so. Environment errors and filter errors count together."""
        env = summary.get("env", {})
        errors = summary["filter_errors"] + env.get("env_errors", 0)
        rows, limit = summary["rows"], self.config.loop.max_filter_error_rate
        if errors / rows >= limit:
            ray.get(written)  # the file the message points to
            first = summary["first_filter_error"] or _one_line(env.get("first_env_error"))
            where = "the filters or environments" if env else "the filters"
            raise FilterErrorsError(
                f"round {r + 1}: {errors} of {rows} rows failed in {where} ({errors / rows:.0%}, "
                f"loop.max_filter_error_rate is {limit:g}); first error: {first} "
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

    def _round_stats(self, r, summary, train, t) -> dict[str, Any]:
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
            "train_rows": train["train_rows"],
            "num_target_tokens": train["num_target_tokens"],
            "num_tokens": train["num_tokens"],
            "updates": train["updates"],
            "global_step": train["global_step"],
            "learning_rate": train["learning_rate"],
            "weight_version": self.rl.version,
            "sample_weight_versions": {str(k): v for k, v in sorted(versions.items())},
            "staleness": _staleness(r, versions, self._rounds_at_version),
            "generate_time": t["generated"] - t["start"],
            "filter_time": t["filtered"] - t["generated"],
            "train_time": t["trained"] - t["filtered"],
            "sync_time": t["synced"] - t["trained"],
            "round_time": time.perf_counter() - t["start"],
            **self._sampling_stats,
            **_trajectory_stats(summary),
        }
        return stats

    def shutdown(self) -> None:
        self.prompts.close()
        self.recorder.close()
        self.rl.shutdown()


def _trajectory_stats(summary: dict[str, Any]) -> dict[str, Any]:
    """A multi-turn round's statistics (`combine_trajectories`), the first environment error on one line."""
    env = dict(summary.get("env", {}))
    if env.get("first_env_error") is not None:
        env["first_env_error"] = _one_line(env["first_env_error"])
    elif env:
        del env["first_env_error"]
    return env


def _bar(iterable, desc: str, total: int | None = None):
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)




def _staleness(r: int, versions: dict[int, int], rounds_at_version: dict[int, int]) -> int:
    """How many rounds of training round r's oldest samples lack: rounds trained into the weights its step
    started from, less rounds trained into the version they were sampled with. 0 in sync mode, also after
    rounds that accepted nothing (their weights are still the newest); at most loop.max_staleness in async mode."""
    newest = max(n for n in rounds_at_version.values() if n <= r)
    return max((newest - rounds_at_version[v] for v in versions), default=0)


def _one_line(text: str | None, limit: int = 300) -> str | None:
    """An error message for a console line: newlines folded, cut at `limit` characters (the Parquet keeps it whole)."""
    if text is None:
        return None
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _evaluation_line(s: dict[str, Any]) -> str:
    """An evaluation in one line: per split (test `eval_*`, validation `val_*`), greedy accuracy, the largest k's
    pass@k and maj@n, in percent, and its filter errors."""
    lines = []
    for split, name in (("eval", ""), ("val", "validation ")):
        if f"{split}_greedy" not in s:
            continue
        parts = [f"{name}greedy {s[f'{split}_greedy']:.1%}"]
        ks = [int(key.removeprefix(f"{split}_pass@")) for key in s if key.startswith(f"{split}_pass@")]
        if ks:
            parts.append(f"pass@{max(ks)} {s[f'{split}_pass@{max(ks)}']:.1%}")
        parts += [f"{key.removeprefix(split + '_')} {value:.1%}" for key, value in s.items()
                  if key.startswith(f"{split}_maj@")]
        if s.get(f"{split}_filter_errors"):
            parts.append(f"(filter errors {s[f'{split}_filter_errors']}, first: "
                         f"{_one_line(s[f'{split}_first_filter_error'])})")
        lines.append(" ".join(parts))
    return " | ".join(lines)


def _summary_line(s: dict[str, Any]) -> str:
    """One line per round; a round that accepted nothing trained on nothing, so its loss is `-`, not nan."""
    loss = "-" if s["loss"] is None or math.isnan(s["loss"]) else f"{s['loss']:.3f}"
    line = (
        f"round {s['round']:3d} | accept {s['accept_rate']:6.1%} | reward {s['reward_mean']:.3f} | "
        f"loss {loss} | v{s['weight_version']} | gen {s['generate_time']:.1f}s "
        f"filter {s['filter_time']:.1f}s train {s['train_time']:.1f}s sync {s['sync_time']:.1f}s"
    )
    if "eval_greedy" in s or "val_greedy" in s:
        line += f" | eval {_evaluation_line(s)}"
    if "waves" in s:  # rows past sampling.until_accepted passed the filters but count as not accepted
        over = s["passed_before_cap"] - s["accepted"] + s.get("hinted_accepted", 0)
        line += f" | waves {s['waves']}" + (f" ({over} passed past until_accepted, not accepted)" if over > 0 else "")
    if "hinted" in s:
        line += f" | hinted {s['hinted_accepted']}/{s['hinted']}"
    if "set_aside" in s:
        line += f" | aside {s['set_aside']}"
    if "rolled_back_to" in s:
        line += f" | rolled back to round {s['rolled_back_to']}"
    if "turns_mean" in s:
        line += (f" | turns {s['turns_mean']:.2f} env {s['env_time_mean'] * 1000:.0f}ms/trajectory "
                 f"truncated {s['truncation_rate']:.1%}")
    if s["filter_errors"]:
        line += f" | filter errors {s['filter_errors']}, first: {s['first_filter_error']}"
    if s.get("env_errors"):
        line += f" | env errors {s['env_errors']}, first: {s['first_env_error']}"
    return line
