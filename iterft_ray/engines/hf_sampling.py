"""Sampling completions from a model into a rollout batch with transformers `generate`. No Ray here.

The batch's columns are `iterft_ray.data.rollouts`'s (`SAMPLE_SCHEMA`), built by its
`rollout_table`, as the vLLM engine's are; the prompt and stop-token helpers here serve both engines.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from iterft_ray.config import SamplingConfig
from iterft_ray.data.rollouts import RolloutBatch, rollout_table


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompts: pa.Table) -> list[list[int]]:
    """The tokens to sample from: the table's `prompt_ids` when it has them (a chat template's tokens,
    made by `iterft_ray.data.prompts.with_chat_template`, used unchanged), else `tokenizer(prompt)`."""
    if "prompt_ids" in prompts.column_names:
        return prompts.column("prompt_ids").to_pylist()
    return tokenizer(prompts.column("prompt").to_pylist())["input_ids"]


def stop_token_ids(generation_config, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion: the model's own (`generation_config.eos_token_id`, an int
    or a list, as in Llama-3-Instruct's `<|eot_id|>` and `<|end_of_text|>`) and the tokenizer's EOS."""
    model_eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = model_eos if isinstance(model_eos, (list, tuple)) else [model_eos]
    ids = [*ids, tokenizer.eos_token_id]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


class _SampledLogprobs(LogitsProcessor):
    """Records the log-probability of each sampled token, one step behind, without keeping scores.

    `generate` calls it with the final (warped) scores of step k; the token chosen from
    them is the last of `input_ids` at step k + 1. So only one step's log-softmax is held
    (sequences x vocab), never sequences x vocab x steps, and nothing is read back to
    the host until the batch is done.
    """

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs of `new_tokens` (sequences x steps). `generate` may have run one step
        more than it returned (a deferred stop check), so only the first `steps` records count."""
        steps = new_tokens.shape[1]
        if len(self.steps) < steps:
            self.steps.append(self.previous.gather(1, new_tokens[:, -1:]).squeeze(1))
        self.previous = None
        return torch.stack(self.steps[:steps], dim=1) if steps else new_tokens.new_zeros((len(new_tokens), 0), dtype=torch.float)


@torch.no_grad()
def sample_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: pa.Table,
    config: SamplingConfig,
    seed: int,
    weight_version: int,
    generator_id: int,
    round_index: int,
) -> RolloutBatch:
    """Sample `config.num_samples` completions per prompt row with transformers `generate`,
    in batches of about `config.batch_size` sequences.

    `seed` fixes the samples, so a shard that is retried after a failure yields the
    same rows. `logprob_sum` is the log-probability of the completion under the
    distribution actually sampled from (after temperature, top-k and top-p): the
    warpers are given to `generate` as logits processors, ahead of the recorder, so it
    sees the scores the token was drawn from.
    """
    n = 1 if config.temperature == 0 else config.num_samples
    prompt_ids_all = prompt_token_ids(tokenizer, prompts)
    out: dict[str, list] = {k: [] for k in ("prompt_index", "sample", "completion_ids", "finished", "logprob_sum")}
    for index, tokens, done, total in generate_token_ids(model, tokenizer, prompt_ids_all, config, seed, n):
        out["prompt_index"].append(index // n)
        out["sample"].append(index % n)
        out["completion_ids"].append(tokens)
        out["finished"].append(done)
        out["logprob_sum"].append(total)
    return rollout_table(prompts, tokenizer, prompt_ids_all, out, weight_version, generator_id, round_index, seed)


@torch.no_grad()
def generate_token_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids_all: list[list[int]],
    config: SamplingConfig,
    seed: int,
    n: int = 1,
    max_new_tokens: list[int] | None = None,
):
    """Yield (sequence index, sampled ids, finished, logprob_sum) for `n` samples of each prompt, in order
    (sequence `i * n + s` is prompt i's sample s), in batches of about `config.batch_size` sequences.

    Each row is cut after its first stop token (`finished`), or at its own `max_new_tokens[i]` when given
    (a trajectory's context budget; the batch samples up to the largest); `logprob_sum` is over the ids kept.
    """
    greedy = config.temperature == 0
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    prompts_per_batch = max(1, config.batch_size // n)
    torch.manual_seed(seed)
    stops = stop_token_ids(model.generation_config, tokenizer)
    stop_tensor = torch.tensor(stops, device=model.device)
    warpers = [] if greedy else [
        TemperatureLogitsWarper(config.temperature),
        *([TopKLogitsWarper(config.top_k)] if config.top_k else []),
        *([TopPLogitsWarper(config.top_p)] if config.top_p < 1 else []),
    ]
    for start in range(0, len(prompt_ids_all), prompts_per_batch):
        chunk = prompt_ids_all[start : start + prompts_per_batch]
        limits = None if max_new_tokens is None else max_new_tokens[start : start + prompts_per_batch]
        batch = tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt", padding_side="left")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        recorder = _SampledLogprobs()
        sequences = model.generate(
            **batch,
            do_sample=not greedy,
            # The warpers run inside `logits_processor`, so generate adds none of its own.
            temperature=None if greedy else 1.0,
            top_p=None if greedy else 1.0,
            top_k=None if greedy else 0,
            logits_processor=[*warpers, recorder],
            max_new_tokens=config.max_new_tokens if limits is None else max(limits),
            num_return_sequences=n,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stops,
        )
        new_tokens = sequences[:, 1:] if is_encoder_decoder else sequences[:, batch["input_ids"].shape[1] :]
        logprobs = recorder.finish(new_tokens)
        # Cut each row after its first stop token, on the device, then read the batch back once.
        is_stop = torch.isin(new_tokens, stop_tensor)
        if limits is not None:
            limit = torch.tensor(limits, device=new_tokens.device).repeat_interleave(n)
            is_stop &= torch.arange(new_tokens.shape[1], device=new_tokens.device)[None, :] < limit[:, None]
        finished = is_stop.any(dim=1)
        lengths = torch.where(finished, is_stop.int().argmax(dim=1) + 1, new_tokens.shape[1])
        if limits is not None:
            lengths = torch.minimum(lengths, limit)
        kept = torch.arange(new_tokens.shape[1], device=new_tokens.device)[None, :] < lengths[:, None]
        sums = torch.where(kept, logprobs, 0.0).sum(dim=1, dtype=torch.float64)
        for row, (tokens, length, done, total) in enumerate(
            zip(new_tokens.tolist(), lengths.tolist(), finished.tolist(), sums.tolist())
        ):
            yield start * n + row, tokens[:length], done, total
