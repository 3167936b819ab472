"""IterativeSFTTrainer on real tiny models: correctness against a plain PyTorch loop and TRL's defects."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, TrainingArguments

from iterft_ray import IterativeSFTConfig, IterativeSFTTrainer

TEXTS = ["12+30=42", "7+5=12", "100+1=101", "3+3=6", "45+45=90", "9+90=99", "1+1=2", "20+22=42"]


def make_trainer(path, tmp_path, seq2seq=False, trainer_kwargs=None, **args):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        disable_tqdm=True,
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        seed=0,
        # Equivalence tests compare updates: SGD keeps float noise at float scale, where
        # Adam's first update (about lr * sign(grad)) would amplify it for near-zero grads.
        optim="sgd",
    )
    settings.update(args)
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    return IterativeSFTTrainer(
        cls.from_pretrained(path),
        IterativeSFTConfig(**settings),
        processing_class=AutoTokenizer.from_pretrained(path),
        **(trainer_kwargs or {}),
    )


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def assert_weights_differ(a, b):
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_step_matches_plain_pytorch_loop(llama_path, tmp_path):
    trainer = make_trainer(
        llama_path, tmp_path, weight_decay=0.01, max_grad_norm=0.5, train_sampling_strategy="sequential",
        optim="adamw_torch",
    )
    tok = trainer.tokenizer
    stats = trainer.step(texts=TEXTS[:4])
    # The tied embedding's lookup gradient comes back sparse (no dense copy beside the LM head's); same update.
    assert trainer.model.get_input_embeddings().sparse and trainer.model.lm_head.weight.grad is None

    model = AutoModelForCausalLM.from_pretrained(llama_path)
    assert not model.get_input_embeddings().sparse
    decay = [p for n, p in model.named_parameters() if "norm" not in n and "bias" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n or "bias" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)
    batch = tok(TEXTS[:4], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    logits = model(**batch).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    opt.step()

    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    assert stats["num_target_tokens"] == int((labels[:, 1:] != -100).sum())
    assert_same_weights(weights(trainer), {k: v.detach() for k, v in model.state_dict().items()})


def test_stats_count_updates_not_micro_batches(llama_path, tmp_path):
    trainer = make_trainer(llama_path, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    stats = trainer.step(texts=TEXTS)
    assert stats["updates"] == 2 and stats["global_step"] == 2
    assert stats["num_sequences"] == 8
    assert stats["num_tokens"] == sum(len(t) + 1 for t in TEXTS)  # bytes + BOS
    assert stats["learning_rate"] == pytest.approx(1e-3)  # no max_steps: constant, never 0
    assert stats["tokens_per_second"] > 0 and math.isfinite(stats["loss"])
    assert trainer.step(texts=TEXTS[:3])["global_step"] == 3


def test_accumulation_2x2_equals_4x1(llama_path, tmp_path):
    a = make_trainer(llama_path, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    b = make_trainer(llama_path, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    ragged = ["1+1=2", "123+456=579", "9+9=18", "1000+2000=3000"]
    sa, sb = a.step(texts=ragged), b.step(texts=ragged)
    assert sa["updates"] == sb["updates"] == 1
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-5)
    assert_same_weights(weights(a), weights(b))


def test_group_by_length_same_update_less_padding(llama_path, tmp_path):
    ragged = ["1+1=2", "123456+654321=777777", "2+2=4", "111111+222222=333333"]
    a = make_trainer(
        llama_path, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        train_sampling_strategy="sequential",
    )
    b = make_trainer(
        llama_path, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        train_sampling_strategy="group_by_length",
    )
    sa, sb = a.step(texts=ragged), b.step(texts=ragged)
    assert sb["pad_fraction"] < sa["pad_fraction"]
    assert_same_weights(weights(a), weights(b))


def test_learning_rate_warmup_then_constant_without_max_steps(llama_path, tmp_path):
    trainer = make_trainer(llama_path, tmp_path, per_device_train_batch_size=8, warmup_steps=2)
    lrs = [trainer.step(texts=TEXTS)["learning_rate"] for _ in range(4)]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


def test_decaying_schedule_without_max_steps_is_an_error(llama_path, tmp_path):
    with pytest.raises(ValueError, match="max_steps"):
        make_trainer(llama_path, tmp_path, lr_scheduler_type="cosine")


def test_linear_schedule_with_max_steps_decays(llama_path, tmp_path):
    trainer = make_trainer(llama_path, tmp_path, per_device_train_batch_size=8, max_steps=4)
    lrs = [trainer.step(texts=TEXTS)["learning_rate"] for _ in range(3)]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4])


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_cuts_sequences_not_batch(llama_path, tmp_path, mode):
    tok = AutoTokenizer.from_pretrained(llama_path)
    ids = [torch.tensor(x) for x in tok(TEXTS[:4])["input_ids"]]
    cut = [x[-5:] if mode == "keep_end" else x[:5] for x in ids]

    on_tensors = make_trainer(llama_path, tmp_path, trainer_kwargs=dict(max_length=5, truncation_mode=mode))
    on_texts = make_trainer(llama_path, tmp_path, max_length=5, truncation_mode=mode)  # via the config
    by_hand = make_trainer(llama_path, tmp_path)
    s1 = on_tensors.step(input_ids=ids)
    s2 = on_texts.step(texts=TEXTS[:4])
    s3 = by_hand.step(input_ids=cut)
    assert s1["num_sequences"] == 4 and s1["num_tokens"] == 20
    assert_same_weights(weights(on_tensors), weights(by_hand))
    assert_same_weights(weights(on_texts), weights(by_hand))
    assert s1["loss"] == pytest.approx(s3["loss"]) and s2["loss"] == pytest.approx(s3["loss"])


def test_labels_truncated_with_inputs(llama_path, tmp_path):
    ids = [torch.arange(10, 20)]
    labels = [torch.tensor([-100] * 7 + [17, 18, 19])]
    a = make_trainer(llama_path, tmp_path, trainer_kwargs=dict(max_length=4, truncation_mode="keep_end"))
    stats = a.step(input_ids=ids, labels=labels)
    assert stats["num_target_tokens"] == 3  # labels cut to [-100, 17, 18, 19]; the first is never a target


def test_prompt_masking_via_labels_and_texts_labels(llama_path, tmp_path):
    prompts, completions = ["12+30=", "7+5="], ["42", "12"]
    tok = AutoTokenizer.from_pretrained(llama_path)
    ids = [torch.tensor(x) for x in tok([p + c for p, c in zip(prompts, completions)])["input_ids"]]
    labels = []
    for x, p in zip(ids, prompts):
        lab = x.clone()
        lab[: len(tok(p)["input_ids"])] = -100
        labels.append(lab)

    via_labels = make_trainer(llama_path, tmp_path)
    via_texts = make_trainer(llama_path, tmp_path)
    unmasked = make_trainer(llama_path, tmp_path)
    s1 = via_labels.step(input_ids=ids, labels=labels)
    s2 = via_texts.step(texts=prompts, texts_labels=completions)
    unmasked.step(input_ids=ids)
    assert s1["num_target_tokens"] == s2["num_target_tokens"] == 4
    assert_same_weights(weights(via_labels), weights(via_texts))
    assert_weights_differ(weights(via_labels), weights(unmasked))


def test_eos_is_trained_when_pad_is_eos(llama_path, tmp_path):
    trainer = make_trainer(llama_path, tmp_path)
    trainer.tokenizer.pad_token = trainer.tokenizer.eos_token
    eos = trainer.tokenizer.eos_token_id
    ids = [torch.tensor([1, 20, 21, eos]), torch.tensor([1, 22, eos])]
    stats = trainer.step(input_ids=ids, attention_mask=[torch.ones(4, dtype=torch.long), torch.ones(3, dtype=torch.long)])
    assert stats["num_target_tokens"] == 3 + 2  # both EOS count; the padding added to row 2 does not


def test_seq2seq_with_texts_labels(t5_path, tmp_path):
    trainer = make_trainer(t5_path, tmp_path, seq2seq=True, learning_rate=3e-3, optim="adamw_torch")
    first = trainer.step(texts=["12+30=", "7+5="], texts_labels=["42", "12"])
    assert first["num_target_tokens"] == 6  # 2 digits + EOS each
    for _ in range(15):
        last = trainer.step(texts=["12+30=", "7+5="], texts_labels=["42", "12"])
    assert last["loss"] < first["loss"]
    with pytest.raises(ValueError, match="texts_labels"):
        trainer.step(texts=["12+30="])


def test_gpt2_loss_falls_over_steps(tiny_paths, tmp_path):
    trainer = make_trainer(
        tiny_paths["tiny-gpt2"], tmp_path, learning_rate=3e-3, per_device_train_batch_size=8, optim="adamw_torch"
    )
    losses = [trainer.step(texts=TEXTS)["loss"] for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0]


def test_evaluate_returns_compute_metrics_output(llama_path, tmp_path):
    tok = AutoTokenizer.from_pretrained(llama_path)
    eval_dataset = [{"input_ids": x} for x in tok(TEXTS)["input_ids"]]
    seen = {}

    def preprocess(logits, labels):
        return logits.argmax(-1)

    def compute_metrics(pred):
        seen["shape"] = pred.predictions.shape
        mask = pred.label_ids[:, 1:] != -100
        correct = (pred.predictions[:, :-1] == pred.label_ids[:, 1:]) & mask
        return {"token_accuracy": float(correct.sum() / mask.sum())}

    trainer = make_trainer(
        llama_path,
        tmp_path,
        per_device_eval_batch_size=4,
        optim="adamw_torch",
        trainer_kwargs=dict(
            eval_dataset=eval_dataset, compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess
        ),
    )
    before = trainer.evaluate()
    for _ in range(10):
        trainer.step(texts=TEXTS)
    after = trainer.evaluate()
    assert seen["shape"][0] == len(TEXTS)
    assert 0.0 <= before["eval_token_accuracy"] < after["eval_token_accuracy"]
    assert after["eval_loss"] < before["eval_loss"]


def test_save_and_load_round_trip(llama_path, tmp_path):
    trainer = make_trainer(llama_path, tmp_path)
    trainer.step(texts=TEXTS)
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    AutoTokenizer.from_pretrained(tmp_path / "saved")
    x = torch.tensor([[1, 20, 21, 14, 22]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, trainer.model(x).logits, atol=0, rtol=0)


def test_model_given_as_path_and_tensorboard_logging(llama_path, tmp_path):
    args = IterativeSFTConfig(
        output_dir=str(tmp_path / "out"), report_to=["tensorboard"], logging_steps=1
    )
    trainer = IterativeSFTTrainer(llama_path, args)
    trainer.step(texts=TEXTS)
    assert trainer.state.log_history[-1]["learning_rate"] > 0
    assert list((tmp_path / "out").rglob("events.out.tfevents.*"))


def test_plain_training_arguments_accepted(llama_path, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=8)
    trainer = IterativeSFTTrainer(
        AutoModelForCausalLM.from_pretrained(llama_path), args, tokenizer=AutoTokenizer.from_pretrained(llama_path),
        max_length=6,
    )
    assert trainer.step(texts=TEXTS)["num_tokens"] == 6 * len(TEXTS)


def test_bad_truncation_mode_is_an_error(llama_path, tmp_path):
    with pytest.raises(ValueError, match="truncation_mode"):
        make_trainer(llama_path, tmp_path, trainer_kwargs=dict(truncation_mode="middle"))


BAD_STEPS = [
    (dict(), ValueError, "texts, input_ids"),
    (dict(texts=["a"], input_ids=[torch.tensor([1, 2])]), ValueError, "texts, input_ids"),
    (dict(texts=[]), ValueError, "texts"),
    (dict(texts="abc"), TypeError, "texts"),
    (dict(texts=["a", 3]), TypeError, r"texts\[1\]"),
    (dict(texts=["a", "b"], texts_labels=["x"]), ValueError, "texts_labels"),
    (dict(texts=["bad \udcff"]), ValueError, r"texts\[0\]"),
    (dict(input_ids=[]), ValueError, "input_ids"),
    (dict(input_ids=torch.tensor([[1, 2]])), TypeError, "input_ids"),
    (dict(input_ids=[[1, 2]]), TypeError, r"input_ids\[0\]"),
    (dict(input_ids=[torch.tensor([1.0, 2.0])]), TypeError, r"input_ids\[0\]"),
    (dict(input_ids=[torch.tensor([[1, 2]])]), ValueError, r"input_ids\[0\]"),
    (dict(input_ids=[torch.tensor([1, 100000])]), ValueError, r"input_ids\[0\]"),
    (dict(input_ids=[torch.tensor([1, 2])], attention_mask=[torch.tensor([1])]), ValueError, "attention_mask"),
    (dict(input_ids=[torch.tensor([1, 2])], labels=[torch.tensor([1, 2]), torch.tensor([3])]), ValueError, "labels"),
    (dict(input_ids=[torch.tensor([1, 2])], labels=[torch.tensor([1, 2, 3])]), ValueError, r"labels\[0\]"),
    (dict(input_ids=[torch.tensor([1, 2])], texts_labels=["x"]), ValueError, "texts_labels"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_STEPS)
def test_bad_step_input_raises_and_leaves_weights(llama_path, tmp_path, kwargs, error, match):
    trainer = make_trainer(llama_path, tmp_path)
    before = weights(trainer)
    with pytest.raises(error, match=match):
        trainer.step(**kwargs)
    assert_same_weights(before, weights(trainer), atol=0)
    assert trainer.state.global_step == 0


def test_seq2seq_without_labels_raises_and_leaves_weights(t5_path, tmp_path):
    trainer = make_trainer(t5_path, tmp_path, seq2seq=True)
    before = weights(trainer)
    with pytest.raises(ValueError, match="labels"):
        trainer.step(input_ids=[torch.tensor([20, 21, 2])])
    assert_same_weights(before, weights(trainer), atol=0)


def test_bf16_mixed_precision_trains_fp32_weights(llama_path, tmp_path):
    # On a CPU TrainingArguments wants use_cpu=True for bf16; on a GPU bf16=True alone.
    trainer = make_trainer(llama_path, tmp_path, bf16=True, use_cpu=True, optim="adamw_torch", learning_rate=3e-3)
    first = trainer.step(texts=TEXTS)
    for _ in range(5):
        last = trainer.step(texts=TEXTS)
    assert math.isfinite(first["loss"]) and last["loss"] < first["loss"]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast, not a cast
    assert trainer.accelerator.mixed_precision == "bf16"


@pytest.mark.parametrize("model_name", ["causal", "seq2seq"])
@pytest.mark.parametrize("input_name", ["tensor", "text"])
def test_trl_test_usage_keeps_gradients_after_step(tiny_paths, tmp_path, model_name, input_name):
    """What TRL's `test_iterative_step_from_tensor` does, unchanged but for the tiny models' token ids."""
    from functools import partial

    from datasets import Dataset

    if input_name == "tensor":
        ids = [torch.tensor([53, 36, 66, 143, 18]), torch.tensor([66, 143, 18, 66, 143, 18]),
               torch.tensor([53, 36, 66, 143, 18])]
        dummy_dataset = Dataset.from_dict(
            {"input_ids": ids, "attention_mask": [torch.ones_like(x) for x in ids], "labels": ids}
        )
        dummy_dataset.set_format("torch")
        inputs = {k: dummy_dataset[k] for k in ("input_ids", "attention_mask", "labels")}
    else:
        texts = ["Testing the IterativeSFTTrainer.", "This is a test of the IterativeSFTTrainer"]
        dummy_dataset = Dataset.from_dict({"texts": texts, "texts_labels": texts})
        dummy_dataset.set_format("torch")
        inputs = {"texts": dummy_dataset["texts"], "texts_labels": dummy_dataset["texts_labels"]}
    path = tiny_paths["tiny-llama" if model_name == "causal" else "tiny-t5"]
    cls = AutoModelForCausalLM if model_name == "causal" else AutoModelForSeq2SeqLM
    training_args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3, report_to="none"
    )
    trainer = IterativeSFTTrainer(
        model=cls.from_pretrained(path), args=training_args, processing_class=AutoTokenizer.from_pretrained(path)
    )
    trainer.optimizer.zero_grad = partial(trainer.optimizer.zero_grad, set_to_none=False)

    trainer.step(**inputs)

    for param in trainer.model.parameters():
        assert param.grad is not None


def test_gradient_checkpointing_recomputes_layers_and_makes_the_same_update(llama_path, tmp_path):
    def forwards_of_first_layer(trainer):
        calls = []
        trainer.model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        trainer.step(texts=TEXTS)
        return len(calls)

    plain = make_trainer(llama_path, tmp_path, per_device_train_batch_size=8)
    checkpointed = make_trainer(llama_path, tmp_path, per_device_train_batch_size=8, gradient_checkpointing=True)
    assert forwards_of_first_layer(plain) == 1
    assert forwards_of_first_layer(checkpointed) == 2  # the forward runs again in backward: activations not kept
    assert_same_weights(weights(plain), weights(checkpointed))


@pytest.mark.parametrize("key,value", [
    ("fsdp", "full_shard"), ("fsdp_config", {"min_num_params": 1}), ("deepspeed", "ds.json"),
    ("ddp_find_unused_parameters", True), ("ddp_bucket_cap_mb", 25), ("ddp_broadcast_buffers", False),
    ("ddp_static_graph", True), ("use_liger_kernel", True),
])
def test_parallelism_and_liger_keys_are_refused_naming_the_key(llama_path, tmp_path, key, value):
    from iterft_ray.config import load_config

    with pytest.raises(ValueError, match=rf"^trainer\.{key}: "):
        load_config({"model": {"name_or_path": "tiny-llama"}, "trainer": {key: value}})
    if key in ("deepspeed", "fsdp", "fsdp_config"):
        return  # TrainingArguments itself acts on these when built (needs accelerate plugins); config load refuses first
    with pytest.raises(ValueError, match=rf"^trainer\.{key}: "):
        make_trainer(llama_path, tmp_path, **{key: value})


def test_seed_page_usage_runs_verbatim_and_trains(tmp_path, monkeypatch):
    """The seed page's `IterativeSFTTrainer(model, tokenizer)` (tokenizer where `args` sits) and both steps."""
    import runpy
    from pathlib import Path

    monkeypatch.chdir(tmp_path)  # the default args' output_dir ("tmp_trainer") is relative
    page = runpy.run_path(str(Path(__file__).parent / "data" / "seed_usage.py"))
    trainer, base = page["trainer"], AutoModelForCausalLM.from_pretrained(page["model_name"])
    assert trainer.tokenizer is page["tokenizer"]
    assert trainer.state.global_step == 2  # one update per step() (2 and 2 rows, batch size 8)
    assert_weights_differ(weights(trainer), {k: v.detach() for k, v in base.state_dict().items()})


def test_tokenizer_given_positionally_and_by_keyword_is_an_error(llama_path):
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    with pytest.raises(ValueError, match="^args: got a tokenizer positionally"):
        IterativeSFTTrainer(AutoModelForCausalLM.from_pretrained(llama_path), tokenizer, processing_class=tokenizer)
