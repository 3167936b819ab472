"""Multi-turn environments (`env:`): trajectories sampled turn by turn, token-exact, with the loss mask.

A run is `iterft run` of a config with an `env:` section, on a tiny chat Llama whose tokenizer has BPE
merges (`build_tiny_model(merges=True)`): decoding a sampled turn and encoding it again gives other ids,
so a runner that re-tokenized would fail the log-prob check. The environments named by import string
are tests/toy_envs.py's; SkyRL-gym's `gsm8k_multi_turn` comes from the skyrl-gym package as it is.
"""

import json

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from iterft_ray.cli import main
from iterft_ray.config import load_config
from iterft_ray.data.warmup import load_warmup_file
from iterft_ray.envs.calculator import CalculatorEnv, evaluate
from iterft_ray.envs.protocol import resolve_env
from iterft_ray.envs.retry import RetryEnv
from iterft_ray.envs.turns import TurnTemplate
from iterft_ray.engines.hf_sampling import stop_token_ids
from iterft_ray.tiny import build_tiny_model
from iterft_ray.train.labels import last_turn, rollout_labels

pytestmark = pytest.mark.usefixtures("warm_actors")


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory):
    return str(build_tiny_model("tiny-llama", tmp_path_factory.mktemp("envs") / "llama", chat_template=True,
                                merges=True, num_attention_heads=2, num_key_value_heads=2))


@pytest.fixture(scope="module")
def tokenizer(chat_path):
    return AutoTokenizer.from_pretrained(chat_path)


def _config(model, out, prompts_file, env, **sections):
    return {
        "model": {"name_or_path": model},
        "data": {"task": None, "prompts_file": str(prompts_file), "chat_template": True},
        "env": env,
        "sampling": {"num_samples": 2, "max_new_tokens": 5},
        "trainer": {"learning_rate": 1e-3, "per_device_train_batch_size": 16, "optim": "adamw_torch",
                    "max_length": 256},
        "resources": {"num_generators": 1, "filter_pool_size": 1},
        "loop": {"rounds": 1, "prompts_per_round": 6, "save_every": 10, "output_dir": str(out)},
        **sections,
    }


def _write(path, data):
    path.write_text(data if isinstance(data, str) else "\n".join(json.dumps(r) for r in data))
    return path


def _runs(mask):
    """(start, end, value) of each run of equal values in a mask."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((start, i, mask[start]))
            start = i
    return runs


# ------------------------------------------------------------------ no Ray


def test_env_names_resolve_or_fail_at_load(chat_path, tmp_path):
    assert callable(resolve_env("calculator")) and callable(resolve_env("toy_envs:CountdownEnv"))
    assert callable(resolve_env("skyrl_gym:gsm8k_multi_turn"))
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "1+1", "answer": "2"}])
    base = _config(chat_path, tmp_path / "run", prompts, {"name": "calculator"})
    assert load_config(base).filters == []  # with env:, no default filter
    bad = [
        ({"env": {"name": "calculater"}}, "env.name: 'calculater' is not a built-in environment"),
        ({"env": {"name": "no_such_module:Env"}}, "env.name: 'no_such_module:Env': cannot import no_such_module"),
        ({"env": {"name": "toy_envs:NoStep"}}, "env.name: 'toy_envs:NoStep': NoStep is not an environment class"),
        ({"env": {"name": "skyrl_gym:nope"}}, "SkyRL-gym has no environment 'nope'"),
        ({"env": {"name": "calculator", "train_turns": "first"}}, "env.train_turns: expected 'all' or 'last'"),
        ({"data": {**base["data"], "chat_template": False}}, "set data.chat_template: true"),
        ({"recipe": {"rationalize": True, "hint_template": "{prompt}"}}, "recipe.rationalize:"),
        ({"model": {"name_or_path": "tiny-t5"}}, "is a seq2seq model"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError) as e:
            load_config({**base, **change})
        assert message in str(e.value) and "\n" not in str(e.value)
    # The command line says it in one line, exit 2, before any actor starts.
    config = _write(tmp_path / "bad.yaml", json.dumps({**base, "env": {"name": "calculater"}}))
    assert main(["run", str(config)]) == 2
    assert not (tmp_path / "run").exists()


def test_calculator_parses_never_evals():
    assert evaluate("12*(3+4) - 6/4") == evaluate("82.5")
    for expression in ("__import__('os').system('true')", "2**999999", "x + 1"):
        with pytest.raises((ValueError, SyntaxError)):
            evaluate(expression)
    env = CalculatorEnv({}, {"answer": "1554", "max_turns": 3})
    out = env.step("I will use it: <calc>37*42</calc>")
    assert out["observations"] == [{"role": "tool", "content": "<result>1554</result>"}] and not out["done"]
    out = env.step("1554")
    assert out["done"] and out["reward"] == 1.0 and env.get_metrics() == {"calls": 1}


def test_retry_gives_another_try_with_the_row_checker():
    env = RetryEnv({"filter": "exact_answer"}, {"answer": "5", "max_turns": 2})
    env.init([{"role": "user", "content": "2+3="}])
    wrong = env.step("6")
    assert wrong["reward"] == 0.0 and not wrong["done"] and wrong["observations"][0]["content"] == "wrong, try again"
    right = env.step("5")
    assert right["reward"] == 1.0 and right["done"]


def test_observation_ids_are_the_templates_tokens_between_turns(tokenizer):
    stops = stop_token_ids(None, tokenizer) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    template = TurnTemplate(tokenizer, stops)
    ids = template.observation_ids([{"role": "user", "content": "left: 2"}])
    assert tokenizer.decode(ids) == "\n<|im_start|>user\nleft: 2<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode([template.end_of_turn]) == "<|im_end|>"


def test_labels_mask_observations_and_keep_the_last_turn():
    prompt, completion = [1, 2], [10, 11, 12, 20, 21, 13, 14, 22]
    mask = [1, 1, 1, 0, 0, 1, 1, 0]
    ids, labels = rollout_labels(prompt, completion, mask)
    assert ids == prompt + completion
    assert labels == [-100, -100, 10, 11, 12, -100, -100, 13, 14, -100]
    assert last_turn(mask) == [0, 0, 0, 0, 0, 1, 1, 0]
    assert rollout_labels(prompt, completion, mask, "last")[1] == [-100] * 7 + [13, 14, -100]


def test_a_warm_up_conversation_trains_the_assistant_turns_only(tokenizer, chat_path, tmp_path):
    """`{"messages": [...]}` demonstrations (TRL's conversational format): each assistant turn up to its end-of-turn
    token is a target; the user's and the tool's messages and the template's tokens between turns are not."""
    messages = [{"role": "user", "content": "47*82="}, {"role": "assistant", "content": "<calc>47*82</calc>"},
                {"role": "tool", "content": "<result>3854</result>"}, {"role": "assistant", "content": "3854"}]
    template = TurnTemplate(tokenizer, tokenizer.all_special_ids)
    ids, labels = template.conversation_ids(messages)
    assert tokenizer.decode(ids) + "\n" == tokenizer.apply_chat_template(messages, tokenize=False)
    targets = [token for token, label in zip(ids, labels) if label != -100]
    assert tokenizer.decode(targets) == "<calc>47*82</calc><|im_end|>3854<|im_end|>"
    # Built as a trajectory is: the prompt's ids, then the turn, then the template's ids after it.
    turn = tokenizer("<calc>47*82</calc>", add_special_tokens=False)["input_ids"] + [template.end_of_turn]
    start = template.prompt_ids(messages[:1])
    assert ids[: len(start) + len(turn)] == start + turn
    between = template.observation_ids(messages[2:3])
    assert ids[len(start) + len(turn):][: len(between)] == between
    lines = _write(tmp_path / "demos.jsonl", [{"messages": messages}, {"prompt": "1+1=", "completion": "2"}])
    assert load_warmup_file(lines)[0] == {"messages": messages}
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "1+1", "answer": "2"}])
    config = _config(chat_path, tmp_path / "run", prompts, {"name": "calculator"})
    config["data"].update(warmup_file=str(lines), chat_template=False)
    config["loop"]["warmup_passes"] = 1
    del config["env"]
    with pytest.raises(ValueError, match="data.warmup_file: conversations .* set data.chat_template: true"):
        load_config(config)


# ------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def countdown_run(chat_path, tmp_path_factory, shared_ray):
    """`iterft run` with an environment by import string; two rows name a faulty one (`env_class`): one raises in
    `step`, one hangs past `env.turn_timeout_s`."""
    shared_ray.up()
    tmp = tmp_path_factory.mktemp("countdown")
    rows = [{"prompt": f"Count down from {i}.", "prompt_id": i} for i in range(6)]
    rows[0]["env_class"] = rows[1]["env_class"] = "toy_envs:FaultyEnv"  # prompt ids 0 (raises) and 1 (hangs)
    prompts = _write(tmp / "prompts.jsonl", rows)
    out = tmp / "run"
    config = _config(chat_path, out, prompts, {"name": "toy_envs:CountdownEnv", "max_turns": 3, "turn_timeout_s": 3,
                                               "groups": 2})
    assert main(["run", str(_write(tmp / "config.yaml", json.dumps(config)))]) == 0
    table = pq.read_table(out / "rounds" / "0001" / "generations.parquet")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return table, metrics[-1]


def test_trajectories_mask_observations_and_keep_sampled_ids(countdown_run, tokenizer, chat_path):
    table, _ = countdown_run
    rows = [r for r in table.to_pylist() if r["prompt_id"] >= 2]
    assert len(rows) == 8
    model = AutoModelForCausalLM.from_pretrained(chat_path).eval()  # the weights that sampled them (version 0)
    stops = stop_token_ids(model.generation_config, tokenizer)
    template = TurnTemplate(tokenizer, stops)
    for row in rows:
        assert row["turns"] == 3 and row["finished"] and not row["truncated"] and row["env_error"] is None
        assert row["env_reward"] == 1.0 and row["step_rewards"] == [0.0, 0.0, 1.0] and row["accepted"]
        messages = json.loads(row["messages"])
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
        assert row["prompt_ids"] == template.prompt_ids(messages[:1])
        mask, ids = row["completion_mask"], row["completion_ids"]
        assert len(mask) == len(ids)
        runs = _runs(mask)
        sampled = [ids[a:b] for a, b, v in runs if v == 1]
        between = [ids[a:b] for a, b, v in runs if v == 0]
        assert len(sampled) == 3 and len(between) == 2
        for turn, message in zip(sampled, messages[1::2]):
            assert tokenizer.decode(turn, skip_special_tokens=True) == message["content"]
        for k, (observed, turn) in enumerate(zip(between, sampled)):
            cut = [] if turn[-1] in stops else [template.end_of_turn]  # a turn cut by max_new_tokens is closed
            assert observed == cut + template.observation_ids([{"role": "user", "content": f"left: {2 - k}"}])
        assert row["completion"] == messages[-1]["content"]
        # The log-probability of exactly the sampled ids under the sampling weights (temperature 1).
        full = torch.tensor([row["prompt_ids"] + ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(full).logits[0, :-1].double(), dim=-1)
        start = len(row["prompt_ids"])
        total = sum(logprobs[start + i - 1, t].item() for i, (t, m) in enumerate(zip(ids, mask)) if m)
        assert abs(total - row["logprob_sum"]) < 1e-3
    # A re-tokenizing runner would not keep these ids: the BPE merges give other ids for some sampled turn.
    turns = [ids[a:b] for row in rows for a, b, v in _runs(row["completion_mask"]) if v == 1
             for ids in [row["completion_ids"]]]
    assert any(tokenizer(tokenizer.decode(t), add_special_tokens=False)["input_ids"] != t for t in turns)


def test_environment_errors_end_only_their_trajectories(countdown_run):
    table, metrics = countdown_run
    errors = {r["prompt_id"]: r["env_error"] for r in table.to_pylist() if r["prompt_id"] < 2}
    raised = [r for r in table.to_pylist() if r["prompt_id"] == 0]
    assert all("RuntimeError: the simulator crashed" in r["env_error"] and not r["accepted"] for r in raised)
    hung = [r for r in table.to_pylist() if r["prompt_id"] == 1]
    assert all("CallTimeout" in r["env_error"] and not r["accepted"] for r in hung), errors
    assert metrics["env_errors"] == 4 and metrics["filter_errors"] == 0
    assert metrics["accepted"] == 8 and metrics["train_rows"] == 8
    # Trained on the sampled tokens only: the mask's ones of the accepted rows.
    accepted = [r for r in table.to_pylist() if r["accepted"]]
    assert metrics["num_target_tokens"] == sum(sum(r["completion_mask"]) for r in accepted)
    assert metrics["turns_mean"] > 2 and metrics["truncation_rate"] == 0.0
    # The environments' get_metrics(): 3 turns each; the one that raised closed after 0; the hung one's process was
    # killed, so it has none.
    reported = [json.loads(r["env_metrics"]) for r in table.to_pylist()]
    assert sorted(m.get("countdown_turns") for m in reported if m) == [0, 0] + [3] * 8
    # Two environments ran (the rows' env_class): each one's metrics apart, under its name.
    assert metrics["env_metrics/toy_envs:CountdownEnv/countdown_turns"] == 3.0
    assert metrics["env_metrics/toy_envs:FaultyEnv/countdown_turns"] == 0.0


def test_skyrl_gym_environment_runs_unchanged(chat_path, tmp_path, shared_ray):
    """SkyRL-gym's gsm8k_multi_turn, by name, on rows as SkyRL's data sets have them (`reward_spec`), trained on
    the last turn only."""
    shared_ray.up()
    rows = [{"prompt": f"Tom has {i} apples and buys 2. How many?", "reward_spec": {"ground_truth": str(i + 2)},
             "env_class": "gsm8k_multi_turn"} for i in range(4)]
    prompts = _write(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "run"
    config = _config(chat_path, out, prompts, {"name": "skyrl_gym:gsm8k_multi_turn", "max_turns": 2, "min_score": 0,
                                               "train_turns": "last"})
    config["loop"]["prompts_per_round"] = 4
    assert main(["run", str(_write(tmp_path / "config.yaml", json.dumps(config)))]) == 0
    table = pq.read_table(out / "rounds" / "0001" / "generations.parquet").to_pylist()
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(r["env_error"] is None and r["turns"] == 2 for r in table)  # a wrong answer gets a second turn
    assert all(json.loads(r["messages"])[2]["content"].startswith("Now provide only the final") for r in table)
    accepted = [r for r in table if r["accepted"]]
    assert accepted and metrics["train_rows"] == len(accepted)
    assert metrics["num_target_tokens"] == sum(sum(last_turn(r["completion_mask"])) for r in accepted)
    # Aggregated by the class's own aggregate_metrics (SkyRL-gym's gsm8k_multi_turn names it avg_steps).
    assert metrics["env_metrics/avg_steps"] == 2.0 and "env_metrics/steps" not in metrics
    assert {r["env_name"] for r in table} == {"skyrl_gym:gsm8k_multi_turn"}


def test_async_run_with_an_environment_killed_and_resumed_ends_with_the_same_weights(chat_path, tmp_path, shared_ray):
    """A deterministic environment, async mode (staleness 1): a driver SIGKILLed after its first checkpoint and
    resumed ends with the weights, metrics and trajectories of the run that was not killed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from iterft_ray.run.run_dir import latest_checkpoint

    shared_ray.up()
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": f"Count down from {i}.", "prompt_id": i}
                                                  for i in range(12)])

    def config(run_dir):
        c = _config(chat_path, run_dir, prompts, {"name": "toy_envs:CountdownEnv", "max_turns": 2, "groups": 2})
        c["loop"].update(rounds=3, prompts_per_round=4, save_every=1, async_mode=True, max_staleness=1)
        return str(_write(tmp_path / f"{run_dir.name}.yaml", json.dumps(c)))

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main(["run", config(straight)]) == 0
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    driver = subprocess.Popen([sys.executable, "-m", "iterft_ray", "run", config(broken)], env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while latest_checkpoint(broken) is None:
        assert driver.poll() is None and time.time() < deadline
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    assert latest_checkpoint(broken).name != "round-0003"
    assert main(["run", config(broken), "--resume"]) == 0

    a = load_file(str(straight / "checkpoints" / "round-0003" / "model.safetensors"))
    b = load_file(str(broken / "checkpoints" / "round-0003" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for r in range(1, 4):
        x = pq.read_table(straight / "rounds" / f"{r:04d}" / "generations.parquet").drop_columns(["env_seconds"])
        y = pq.read_table(broken / "rounds" / f"{r:04d}" / "generations.parquet").drop_columns(["env_seconds"])
        assert x.equals(y), r


def test_vllm_engine_samples_trajectories_token_exact(tmp_path, shared_ray):
    """The same runner on the vllm engine (one request per trajectory turn, each with its own seed, the
    conversation's prefix cached within a version): the mask and the sampled ids' log-probability hold."""
    shared_ray.up()
    path = str(build_tiny_model("tiny-llama", tmp_path / "llama", chat_template=True, merges=True,
                                num_attention_heads=2, num_key_value_heads=2))  # head_dim 32 for vLLM's CPU attention
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": f"Count down from {i}.", "prompt_id": i} for i in range(3)])
    out = tmp_path / "run"
    config = _config(path, out, prompts, {"name": "toy_envs:CountdownEnv", "max_turns": 2})
    config["sampling"].update(engine="vllm", vllm={"max_model_len": 256})
    config["loop"]["prompts_per_round"] = 3
    assert main(["run", str(_write(tmp_path / "config.yaml", json.dumps(config)))]) == 0
    rows = pq.read_table(out / "rounds" / "0001" / "generations.parquet").to_pylist()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = TurnTemplate(tokenizer, stop_token_ids(model.generation_config, tokenizer))
    assert len(rows) == 6
    for row in rows:
        assert row["turns"] == 2 and row["finished"] and row["accepted"]
        runs = _runs(row["completion_mask"])
        assert [v for _, _, v in runs] == [1, 0, 1]
        between, observation = (row["completion_ids"][runs[1][0]:runs[1][1]],
                                template.observation_ids([{"role": "user", "content": "left: 1"}]))
        assert between[-len(observation):] == observation  # after the end-of-turn token of a cut turn, if any
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        start = len(row["prompt_ids"])
        sampled = [(i, t) for i, (t, m) in enumerate(zip(row["completion_ids"], row["completion_mask"])) if m]
        total = sum(logprobs[start + i - 1, t].item() for i, t in sampled)
        assert abs(total - row["logprob_sum"]) / len(sampled) < 2e-3


def test_trajectories_whose_environment_actor_died_run_again_from_their_start(chat_path, tmp_path, shared_ray):
    """The environment actor is killed mid-round (Ray restarts it): its trajectories run again from their start on
    the restarted actor, and the round ends with every trajectory whole, none with an env_error."""
    import threading
    import time

    import ray

    from iterft_ray.run.loop import IterativeLoop

    shared_ray.up()
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": f"Count down from {i}.", "prompt_id": i} for i in range(4)])
    config = _config(chat_path, tmp_path / "run", prompts, {"name": "toy_envs:CountdownEnv", "max_turns": 3,
                                                            "config": {"step_seconds": 0.5}})
    config["loop"]["prompts_per_round"] = 4
    loop = IterativeLoop(config)
    try:
        actor = loop.rl.env_pool.actors[0]
        pid = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
        result = {}
        thread = threading.Thread(target=lambda: result.update(stats=loop.round()))
        thread.start()
        time.sleep(2.0)  # mid-trajectory: each of the 3 steps takes 0.5 s
        ray.kill(actor, no_restart=False)
        thread.join(timeout=300)
        assert not thread.is_alive() and result["stats"]["env_errors"] == 0
        assert ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid())) != pid  # restarted
    finally:
        loop.shutdown()
    rows = pq.read_table(tmp_path / "run" / "rounds" / "0001" / "generations.parquet").to_pylist()
    assert len(rows) == 8 and all(r["env_error"] is None and r["turns"] == 3 and r["accepted"] for r in rows)
    assert all(r["step_rewards"] == [0.0, 0.0, 1.0] for r in rows)
