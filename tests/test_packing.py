"""`trainer.packing`: a packed step makes the padded step's update (one rank and two), packed examples do not
attend to each other, and what cannot pack is refused with the key's name."""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from iterft_ray import IterativeSFTConfig, IterativeSFTTrainer
from iterft_ray.config import load_config
from iterft_ray.tiny import build_tokenizer
from iterft_ray.train.packing import PackingCollator

_rng = random.Random(0)
# Ragged: 3 to 90 characters (byte tokens), so padded micro-batches are mostly padding.
RAGGED = ["".join(_rng.choice("0123456789+= abc") for _ in range(_rng.randint(3, 90))) for _ in range(12)]
COMMON = dict(report_to="none", disable_tqdm=True, optim="sgd", learning_rate=0.1, seed=0,
              train_sampling_strategy="sequential")


def qwen2_model(tokenizer, attn="sdpa"):
    config = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                  max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def load(arch, llama_path, attn="sdpa"):
    if arch == "qwen2":
        tokenizer = build_tokenizer()
        return qwen2_model(tokenizer, attn), tokenizer
    return AutoModelForCausalLM.from_pretrained(llama_path, attn_implementation=attn), AutoTokenizer.from_pretrained(
        llama_path)


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_packed_step_makes_the_padded_update(arch, llama_path, tmp_path):
    runs = {}
    start = {k: v.clone() for k, v in load(arch, llama_path)[0].state_dict().items()}
    for packing in (False, True):
        model, tokenizer = load(arch, llama_path)
        args = IterativeSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                  gradient_accumulation_steps=2, packing=packing, **COMMON)
        trainer = IterativeSFTTrainer(model, args, processing_class=tokenizer)
        runs[packing] = trainer.step(texts=RAGGED), weights(trainer)
    (padded, w_padded), (packed, w_packed) = runs[False], runs[True]
    assert packed["updates"] == padded["updates"] == 2
    assert packed["num_tokens"] == padded["num_tokens"] and packed["num_target_tokens"] == padded["num_target_tokens"]
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-6)
    assert packed["pad_fraction"] < 0.5 * padded["pad_fraction"]
    moved = max((w_padded[k] - start[k]).abs().max() for k in w_padded)
    assert moved > 1e-3  # the update is large enough for the comparison to mean something
    for k in w_padded:
        assert (w_packed[k] - w_padded[k]).abs().max() <= 1e-5, k


def test_two_ranks_packed_make_the_one_rank_padded_update(ray_up, llama_path):
    import ray

    from iterft_ray.actors.trainer_group import TrainerGroup
    from iterft_ray.config import ModelConfig, ResourcesConfig
    from iterft_ray.weights.sync import publish_from

    def full_weights(group):
        return {k: torch.from_numpy(v.copy()) for k, v in ray.get(publish_from(group)[0]).arrays.items()}

    args = {**COMMON, "output_dir": "runs/test-packing"}
    one = TrainerGroup(ModelConfig(llama_path), {**args, "per_device_train_batch_size": 4},
                       ResourcesConfig(trainer_ranks=1))
    two = TrainerGroup(ModelConfig(llama_path), {**args, "per_device_train_batch_size": 2, "packing": True},
                       ResourcesConfig(trainer_ranks=2))
    try:
        s1, s2 = one.step(texts=RAGGED[:7]), two.step(texts=RAGGED[:7])  # uneven: one rank gets 3 examples
        assert s1["updates"] == s2["updates"] == 2 and s1["num_tokens"] == s2["num_tokens"]
        assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-5)
        a, b = full_weights(one), full_weights(two)
        for k in a:
            assert (a[k] - b[k]).abs().max() <= 1e-5, k
    finally:
        one.shutdown()
        two.shutdown()


def per_token_losses(model, batch):
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none",
                           ignore_index=-100)


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_packed_examples_do_not_attend_to_each_other(arch, attn, llama_path):
    model, tokenizer = load(arch, llama_path, attn)
    model.eval()
    texts = ["a long first example, alone in its row", "second: shares", "third"]
    examples = [{"input_ids": torch.tensor(x)} for x in tokenizer(texts)["input_ids"]]
    collate = PackingCollator(tokenizer.pad_token_id)
    batch = collate(examples)
    assert batch["input_ids"].shape[0] == 2  # the second and third examples share the second row
    third = slice(len(examples[1]["input_ids"]), len(examples[1]["input_ids"]) + len(examples[2]["input_ids"]) - 1)

    changed = [dict(e) for e in examples]
    changed[1]["input_ids"] = torch.flip(examples[1]["input_ids"], [0])  # same length, other tokens
    with torch.no_grad():
        before, after = per_token_losses(model, batch), per_token_losses(model, collate(changed))
    assert not torch.allclose(before[1, : third.start - 1], after[1, : third.start - 1])  # the change shows...
    torch.testing.assert_close(before[1, third], after[1, third], atol=1e-6, rtol=0)  # ...but not in the third
    # And the third example's losses are its own, as if it were alone.
    with torch.no_grad():
        alone = per_token_losses(model, collate([examples[2]]))
    torch.testing.assert_close(before[1, third], alone[0], atol=1e-5, rtol=0)


def test_packing_is_refused_for_seq2seq_models(t5_path, tmp_path):
    args = IterativeSFTConfig(output_dir=str(tmp_path), packing=True, **COMMON)
    with pytest.raises(ValueError, match=r"^trainer\.packing: only for causal LMs"):
        IterativeSFTTrainer(AutoModelForSeq2SeqLM.from_pretrained(t5_path), args,
                            processing_class=AutoTokenizer.from_pretrained(t5_path))
    with pytest.raises(ValueError, match=r"^trainer\.packing: only for causal LMs; tiny-t5"):
        load_config({"model": {"name_or_path": "tiny-t5"}, "trainer": {"packing": True}})
    with pytest.raises(ValueError, match=r"^trainer\.packing: only for causal LMs"):
        load_config({"model": {"name_or_path": t5_path}, "trainer": {"packing": True}})
    assert load_config({"model": {"name_or_path": "tiny-llama"}, "trainer": {"packing": True}}).trainer == {
        "packing": True}


def _attention_that_ignores_packing(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Causal attention over the whole row, as a kernel that reads no packed position_ids would compute it."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def test_an_attention_that_mixes_packed_examples_is_refused(llama_path, tmp_path):
    AttentionInterface.register("whole_row_causal", _attention_that_ignores_packing)
    model = AutoModelForCausalLM.from_pretrained(llama_path, attn_implementation="whole_row_causal")
    args = IterativeSFTConfig(output_dir=str(tmp_path), packing=True, **COMMON)
    with pytest.raises(ValueError, match=r"^trainer\.packing: this model's attention \(whole_row_causal\) lets"):
        IterativeSFTTrainer(model, args, processing_class=AutoTokenizer.from_pretrained(llama_path))
    # The same model trains padded: its attention is right for one example per row.
    args = IterativeSFTConfig(output_dir=str(tmp_path), **COMMON)
    stats = IterativeSFTTrainer(model, args, processing_class=AutoTokenizer.from_pretrained(llama_path)).step(
        texts=RAGGED[:2])
    assert stats["updates"] == 1
