"""Labels of a rollout row: the tokens the model sampled are targets, everything else is -100.

A single-turn row's completion is all sampled (its mask all ones); a trajectory's completion also
holds the chat template's tokens between turns and the environment's observations (mask 0), which
are context, never targets. Built here, in `train/`, so the rule that decides what a model learns from
lives beside the trainer that applies it, not in an actor.
"""

from __future__ import annotations

from iterft_ray.train.batching import IGNORE_INDEX


def rollout_labels(prompt_ids: list[int], completion_ids: list[int], completion_mask: list[int],
                   train_turns: str = "all", is_encoder_decoder: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels): causal, the prompt and completion with labels -100 on the prompt and wherever
    `completion_mask` is 0; `train_turns="last"` keeps only the last run of sampled tokens (the final
    assistant turn, its end-of-turn token included). Seq2seq: the prompt in, the completion as labels."""
    if is_encoder_decoder:
        return list(prompt_ids), list(completion_ids)
    mask = list(completion_mask)
    if train_turns == "last":
        mask = last_turn(mask)
    targets = [token if keep else IGNORE_INDEX for token, keep in zip(completion_ids, mask)]
    return list(prompt_ids) + list(completion_ids), [IGNORE_INDEX] * len(prompt_ids) + targets


def last_turn(mask: list[int]) -> list[int]:
    """`mask` with only its last run of ones kept."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return [0] * start + [1] * (end - start) + [0] * (len(mask) - end)
