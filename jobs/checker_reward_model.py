"""A learned checker for the addition task: a tiny reward model trained to tell right sums from wrong ones.

For the comparison of a verifier with a reward model (RAFT): the exact checker is always right,
and this model is right only as often as it learned to be, so its false accept rate (wrong
answers it scores above its threshold) is how noisy a reward a run gets from it.

    python jobs/checker_reward_model.py --out runs/checker    # prints the JSON of the result

The pairs are the task's: each train prompt (and warm-up example) with its answer (label 1) and `wrong_per_prompt`
perturbed answers (label 0: a digit changed, one added or dropped, two swapped, the sum +-1),
held-out prompts the same way for the rates. The text is what the `reward_model` filter reads
(`iterft_ray.verify.reward_model.reward_texts`), and the rates are measured through that filter's
own `RewardScorer`, so they are the rates the filter has in a run. A plain torch loop on CPU.

Defaults on a loaded 2-core machine (2026-12-02, addition num_train 512, num_heldout 200, seed 0):
1500 updates in 54 s, false accept rate 0.415, false reject rate 0.12; at learning rate 3e-3 it
did worse (0.49 / 0.17 after 400 updates, 0.51 / 0.23 after 3000).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from iterft_ray.data.tasks import get_task
from iterft_ray.tiny import build_tiny_reward_model
from iterft_ray.verify.reward_model import RewardModel, RewardScorer, reward_texts


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer to an addition prompt: never equal to `answer` once stripped."""
    while True:
        kind = rng.randrange(5)
        digits = list(answer)
        if kind == 0:
            i = rng.randrange(len(digits))
            digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
        elif kind == 1:
            digits.insert(rng.randrange(len(digits) + 1), rng.choice("0123456789"))
        elif kind == 2 and len(digits) > 1:
            del digits[rng.randrange(len(digits))]
        elif kind == 3 and len(digits) > 1:
            i = rng.randrange(len(digits) - 1)
            digits[i], digits[i + 1] = digits[i + 1], digits[i]
        else:
            digits = list(str(max(0, int(answer) + rng.choice([-1, 1]))).zfill(len(answer)))
        wrong = "".join(digits)
        if wrong.strip() != answer.strip():
            return wrong


def labelled_pairs(prompts: list[dict], wrong_per_prompt: int, rng: random.Random) -> list[tuple[str, str, float]]:
    """(prompt, completion, label) pairs: each prompt's answer (1.0) and `wrong_per_prompt` wrong ones (0.0)."""
    pairs = []
    for row in prompts:
        pairs.append((row["prompt"], row["answer"], 1.0))
        pairs += [(row["prompt"], wrong_answer(row["answer"], rng), 0.0) for _ in range(wrong_per_prompt)]
    return pairs


def best_threshold(scores: list[float], labels: list[float]) -> float:
    """The threshold (accept: score > threshold) that makes fewest false accepts + false rejects on these pairs,
    each rate weighted by its class so that wrong answers, the more numerous, do not decide alone."""
    right = sum(labels) or 1.0
    wrong = (len(labels) - sum(labels)) or 1.0
    candidates = sorted(set(scores))
    cuts = [candidates[0] - 1.0] + [(a + b) / 2 for a, b in zip(candidates, candidates[1:])]

    def cost(cut: float) -> float:
        fa = sum(s > cut and y == 0 for s, y in zip(scores, labels)) / wrong
        fr = sum(s <= cut and y == 1 for s, y in zip(scores, labels)) / right
        return fa + fr

    return min(cuts, key=cost)


def rates(scores: list[float], labels: list[float], threshold: float) -> tuple[float, float]:
    """(false accept rate over the wrong answers, false reject rate over the right ones)."""
    wrong = [s for s, y in zip(scores, labels) if y == 0]
    right = [s for s, y in zip(scores, labels) if y == 1]
    fa = sum(s > threshold for s in wrong) / len(wrong) if wrong else 0.0
    fr = sum(s <= threshold for s in right) / len(right) if right else 0.0
    return fa, fr


def train_checker_reward_model(task_options: dict, out_dir: str, seed: int = 0, *, steps: int = 1500,
                               batch_size: int = 64, learning_rate: float = 1e-3, wrong_per_prompt: int = 2,
                               max_seconds: float = 120.0, threads: int | None = 1,
                               **model_overrides: Any) -> dict[str, Any]:
    """Train a tiny reward model on the addition task's right and wrong answers and save it to `out_dir`.

    `task_options` are the addition task's (`digits`, `num_train`, `num_heldout`, `reverse_answer`, ...);
    training stops after `steps` updates or `max_seconds`, whichever comes first. The threshold is
    chosen on the training pairs; the rates are measured on held-out prompts' pairs. Returns {"path",
    "false_accept_rate", "false_reject_rate", "threshold", "steps", "train_seconds", "heldout_pairs"}; the
    path is a `reward_model` filter's `model`. `threads`: torch CPU threads (None leaves torch's default).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    task = get_task("addition", **task_options)
    rng = random.Random(seed)
    warmup = [{"prompt": e["prompt"], "answer": e["completion"]} for e in task.warmup_examples]
    train = labelled_pairs(task.train_prompts + warmup, wrong_per_prompt, rng)
    heldout = labelled_pairs(task.heldout_prompts, wrong_per_prompt, rng)
    if not train or not heldout:
        raise ValueError("task_options: the addition task needs train and held-out prompts (num_train, num_heldout > 0)")

    path = build_tiny_reward_model(out_dir, seed=seed, **model_overrides)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    texts, templated = reward_texts(tokenizer, [p for p, _, _ in train], [c for _, c, _ in train])
    encoded = tokenizer(texts, add_special_tokens=not templated)["input_ids"]
    labels = torch.tensor([y for _, _, y in train])
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    start, done = time.monotonic(), 0
    while done < steps and time.monotonic() - start < max_seconds:
        rows = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
        logits = model(**batch).logits[:, 0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done += 1
    train_seconds = time.monotonic() - start
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)

    scorer = RewardScorer(RewardModel(str(Path(path).resolve()), batch_size=256), device="cpu")
    train_scores = scorer.score([p for p, _, _ in train], [c for _, c, _ in train])
    threshold = best_threshold(train_scores, [y for _, _, y in train])
    heldout_scores = scorer.score([p for p, _, _ in heldout], [c for _, c, _ in heldout])
    false_accept, false_reject = rates(heldout_scores, [y for _, _, y in heldout], threshold)
    return {"path": str(path), "false_accept_rate": false_accept, "false_reject_rate": false_reject,
            "threshold": threshold, "steps": done, "train_seconds": train_seconds, "heldout_pairs": len(heldout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where the model is saved")
    parser.add_argument("--task-options", default="{}", help='the addition task\'s options as JSON, e.g. {"digits": 2}')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    result = train_checker_reward_model(json.loads(args.task_options), args.out, args.seed, steps=args.steps,
                                        max_seconds=args.max_seconds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
