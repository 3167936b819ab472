"""Weight snapshots: publish once, load in another actor, get the same model back."""

import sys

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from iterft_ray.tiny import build_tiny_model
from iterft_ray.weights.snapshot import load_snapshot, publish_weights, snapshot_from_model, weights_checksum

INPUT_IDS = [[1, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]]


@pytest.fixture(scope="module")
def local_ray(shared_ray):
    # Ship this module's functions by value (as if workers could not import it by name).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    shared_ray.up()  # the session's Ray (tests/conftest.py)


def load(path, dtype=torch.float32):
    cls = AutoModelForSeq2SeqLM if "t5" in str(path) else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype).eval()


def logits(model) -> torch.Tensor:
    ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids).logits
        return model(input_ids=ids).logits


def perturbed(model, seed=1):
    """The model after some 'training': every parameter moved away from what is on disk."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


def plasma_backed(array: np.ndarray) -> bool:
    base = array
    while getattr(base, "base", None) is not None:  # views, and the holder of an as_strided view
        base = base.base
    return type(base).__module__ == "ray._raylet"


@ray.remote
class Replica:
    """A generator stand-in: loads a fresh model from disk, then a published snapshot into it."""

    def load(self, path: str, dtype: str, weights: list) -> dict:
        torch.set_num_threads(1)
        model = load(path, getattr(torch, dtype))
        snapshot = ray.get(weights[0])
        zero_copy = all(not a.flags.writeable and plasma_backed(a) for a in snapshot.arrays.values())
        load_snapshot(model, snapshot)
        return {
            "version": snapshot.version,
            "checksum": weights_checksum(model),
            "logits": logits(model).float().numpy(),
            "zero_copy": zero_copy,
        }


@pytest.fixture(scope="module")
def replica(local_ray):
    return Replica.remote()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_publish_then_load_in_another_actor_gives_the_same_model(tiny_paths, replica, name):
    model = perturbed(load(tiny_paths[name]))
    ref = publish_weights(model, version=3)

    got = ray.get(replica.load.remote(tiny_paths[name], "float32", [ref]))

    torch.set_num_threads(1)  # the replica computes with one thread; same reduction order
    assert got["version"] == 3
    assert got["checksum"] == weights_checksum(model) == weights_checksum(ray.get(ref))
    assert torch.equal(torch.tensor(got["logits"]), logits(model))
    assert got["zero_copy"]


def test_get_is_zero_copy(llama_path, local_ray):
    snapshot = ray.get(publish_weights(load(llama_path), version=0))

    for array in snapshot.arrays.values():
        assert not array.flags.writeable
        assert plasma_backed(array)


def test_snapshot_is_unaffected_by_later_training(llama_path, local_ray):
    model = load(llama_path)
    before = weights_checksum(model)
    snapshot = snapshot_from_model(model, version=0)
    ref = publish_weights(model, version=0)

    perturbed(model)

    assert weights_checksum(model) != before
    assert weights_checksum(snapshot) == before
    assert weights_checksum(ray.get(ref)) == before


def test_bf16_round_trip(llama_path, replica):
    model = perturbed(load(llama_path, torch.bfloat16))
    snapshot = snapshot_from_model(model, version=1)
    assert set(snapshot.dtypes.values()) == {"bfloat16"}
    assert all(a.dtype == np.uint16 for a in snapshot.arrays.values())

    got = ray.get(replica.load.remote(llama_path, "bfloat16", [ray.put(snapshot)]))

    assert got["checksum"] == weights_checksum(model)
    fresh = load(llama_path, torch.bfloat16)
    load_snapshot(fresh, snapshot)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert b.dtype == torch.bfloat16 and torch.equal(a, b), name


def test_tied_embeddings_are_stored_once_and_restored(llama_path, tmp_path):
    model = perturbed(load(llama_path))
    assert model.config.tie_word_embeddings
    snapshot = snapshot_from_model(model, version=0)
    assert snapshot.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in snapshot.arrays

    tied = load(llama_path)
    load_snapshot(tied, snapshot)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert torch.equal(tied.lm_head.weight, model.lm_head.weight)

    untied = load(build_tiny_model("tiny-llama", tmp_path / "untied", tie_word_embeddings=False))
    load_snapshot(untied, snapshot)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert torch.equal(untied.lm_head.weight, model.lm_head.weight)
    assert torch.equal(untied.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_load_casts_to_the_model_dtype(llama_path):
    model = perturbed(load(llama_path))
    generator = load(llama_path, torch.bfloat16)

    load_snapshot(generator, snapshot_from_model(model, version=0))

    assert torch.equal(generator.model.norm.weight, model.model.norm.weight.bfloat16())
    assert generator.model.norm.weight.dtype == torch.bfloat16


def test_load_rejects_a_snapshot_of_another_architecture(tiny_paths, tmp_path):
    llama_snapshot = snapshot_from_model(load(tiny_paths["tiny-llama"]), version=0)
    with pytest.raises(KeyError, match="missing"):
        load_snapshot(load(tiny_paths["tiny-gpt2"]), llama_snapshot)

    wider = load(build_tiny_model("tiny-llama", tmp_path / "wide", hidden_size=128))
    with pytest.raises(ValueError, match="shape"):
        load_snapshot(wider, llama_snapshot)


def test_an_hf_replica_on_cpu_samples_from_the_shared_snapshot_itself(llama_path, local_ray):
    """The hf engine's load copies nothing on CPU: its weights are the snapshot's shared arrays, kept alive
    (and unwritten) while it uses them, and the next version re-points them."""
    from iterft_ray.config import SamplingConfig
    from iterft_ray.engines.hf import HFEngine
    from iterft_ray.data.prompts import prompt_table

    torch.set_num_threads(1)
    model = perturbed(load(llama_path))
    engine = HFEngine(llama_path, None, False)
    for version in (1, 2):
        ref = publish_weights(model, version)
        snapshot = ray.get(ref)
        engine.load(snapshot)
        shared = {a.ctypes.data for a in snapshot.arrays.values()}
        assert all(t.data_ptr() in shared for t in engine.model.state_dict().values())
        # Tied in the replica too: lm_head is still the embedding.
        assert engine.model.lm_head.weight.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()
        assert weights_checksum(engine.model) == weights_checksum(model)
        expected = logits(model)

        # The driver lets go of the version and the store is filled with other objects of the same size:
        # the replica's weights hold their object, so nothing may be written over them.
        nbytes = snapshot.nbytes
        del ref, snapshot
        others = [ray.put(np.full(nbytes, 7, np.uint8)) for _ in range(3)]
        assert torch.equal(logits(engine.model), expected)
        del others
        perturbed(model, seed=version + 1)

    # Sampling reads the shared weights and never writes them.
    before = weights_checksum(engine.model)
    rows = engine.sample(prompt_table(["12+30=", "7+5="]), SamplingConfig(num_samples=2, max_new_tokens=4),
                         seed=0, weight_version=2, generator_id=0, round_index=1)
    assert rows.num_rows == 4
    assert weights_checksum(engine.model) == before


def test_share_copies_where_it_cannot_share(llama_path, local_ray):
    """A replica of another dtype cannot point at the snapshot: it gets a cast copy in its own parameters."""
    model = perturbed(load(llama_path))
    generator = load(llama_path, torch.bfloat16)
    own = {name: t.data_ptr() for name, t in generator.state_dict().items()}
    snapshot = ray.get(publish_weights(model, version=1))

    load_snapshot(generator, snapshot, share=True)

    assert {name: t.data_ptr() for name, t in generator.state_dict().items()} == own
    assert torch.equal(generator.model.norm.weight, model.model.norm.weight.bfloat16())
