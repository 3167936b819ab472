"""Delta weight sync: a version travels as what changed since the version a generator holds.

After every version each generator holds exactly the trainer's fp32 master weights cast to the engines'
dtype (bf16 here: a bf16 checkpoint), the bytes that travelled are the delta's, fewer than the whole
version's, and a generator that does not hold the delta's base (new, or behind) loads the whole version.
"""

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from iterft_ray.config import ResourcesConfig, SamplingConfig
from iterft_ray.ray_trainer import RayIterativeSFTTrainer
from iterft_ray.tiny import build_tiny_model
from iterft_ray.weights.delta import apply_delta, weight_delta
from iterft_ray.weights.snapshot import _from_array, owned_copy, snapshot_from_model, weights_checksum

# The module's trainers reuse its earlier trainers' actors (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("warm_actors")

TEXTS = ["12+30=42", "7+5=12", "3+4=7", "10+11=21"]
TRAINER_ARGS = {"learning_rate": 1e-5, "per_device_train_batch_size": 4, "optim": "adamw_torch"}


def test_a_delta_applied_to_its_base_gives_the_new_version_exactly(bf16_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(bf16_checkpoint, dtype=torch.float32)
    base = snapshot_from_model(model, 0, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # an Adam-like first step: every master moves by the learning rate
            p.add_(1e-5 * torch.sign(torch.randn_like(p)))
        model.model.norm.weight.add_(1.0)  # one entry changes in every element: it travels whole
    new = snapshot_from_model(model, 1, dtype=torch.bfloat16)

    delta = weight_delta(base, new)

    assert (delta.base_version, delta.version) == (0, 1)
    assert "model.norm.weight" in delta.whole and delta.changed
    assert all(i.dtype == np.int32 for i, _ in delta.changed.values())
    assert 0 < delta.nbytes < new.nbytes / 2
    replica = owned_copy(base)
    apply_delta({n: _from_array(a, replica.dtypes[n]) for n, a in replica.arrays.items()}, delta)
    assert weights_checksum(replica) == weights_checksum(new) == weights_checksum(model, torch.bfloat16)
    assert weights_checksum(replica) != weights_checksum(base)


def _infos(rt):
    return ray.get([g.info.remote() for g in rt.generators])


def _held(rt):
    return [(i["version"], i["loaded_from"], i["loaded_as"], i["checksum"]) for i in _infos(rt)]


def _trainer(path, tmp_path, engine="hf", num_generators=2, **resources):
    return RayIterativeSFTTrainer(
        path, {**TRAINER_ARGS, "output_dir": str(tmp_path / "t")},
        resources=ResourcesConfig(num_generators=num_generators, filter_pool_size=1, weight_transport="broadcast",
                                  **resources),
        sampling=SamplingConfig(engine=engine, num_samples=1, max_new_tokens=4))


# These two run before the module's trainer (`rt`) starts: `ray_up` gives a test a clean Ray, no actor alive.
def test_with_weight_delta_off_every_version_travels_whole(bf16_checkpoint, ray_up, tmp_path):
    rt = _trainer(bf16_checkpoint, tmp_path, num_generators=1, weight_delta="off")
    try:
        rt.sync_weights()
        rt.step(texts=TEXTS)
        version = rt.sync_weights()
        assert rt.weight_sync.delta is None
        assert _held(rt) == [(version, "broadcast", "whole", rt.trainer.checksum())]
        assert rt.weight_sync.broadcast_bytes >= ray.get(rt.weights).nbytes
    finally:
        rt.shutdown()


def test_weight_delta_is_checked_at_load():
    with pytest.raises(ValueError, match="resources.weight_delta: expected 'auto' or 'off', got 'on'"):
        ResourcesConfig(weight_delta="on")


@pytest.fixture(scope="module")
def vllm_bf16(tmp_path_factory):
    """A tiny Llama vLLM's CPU attention runs (head_dim 32), saved in bf16."""
    path = tmp_path_factory.mktemp("vllm") / "llama"
    build_tiny_model("tiny-llama", path, num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    return str(path)


@pytest.mark.timeout(180)
def test_a_vllm_engine_applies_broadcast_deltas_in_place(vllm_bf16, ray_up, tmp_path):
    pytest.importorskip("vllm")
    rt = _trainer(vllm_bf16, tmp_path, engine="vllm", num_generators=1)
    try:
        rt.sync_weights()
        full = ray.get(rt.weights).nbytes
        rt.step(texts=TEXTS)
        version = rt.sync_weights()  # the group's first version travels whole
        assert _held(rt) == [(version, "broadcast", "whole", rt.trainer.checksum())]
        for _ in range(2):
            rt.step(texts=TEXTS)
            version = rt.sync_weights()
            assert _held(rt) == [(version, "broadcast", "delta", rt.trainer.checksum())]
            assert _infos(rt)[0]["transfer_bytes"] < full
        rows = rt.collect(rt.generate(["12+30=", "7+5="], round_index=1))
        assert set(rows["weight_version"].to_pylist()) == {version}
    finally:
        rt.shutdown()


@pytest.fixture(scope="module")
def rt(bf16_checkpoint, shared_ray, tmp_path_factory):
    """One trainer (fp32 masters of a bf16 checkpoint) broadcasting to 2 hf generators, for the module."""
    shared_ray.up()
    rt = _trainer(bf16_checkpoint, tmp_path_factory.mktemp("delta"))
    rt.sync_weights()
    yield rt
    rt.shutdown()


def test_each_version_is_broadcast_as_a_delta(rt):
    full = ray.get(rt.weights).nbytes
    # The group's first version travels whole: before it, a CPU hf engine samples from the node's shared
    # snapshot, which a delta cannot be written into.
    rt.step(texts=TEXTS)
    version = rt.sync_weights()
    assert _held(rt) == [(version, "broadcast", "whole", rt.trainer.checksum())] * 2
    for _ in range(2):
        rt.step(texts=TEXTS)
        version = rt.sync_weights()
        assert _held(rt) == [(version, "broadcast", "delta", rt.trainer.checksum())] * 2
        sent = rt.weight_sync.broadcast_bytes
        assert [i["transfer_bytes"] for i in _infos(rt)] == [sent] * 2
        assert sent < full
    # Sampling reads the weights the deltas were written into.
    rows = rt.collect(rt.generate(["12+30=", "7+5="], round_index=1))
    assert set(rows["weight_version"].to_pylist()) == {version}


def test_a_generator_behind_loads_the_whole_version_then_deltas_again(rt):
    # Two versions published while the generators load neither: the second delta's base is not what they
    # hold, so they load the whole snapshot, and the next version's delta applies to it.
    for _ in range(2):
        rt.step(texts=TEXTS)
        rt.publish_weights()
    version = rt.sync_weights()
    assert _held(rt) == [(version, "object_store", "whole", rt.trainer.checksum())] * 2
    assert [i["transfer_bytes"] for i in _infos(rt)] == [ray.get(rt.weights).nbytes] * 2
    rt.step(texts=TEXTS)
    version = rt.sync_weights()
    assert _held(rt) == [(version, "broadcast", "delta", rt.trainer.checksum())] * 2


def test_a_new_generator_loads_the_whole_version(rt):
    rt.scale_generators(3)  # the group forms anew, with the newcomer: its first version travels whole to all
    rt.step(texts=TEXTS)
    version = rt.sync_weights()
    assert _held(rt) == [(version, "broadcast", "whole", rt.trainer.checksum())] * 3
    rt.step(texts=TEXTS)
    version = rt.sync_weights()
    assert _held(rt) == [(version, "broadcast", "delta", rt.trainer.checksum())] * 3
