"""Evaluation: held-out prompts sampled by the generators and graded by the run's verifiers.

Each evaluation answers every prompt once greedily and `eval.num_samples` (n) times at the run's
temperature, scores both in the filter pool with the evaluation's filters, and reduces the
scored rows to a few numbers in a task beside the driver (the rows never reach the driver):

- `eval_greedy`: the share of prompts whose greedy answer is accepted;
- `eval_pass@k` for k = 1..n: Chen et al. (2021)'s unbiased estimate of the chance that at
  least one of k samples is accepted, from the n drawn, averaged over prompts;
- `eval_maj@n`: the share of prompts whose most frequent `final_answer` (the answer a filter's
  `Verdict` read) is an accepted one; only when the filters read answers;
- `eval_score_mean`: the mean score of the sampled answers (of the greedy ones when n is 0);
- `eval_filter_errors`: rows whose filter failed (not accepted), and `eval_first_filter_error` when any.

The rows themselves go to `eval/NNNN.parquet` (NNNN: the round evaluated after), with an
`eval_mode` column ("greedy" / "sampled"). Evaluation prompts only ever reach the generators
and the filters, never the trainer.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from iterft_ray.config import RunConfig
from iterft_ray.data.heldout import HeldOut, held_out_prompts
from iterft_ray.data.prompts import PromptDataset, PromptFile, PromptSource
from iterft_ray.data.tasks import Task
from iterft_ray.storage import StoragePath
from iterft_ray.verify.filters import Selector, resolve_filter

# The round index an evaluation samples under (its seeds, its sample ids): apart from every training round's.
EVAL_ROUND_BASE = -1_000_000


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
    as a running product so that large n does not overflow."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def eval_metrics(table: pa.Table, num_samples: int) -> dict[str, Any]:
    """The evaluation's metrics (see the module docstring) from its scored rows with their `eval_mode`."""
    greedy = table.filter(pc.equal(table["eval_mode"], "greedy"))
    sampled = table.filter(pc.equal(table["eval_mode"], "sampled"))
    metrics = {"eval_greedy": _mean(greedy["accepted"].to_pylist())}
    by_prompt: dict[Any, list[tuple[bool, str | None]]] = {}
    for pid, accepted, answer in zip(*(sampled[c].to_pylist() for c in ("prompt_id", "accepted", "final_answer"))):
        by_prompt.setdefault(pid, []).append((accepted, answer))
    for k in range(1, num_samples + 1):
        metrics[f"eval_pass@{k}"] = _mean([pass_at_k(len(rows), sum(a for a, _ in rows), k)
                                           for rows in by_prompt.values()])
    if num_samples and any(answer is not None for rows in by_prompt.values() for _, answer in rows):
        metrics[f"eval_maj@{num_samples}"] = _mean([_majority_accepted(rows) for rows in by_prompt.values()])
    scores = (sampled if num_samples else greedy)["score"].to_pylist()
    metrics["eval_score_mean"] = _mean(scores)
    # A row whose filter failed counts as not accepted; say how many, as rounds do, so 0% is not taken for a score.
    errors = pc.drop_null(table["filter_error"])
    metrics["eval_filter_errors"] = len(errors)
    if len(errors):
        metrics["eval_first_filter_error"] = errors[0].as_py()
    return metrics


def _majority_accepted(rows: list[tuple[bool, str | None]]) -> bool:
    """Whether the most frequent answer (ties: the one given first) was accepted; no answer read: wrong."""
    votes = Counter(answer for _, answer in rows if answer is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(answer for _, answer in rows if votes.get(answer) == top)
    return any(accepted for accepted, answer in rows if answer == winner)


def _mean(values: list) -> float:
    return sum(float(v) for v in values) / len(values) if values else 0.0


@ray.remote(num_cpus=0)
def _reduce_evaluation(path: StoragePath, num_samples: int, split: str, greedy_count: int,
                       *tables: pa.Table) -> dict[str, float]:
    """Label the scored tables greedy / sampled, write them to `path` whole, return their metrics (`val_*` for
    the validation split)."""
    labelled = [t.append_column("eval_mode", pa.array(["greedy" if i < greedy_count else "sampled"] * t.num_rows))
                for i, t in enumerate(tables)]
    table = pa.concat_tables(labelled, promote_options="default")
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    path.write_bytes(buffer.getvalue())
    metrics = eval_metrics(table, num_samples)
    return metrics if split == "eval" else {f"{split}_{k.removeprefix('eval_')}": v for k, v in metrics.items()}


def evaluation_filters(config: RunConfig) -> list[Any]:
    """The filters that grade evaluation answers: eval.filters, else the run's row filters (no selectors:
    a best-of-k would reject correct answers beyond the k-th). A reward model among them scores here too, through
    the run's reward-model actors (the same spec finds the same actors): it rejects nothing, so with it alone
    eval_greedy and pass@k are 1 and eval_score_mean, the mean reward, is the number to watch."""
    if config.eval.filters is not None:
        return list(config.eval.filters)
    return [spec for spec in config.filters if not isinstance(resolve_filter(spec), Selector)]


def held_out_rule(config: RunConfig) -> HeldOut | None:
    """The rule that sets the training prompts the rounds skip aside: eval.heldout_fraction's and
    eval.validation.fraction's together (None without either)."""
    test, validation = config.eval.heldout_fraction, _validation_fraction(config)
    if test is None and validation is None:
        return None
    return HeldOut((test or 0.0) + (validation or 0.0), config.loop.seed)


def _validation_fraction(config: RunConfig) -> float | None:
    return config.eval.validation.fraction if config.eval.validation is not None else None


def load_eval_prompts(config: RunConfig, task: Task | None, prompts: pa.Table | PromptSource) -> pa.Table | None:
    """The evaluation (test) prompts: eval.prompts_file, eval.dataset or eval.reasoning_gym read whole, the
    held-out part of the training `prompts` (eval.heldout_fraction), else the task's held-out split (None when
    there is none). Errors name the eval key."""
    ev = config.eval
    if ev.heldout_fraction is not None:
        table = held_out_prompts(prompts, HeldOut(ev.heldout_fraction, config.loop.seed), ev.max_prompts)
        if table.num_rows == 0:
            raise ValueError(f"eval.heldout_fraction: {ev.heldout_fraction} sets none of the prompts aside; raise it")
        return table
    table = _read_split("eval", ev, config.data.prompt_column, ev.max_prompts)
    if table is None and task is not None and task.heldout_prompts:
        return pa.Table.from_pylist(task.heldout_prompts)
    return table


def load_validation_prompts(config: RunConfig, task: Task | None,
                            prompts: pa.Table | PromptSource) -> pa.Table | None:
    """The validation prompts, which selection reads (`val_*`): eval.validation's source, else the task's
    validation split (addition's `num_validation`), else None. Errors name the key."""
    validation = config.eval.validation
    if validation is None:
        return pa.Table.from_pylist(task.validation_prompts) if task is not None and task.validation_prompts else None
    if validation.fraction is not None:
        start = config.eval.heldout_fraction or 0.0
        rule = HeldOut(start + validation.fraction, config.loop.seed, start=start)
        table = held_out_prompts(prompts, rule, config.eval.max_prompts)
        if table.num_rows == 0:
            raise ValueError(f"eval.validation.fraction: {validation.fraction} sets none of the prompts aside; "
                             "raise it")
        return table
    return _read_split("eval.validation", validation, config.data.prompt_column, config.eval.max_prompts)


def _read_split(key: str, spec: Any, column: str, limit: int) -> pa.Table | None:
    """A split's prompts from `spec`'s prompts_file, dataset or reasoning_gym, read whole (at most `limit`);
    None when it names none. Errors name `key`."""
    if spec.reasoning_gym is not None:
        from iterft_ray.data.reasoning_gym import prompt_table

        return prompt_table(spec.reasoning_gym, f"{key}.reasoning_gym").slice(0, limit)
    name = "prompts_file" if spec.prompts_file is not None else "dataset" if spec.dataset is not None else None
    if name is None:
        return None
    try:
        source = PromptFile(spec.prompts_file, column) if name == "prompts_file" else PromptDataset(spec.dataset, column)
        table = pa.concat_tables([source.read_shard(i) for i in range(len(source.shards))]).slice(0, limit)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{key}.{name}: {e}") from None
    if table.num_rows == 0:
        raise ValueError(f"{key}.{name}: holds no prompts")
    return table


def eval_path(out: StoragePath, round_index: int, split: str = "eval") -> StoragePath:
    """Where a run's evaluation after `round_index` rounds writes its rows: eval/NNNN.parquet (the test split),
    eval/validation/NNNN.parquet (`split` "val")."""
    where = out / "eval" / "validation" if split == "val" else out / "eval"
    return where / f"{round_index:04d}.parquet"


class Evaluation:
    """One run's evaluation of a split: its prompts, filters and sample count, run with the trainer's current
    weights; its metrics are `eval_*` (the test split) or `val_*` (`split` "val", the validation split)."""

    def __init__(self, prompts: pa.Table, filters: list[Any], num_samples: int, seed: int, split: str = "eval"):
        self.prompts, self.filters, self.num_samples, self.seed = prompts, filters, num_samples, seed
        self.split = split

    def start(self, rl, path: StoragePath, round_index: int) -> ray.ObjectRef:
        """Sample and score the evaluation after `round_index` rounds (its seeds) with `rl`'s current weights;
        returns a reference to its metrics, which are ready once the rows are written to `path`."""
        at = EVAL_ROUND_BASE - round_index
        greedy = rl.filter(rl.generate(self.prompts, temperature=0.0, num_samples=1, round_index=at), self.filters)
        sampled = rl.filter(rl.generate(self.prompts, seed=self.seed, round_index=at, num_samples=self.num_samples),
                            self.filters).tables if self.num_samples else []
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        return _reduce_evaluation.options(scheduling_strategy=here).remote(
            path, self.num_samples, self.split, len(greedy.tables), *greedy.tables, *sampled)
