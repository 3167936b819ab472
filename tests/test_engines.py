"""The hf engine: sampled-token log-probs without full-vocabulary scores, the model's own stop tokens,
and `sampling.engine` checked at load."""

import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TemperatureLogitsWarper, TopKLogitsWarper

from iterft_ray.config import SamplingConfig, load_config
from iterft_ray.engines.hf_sampling import sample_rollouts, stop_token_ids
from iterft_ray.tiny import build_tiny_model

PROMPTS = pa.Table.from_pylist([{"prompt_id": i, "prompt": p} for i, p in enumerate(["12+30=", "7+5=", "100+1="])])


def _sample(model, tokenizer, config, seed=0):
    return sample_rollouts(model, tokenizer, PROMPTS, config, seed=seed, weight_version=3, generator_id=1,
                           round_index=2)


def reference_logprobs(model, prompt_ids, completion_ids, warpers=()):
    """Per-token log-probs of `completion_ids` from one plain forward pass, after `warpers`."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    for warp in warpers:
        logits = warp(ids, logits)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion_ids)[:, None]).squeeze(1)


def test_logprob_sum_is_the_sampled_tokens_logprob_under_the_warped_distribution(llama_path):
    model = AutoModelForCausalLM.from_pretrained(llama_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    config = SamplingConfig(num_samples=4, temperature=0.7, top_k=20, max_new_tokens=12, batch_size=5)
    table = _sample(model, tokenizer, config)
    assert table.num_rows == 12 and table.column("weight_version").to_pylist() == [3] * 12
    assert table.equals(_sample(model, tokenizer, config))  # same seed, same rows
    warpers = (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20))
    for row in table.to_pylist():
        expected = reference_logprobs(model, row["prompt_ids"], row["completion_ids"], warpers)
        assert abs(row["logprob_sum"] - float(expected.sum())) < 2e-3 * len(row["completion_ids"]), row["sample_id"]

    greedy = _sample(model, tokenizer, SamplingConfig(temperature=0, max_new_tokens=8))
    assert greedy.num_rows == 3
    for row in greedy.to_pylist():
        expected = reference_logprobs(model, row["prompt_ids"], row["completion_ids"])
        assert abs(row["logprob_sum"] - float(expected.sum())) < 2e-3 * len(row["completion_ids"])


def test_generation_stops_at_every_stop_token_of_the_model(llama_path, tmp_path):
    """Llama-3-Instruct style: generation_config.eos_token_id is a list; any of them ends a completion."""
    model = AutoModelForCausalLM.from_pretrained(llama_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    greedy = SamplingConfig(temperature=0, max_new_tokens=8)
    free = _sample(model, tokenizer, greedy).to_pylist()
    first = free[0]["completion_ids"][0]
    assert first != tokenizer.eos_token_id and not free[0]["finished"]

    model.generation_config.eos_token_id = [first, tokenizer.eos_token_id]
    assert stop_token_ids(model.generation_config, tokenizer) == [first, tokenizer.eos_token_id]
    stopped = _sample(model, tokenizer, greedy).to_pylist()
    assert stopped[0]["completion_ids"] == [first] and stopped[0]["finished"]
    for before, after in zip(free, stopped):  # every row is cut at its first stop token, kept included
        ids = before["completion_ids"]
        cut = next((i + 1 for i, t in enumerate(ids) if t == first), len(ids))
        assert after["completion_ids"] == ids[:cut] and after["finished"] == (cut < len(ids) or ids[-1] == first)


def test_peak_memory_does_not_grow_with_vocabulary_times_new_tokens(tmp_path):
    """32 sequences over a 65536-token vocabulary, 4 then 64 new tokens, each in a fresh process: keeping
    every step's scores would add 32 x 65536 x 60 fp32 = 503 MB (times the copies); recording only the
    sampled tokens holds one step (8 MB). Allocations of 1 MB and more are mmapped at a fixed threshold,
    so freed ones leave the peak RSS and it measures live memory, not the allocator's caching."""
    path = build_tiny_model("tiny-llama", tmp_path / "wide", vocab_size=65536)
    script = textwrap.dedent(f"""
        import resource, sys, pyarrow as pa
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from iterft_ray.config import SamplingConfig
        from iterft_ray.engines.hf_sampling import sample_rollouts
        model = AutoModelForCausalLM.from_pretrained({str(path)!r}).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(path)!r})
        prompts = pa.Table.from_pylist([{{"prompt_id": i, "prompt": f"{{i}}+{{i}}="}} for i in range(8)])
        config = SamplingConfig(num_samples=4, max_new_tokens=int(sys.argv[1]), batch_size=32)
        table = sample_rollouts(model, tokenizer, prompts, config, 0, 0, 0, 0)
        print(sum(map(len, table.column("completion_ids").to_pylist())),
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}

    def peak(new_tokens):
        out = subprocess.run([sys.executable, "-c", script, str(new_tokens)], capture_output=True, text=True,
                             env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return tuple(map(int, out.stdout.split()[-2:]))

    (_, short), (tokens, long) = peak(4), peak(64)
    assert tokens > 32 * 48  # most rows ran (nearly) all 64 steps
    assert long - short < 32 * 65536 * 60 * 4 / 8, f"peak RSS grew {(long - short) / 1e6:.0f} MB over 60 more steps"


def test_unknown_engine_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"sampling\.engine: expected 'hf' or 'vllm', got 'sglang'"):
        load_config({"model": {"name_or_path": "tiny-llama"}, "sampling": {"engine": "sglang"}})
    with pytest.raises(ValueError, match=r"sampling\.engine"):
        SamplingConfig(engine="HF")
    with pytest.raises(ValueError, match=r"sampling\.temperature: the vllm engine takes at most 2"):
        load_config({"model": {"name_or_path": "tiny-llama"}, "sampling": {"engine": "vllm", "temperature": 2.5}})
    assert load_config({"model": {"name_or_path": "tiny-llama"}, "sampling": {"engine": "vllm"}}).sampling.engine == "vllm"
