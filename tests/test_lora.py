"""LoRA (`model.lora`): only a PEFT adapter trains, is checkpointed in PEFT format, and is synced; generators
sample with base + the adapter version they claim; a run resumes from an adapter checkpoint."""

import json

import pyarrow.parquet as pq
import pytest
import ray
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from iterft_ray.actors.trainer_group import TrainerGroup
from iterft_ray.weights.sync import publish_from
from iterft_ray.train.checkpoint import load_training_state, save_training_state
from iterft_ray.cli import run
from iterft_ray.config import LoraConfig, ModelConfig, ResourcesConfig, load_config
from iterft_ray.engines.hf import HFEngine
from iterft_ray.tiny import resolve_model_path
from iterft_ray.train.models import load_model
from iterft_ray.train.trainer import IterativeSFTConfig, IterativeSFTTrainer
from iterft_ray.weights.snapshot import adapter_parameters, publish_adapter

# The module's trainers reuse its earlier trainers' actors (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("warm_actors")


def _config(**sections):
    data = {"model": {"name_or_path": "tiny-llama", "lora": {"r": 4}}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


@pytest.mark.parametrize("sections, message", [
    ({"model": {"lora": {"r": 0}}}, "model.lora.r: expected a positive number"),
    ({"model": {"lora": {"alpha": "big"}}}, "model.lora.alpha: expected float"),
    ({"model": {"lora": {"dropout": 1.0}}}, r"model.lora.dropout: expected a number in \[0, 1\)"),
    ({"model": {"lora": {"target_modules": []}}}, "model.lora.target_modules: expected a non-empty list"),
    ({"model": {"lora": {"rank": 4}}}, "model.lora.rank: unknown key"),
    ({"model": {"lora": [4]}}, "model.lora: expected a mapping"),
    ({"model": {"lora": {"r": 1024}}, "sampling": {"engine": "vllm"}},
     "model.lora.r: sampling.engine: vllm serves adapters of rank up to 512"),
])
def test_bad_lora_settings_name_the_key(sections, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load_config(_config(**sections))


def test_lora_config_loads_and_round_trips():
    config = load_config(_config(model={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}))
    assert config.model.lora == LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    assert load_config(config.to_dict()).model.lora == config.model.lora
    assert load_config({"model": {"name_or_path": "tiny-llama"}}).model.lora is None
    assert load_config(_config(resources={"trainer_ranks": 2})).resources.trainer_ranks == 2  # LoRA on N ranks
    assert load_config(_config(sampling={"engine": "vllm"})).sampling.engine == "vllm"  # and on vLLM


def test_only_the_adapter_trains_and_a_trainer_restored_from_its_checkpoint_steps_the_same(llama_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    args = IterativeSFTConfig(output_dir=str(tmp_path / "out"), report_to="none", learning_rate=1e-2,
                              optim="adamw_torch")
    trainer = IterativeSFTTrainer(load_model(llama_path), args, processing_class=tokenizer,
                                  peft_config=LoraConfig(r=4).peft_config())
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.step(texts=["1+1=2", "2+3=5", "7+8=15"])
    assert all(torch.equal(p, base_before[n]) for n, p in trainer.model.named_parameters() if "lora_" not in n)
    assert set(adapter_parameters(trainer.model)) == {n for n, _ in trainer.model.named_parameters() if "lora_" in n}

    save_training_state(trainer, tmp_path / "ckpt", {"round_index": 1})
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files

    restored = IterativeSFTTrainer(
        PeftModel.from_pretrained(load_model(llama_path), tmp_path / "ckpt", is_trainable=True), args,
        processing_class=tokenizer)
    assert load_training_state(restored, tmp_path / "ckpt") == {"round_index": 1}
    assert restored.state.global_step == trainer.state.global_step == 1
    for t in (trainer, restored):  # Adam moments restored too: the next update is the same
        t.step(texts=["4+4=8", "9+1=10"])
    ours, theirs = adapter_parameters(trainer.model), adapter_parameters(restored.model)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


# ---------------------------------------------------------------- `iterft run` with model.lora


@pytest.fixture
def local_ray(ray_up):
    """The session's Ray (tests/conftest.py)."""


def _overrides(model_path, out, rounds):
    return [f"model.name_or_path={model_path}", "model.lora={r: 4, alpha: 16}", f"loop.output_dir={out}",
            f"loop.rounds={rounds}", "loop.save_every=1", "trainer.learning_rate=0.02", "trainer.optim=adamw_torch",
            "filters=[{name: length_bounds, min_chars: 1}]"]  # a random tiny model gets no sum right


def _checkpoint_version(path) -> int:
    return json.loads((path / "training_state.json").read_text())["extra"]["weight_version"]


def _worst_logprob_error(model, rows) -> float:
    """Largest mean per-token difference between a row's `logprob_sum` and `model`'s (temperature 1)."""
    worst = 0.0
    for row in rows:
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(row["prompt_ids"]) - 1 : -1]
        expected = torch.log_softmax(logits.double(), -1).gather(1, ids[0, len(row["prompt_ids"]):, None]).sum()
        worst = max(worst, abs(row["logprob_sum"] - float(expected)) / len(row["completion_ids"]))
    return worst


def _check_round_sampled_with(run_dir, round_number, checkpoint, base_path):
    rows = pq.read_table(run_dir / "rounds" / f"{round_number:04d}" / "generations.parquet").to_pylist()
    assert {r["weight_version"] for r in rows} == {_checkpoint_version(checkpoint)}
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), checkpoint).eval()
    assert _worst_logprob_error(adapted, rows) < 2e-3
    # The adapter matters: the base alone gives other log-probs.
    assert _worst_logprob_error(AutoModelForCausalLM.from_pretrained(base_path).eval(), rows) > 2e-2


def test_a_version_moves_the_adapter_only_and_an_hf_replica_computes_base_plus_adapter(local_ray, llama_path,
                                                                                          tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    args = IterativeSFTConfig(output_dir=str(tmp_path / "out"), report_to="none", learning_rate=1e-2)
    trainer = IterativeSFTTrainer(load_model(llama_path), args, processing_class=tokenizer,
                                  peft_config=LoraConfig(r=4).peft_config())
    engine = HFEngine(llama_path, None, False)
    for version in (1, 2):  # the second version is copied into the adapter the first one added
        trainer.step(texts=["1+1=2", "2+3=5", "7+8=15"])
        snapshot = ray.get(publish_adapter(trainer.model, version))
        engine.load(snapshot)
    save_training_state(trainer, tmp_path / "ckpt")

    with safe_open(str(tmp_path / "ckpt" / "adapter_model.safetensors"), "pt") as f:
        saved = {name: f.get_tensor(name) for name in f.keys()}
    assert snapshot.adapter_config is not None and len(snapshot.arrays) == len(saved)
    assert snapshot.nbytes == sum(t.numel() * t.element_size() for t in saved.values())
    base = AutoModelForCausalLM.from_pretrained(llama_path)
    assert snapshot.nbytes < 0.1 * sum(p.numel() * p.element_size() for p in base.parameters())

    adapted = PeftModel.from_pretrained(base, tmp_path / "ckpt").eval()
    ids = torch.tensor([tokenizer("12+30=42")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(engine.model(ids).logits, adapted(ids).logits)


def test_lora_run_checkpoints_adapters_samples_with_the_adapter_it_claims_and_resumes(local_ray, llama_path, tmp_path):
    out = tmp_path / "run"
    run("tiny", _overrides(llama_path, out, rounds=2))
    checkpoints = [out / "checkpoints" / f"round-{r:04d}" for r in (1, 2)]
    for checkpoint in checkpoints:
        files = {p.name for p in checkpoint.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
        assert "model.safetensors" not in files
    assert _checkpoint_version(checkpoints[1]) > _checkpoint_version(checkpoints[0])

    # Round 2 sampled with the adapter checkpointed after round 1, on the unchanged base.
    _check_round_sampled_with(out, 2, checkpoints[0], llama_path)

    # Resume: the trainer comes back from the round-2 adapter (and its optimizer state) and round 3 samples with it.
    _, stats = run("tiny", _overrides(llama_path, out, rounds=3), resume=True)
    assert [s["round"] for s in stats] == [3]
    _check_round_sampled_with(out, 3, checkpoints[1], llama_path)
    assert _checkpoint_version(out / "checkpoints" / "round-0003") > _checkpoint_version(checkpoints[1])


# ---------------------------------------------------------------- LoRA on FSDP2-sharded ranks

TEXTS = ["12+30=42", "7+5=12", "100+1=101", "3+3=6", "45+45=90", "9+90=99", "1+1=2"]  # uneven over 2 ranks
COMMON = {"learning_rate": 1e-1, "train_sampling_strategy": "sequential", "report_to": "none",
          "output_dir": "runs/test-lora-ranks"}


def _lora_group(ranks, checkpoint=None, **args):
    return TrainerGroup(ModelConfig("tiny-llama", lora=LoraConfig(r=4, alpha=16)), {**COMMON, **args},
                        ResourcesConfig(trainer_ranks=ranks), checkpoint)


def _adapter(group):
    """The published version of a group's adapter: (its weights as tensors, the snapshot)."""
    ref, version = publish_from(group)
    snapshot = ray.get(ref)
    assert snapshot.version == version and snapshot.adapter_config is not None
    return {k: torch.from_numpy(v.copy()) for k, v in snapshot.arrays.items()}, snapshot


def _assert_close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= tol, k


def test_two_lora_ranks_make_the_same_adapter_update_as_one_rank_and_checkpoint_a_peft_adapter_that_resumes(
        local_ray, tmp_path):
    # SGD with momentum: the same update contract as plain SGD, and optimizer state for the resume to restore.
    args = dict(optim="sgd", optim_args="momentum=0.9")
    one = _lora_group(1, per_device_train_batch_size=4, **args)
    two = _lora_group(2, per_device_train_batch_size=2, **args)
    try:
        start, _ = _adapter(two)
        _assert_close(_adapter(one)[0], start, tol=0)  # the same initial adapter on every rank (seeded)
        s1, s2 = one.step(texts=TEXTS), two.step(texts=TEXTS)
        assert s1["updates"] == s2["updates"] == 2 and s1["loss"] == pytest.approx(s2["loss"], rel=1e-5)
        two.save(str(tmp_path / "ckpt"), {"round_index": 1})
        saved, _ = _adapter(two)
        s1, s2 = one.step(texts=TEXTS), two.step(texts=TEXTS)  # lora_A moves too once lora_B is not zero
        assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-5)
        ours, snapshot = _adapter(two)
        _assert_close(_adapter(one)[0], ours)
        assert all("lora_" in name for name in ours) and not any(torch.equal(ours[n], start[n]) for n in ours)

        def frozen_base_sharded(actor):  # the base is sharded too (not replicated), and frozen
            model = actor.trainer.model
            frozen = all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
            return frozen, sum(p.to_local().numel() for p in model.parameters()), sum(p.numel() for p in model.parameters())

        for rank in range(2):
            frozen, local, total = ray.get(two.ranks[rank].__ray_call__.remote(frozen_base_sharded))
            assert frozen and local < 0.6 * total
    finally:
        one.shutdown()
        two.shutdown()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-llama"))
    assert snapshot.nbytes < 0.1 * sum(p.numel() * p.element_size() for p in base.parameters())  # a version: adapter only
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    loaded = PeftModel.from_pretrained(base, tmp_path / "ckpt")
    _assert_close({n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}, saved, tol=0)

    resumed = _lora_group(2, checkpoint=str(tmp_path / "ckpt"), per_device_train_batch_size=2, **args)
    try:
        assert resumed.restored == {"round_index": 1}
        resumed.step(texts=TEXTS)
        _assert_close(_adapter(resumed)[0], ours)  # momentum restored into the shards, not fresh
    finally:
        resumed.shutdown()


# ---------------------------------------------------------------- LoRA on the vLLM engine


def test_vllm_generators_serve_the_base_plus_the_adapter_version_they_claim_trained_on_two_ranks(local_ray, tmp_path):
    out = tmp_path / "run"
    heads = {"num_attention_heads": 2, "num_key_value_heads": 2}  # vLLM's CPU attention needs head_dim 32
    run("tiny", _overrides("tiny-llama", out, rounds=2) + [
        "model.tiny_overrides={num_attention_heads: 2, num_key_value_heads: 2}", "sampling.engine=vllm",
        "resources.trainer_ranks=2", "trainer.per_device_train_batch_size=16"])
    checkpoint = out / "checkpoints" / "round-0001"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    # Round 1 sampled with version 0 (lora_B is zero: the base), round 2 with the adapter checkpointed after
    # round 1: the engine's second adapter, added under a new id (a reused id would serve the first).
    _check_round_sampled_with(out, 2, checkpoint, resolve_model_path("tiny-llama", **heads))
