"""Benchmark: bytes and time per weight version as a delta against the whole version, at the 0.5B shape.

    python jobs/bench_weight_delta.py [--lrs 1e-6 1e-5] [--steps 2] [--json out.json]

Builds the shape from its published config (Qwen2.5-0.5B's config.json) with random weights in memory,
trains fp32 masters with AdamW on random tokens, and per optimizer step publishes the version as the trainer
does (cast to bf16, `snapshot_from_model`), then:

  whole - the version's bytes, and one copy of them into a replica's own memory (what loading it costs)
  delta - `weight_delta` against the version before (what the trainer's node computes), its bytes (the
          broadcast moves these plus one int64 count per entry), and `apply_delta` into the replica in place

and checks the replica then holds exactly the masters cast to bf16 (`weights_checksum`). In one process, no
transport: the bytes are what a transport moves; the times are the two ends' own costs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import environment, parser, print_environment, write_json  # noqa: E402

from iterft_ray.weights.delta import apply_delta, weight_delta  # noqa: E402
from iterft_ray.weights.snapshot import _from_array, owned_copy, snapshot_from_model, weights_checksum  # noqa: E402


# Qwen2.5-0.5B's published config, the fields that set the size (as in jobs/bench_model_memory.py).
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                 rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu")


def replica_tensors(snapshot):
    return {n: _from_array(a, snapshot.dtypes[n]) for n, a in snapshot.arrays.items()}


def main() -> None:
    p = parser(__doc__, reps=1, warmup=0)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-6, 1e-5])
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", **QWEN2_05B)
    print_environment(environment())
    rows = []
    for lr in args.lrs:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        base = snapshot_from_model(model, 0, dtype=torch.bfloat16)
        replica = owned_copy(base)
        tensors = replica_tensors(replica)
        for version in range(1, args.steps + 1):
            ids = torch.randint(0, model.config.vocab_size, (1, 16))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            new = snapshot_from_model(model, version, dtype=torch.bfloat16)
            start = time.perf_counter()
            delta = weight_delta(base, new)
            delta_s = time.perf_counter() - start
            start = time.perf_counter()
            apply_delta(tensors, delta)
            apply_s = time.perf_counter() - start
            start = time.perf_counter()
            scratch = owned_copy(new)
            whole_s = time.perf_counter() - start
            del scratch
            assert weights_checksum(replica) == weights_checksum(model, torch.bfloat16), "replica differs"
            changed = sum(len(i) for i, _ in delta.changed.values())
            whole_entries = len(delta.whole)
            row = {"lr": lr, "version": version, "whole_bytes": new.nbytes, "delta_bytes": delta.nbytes,
                   "ratio": delta.nbytes / new.nbytes, "changed_elements": changed,
                   "entries_whole": whole_entries, "entries": len(new.arrays),
                   "delta_s": delta_s, "apply_s": apply_s, "whole_copy_s": whole_s}
            rows.append(row)
            print(f"lr {lr:g} v{version}: whole {new.nbytes / 1e9:.3f} GB, delta {delta.nbytes / 1e6:.1f} MB "
                  f"({100 * row['ratio']:.2f}%; {whole_entries}/{len(new.arrays)} entries whole); "
                  f"make delta {delta_s:.2f} s, apply {apply_s:.2f} s, whole copy {whole_s:.2f} s", flush=True)
            base = new
        del model, optimizer
    print("checked: after every version the replica holds exactly the fp32 masters cast to bf16")
    write_json(args.json, {"benchmark": "weight_delta", "shape": "qwen2.5-0.5b", "environment": environment(),
                           "rows": rows})


if __name__ == "__main__":
    main()
