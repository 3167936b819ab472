"""Sampling completions from a model into a rollout batch (an Arrow table). No Ray here.

A rollout batch has one row per sample: `sample_id`, `prompt_id`, `prompt`,
`completion`, `prompt_ids`, `completion_ids` (the sampled tokens, EOS included when
the model stopped), `finished`, `logprob_sum`, `weight_version`, `generator_id`, and
every other column of the prompt table (an `answer`, say) repeated per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingParams:
    """What `sample_rollouts` needs to know; temperature 0 means greedy."""

    num_samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    max_new_tokens: int = 16
    batch_size: int = 256


@torch.no_grad()
def sample_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: pa.Table,
    params: SamplingParams,
    seed: int,
    weight_version: int,
    generator_id: int,
    round_index: int,
) -> pa.Table:
    """Sample `params.num_samples` completions per prompt row, in batches of about `params.batch_size` sequences.

    `seed` fixes the samples, so a shard that is retried after a failure yields the
    same rows. `logprob_sum` is the log-probability of the completion under the
    distribution actually sampled from (after temperature and top-p).
    """
    greedy = params.temperature == 0
    n = 1 if greedy else params.num_samples
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    prompts_per_batch = max(1, params.batch_size // n)
    torch.manual_seed(seed)
    texts = prompts.column("prompt").to_pylist()
    out: dict[str, list] = {k: [] for k in ("prompt_index", "sample", "completion_ids", "finished", "logprob_sum")}
    prompt_ids_all = tokenizer(texts)["input_ids"]
    eos = tokenizer.eos_token_id
    for start in range(0, len(texts), prompts_per_batch):
        chunk = prompt_ids_all[start : start + prompts_per_batch]
        batch = tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt", padding_side="left")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        generated = model.generate(
            **batch,
            do_sample=not greedy,
            temperature=params.temperature if not greedy else None,
            top_p=params.top_p if not greedy else None,
            top_k=params.top_k if not greedy else None,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=n,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
            output_scores=True,
            return_dict_in_generate=True,
        )
        new_tokens = generated.sequences[:, 1:] if is_encoder_decoder else generated.sequences[:, batch["input_ids"].shape[1] :]
        logprobs = model.compute_transition_scores(generated.sequences, generated.scores, normalize_logits=True)
        for row in range(new_tokens.shape[0]):
            tokens = new_tokens[row].tolist()
            length = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            out["prompt_index"].append(start + row // n)
            out["sample"].append(row % n)
            out["completion_ids"].append(tokens[:length])
            out["finished"].append(eos in tokens[:length])
            out["logprob_sum"].append(float(logprobs[row, :length].float().nan_to_num(0.0, neginf=0.0).sum()))

    index = pa.array(out["prompt_index"], pa.int64())
    rows = prompts.take(index)
    completion_ids = out["completion_ids"]
    prompt_ids = [prompt_ids_all[i] for i in out["prompt_index"]]
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    sample_ids = [f"r{round_index}-p{pid}-s{s}" for pid, s in zip(rows.column("prompt_id").to_pylist(), out["sample"])]
    columns = {
        "sample_id": pa.array(sample_ids, pa.string()),
        "completion": pa.array(completions, pa.string()),
        "prompt_ids": pa.array(prompt_ids, pa.list_(pa.int32())),
        "completion_ids": pa.array(completion_ids, pa.list_(pa.int32())),
        "finished": pa.array(out["finished"], pa.bool_()),
        "logprob_sum": pa.array(out["logprob_sum"], pa.float64()),
        "weight_version": pa.array([weight_version] * len(index), pa.int64()),
        "generator_id": pa.array([generator_id] * len(index), pa.int32()),
    }
    for name, column in columns.items():
        rows = rows.append_column(name, column)
    return rows
