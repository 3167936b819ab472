"""Trainer ranks sharded with FSDP2 on a local Ray (gloo): same update as one rank, shards, errors, checkpoints."""

import os

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from iterft_ray.actors.trainer_actor import TrainerRank
from iterft_ray.actors.trainer_group import TrainerGroup, TrainerRankError
from iterft_ray.config import ModelConfig, ResourcesConfig
from iterft_ray.weights.sync import publish_from
from iterft_ray.weights.snapshot import weights_checksum

TEXTS = ["12+30=42", "7+5=12", "100+1=101", "3+3=6", "45+45=90", "9+90=99", "1+1=2", "20+22=42"]
COMMON = {"learning_rate": 1e-2, "train_sampling_strategy": "sequential", "report_to": "none",
          "output_dir": "runs/test-ranks"}


@pytest.fixture(scope="module", autouse=True)
def local_ray(shared_ray):
    shared_ray.up()  # the session's Ray (tests/conftest.py)


def group(ranks, checkpoint=None, **args):
    return TrainerGroup(ModelConfig("tiny-llama"), {**COMMON, **args}, ResourcesConfig(trainer_ranks=ranks), checkpoint)


def full_weights(g):
    snapshot = ray.get(publish_from(g)[0])
    return {k: torch.from_numpy(v.copy()) for k, v in snapshot.arrays.items()}


def assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5, k


def on_rank(g, rank, fn):
    """Run `fn(actor_instance)` in rank `rank`'s process."""
    return ray.get(g.ranks[rank].__ray_call__.remote(fn))


@pytest.fixture(scope="module")
def warm_groups():
    """(one rank, two ranks) for an optimizer, started once: each test of it restarts them from the base weights
    with a fresh optimizer and schedule (`TrainerRank.restart_from`, as recipe.train_from: base does), which is
    what new groups would hold, without starting three trainer processes per test. One optimizer's at a time:
    the module's later tests need the CPUs."""
    groups = {}

    def groups_for(optim):
        for other in [o for o in groups if o != optim]:
            for g in groups.pop(other):
                g.shutdown()
        if optim not in groups:
            # Adam's first updates (about lr * sign(grad)) amplify float noise of near-zero gradients: a smaller rate.
            lr = 1e-2 if optim == "sgd" else 1e-3
            groups[optim] = (group(1, optim=optim, learning_rate=lr, per_device_train_batch_size=4),
                             group(2, optim=optim, learning_rate=lr, per_device_train_batch_size=2))
        else:
            for g in groups[optim]:
                g.call(TrainerRank.restart_from, two_path())
        return groups[optim]

    yield groups_for
    for pair in groups.values():
        for g in pair:
            g.shutdown()


@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:7], TEXTS[:1]], ids=["even", "uneven", "one-rank-empty"])
@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])  # the outer loop: one optimizer's groups at a time
def test_two_sharded_ranks_make_the_same_update_as_one_rank(optim, texts, warm_groups):
    one, two = warm_groups(optim)
    assert one.checksum() == two.checksum()
    for _ in range(2):  # AdamW's second update uses the (sharded) moments of the first
        s1, s2 = one.step(texts=texts), two.step(texts=texts)
        assert s1["updates"] == s2["updates"] and s1["num_sequences"] == s2["num_sequences"] == len(texts)
        assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-5)
        assert s1["grad_norm"] == pytest.approx(s2["grad_norm"], rel=1e-4)
    assert_close(full_weights(one), full_weights(two))


def test_ranks_hold_half_the_parameters_and_get_the_torchrun_environment():
    """Rank 1 never holds the whole model: it is built on the meta device and receives its shards from rank 0."""
    two = group(2, optim="adamw_torch", per_device_train_batch_size=2)
    try:
        two.step(texts=TEXTS)
        total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(two_path()).parameters())

        def local_sizes(actor):
            model, opt = actor.trainer.model, actor.trainer.optimizer.optimizer
            params = sum(p.to_local().numel() for p in model.parameters())
            moments = sum(s["exp_avg"].to_local().numel() for s in opt.state.values())
            env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
            return params, moments, env

        sizes = [on_rank(two, r, local_sizes) for r in range(2)]
        for rank, (params, moments, env) in enumerate(sizes):
            assert params == moments and abs(params - total / 2) <= total * 0.05
            assert env["RANK"] == env["LOCAL_RANK"] == str(rank) and env["WORLD_SIZE"] == "2"
        assert sizes[0][0] + sizes[1][0] == total
        assert sizes[0][2]["MASTER_PORT"] == sizes[1][2]["MASTER_PORT"]
        assert two.call(lambda actor: actor.built_on) == ["cpu", "meta"]
    finally:
        two.shutdown()


def two_path():
    from iterft_ray.tiny import resolve_model_path

    return resolve_model_path("tiny-llama")


def test_a_failing_rank_is_raised_with_its_rank_while_the_others_wait_in_a_collective():
    two = group(2, per_device_train_batch_size=2)
    try:
        def rank1_fails_rank0_waits(actor):
            if actor.rank == 1:
                raise ValueError("broken on rank 1")
            torch.distributed.barrier()  # never met: would wait until the process-group timeout (30 min)

        with pytest.raises(TrainerRankError, match=r"(?s)trainer rank 1 failed.*ValueError: broken on rank 1"):
            two.call(rank1_fails_rank0_waits)
        # The asynchronous form (how the driver starts a round's training) raises the same way.
        with pytest.raises(TrainerRankError, match=r"(?s)trainer rank 1 failed.*ValueError: broken on rank 1"):
            two.gather(two.call_async(rank1_fails_rank0_waits))
    finally:
        two.shutdown()


def test_sharded_checkpoint_loads_with_from_pretrained_and_resumes_with_any_rank_count(tmp_path):
    args = dict(optim="adamw_torch", per_device_train_batch_size=2)
    two = group(2, **args)
    try:
        two.step(texts=TEXTS)
        two.save(str(tmp_path / "ckpt"), {"round_index": 1})
        saved = two.checksum()
        two.step(texts=TEXTS)
        uninterrupted = full_weights(two)
    finally:
        two.shutdown()
    assert weights_checksum(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")) == saved
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(tmp_path / "ckpt" / "model.safetensors"))  # tied: stored once

    resumed_two = group(2, checkpoint=str(tmp_path / "ckpt"), **args)
    resumed_one = group(1, checkpoint=str(tmp_path / "ckpt"), optim="adamw_torch", per_device_train_batch_size=4)
    try:
        assert resumed_two.restored == resumed_one.restored == {"round_index": 1}
        resumed_two.step(texts=TEXTS)
        resumed_one.step(texts=TEXTS)
        assert_close(full_weights(resumed_two), uninterrupted)  # optimizer moments restored, not fresh
        assert_close(full_weights(resumed_one), uninterrupted)
    finally:
        resumed_two.shutdown()
        resumed_one.shutdown()
