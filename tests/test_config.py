"""Config loading: errors name the key; the shipped configs load."""

import json
import warnings
from pathlib import Path

import pytest
import yaml

from iterft_ray.cli import config_data
from iterft_ray.config import ConfigWarning, VllmConfig, load_config, resolve_config
from iterft_ray.run.run_dir import check_start

ROOT = Path(__file__).resolve().parents[1]


def base():
    return {"model": {"name_or_path": "tiny-llama"}}


@pytest.mark.parametrize(
    "change,error,key",
    [
        (lambda c: c.update(bogus=1), ValueError, "bogus"),
        (lambda c: c.setdefault("loop", {}).update(roundz=3), ValueError, "loop.roundz"),
        (lambda c: c.setdefault("loop", {}).update(rounds="ten"), TypeError, "loop.rounds"),
        (lambda c: c.setdefault("loop", {}).update(rounds=True), TypeError, "loop.rounds"),
        (lambda c: c.setdefault("loop", {}).update(rounds=0), ValueError, "loop.rounds"),
        (lambda c: c.setdefault("sampling", {}).update(temperature=-1.0), ValueError, "sampling.temperature"),
        (lambda c: c.setdefault("sampling", {}).update(top_p=1.5), ValueError, "sampling.top_p"),
        (lambda c: c.setdefault("resources", {}).update(num_generators=[2]), TypeError, "resources.num_generators"),
        (lambda c: c.setdefault("resources", {}).update(weight_transport="nccl"), ValueError,
         "resources.weight_transport"),
        (lambda c: c.setdefault("resources", {}).update(weight_transport="broadcast", trainer_ranks=2), ValueError,
         "resources.weight_transport"),
        (lambda c: c.pop("model"), ValueError, "model"),
        (lambda c: c["model"].pop("name_or_path"), ValueError, "model.name_or_path"),
        (lambda c: c.update(trainer={"learnin_rate": 1e-3}), ValueError, "trainer.learnin_rate"),
        (lambda c: c.update(trainer={"learning_rate": "fast"}), TypeError, "trainer.learning_rate"),
        (lambda c: c.update(trainer={"per_device_train_batch_size": 2.5}), TypeError,
         "trainer.per_device_train_batch_size"),
        (lambda c: c.update(trainer={"bf16": "yes"}), TypeError, "trainer.bf16"),
        (lambda c: c.update(trainer={"learning_rate": -0.001}), ValueError, "trainer.learning_rate: expected a number >= 0"),
        (lambda c: c.update(trainer={"per_device_train_batch_size": 0}), ValueError,
         "trainer.per_device_train_batch_size: expected a positive number"),
        (lambda c: c.update(trainer={"gradient_accumulation_steps": 0}), ValueError, "trainer.gradient_accumulation_steps"),
        (lambda c: c.update(trainer={"max_steps": 0}), ValueError, "trainer.max_steps: expected -1 (no end)"),
        (lambda c: c.update(trainer={"adam_beta2": 1.0}), ValueError, "trainer.adam_beta2: expected a number in [0, 1)"),
        (lambda c: c.update(trainer={"lr_scheduler_type": "nonsense"}), ValueError,
         "trainer.lr_scheduler_type: expected one of ['linear', 'cosine'"),
        (lambda c: c.update(trainer={"optim": "adam_typo"}), ValueError, "trainer.optim: expected one of"),
        (lambda c: c.update(trainer={"warmup_steps": -1}), ValueError, "trainer.warmup_steps"),
        (lambda c: c.update(data={"task": None}), ValueError, "data.task"),
        (lambda c: c.update(sampling=[1]), TypeError, "sampling"),
    ],
)
def test_bad_config_names_the_key(change, error, key):
    data = base()
    change(data)
    with pytest.raises(error) as info:
        load_config(data)
    assert str(info.value).startswith(key)


def test_shipped_configs_load():
    for path in [*(ROOT / "iterft_ray" / "configs").glob("*.yaml"), *(ROOT / "jobs" / "configs").glob("*.yaml")]:
        load_config(path)


def test_set_overrides_and_builtin_names():
    assert resolve_config("demo").name == "demo.yaml"
    data = config_data("demo", ["loop.rounds=2", "sampling.temperature=0.5", "trainer.bf16=false"])
    config = load_config(data)
    assert config.loop.rounds == 2 and config.sampling.temperature == 0.5 and config.trainer["bf16"] is False


def test_yaml_exponent_without_a_dot_is_a_float(tmp_path):
    """PyYAML reads `1e-3` as a string; float fields take it as the number it spells."""
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: tiny-llama}\ntrainer: {learning_rate: 1e-3}\n"
                    "sampling: {temperature: 5e-1}\n", encoding="utf-8")
    config = load_config(path)
    assert config.trainer["learning_rate"] == 0.001 and config.sampling.temperature == 0.5


def reward(prompt: str, completion: str, meta: dict) -> float:
    """A reward model's score: a number, which gates nothing."""
    return float(len(completion))


def gate(prompt: str, completion: str, meta: dict) -> bool:
    return True


def test_numeric_filter_without_a_selector_is_warned_about_at_load():
    with pytest.warns(ConfigWarning, match=r"^filters\[1\]: a numeric filter adds to each row's score and rejects no"):
        load_config({**base(), "filters": [f"{__name__}:gate", f"{__name__}:reward"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        load_config({**base(), "filters": [f"{__name__}:reward", {"name": "best_of_k", "k": 1}]})
        load_config({**base(), "filters": [f"{__name__}:gate", "exact_answer"]})


def test_more_prompts_a_round_than_the_file_has_is_warned_about_at_start(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(3)))
    config = load_config({**base(), "data": {"prompts_file": str(prompts)},
                          "loop": {"prompts_per_round": 8, "output_dir": str(tmp_path / "run")}})
    with pytest.warns(ConfigWarning, match=r"^loop.prompts_per_round: 8 prompts a round, but data.prompts_file has 3"):
        check_start(config)
    config.loop.prompts_per_round = 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        check_start(config)


DEMOS = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+4=", "completion": "7", "source": "hand-written"}]


@pytest.mark.parametrize("lines,passes,message", [
    (None, 1, "data.warmup_file: no such file "),
    (["{\"prompt\": \"1+1=\", \"completion\": \"2\"}", "{\"question\": \"1+2=\", \"answer\": \"3\"}"], 1,
     "data.warmup_file: {path}, line 2: expected non-empty strings \"prompt\" and \"completion\", got ['answer', "
     "'question']"),
    (["{\"prompt\": \"1+1=\", \"completion\": 2}"], 1, "data.warmup_file: {path}, line 1: expected non-empty strings"),
    (["not json"], 1, "data.warmup_file: {path}, line 1: not JSON"),
    ([], 1, "data.warmup_file: {path}: no demonstrations"),
    ([json.dumps(d) for d in DEMOS], 0, "data.warmup_file: demonstrations to warm up on, but loop.warmup_passes is 0"),
])
def test_bad_warmup_file_is_refused_at_load_naming_the_key(tmp_path, lines, passes, message):
    path = tmp_path / "demos.jsonl"
    if lines is not None:
        path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError) as info:
        load_config({**base(), "data": {"warmup_file": str(path)}, "loop": {"warmup_passes": passes}})
    assert str(info.value).startswith(message.format(path=path))


def test_warmup_file_is_relative_to_the_config_and_replaces_the_task_examples(tmp_path):
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DEMOS))
    (tmp_path / "c.yaml").write_text(f"model: {{name_or_path: tiny-llama}}\ndata: {{warmup_file: demos.jsonl}}\n"
                                     f"loop: {{warmup_passes: 1, output_dir: {tmp_path / 'run'}}}\n")
    config = load_config(tmp_path / "c.yaml")
    assert config.data.warmup_file == str(tmp_path / "demos.jsonl")
    expected = [{"prompt": d["prompt"], "completion": d["completion"]} for d in DEMOS]  # other fields dropped
    assert check_start(config).warmup_examples == expected


def test_trainer_bounds_name_real_fields():
    """A TrainingArguments rename must not silently drop a check."""
    import dataclasses

    from iterft_ray.config import TRAINER_BOUNDS
    from iterft_ray.train.trainer import IterativeSFTConfig

    assert set(TRAINER_BOUNDS) <= {f.name for f in dataclasses.fields(IterativeSFTConfig)}


def test_trainer_values_that_hold_load():
    config = load_config({**base(), "trainer": {"learning_rate": 0.0, "max_steps": -1, "lr_scheduler_type": "cosine",
                                                "max_length": None, "adam_beta1": 0.0}})
    assert config.trainer["lr_scheduler_type"] == "cosine"


def test_vllm_kv_cache_size_and_max_model_len_reach_the_engine_options():
    from iterft_ray.engines.vllm import engine_options

    assert "kv_cache_memory_bytes" not in engine_options(VllmConfig())
    assert engine_options(VllmConfig(kv_cache_memory_bytes=1 << 29))["kv_cache_memory_bytes"] == 1 << 29
    assert "max_model_len" not in engine_options(VllmConfig())
    assert engine_options(VllmConfig(max_model_len=4096))["max_model_len"] == 4096
    with pytest.raises(ValueError, match="sampling.vllm.kv_cache_memory_bytes"):
        load_config({**yaml.safe_load(resolve_config("tiny").read_text()), "sampling": {"vllm": {"kv_cache_memory_bytes": 0}}})
