"""Benchmark: `IterativeSFTTrainer.step()` against a plain PyTorch training loop (the floor).

    python jobs/bench_step.py [--json out.json] [--reps 5] [--threads 1]

One process, no Ray. A tiny Llama (hidden 256, 4 layers, built offline) and a batch of
64 random sequences with ragged lengths (32-96 tokens). Three sides, each with its own
copy of the same initial weights and its own optimizer, run interleaved per repetition:

  plain        the floor: the same micro-batches (16 sequences, consecutive, each padded
               to its own longest, padded before the timer starts), forward, masked
               token cross-entropy summed and divided by the update's target tokens,
               backward, accumulation 2, clip_grad_norm_(1.0), AdamW step, zero_grad
  step         trainer.step(input_ids=...) on the same sequences, sampling "sequential"
               (the same micro-batches as plain), same AdamW settings as plain
  step_grouped the same with train_sampling_strategy="group_by_length"

Target: step / plain <= 1.05 (median of per-repetition ratios of wall time; the ratio
of CPU time, which other processes' load does not inflate, is shown beside it). Also
reported: pad fraction and tokens/s (non-pad tokens per second) of "sequential" against
"group_by_length". plain and step start from the same weights and see the same
batches, so their losses must agree every repetition; the largest difference is shown.
The optimizer is the Trainer's default (AdamW, fused on torch >= 2.8); plain builds the
same one from the Trainer's settings.
"""

from __future__ import annotations

import os
import statistics
import tempfile

import torch
import torch.nn.functional as F

from bench_common import (column, environment, interleave, parser, print_environment, print_table, ratios,
                          verdict, write_json)
from iterft_ray.tiny import build_tiny_model
from iterft_ray.train.models import load_model
from iterft_ray.train.trainer import IterativeSFTConfig, IterativeSFTTrainer

MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4)
TARGET = 1.05


def make_batch(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(4, vocab, (length,), generator=g) for length in lengths]


def plain_batches(seqs: list[torch.Tensor], micro: int, accum: int, pad_id: int) -> list[list[dict]]:
    """Consecutive micro-batches of `micro` sequences, `accum` per update, right-padded to their own longest."""
    updates = []
    for u in range(0, len(seqs), micro * accum):
        mbs = []
        for m in range(u, min(u + micro * accum, len(seqs)), micro):
            chunk = seqs[m : m + micro]
            ids = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True, padding_value=pad_id)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in chunk], batch_first=True)
            labels = ids.masked_fill(mask == 0, -100)
            mbs.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        updates.append(mbs)
    return updates


class PlainLoop:
    """The floor: what one would write by hand for the same update."""

    def __init__(self, model: torch.nn.Module, optimizer_kwargs: dict, max_grad_norm: float):
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), **optimizer_kwargs)
        self.max_grad_norm = max_grad_norm

    def step(self, updates: list[list[dict]]) -> dict:
        model = self.model
        model.train()
        loss_sum, targets_total = torch.zeros(()), 0
        for mbs in updates:
            targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in mbs)
            for b in mbs:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                       ignore_index=-100, reduction="sum")
                (loss / targets).backward()
                loss_sum += loss.detach()
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            targets_total += targets
        return {"loss": loss_sum.item() / targets_total}


def main() -> None:
    p = parser(__doc__, reps=5, warmup=1)
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on the shared 2-core machine two threads measured 3-6x "
                        "slower than one, spin-waiting on each other under load)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)

    tmp = tempfile.mkdtemp(prefix="bench_step_")
    path = build_tiny_model("tiny-llama", os.path.join(tmp, "model"), **MODEL)
    trainers = {}
    for strategy in ("sequential", "group_by_length"):
        cfg = IterativeSFTConfig(
            output_dir=os.path.join(tmp, strategy), report_to="none", learning_rate=1e-4,
            per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.accumulation,
            train_sampling_strategy=strategy, max_grad_norm=1.0, weight_decay=0.0, logging_strategy="no",
            save_strategy="no",
            use_cpu=True,
        )
        trainers[strategy] = IterativeSFTTrainer(load_model(str(path)), cfg, processing_class=_tokenizer(path))
    opt = trainers["sequential"].optimizer.optimizer  # accelerate wraps it
    opt_kwargs = {k: opt.defaults[k] for k in ("lr", "betas", "eps", "foreach", "fused")}
    # The Trainer puts weight decay in its parameter groups (0.0 in all of them here), not in the defaults.
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert len(decays) == 1, decays
    opt_kwargs["weight_decay"] = decays.pop()
    plain = PlainLoop(load_model(str(path)), opt_kwargs, max_grad_norm=1.0)
    n_params = sum(p.numel() for p in plain.model.parameters())

    vocab = plain.model.config.vocab_size
    seqs = make_batch(args.sequences, args.min_len, args.max_len, vocab)
    pad_id = trainers["sequential"].tokenizer.pad_token_id
    updates = plain_batches(seqs, args.micro_batch, args.accumulation, pad_id)
    real = sum(len(s) for s in seqs)
    padded = sum(b["input_ids"].numel() for mbs in updates for b in mbs)
    print(f"model: tiny-llama {n_params / 1e6:.2f}M params {MODEL}; batch {len(seqs)} sequences of "
          f"{args.min_len}-{args.max_len} tokens ({real} tokens), micro-batch {args.micro_batch} x accumulation "
          f"{args.accumulation}; optimizer AdamW {opt_kwargs}; {args.reps} reps after {args.warmup} warm-up")

    def run_step(strategy):
        def fn():
            s = trainers[strategy].step(input_ids=seqs)
            return {"loss": s["loss"], "pad_fraction": s["pad_fraction"], "tokens": s["num_tokens"],
                    "inner_s": s["step_time"]}
        return fn

    sides = {
        "plain": lambda: {**plain.step(updates), "pad_fraction": 1 - real / padded, "tokens": real},
        "step": run_step("sequential"),
        "step_grouped": run_step("group_by_length"),
    }
    res = interleave(sides, args.reps, args.warmup)
    for rows in res.values():
        for r in rows:
            r["tokens_per_s"] = r["tokens"] / r["s"]

    step_over_plain = ratios(res["step"], res["plain"])
    cpu_step_over_plain = ratios(res["step"], res["plain"], "cpu_s")
    grouped_over_step = ratios(res["step"], res["step_grouped"])  # >1: grouping is faster
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(res["step"], res["plain"]))
    table = print_table("seconds per call and throughput (median of the timed repetitions)", [
        ("plain loop: s", column(res["plain"], "s"), "s"),
        ("step() sequential: s", column(res["step"], "s"), "s"),
        ("step() sequential: inner step_time", column(res["step"], "inner_s"), "s"),
        ("step() group_by_length: s", column(res["step_grouped"], "s"), "s"),
        ("plain loop: tokens/s", column(res["plain"], "tokens_per_s"), "tok/s"),
        ("step() sequential: tokens/s", column(res["step"], "tokens_per_s"), "tok/s"),
        ("step() group_by_length: tokens/s", column(res["step_grouped"], "tokens_per_s"), "tok/s"),
        ("step() sequential: pad fraction", column(res["step"], "pad_fraction"), ""),
        ("step() group_by_length: pad fraction", column(res["step_grouped"], "pad_fraction"), ""),
        ("plain loop: CPU s", column(res["plain"], "cpu_s"), "cpu s"),
        ("step() sequential: CPU s", column(res["step"], "cpu_s"), "cpu s"),
        ("step() group_by_length: CPU s", column(res["step_grouped"], "cpu_s"), "cpu s"),
        ("ratio step / plain (per rep)", step_over_plain, "x"),
        ("CPU-time ratio step / plain (per rep)", cpu_step_over_plain, "x"),
        ("speed-up group_by_length over sequential", grouped_over_step, "x"),
    ])
    print(f"largest |loss(step) - loss(plain)| over the reps: {loss_diff:.2e} (same work on both sides)")
    result = verdict("step() / plain loop (wall)", statistics.median(step_over_plain), TARGET, per_rep=step_over_plain)
    cpu_result = verdict("step() / plain loop (CPU time)", statistics.median(cpu_step_over_plain), TARGET,
                         per_rep=cpu_step_over_plain)
    write_json(args.json, {
        "benchmark": "step", "environment": env, "model": {**MODEL, "n_params": n_params},
        "batch": {"sequences": len(seqs), "tokens": real, "min_len": args.min_len, "max_len": args.max_len,
                  "micro_batch": args.micro_batch, "accumulation": args.accumulation},
        "optimizer": opt_kwargs, "reps": args.reps, "warmup": args.warmup, "table": table,
        "max_loss_difference": loss_diff, "raw": res, "target": result, "target_cpu_time": cpu_result,
    })


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


if __name__ == "__main__":
    main()
