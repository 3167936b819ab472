"""Multi-digit addition: the prompt "37+45=" has the answer "82".

Prompts are short because the tiny models' tokenizer spends one token per character.
The model must answer with the sum's digits and nothing else.

With `reverse_answer=True` the sum is written least significant digit first ("28"
for 37+45), the order in which the carries are worked out: a model that writes one
token at a time then never needs a digit it has not computed yet, and tiny models
learn it in minutes on a CPU (see "Teaching Arithmetic to Small Transformers", Lee
et al. 2023). With `pad_operands=True` operands and sums are zero-padded to a fixed
width ("07+45=" -> "250" reversed), so every digit sits at the same position in every
problem: the model learns one alignment instead of one per operand length, the other
finding of that paper. The demo uses both.
"""

from __future__ import annotations

import random


def build_splits(
    *,
    digits: int = 2,
    num_train: int = 512,
    num_heldout: int = 200,
    num_warmup: int = 256,
    num_validation: int = 0,
    seed: int = 0,
    reverse_answer: bool = False,
    pad_operands: bool = False,
) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Train prompts, held-out prompts, warm-up examples and validation prompts for sums of two numbers.

    Operands have up to `digits` digits (0 to 10**digits - 1), so easy one-digit sums are
    mixed in. All (a, b) pairs are distinct across the four splits, drawn from
    `random.Random(seed)`; a ValueError says so when there are not enough pairs. The
    validation pairs are drawn after the others, so asking for them changes no other split.
    """
    if digits < 1 or min(num_train, num_heldout, num_warmup, num_validation) < 0:
        raise ValueError(
            f"addition: expected digits >= 1 and sizes >= 0, got digits={digits}, "
            f"num_train={num_train}, num_heldout={num_heldout}, num_warmup={num_warmup}, "
            f"num_validation={num_validation}"
        )
    numbers = 10**digits
    needed = num_heldout + num_train + num_warmup
    if needed + num_validation > numbers**2:
        raise ValueError(
            f"addition: digits={digits} gives {numbers**2} distinct (a, b) pairs, fewer than "
            f"num_train + num_heldout + num_warmup + num_validation = {needed + num_validation}"
        )
    rng = random.Random(seed)
    drawn = rng.sample(range(numbers**2), needed)
    taken, validation = set(drawn), []
    while len(validation) < num_validation:
        pick = rng.randrange(numbers**2)
        if pick not in taken:
            taken.add(pick)
            validation.append(divmod(pick, numbers))
    pairs = [divmod(i, numbers) for i in drawn]
    heldout = pairs[:num_heldout]
    train = pairs[num_heldout : num_heldout + num_train]
    warmup = pairs[num_heldout + num_train :]
    width = digits if pad_operands else 0
    question = lambda a, b: f"{a:0{width}d}+{b:0{width}d}="  # noqa: E731
    answer = lambda a, b: _answer(a + b, digits + 1 if pad_operands else 0, reverse_answer)  # noqa: E731
    train_prompts = [_prompt_row(i, question(a, b), answer(a, b)) for i, (a, b) in enumerate(train)]
    heldout_prompts = [_prompt_row(num_train + i, question(a, b), answer(a, b)) for i, (a, b) in enumerate(heldout)]
    warmup_examples = [{"prompt": question(a, b), "completion": answer(a, b)} for a, b in warmup]
    validation_prompts = [_prompt_row(num_train + num_heldout + i, question(a, b), answer(a, b))
                          for i, (a, b) in enumerate(validation)]
    return train_prompts, heldout_prompts, warmup_examples, validation_prompts


def _answer(total: int, width: int, reverse: bool) -> str:
    text = f"{total:0{width}d}"
    return text[::-1] if reverse else text


def _prompt_row(prompt_id: int, prompt: str, answer: str) -> dict:
    return {"prompt_id": prompt_id, "prompt": prompt, "answer": answer}


def check(completion: str, answer: str) -> bool:
    """True when the completion is exactly the answer, give or take surrounding whitespace.

    Strict on purpose: "82" matches "82", but "820", "82 and more" or "" do not, so a
    model that writes the right digits and then rambles is not rewarded for it.
    (Completions are decoded without special tokens, so an EOS does not show.)
    """
    return completion.strip() == answer
