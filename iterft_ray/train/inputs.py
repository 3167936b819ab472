"""`step()` arguments -> examples, refused before anything trains.

Every error names the argument (and the item: `labels[2]`), and all of them are raised
before the first update, so a bad call leaves the weights and `global_step` as they were.
"""

from __future__ import annotations

import warnings

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from iterft_ray.train.batching import IGNORE_INDEX, Example, encode_texts, examples_from_tensors


def step_examples(
    input_ids: Any,
    attention_mask: Any,
    labels: Any,
    texts: Any,
    texts_labels: Any,
    *,
    tokenizer: PreTrainedTokenizerBase,
    is_encoder_decoder: bool,
    vocab_size: int,
    max_positions: int | None,
    max_length: int | None,
    truncation_mode: str,
) -> list[Example]:
    """Validate `step()` arguments and turn them into examples (truncated to `max_length`).

    Any sequence is taken for a list (TRL's own tests pass `datasets` columns). An example
    longer than the model's `max_positions` is refused: position embeddings past it do not exist.
    """
    input_ids, attention_mask, labels, texts, texts_labels = (
        _as_list(v) for v in (input_ids, attention_mask, labels, texts, texts_labels)
    )
    if (texts is None) == (input_ids is None):
        raise ValueError("texts, input_ids: give exactly one of them")
    if texts is not None:
        if attention_mask is not None or labels is not None:
            raise ValueError("attention_mask, labels: only with input_ids; with texts use texts_labels")
        _check_str_list("texts", texts)
        if texts_labels is not None:
            _check_str_list("texts_labels", texts_labels, len(texts))
        elif is_encoder_decoder:
            raise ValueError("texts_labels: required for a seq2seq model (the targets of the texts)")
        if not any(texts) and not any(texts_labels or ()):
            warnings.warn("texts: every text is empty, so this step trains on nothing (loss nan, 0 updates)",
                          stacklevel=4)
        input_ids, labels = encode_texts(tokenizer, texts, texts_labels, is_encoder_decoder)
    else:
        if texts_labels is not None:
            raise ValueError("texts_labels: only with texts; with input_ids use labels")
        _check_tensor_list("input_ids", input_ids, vocab_size=vocab_size)
        if attention_mask is not None:
            _check_tensor_list("attention_mask", attention_mask, like=input_ids)
            if any(bool(((m != 0) & (m != 1)).any()) for m in attention_mask):
                raise ValueError("attention_mask: expected only 0 and 1")
        if labels is not None:
            like = None if is_encoder_decoder else input_ids
            _check_tensor_list("labels", labels, like=like, count=len(input_ids))
            for i, lab in enumerate(labels):
                if not bool(((lab == IGNORE_INDEX) | ((lab >= 0) & (lab < vocab_size))).all()):
                    raise ValueError(f"labels[{i}]: token ids must lie in [0, {vocab_size}) or be {IGNORE_INDEX}")
        elif is_encoder_decoder:
            raise ValueError("labels: required for a seq2seq model (the target token ids)")
    examples = examples_from_tensors(input_ids, attention_mask, labels, is_encoder_decoder, max_length, truncation_mode)
    for i, example in enumerate(examples):
        if max_positions is not None and len(example["input_ids"]) > max_positions:
            name = "texts" if texts is not None else "input_ids"
            raise ValueError(
                f"{name}[{i}]: {len(example['input_ids'])} tokens, more than the model's {max_positions} positions; "
                "set max_length"
            )
    return examples


def _as_list(value: Any) -> Any:
    """`value` as a list when it is a non-string sequence; anything else unchanged for the checks to name."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, list, tuple)):
        return list(value)
    return value


def _check_str_list(name: str, value: Any, count: int | None = None) -> None:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list of strings, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name}: expected a non-empty list")
    if count is not None and len(value) != count:
        raise ValueError(f"{name}: expected {count} items (one per text), got {len(value)}")
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise TypeError(f"{name}[{i}]: expected a string, got {type(s).__name__}")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{name}[{i}]: not valid Unicode text ({e.reason})") from None


def _check_tensor_list(
    name: str,
    value: Any,
    like: Sequence[torch.Tensor] | None = None,
    count: int | None = None,
    vocab_size: int | None = None,
) -> None:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list of 1-D tensors, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name}: expected a non-empty list")
    count = len(like) if like is not None else count
    if count is not None and len(value) != count:
        raise ValueError(f"{name}: expected {count} tensors (one per input_ids), got {len(value)}")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"{name}[{i}]: expected a non-empty 1-D tensor, got shape {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name}[{i}]: expected an integer tensor, got {t.dtype}")
        if like is not None and t.shape != like[i].shape:
            raise ValueError(f"{name}[{i}]: expected shape {tuple(like[i].shape)} like input_ids[{i}], got {tuple(t.shape)}")
        if vocab_size is not None and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
            raise ValueError(f"{name}[{i}]: token ids must lie in [0, {vocab_size}), got {int(t.min())}..{int(t.max())}")
