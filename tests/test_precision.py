"""fp32 master weights and optimizer state whatever the checkpoint's dtype; bf16 compute when asked."""

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from iterft_ray import IterativeSFTConfig, IterativeSFTTrainer
from iterft_ray.actors.trainer_group import TrainerGroup
from iterft_ray.config import ModelConfig, ResourcesConfig

TEXTS = ["12+30=42", "7+5=12", "100+1=101", "3+3=6"]
# SGD at this rate moves weights by ~1e-7, far below bf16's resolution near 1e-2 (~4e-5).
TINY_UPDATE = {"optim": "sgd", "learning_rate": 1e-5, "per_device_train_batch_size": 2, "report_to": "none",
               "train_sampling_strategy": "sequential"}


def assert_update_below_bf16_moved_master(before, after):
    moved = below_bf16 = 0
    for name in before:
        moved += int((after[name] != before[name]).sum())
        below_bf16 += int(((after[name] != before[name]) & (after[name].bfloat16() == before[name].bfloat16())).sum())
    assert moved > 0 and below_bf16 > 0.9 * moved  # the fp32 master moved where bf16 weights could not


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_checkpoint_trains_fp32_master_and_moves_below_bf16_resolution(bf16_checkpoint, tmp_path, bf16):
    args = IterativeSFTConfig(output_dir=str(tmp_path), bf16=bf16, use_cpu=True, **TINY_UPDATE)
    trainer = IterativeSFTTrainer(bf16_checkpoint, args)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.step(texts=TEXTS)
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert_update_below_bf16_moved_master(before, after)
    if bf16:
        assert trainer.accelerator.mixed_precision == "bf16"  # autocast on one rank


def test_sharded_ranks_compute_in_bf16_and_keep_fp32_masters(bf16_checkpoint, ray_up):
    # On the session's Ray (tests/conftest.py).
    two = TrainerGroup(ModelConfig(str(bf16_checkpoint)),
                       {**TINY_UPDATE, "bf16": True, "use_cpu": True, "output_dir": "runs/t"},
                       ResourcesConfig(trainer_ranks=2))
    try:
        def step_seeing_dtypes(actor):
            model = actor.trainer.model
            seen = []
            layer = model.model.layers[0].self_attn.q_proj
            hook = layer.register_forward_pre_hook(lambda m, _: seen.append(m.weight.dtype))
            before = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
            actor.trainer.train_examples(actor.trainer.build_examples(None, None, None, TEXTS, None)[actor.rank::2])
            hook.remove()
            after = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
            masters = {p.dtype for p in model.parameters()} | {
                s["momentum_buffer"].dtype for s in actor.trainer.optimizer.optimizer.state.values()
                if s.get("momentum_buffer") is not None}
            return seen, masters, before, after

        results = two.call(step_seeing_dtypes)
        for seen, masters, before, after in results:
            assert seen and set(seen) == {torch.bfloat16}  # MixedPrecisionPolicy: bf16 compute
            assert masters == {torch.float32}
            assert_update_below_bf16_moved_master(before, after)
    finally:
        two.shutdown()
