"""Runs that fit the machine, or a one-line refusal before any actor starts: the embedded Ray has what the machine
has (not what the run asks for), each actor asks Ray for the memory its model takes, and the Python API refuses
bad trainer arguments before Ray starts."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from iterft_ray.actors.footprint import TRAINING_STATE_BYTES, actor_memory, model_shape
from iterft_ray.config import LoraConfig, ModelConfig, ResourcesConfig, SamplingConfig
from iterft_ray.tiny import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
# Qwen2.5-7B's published config.json, the fields that set its size.
QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False)


def _embedded_env() -> dict[str, str]:
    """A driver that starts the embedded Ray: no address, no shared Ray's auth settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_", "RAY_ENABLE"))}
    return dict(env, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


def _run(tmp_path: Path, config: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iterft_ray", "run", config, "--set",
                           f"loop.output_dir={tmp_path / 'run'}", *[a for o in overrides for a in ("--set", o)]],
                          env=_embedded_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)


def test_fifty_generators_are_refused_on_the_embedded_ray_before_any_actor_starts(tmp_path):
    """The reported case: 50 generators on a 2-core machine started 50 processes of ~0.6 GB each. The local Ray
    now has the machine's CPUs, not the run's demand, and the fit check refuses the run in one line."""
    run = _run(tmp_path, "tiny", "resources.num_generators=50")
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and last.startswith("iterft: error: resources: the run asks for"), run.stderr[-3000:]
    assert "50 generators x {CPU: 1, memory: 0.60 GB}" in last and "the local Ray (this machine) has" in last, last
    assert f"CPU: {os.cpu_count()}," in last.split("has")[-1], last
    assert "Traceback" not in run.stderr and not (tmp_path / "run").exists()
    assert "starting run" not in run.stdout  # refused before the local Ray started


def _sparse_checkpoint(out: Path, shapes: dict[str, torch.Size]) -> None:
    """A bf16 safetensors file with these tensors, written as a sparse file: the header is real, the data all
    zeros and never on disk (a 7B checkpoint in 0 bytes of disk)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


@pytest.fixture(scope="module")
def qwen_7b(tmp_path_factory):
    """Qwen2.5-7B's shape (published config, random weights never written: a sparse file) and a tokenizer."""
    out = tmp_path_factory.mktemp("qwen7b")
    config = transformers.Qwen2Config(**QWEN_7B, dtype="bfloat16")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    _sparse_checkpoint(out, {name: p.shape for name, p in model.state_dict().items()})
    config.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def test_a_model_too_big_for_the_machines_memory_is_refused_naming_its_memory(qwen_7b, tmp_path):
    path, parameters = qwen_7b
    assert model_shape(ModelConfig(str(path))).parameters == parameters  # read from the safetensors header
    run = _run(tmp_path, "tiny", f"model.name_or_path={path}")
    last = run.stderr.strip().splitlines()[-1]
    trainer_gb = (0.6e9 + TRAINING_STATE_BYTES * parameters) / 1e9
    assert run.returncode == 2 and f"1 trainer rank x {{CPU: 1, memory: {trainer_gb:.2f} GB}}" in last, \
        run.stderr[-3000:]
    assert "or the memory the model takes (a smaller model, model.lora" in last, last
    assert "Traceback" not in run.stderr and not (tmp_path / "run").exists()


def test_the_estimate_reads_a_saved_checkpoint_as_its_model_and_peft_count_it(llama_path):
    """Parameters from the safetensors header equal the model's own count; a LoRA adapter's those peft adds."""
    import peft

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_path)
    shape = model_shape(ModelConfig(str(llama_path)))
    assert shape.parameters == model.num_parameters()
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    adapted = peft.get_peft_model(model, lora.peft_config())
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert shape.adapter_parameters(4, ["q_proj", "v_proj"]) == trainable
    full = actor_memory(ModelConfig(str(llama_path)), SamplingConfig(), ResourcesConfig(trainer_ranks=2))
    assert full["trainer rank"] == 0.6e9 + TRAINING_STATE_BYTES * shape.parameters / 2  # split over the ranks
    with_lora = actor_memory(ModelConfig(str(llama_path), lora=lora), SamplingConfig(), ResourcesConfig())
    assert with_lora["trainer rank"] == 0.6e9 + shape.parameters * shape.dtype_bytes + 16 * trainable


BAD_TRAINER_ARGUMENT = """
import ray
from iterft_ray.ray_trainer import RayIterativeSFTTrainer
try:
    RayIterativeSFTTrainer("tiny-llama", {"lerning_rate": 1e-3})
except ValueError as e:
    print("ValueError:", e)
print("ray started:", ray.is_initialized())
"""


def test_a_bad_trainer_argument_is_a_value_error_before_ray_starts():
    done = subprocess.run([sys.executable, "-c", BAD_TRAINER_ARGUMENT], env=_embedded_env(), capture_output=True,
                          text=True, timeout=120)
    assert "ValueError: trainer.lerning_rate: unknown key" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "ray started: False" in done.stdout


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_the_small_configs_ask_for_at_most_two_cpus(name):
    """What the README's `ray job submit` recipe needs of a 2-CPU head (test_jobs submits it to one)."""
    from iterft_ray.actors.placement import actor_requests, total_request
    from iterft_ray.config import load_config

    config = load_config(name)
    assert total_request(actor_requests(config.resources)).get("CPU", 0) <= 2


def test_iterft_check_says_ok_or_what_is_wrong_and_writes_nothing(tmp_path):
    check = [sys.executable, "-m", "iterft_ray", "check", "tiny", "--set", f"loop.output_dir={tmp_path / 'run'}"]
    ok = subprocess.run(check, env=_embedded_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "tiny: ok; 2 rounds into" in ok.stdout and "fits this machine" in ok.stdout, ok.stderr
    too_many = subprocess.run(check + ["--set", "resources.num_generators=50"], env=_embedded_env(), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    assert too_many.returncode == 2 and "50 generators" in too_many.stderr.strip().splitlines()[-1]
    typo = subprocess.run(check + ["--set", "loop.rundz=3"], env=_embedded_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert typo.returncode == 2 and typo.stderr.startswith("iterft: error: loop.rundz: unknown key"), typo.stderr
    assert not (tmp_path / "run").exists()


def test_iterft_config_show_prints_every_default_and_loads_again(tmp_path):
    from iterft_ray.config import load_config

    shown = subprocess.run([sys.executable, "-m", "iterft_ray", "config", "show", "tiny", "--set", "loop.rounds=5"],
                           env=_embedded_env(), capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    data = yaml.safe_load(shown.stdout)
    assert data["loop"]["rounds"] == 5 and data["resources"]["filter_cpus"] == 0  # an override and a default
    assert data["sampling"]["vllm"]["enable_prefix_caching"] is True
    (tmp_path / "shown.yaml").write_text(shown.stdout)
    assert load_config(tmp_path / "shown.yaml").to_dict() == data


STARTS_AND_STOPS = """
import ray
from iterft_ray.config import ResourcesConfig
from iterft_ray.ray_trainer import RayIterativeSFTTrainer
for _ in range(2):
    trainer = RayIterativeSFTTrainer("tiny-llama", {"max_length": 32}, resources=ResourcesConfig())
    trainer.shutdown()
    ray.shutdown()
print("done")
"""


def test_starting_and_stopping_the_system_again_and_again_leaves_no_crash_stack():
    """Ray's C++ core once printed a `TerminateHandler` ... `CoreWorker::~CoreWorker` stack at exit: the Python
    API started and stopped twice in one process must exit quietly."""
    done = subprocess.run([sys.executable, "-c", STARTS_AND_STOPS], env=_embedded_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("done"), done.stderr[-3000:]
    for mark in ("TerminateHandler", "CoreWorker::~CoreWorker", "*** SIG", "Traceback"):
        assert mark not in done.stderr, done.stderr[-3000:]
