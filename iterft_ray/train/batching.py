"""Texts and tensors -> examples -> padded micro-batches, with truncation and label masks.

An *example* is a dict of 1-D integer tensors: `input_ids`, `attention_mask` and
`labels`. Causal-LM labels are aligned with `input_ids` (the loss shifts them);
seq2seq labels are the target sequence. Label positions that must not be trained
on hold -100.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
TRUNCATION_MODES = ("keep_end", "keep_start")
Example = dict[str, torch.Tensor]


def truncate(seq: torch.Tensor, max_length: int | None, mode: str) -> torch.Tensor:
    """Cut a 1-D sequence to `max_length`: `keep_end` drops the start, `keep_start` the end."""
    if max_length is None or seq.shape[0] <= max_length:
        return seq
    return seq[-max_length:] if mode == "keep_end" else seq[:max_length]


def examples_from_tensors(
    input_ids: Sequence[torch.Tensor],
    attention_mask: Sequence[torch.Tensor] | None,
    labels: Sequence[torch.Tensor] | None,
    is_encoder_decoder: bool,
    max_length: int | None,
    truncation_mode: str,
) -> list[Example]:
    """Build examples from lists of 1-D tensors (already validated by the trainer).

    Causal LM: labels default to the inputs, and positions the attention mask hides
    become -100, so a pad that equals EOS is masked only where it is padding.
    """
    examples = []
    for i, ids in enumerate(input_ids):
        ids = ids.long()
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask[i].long()
        if is_encoder_decoder:
            lab = labels[i].long()
        else:
            lab = ids.clone() if labels is None else labels[i].long().clone()
            lab[mask == 0] = IGNORE_INDEX
        examples.append(
            {
                "input_ids": truncate(ids, max_length, truncation_mode),
                "attention_mask": truncate(mask, max_length, truncation_mode),
                "labels": truncate(lab, max_length, truncation_mode),
            }
        )
    return examples


def _prompt_token_count(offsets: list[tuple[int, int]], special: list[int], prompt_chars: int) -> int:
    """How many leading tokens belong to the prompt: specials and tokens ending inside it.

    A token that straddles the prompt/completion boundary counts as completion, so
    every completion character is trained on.
    """
    n = 0
    for (_, end), is_special in zip(offsets, special):
        if not is_special and end > prompt_chars:
            break
        n += 1
    return n


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    texts_labels: Sequence[str] | None,
    is_encoder_decoder: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Tokenise texts exactly as `tokenizer(text)` does; return (input_ids, labels) lists.

    Causal LM with `texts_labels`: the sequence is `texts[i] + texts_labels[i]` and only
    the completion's tokens are labels. Seq2seq: `texts_labels` are the targets.
    """
    if is_encoder_decoder:
        inputs = tokenizer(list(texts))["input_ids"]
        targets = tokenizer(text_target=list(texts_labels))["input_ids"]
        return [torch.tensor(x) for x in inputs], [torch.tensor(y) for y in targets]
    if texts_labels is None:
        ids = [torch.tensor(x) for x in tokenizer(list(texts))["input_ids"]]
        return ids, [x.clone() for x in ids]
    enc = tokenizer(
        [t + c for t, c in zip(texts, texts_labels)],
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    input_ids, labels = [], []
    for i, prompt in enumerate(texts):
        ids = torch.tensor(enc["input_ids"][i])
        lab = ids.clone()
        lab[: _prompt_token_count(enc["offset_mapping"][i], enc["special_tokens_mask"][i], len(prompt))] = (
            IGNORE_INDEX
        )
        input_ids.append(ids)
        labels.append(lab)
    return input_ids, labels


class PaddingCollator:
    """Pads a list of examples to the longest one in the list (right padding).

    Also the default `data_collator` for `evaluate()`: features may be lists or
    tensors, and a causal example without labels gets labels from its inputs.
    """

    def __init__(self, pad_token_id: int, is_encoder_decoder: bool = False):
        self.pad_token_id = pad_token_id
        self.is_encoder_decoder = is_encoder_decoder

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(f["input_ids"]).long() for f in features]
        masks = [
            torch.as_tensor(f["attention_mask"]).long() if "attention_mask" in f else torch.ones_like(x)
            for f, x in zip(features, ids)
        ]
        if all("labels" in f for f in features):
            labels = [torch.as_tensor(f["labels"]).long() for f in features]
        elif self.is_encoder_decoder:
            raise ValueError("labels: a seq2seq example needs `labels`")
        else:
            labels = [x.masked_fill(m == 0, IGNORE_INDEX) for x, m in zip(ids, masks)]
        return {
            "input_ids": _pad(ids, self.pad_token_id),
            "attention_mask": _pad(masks, 0),
            "labels": _pad(labels, IGNORE_INDEX),
        }


def _pad(seqs: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=value)


def plan_micro_batches(
    lengths: Sequence[int], micro_batch_size: int, accumulation_steps: int, strategy: str, seed: int
) -> list[list[list[int]]]:
    """Split example indices into updates, each a list of micro-batches of indices.

    `strategy` is `TrainingArguments.train_sampling_strategy`: `sequential` keeps the
    order given, `random` shuffles with `seed` first, and `group_by_length` sorts by
    length *inside* each update before cutting it into micro-batches: less padding
    and the same update, because the loss is normalised over the whole update.
    """
    order = list(range(len(lengths)))
    if strategy == "random":
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    per_update = micro_batch_size * accumulation_steps
    updates = []
    for start in range(0, len(order), per_update):
        idx = order[start : start + per_update]
        if strategy == "group_by_length":
            idx = sorted(idx, key=lambda i: lengths[i], reverse=True)
        updates.append([idx[j : j + micro_batch_size] for j in range(0, len(idx), micro_batch_size)])
    return updates
