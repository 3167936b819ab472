"""The rest of a round's sampling after its first wave: sequential best-of-n, then STaR's hinted pass.

Sequential best-of-n (`sampling.until_accepted: k`, `sampling.max_samples: n`): a prompt is
sampled in waves of `sampling.num_samples` until k of its samples are accepted or another wave
would pass n samples, so easy prompts stop early and hard ones get more tries. A wave starts only
once the filters' summaries of the one before are in: their per-prompt [generated, accepted]
counts (`iterft_ray.data.rollouts.summarize`) are all the driver reads, never the rows. Each wave
has its own seed (`iterft_ray.engines.seeding.wave_seed`) and numbers its samples on from the last
one's (`first_sample`), so no sample repeats and a resumed round samples the same ones again.

STaR's rationalization (`recipe.rationalize`): a prompt with no accepted sample after the waves is
sampled once more (`recipe.hinted_samples` times, else `num_samples`) from `recipe.hint_template` filled
with its `prompt` and `answer`; its rows record and train on the plain prompt (`prompt`, `prompt_ids`) with `hinted`
true. With `data.chat_template` the hint goes into the raw prompt, before the template.

A wave can accept more than a prompt still needs: past the k-th accepted sample of a prompt (over
its waves, then its hinted rows, in row order) rows are re-marked `accepted: false` by a small Ray
task per table that has any (`_cap_accepted`), before the round's tables are written and trained
on. The pass-rate record counts the filters' verdicts before that cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import ray

from iterft_ray.config import RecipeConfig, SamplingConfig
from iterft_ray.data.rollouts import SAMPLE_SCHEMA, SCORE_SCHEMA, ScoredRollouts, combine_summaries, prompt_counts


def check_rationalize(recipe: RecipeConfig, column_names: list[str]) -> None:
    """Refuse, before anything starts, a rationalization the prompts or the template cannot fill in."""
    if not recipe.rationalize:
        return
    if "answer" not in column_names:
        raise ValueError(f"recipe.rationalize: the hinted pass gives each prompt's reference answer, and the prompts "
                         f"have no 'answer' column (columns: {sorted(column_names)}); add one or set "
                         "recipe.rationalize: false")
    try:
        recipe.hint_template.format(prompt="", answer="")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"recipe.hint_template: only {{prompt}} and {{answer}} can be filled in; "
                         f"{recipe.hint_template!r} fails: {type(error).__name__}: {error}") from None


@dataclass
class RoundSamples:
    """A round's scored rollouts over all its sampling calls, their totals (after the cap), and what they took."""

    scored: ScoredRollouts
    summary: dict[str, Any]
    counts: dict[Any, list[int]]  # prompt_id -> [generated, accepted] of the plain samples, before the cap
    waves: int
    hinted: int
    hinted_accepted: int


class RoundSampler:
    """Samples a round's later waves and hinted pass through the loop's callables.

    `sample(prompts, wave, num_samples)` starts a sampling call on the weights at hand (its seed from
    `wave`; `num_samples` samples a prompt, None: sampling.num_samples) and returns rollout references;
    `score(refs)` queues them in the filters; `fetch(refs, desc)` waits
    for small values by the round's deadline; `chat(prompts)` applies data.chat_template (None: none).
    """

    def __init__(self, sampling: SamplingConfig, recipe: RecipeConfig,
                 sample: Callable[[pa.Table, int, int | None], list[ray.ObjectRef]],
                 score: Callable[[list[ray.ObjectRef]], ScoredRollouts],
                 fetch: Callable[[list[ray.ObjectRef], str], list[Any]],
                 chat: Callable[[pa.Table], pa.Table] | None = None):
        self.sampling, self.recipe = sampling, recipe
        self.sample, self.score, self.fetch, self.chat = sample, score, fetch, chat

    @property
    def in_waves(self) -> bool:
        return self.sampling.until_accepted is not None

    def complete(self, round_number: int, first: ScoredRollouts, first_summaries: list[dict]) -> RoundSamples:
        """The round's samples: `first` (its first wave, scored, summaries fetched), then the later waves and the
        hinted pass as configured, capped at `sampling.until_accepted` accepted per prompt."""
        tables, summaries = list(first.tables), list(first_summaries)
        counts = prompt_counts(summaries)
        prompts: pa.Table | None = None  # the round's prompt rows, fetched once a later call needs them
        waves, n, k = 1, self.sampling.max_samples, self.sampling.until_accepted
        while self.in_waves:
            todo = [pid for pid, (generated, accepted) in counts.items()
                    if accepted < k and generated + self.sampling.num_samples <= n]
            if not todo:
                break
            prompts = prompts if prompts is not None else self._round_prompts(tables, round_number)
            wave = _rows_of(prompts, todo)
            wave = wave.append_column("first_sample", pa.array([counts[p][0] for p in todo], pa.int64()))
            new, new_summaries = self._sample_and_score(wave, waves, f"round {round_number} wave {waves + 1}")
            tables += new
            summaries += new_summaries
            for pid, (generated, accepted) in prompt_counts(new_summaries).items():
                counts[pid][0] += generated
                counts[pid][1] += accepted
            waves += 1
        hinted_from = len(tables)
        if self.recipe.rationalize:
            failed = [pid for pid, (_, accepted) in counts.items() if accepted == 0]
            if failed:
                prompts = prompts if prompts is not None else self._round_prompts(tables, round_number)
                hint = self._hinted_prompts(_rows_of(prompts, failed), [counts[p][0] for p in failed])
                new, new_summaries = self._sample_and_score(hint, waves, f"round {round_number} hinted pass",
                                                            self.recipe.hinted_samples)
                tables += new
                summaries += new_summaries
        if self.in_waves:
            tables, summaries = _cap(tables, summaries, k)
        hinted = summaries[hinted_from:]
        return RoundSamples(
            scored=ScoredRollouts(tables, [ray.put(s) for s in summaries]),
            summary=combine_summaries(summaries),
            counts=counts,
            waves=waves,
            hinted=sum(s["rows"] for s in hinted),
            hinted_accepted=sum(s["accepted"] for s in hinted),
        )

    def _sample_and_score(self, prompts: pa.Table, wave: int, desc: str,
                          num_samples: int | None = None) -> tuple[list[ray.ObjectRef], list[dict]]:
        scored = self.score(self.sample(prompts, wave, num_samples))
        return scored.tables, self.fetch(scored.summaries, desc)

    def _round_prompts(self, tables: list[ray.ObjectRef], round_number: int) -> pa.Table:
        """The round's prompt rows, one per prompt, rebuilt from its first wave's rows (also after a resume, whose
        in-flight rounds come back as rows): a few prompt columns, like the rows the prompt cursor hands out."""
        return self.fetch([_round_prompts.remote(*tables)], f"round {round_number} prompts")[0]

    def _hinted_prompts(self, prompts: pa.Table, first_sample: list[int]) -> pa.Table:
        """The hinted pass's prompt table: the template's prompt to sample from, the plain one to record."""
        if "answer" not in prompts.column_names:
            check_rationalize(self.recipe, prompts.column_names)
        texts, answers = prompts.column("prompt").to_pylist(), prompts.column("answer").to_pylist()
        hinted = [self.recipe.hint_template.format(prompt=p, answer=a) for p, a in zip(texts, answers)]
        # The plain prompt's columns stay where they are (every table of a round has one schema).
        plain = prompts.drop_columns(["prompt_ids"])
        table = (plain.set_column(plain.column_names.index("prompt"), "prompt", pa.array(hinted, pa.string()))
                 .append_column("unhinted_prompt", prompts.column("prompt"))
                 .append_column("unhinted_prompt_ids", prompts.column("prompt_ids"))
                 .append_column("first_sample", pa.array(first_sample, pa.int64())))
        return self.chat(table) if self.chat is not None else table


def _rows_of(prompts: pa.Table, prompt_ids: list) -> pa.Table:
    """The rows of `prompts` for `prompt_ids`, in that order."""
    index = {pid: i for i, pid in enumerate(prompts.column("prompt_id").to_pylist())}
    return prompts.take(pa.array([index[p] for p in prompt_ids], pa.int64()))


# The rollout columns that are not the prompt's; `prompt_ids` stays: it is the prompt's tokens as sampled from.
_NOT_PROMPT = {*SAMPLE_SCHEMA.names, *SCORE_SCHEMA.names} - {"prompt_ids"}


@ray.remote(num_cpus=0)
def _round_prompts(*tables: pa.Table) -> pa.Table:
    """One row per prompt of rollout tables (the first of its rows), with the prompt's columns only."""
    table = pa.concat_tables(tables)
    table = table.drop_columns([c for c in table.column_names if c in _NOT_PROMPT])
    seen: dict[Any, int] = {}
    for i, pid in enumerate(table.column("prompt_id").to_pylist()):
        seen.setdefault(pid, i)
    return table.take(pa.array(list(seen.values()), pa.int64()))


@ray.remote(num_cpus=0)
def _cap_accepted(table: pa.Table, keep: dict[Any, int]) -> pa.Table:
    """`table` with only the first `keep[pid]` accepted rows of each prompt in `keep` still accepted."""
    kept: dict[Any, int] = {}
    accepted = []
    for pid, ok in zip(table.column("prompt_id").to_pylist(), table.column("accepted").to_pylist()):
        if ok and pid in keep:
            ok = kept.get(pid, 0) < keep[pid]
            kept[pid] = kept.get(pid, 0) + ok
        accepted.append(bool(ok))
    return table.set_column(table.column_names.index("accepted"), "accepted", pa.array(accepted, pa.bool_()))


def _cap(tables: list[ray.ObjectRef], summaries: list[dict], k: int) -> tuple[list[ray.ObjectRef], list[dict]]:
    """At most `k` accepted rows per prompt over the tables in order: a `_cap_accepted` task for each table that
    holds more than its prompts' room, and its summary's accepted counts lowered to match."""
    kept: dict[Any, int] = {}
    out_tables, out_summaries = [], []
    for table, summary in zip(tables, summaries):
        keep, per_prompt = {}, {}
        for pid, (generated, accepted) in summary["prompts"].items():
            take = min(accepted, max(0, k - kept.get(pid, 0)))
            kept[pid] = kept.get(pid, 0) + take
            per_prompt[pid] = [generated, take]
            if take < accepted:
                keep[pid] = take
        if keep:
            table = _cap_accepted.remote(table, keep)
            dropped = sum(summary["prompts"][pid][1] - take for pid, take in keep.items())
            summary = {**summary, "accepted": summary["accepted"] - dropped, "prompts": per_prompt}
        out_tables.append(table)
        out_summaries.append(summary)
    return out_tables, out_summaries
