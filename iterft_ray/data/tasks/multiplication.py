"""Multiplication of multi-digit numbers, the tool demo's task: the prompt "47*82=" has the answer "3854".

A product of two 2-digit numbers is beyond what a tiny model computes in its head. With the `calculator`
environment (`iterft demo tools`) it only has to copy the operands into a call, `<calc>47*82</calc>`, and
the result it reads back into its answer. The warm-up examples show that protocol as whole conversations
(`{"messages": [...]}`, the format of TRL's conversational datasets); with `tool=False` they are plain
`{"prompt", "completion"}` pairs instead, for the same model trained without the tool.
"""

from __future__ import annotations

import random


def build_splits(
    *,
    digits: int = 2,
    num_train: int = 2000,
    num_heldout: int = 200,
    num_warmup: int = 64,
    seed: int = 0,
    tool: bool = True,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Train prompts, held-out prompts and warm-up examples for products of two `digits`-digit numbers that have
    `2 * digits` digits (so every problem has the same layout: operands, call and answer at fixed positions).

    All (a, b) pairs are distinct across the three splits, drawn from `random.Random(seed)`.
    """
    if digits < 1 or min(num_train, num_heldout, num_warmup) < 0:
        raise ValueError(f"multiplication: expected digits >= 1 and sizes >= 0, got digits={digits}, "
                         f"num_train={num_train}, num_heldout={num_heldout}, num_warmup={num_warmup}")
    low, high = 10 ** (digits - 1), 10**digits
    candidates = [(a, b) for a in range(low, high) for b in range(low, high) if a * b >= 10 ** (2 * digits - 1)]
    needed = num_train + num_heldout + num_warmup
    if needed > len(candidates):
        raise ValueError(f"multiplication: digits={digits} gives {len(candidates)} problems, fewer than "
                         f"num_train + num_heldout + num_warmup = {needed}")
    pairs = random.Random(seed).sample(candidates, needed)
    heldout, train = pairs[:num_heldout], pairs[num_heldout:num_heldout + num_train]
    warmup = pairs[num_heldout + num_train:]
    rows = lambda ps, start: [{"prompt_id": start + i, "prompt": f"{a}*{b}=", "answer": str(a * b)}  # noqa: E731
                              for i, (a, b) in enumerate(ps)]
    examples = [demonstration(a, b, tool) for a, b in warmup] if num_warmup else []
    return rows(train, 0), rows(heldout, num_train), examples


def demonstration(a: int, b: int, tool: bool = True) -> dict:
    """One solved problem: with the tool, the conversation that calls it; without, the answer alone."""
    if not tool:
        return {"prompt": f"{a}*{b}=", "completion": str(a * b)}
    return {"messages": [{"role": "user", "content": f"{a}*{b}="},
                         {"role": "assistant", "content": f"<calc>{a}*{b}</calc>"},
                         {"role": "tool", "content": f"<result>{a * b}</result>"},
                         {"role": "assistant", "content": str(a * b)}]}


def check(completion: str, answer: str) -> bool:
    """True when the completion is exactly the product, give or take surrounding whitespace."""
    return completion.strip() == answer
