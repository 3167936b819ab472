"""The rollout batch (`RolloutBatch`): the one table a round passes from generators to filters to the trainer.

A rollout batch is a `pyarrow.Table`, one row per sample, with

- the prompt table's columns, repeated per sample: at least `prompt_id` and `prompt`, and
  any other the prompt source gives (an `answer`, say; a `prompt_ids` column is replaced
  by the sample's own);
- `SAMPLE_SCHEMA`, added by the engine that sampled it (`rollout_table`, both engines);
- `SCORE_SCHEMA`, added once by the filters (`with_scores`); rejected rows stay, flagged.

It stays a plain Arrow table, not a wrapper class: it travels through Ray's object store
zero-copy and is written to Parquet as it is. Only the summaries below reach the driver.
This module imports neither torch nor Ray: a filter actor reads it without the ML stack, an
engine without Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from iterft_ray.envs.protocol import aggregate_metrics

if TYPE_CHECKING:
    import ray
    from transformers import PreTrainedTokenizerBase

RolloutBatch = pa.Table

# `completion_ids` are the sampled tokens, the stop token included when the model stopped
# (`finished`); `logprob_sum` is their log-probability under the distribution sampled from.
# `completion_mask` is 1 exactly where the model sampled the token: all ones for a single-turn sample; for a
# trajectory, 0 on the template's tokens between turns and on the environment's observations.
SAMPLE_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("completion", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.int32())),
    ("completion_mask", pa.list_(pa.int8())),
    ("finished", pa.bool_()),
    ("logprob_sum", pa.float64()),
    ("weight_version", pa.int64()),
    ("generator_id", pa.int32()),
    ("sampling_seed", pa.int64()),
    ("hinted", pa.bool_()),
])

# A trajectory's columns (`env:` runs; `iterft_ray.envs.runner`), after SAMPLE_SCHEMA's. There `completion` is
# the final assistant message, `finished` means the environment said done, and `completion_ids` is everything
# after the prompt: sampled turns, template tokens and observations. `truncated`: the context budget ran out
# first; `messages`: the conversation (JSON); `env_reward`: the sum of `step_rewards`; `env_metrics`: the
# environment's `get_metrics()` (JSON); `env_error`: why the environment ended it (raised, timed out, died);
# `env_seconds`: the time its environment calls took.
ENV_SCHEMA = pa.schema([
    ("turns", pa.int32()),
    ("truncated", pa.bool_()),
    ("messages", pa.string()),
    ("step_rewards", pa.list_(pa.float64())),
    ("env_reward", pa.float64()),
    ("env_metrics", pa.string()),
    ("env_error", pa.string()),
    ("env_seconds", pa.float64()),
    ("env_name", pa.string()),
])

# Columns a prompt table may carry for one sampling call, read by `rollout_table` and not kept in the batch:
# `first_sample`, the number of a prompt's first sample in this call (sequential best-of-n's later waves
# go on numbering where the earlier ones stopped, so sample ids never repeat); `unhinted_prompt` and
# `unhinted_prompt_ids`, the prompt without its hint (STaR's rationalization: sampled from the hinted
# prompt, recorded and trained as the plain one, with `hinted` true).
CALL_COLUMNS = ("first_sample", "unhinted_prompt", "unhinted_prompt_ids")

# `final_answer` is the answer a row filter extracted from the completion (a `Verdict`'s), null when
# none did: what majority voting (maj@n) counts.
SCORE_SCHEMA = pa.schema([("score", pa.float64()), ("accepted", pa.bool_()), ("filter_error", pa.string()),
                          ("final_answer", pa.string())])

# What the filters read: a batch built by hand (a test, a user's own sampler) needs only these.
FILTER_INPUT_COLUMNS = ("prompt_id", "prompt", "completion")


def rollout_table(
    prompts: pa.Table,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids_all: list[list[int]] | None,
    samples: dict[str, list],
    weight_version: int,
    generator_id: int,
    round_index: int,
    seed: int,
) -> RolloutBatch:
    """The rollout batch from per-sample lists (`prompt_index`, `sample`, `completion_ids`,
    `finished`, `logprob_sum`): the prompt rows repeated per sample, plus `SAMPLE_SCHEMA`.

    A trajectory's lists (`iterft_ray.envs.runner`) also give `prompt_ids` (its prompt as its environment's
    `init` returned it; `prompt_ids_all` is then None), `completion`, `completion_mask` and `ENV_SCHEMA`'s.

    `seed` is the shard's sampling seed (`iterft_ray.engines.seeding.shard_seed`), kept with each row.
    A prompt table's `CALL_COLUMNS` number the samples on and swap a hinted prompt for its plain one.

    Completions are decoded here, once per batch, so both engines decode alike.
    """
    index = pa.array(samples["prompt_index"], pa.int64())
    rows = prompts.take(index)
    first = rows.column("first_sample").to_pylist() if "first_sample" in rows.column_names else [0] * len(index)
    hinted = "unhinted_prompt" in rows.column_names
    if hinted:  # the plain prompt replaces the hinted one it was sampled from
        rows = rows.set_column(rows.column_names.index("prompt"), "prompt", rows.column("unhinted_prompt"))
        prompt_ids_all = prompts.column("unhinted_prompt_ids").to_pylist()
    rows = rows.drop_columns([c for c in ("prompt_ids", *CALL_COLUMNS) if c in rows.column_names])
    completion_ids = samples["completion_ids"]
    prompt_id_column = rows.column("prompt_id").to_pylist()
    values = {
        "sample_id": [f"r{round_index}-p{pid}-s{f + s}" for pid, f, s in zip(prompt_id_column, first, samples["sample"])],
        "completion": samples.get("completion") or tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        "prompt_ids": samples.get("prompt_ids") or [prompt_ids_all[i] for i in samples["prompt_index"]],
        "completion_ids": completion_ids,
        "completion_mask": samples.get("completion_mask") or [[1] * len(ids) for ids in completion_ids],
        "finished": samples["finished"],
        "logprob_sum": samples["logprob_sum"],
        "weight_version": [weight_version] * len(index),
        "generator_id": [generator_id] * len(index),
        "sampling_seed": [seed] * len(index),
        "hinted": [hinted] * len(index),
    }
    for column in SAMPLE_SCHEMA:
        rows = rows.append_column(column, pa.array(values[column.name], column.type))
    if "env_reward" in samples:
        for column in ENV_SCHEMA:
            rows = rows.append_column(column, pa.array(samples[column.name], column.type))
    return rows


def check_unscored(table: RolloutBatch) -> None:
    """Raise unless `table` has the columns the filters read and none they add (a batch is scored once)."""
    for column in FILTER_INPUT_COLUMNS:
        if column not in table.column_names:
            raise ValueError(f"rollout batch has no {column!r} column; needs {FILTER_INPUT_COLUMNS}")
    for column in SCORE_SCHEMA.names:
        if column in table.column_names:
            raise ValueError(f"rollout batch already has a {column!r} column; score it once")


def with_scores(table: RolloutBatch, rows: list[tuple[float, bool, str | None, str | None]]) -> RolloutBatch:
    """`table` with `SCORE_SCHEMA` appended from one (score, accepted, filter_error, final_answer) per row."""
    for i, column in enumerate(SCORE_SCHEMA):
        table = table.append_column(column, pa.array([row[i] for row in rows], column.type))
    return table


def training_rows(table: RolloutBatch) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, completion_ids, completion_mask) of each row with a non-empty completion: what the trainer
    trains on (`iterft_ray.train.labels` makes the labels). A row from before masks (a ledger written by an
    earlier version) gets all ones.

    Pass the accepted rows only; an empty completion has no token to learn from.
    """
    nonempty = table.filter(pc.greater(pc.list_value_length(table["completion_ids"]), 0))
    completions = nonempty["completion_ids"].to_pylist()
    masks = (nonempty["completion_mask"].to_pylist() if "completion_mask" in nonempty.column_names
             else [None] * len(completions))
    return [(prompt, completion, mask if mask is not None else [1] * len(completion))
            for prompt, completion, mask in zip(nonempty["prompt_ids"].to_pylist(), completions, masks)]


def summarize(scored: RolloutBatch) -> dict[str, Any]:
    """Counts a driver needs from a scored batch: rows, accepted, score sum, errors (and the first), weight versions,
    and per prompt (`prompts`: prompt_id -> [generated, accepted]: sequential best-of-n and the pass-rate record).

    Made beside the batch (in the filter actor), so the driver reads a small dict, never the rows.
    """
    versions = pc.value_counts(scored["weight_version"]).to_pylist() if scored.num_rows else []
    errors = pc.drop_null(scored["filter_error"])
    per_prompt: dict[Any, list[int]] = {}
    for pid, accepted in zip(scored["prompt_id"].to_pylist(), scored["accepted"].to_pylist()):
        counts = per_prompt.setdefault(pid, [0, 0])
        counts[0] += 1
        counts[1] += bool(accepted)
    return {
        "rows": scored.num_rows,
        "accepted": int(pc.sum(scored["accepted"]).as_py() or 0),
        "score_sum": float(pc.sum(scored["score"]).as_py() or 0.0),
        "errors": len(errors),
        "first_error": errors[0].as_py() if len(errors) else None,
        "weight_versions": {int(v["values"]): int(v["counts"]) for v in versions},
        "prompts": per_prompt,
        **({"env": summarize_trajectories(scored)} if "env_reward" in scored.column_names else {}),
    }


def summarize_trajectories(table: RolloutBatch) -> dict[str, Any]:
    """Sums over a batch's trajectories: environment errors (and the first), turns, truncated ones, observation
    tokens (mask 0), environment seconds; and each environment's `get_metrics()` dicts, by `env_name`, for
    `combine_trajectories` to aggregate over the round."""
    errors = pc.drop_null(table["env_error"])
    metrics: dict[str, list[dict]] = {}
    for name, text in zip(table["env_name"].to_pylist(), table["env_metrics"].to_pylist()):
        metrics.setdefault(name, []).append(json.loads(text or "{}"))
    return {
        "errors": len(errors),
        "first_error": errors[0].as_py() if len(errors) else None,
        "turns": int(pc.sum(table["turns"]).as_py() or 0),
        "truncated": int(pc.sum(table["truncated"]).as_py() or 0),
        "observation_tokens": sum(len(m) - sum(m) for m in table["completion_mask"].to_pylist()),
        "seconds": float(pc.sum(table["env_seconds"]).as_py() or 0.0),
        "metrics": metrics,
    }


def prompt_counts(parts: list[dict[str, Any]]) -> dict[Any, list[int]]:
    """prompt_id -> [generated, accepted] over summaries (`summarize`'s `prompts`)."""
    total: dict[Any, list[int]] = {}
    for p in parts:
        for pid, (generated, accepted) in p.get("prompts", {}).items():
            counts = total.setdefault(pid, [0, 0])
            counts[0] += generated
            counts[1] += accepted
    return total


def combine_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """`ScoredRollouts.summary` of summaries already fetched (a driver that waited on them fetched each once)."""
    rows = sum(p["rows"] for p in parts)
    accepted = sum(p["accepted"] for p in parts)
    versions: dict[int, int] = {}
    for p in parts:
        for v, n in p["weight_versions"].items():
            versions[v] = versions.get(v, 0) + n
    return {
        "rows": rows,
        "accepted": accepted,
        "accept_rate": accepted / rows if rows else 0.0,
        "reward_mean": sum(p["score_sum"] for p in parts) / rows if rows else 0.0,
        "filter_errors": sum(p["errors"] for p in parts),
        "first_filter_error": next((p["first_error"] for p in parts if p["first_error"] is not None), None),
        "weight_versions": versions,
        **({"env": combine_trajectories([p["env"] for p in parts if "env" in p], rows)}
           if any("env" in p for p in parts) else {}),
    }


def combine_trajectories(parts: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    """A round's trajectory statistics from `summarize_trajectories`'s sums: `env_errors` (and the first),
    `turns_mean`, `truncation_rate`, `observation_tokens_mean`, `env_time_mean` (a trajectory's seconds in its
    environment's calls, queueing in its actor included) and `env_metrics/<key>`: the environment class's own
    `aggregate_metrics` over the round's `get_metrics()` dicts (SkyRL-gym's; the mean of each number where the
    class has none), `env_metrics/<env_name>/<key>` when the round ran more than one environment."""
    by_env: dict[str, list[dict]] = {}
    for p in parts:
        for name, dicts in p["metrics"].items():
            by_env.setdefault(name, []).extend(dicts)
    env_metrics = {}
    for name, dicts in sorted(by_env.items()):
        prefix = "env_metrics/" if len(by_env) == 1 else f"env_metrics/{name}/"
        env_metrics.update({prefix + k: v for k, v in sorted(aggregate_metrics(name, dicts).items())})
    per_row = max(rows, 1)
    return {
        "env_errors": sum(p["errors"] for p in parts),
        "first_env_error": next((p["first_error"] for p in parts if p["first_error"] is not None), None),
        "turns_mean": sum(p["turns"] for p in parts) / per_row,
        "truncation_rate": sum(p["truncated"] for p in parts) / per_row,
        "observation_tokens_mean": sum(p["observation_tokens"] for p in parts) / per_row,
        "env_time_mean": sum(p["seconds"] for p in parts) / per_row,
        **env_metrics,
    }


@dataclass
class ScoredRollouts:
    """Scored rollout batches (references) and their summaries (references to small dicts)."""

    tables: list[ray.ObjectRef]
    summaries: list[ray.ObjectRef]

    def summary(self) -> dict[str, Any]:
        """Totals over the batches: rows, accepted, accept_rate, reward_mean, errors (and the first), weight_versions."""
        import ray  # here, not at the top: engines sample without Ray (tests, benchmarks) and import this module

        return combine_summaries(ray.get(self.summaries))
