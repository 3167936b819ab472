"""Faults injected from outside (ray.kill, the OS): rounds complete with every sample exactly once, a dead
trainer comes back from its checkpoint, and a killed driver resumes to the same weights."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from iterft_ray import IterativeSFTConfig, IterativeSFTTrainer
from iterft_ray.cli import main
from iterft_ray.train import checkpoint
from iterft_ray.train.checkpoint import load_training_state, save_training_state
from iterft_ray.run.loop import IterativeLoop
from iterft_ray.run.run_dir import latest_checkpoint
from iterft_ray.weights.snapshot import weights_checksum

# The module's trainers reuse its earlier trainers' actors (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("warm_actors")

TIMING = {"generate_time", "filter_time", "train_time", "sync_time", "round_time"}


def tiny_config(run_dir, rounds=3, **loop):
    return {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"task": "addition", "task_options": {"num_train": 64, "num_heldout": 8, "num_warmup": 16}},
        "filters": [{"name": "length_bounds", "min_chars": 1}],
        "sampling": {"num_samples": 4, "max_new_tokens": 6},
        "trainer": {"learning_rate": 3e-3, "per_device_train_batch_size": 16, "optim": "adamw_torch"},
        "resources": {"num_generators": 1, "filter_pool_size": 1},
        "loop": {"rounds": rounds, "prompts_per_round": 24, "save_every": 1, "eval_every": 2,
                 "warmup_passes": 1, "output_dir": str(run_dir), **loop},
    }


@pytest.mark.parametrize("part_bytes", [None, 2**16])
def test_training_state_round_trip_is_exact(llama_path, tmp_path, monkeypatch, part_bytes):
    """Also with the optimizer state written in many parts (a small part size), as a large model's is."""
    if part_bytes is not None:
        monkeypatch.setattr(checkpoint, "OPTIMIZER_PART_BYTES", part_bytes)
    def trainer(path):
        args = IterativeSFTConfig(output_dir=str(tmp_path / "o"), report_to="none", learning_rate=1e-2,
                                  per_device_train_batch_size=2, optim="adamw_torch", warmup_steps=3)
        return IterativeSFTTrainer(AutoModelForCausalLM.from_pretrained(path), args,
                                   processing_class=AutoTokenizer.from_pretrained(path))

    texts = ["12+30=42", "7+5=12", "100+1=101", "3+3=6", "45+45=90"]
    a = trainer(llama_path)
    a.step(texts=texts)
    save_training_state(a, tmp_path / "ckpt", {"round_index": 1})
    parts = list((tmp_path / "ckpt" / "optimizer").glob("part-*"))
    assert len(parts) == 1 if part_bytes is None else len(parts) > 10
    (tmp_path / "ckpt.tmp").mkdir()  # what a crash while saving the next one leaves behind
    a.step(texts=texts)

    b = trainer(str(tmp_path / "ckpt"))
    assert load_training_state(b, tmp_path / "ckpt") == {"round_index": 1}
    assert b.state.global_step == 3
    b.step(texts=texts)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    assert not list((tmp_path / "ckpt").glob("*.bin")) and not list((tmp_path / "ckpt").glob("*.pt"))


@pytest.fixture
def local_ray(ray_up):
    """The session's Ray (tests/conftest.py)."""


def _run_round_while(loop, fault):
    """Run loop.round() in a thread and inject `fault` once generation is under way."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(stats=loop.round()))
    thread.start()
    time.sleep(1.0)
    fault()
    thread.join(timeout=300)
    assert not thread.is_alive()
    return result["stats"]


def _assert_each_prompt_sampled_exactly(run_dir, round_number, prompts, samples):
    table = pq.read_table(run_dir / "rounds" / f"{round_number:04d}" / "generations.parquet")
    counts = pc.value_counts(table["prompt_id"]).to_pylist()
    assert len(counts) == prompts and all(c["counts"] == samples for c in counts)
    assert len(set(table["sample_id"].to_pylist())) == table.num_rows == prompts * samples


def test_killed_generator_and_filter_are_replaced_and_no_sample_is_lost_or_doubled(local_ray, tmp_path):
    cfg = tiny_config(tmp_path / "run", rounds=2)
    cfg["loop"]["prompts_per_round"] = 64
    cfg["sampling"]["max_new_tokens"] = 12
    loop = IterativeLoop(cfg)
    try:
        generator = loop.rl.generators[0]
        pid = ray.get(generator.info.remote())["pid"]
        _run_round_while(loop, lambda: os.kill(pid, signal.SIGKILL))
        assert ray.get(generator.info.remote())["pid"] != pid  # it really died and came back
        _assert_each_prompt_sampled_exactly(tmp_path / "run", 1, 64, 4)

        filter_actor = loop.rl.filter_pool.actors[0]
        _run_round_while(loop, lambda: ray.kill(filter_actor, no_restart=False))
        _assert_each_prompt_sampled_exactly(tmp_path / "run", 2, 64, 4)
    finally:
        loop.shutdown()


def test_dead_trainer_is_restored_from_checkpoint_not_fresh(local_ray, tmp_path):
    run_dir = tmp_path / "run"
    loop = IterativeLoop(tiny_config(run_dir, rounds=3, save_every=2))
    try:
        with pytest.raises(RuntimeError, match="before the first checkpoint"):
            ray.kill(loop.rl.trainer.ranks[0])
            loop.recover_trainer()
    finally:
        loop.shutdown()

    loop = IterativeLoop(tiny_config(run_dir, rounds=3, save_every=2))
    try:
        loop.round()
        loop.round()  # checkpoint after round 2
        saved = load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))
        with pytest.raises(KeyboardInterrupt):  # a Ctrl-C the command line remembered (cli.CtrlC): no round runs
            loop.run(stop=lambda: True)
        assert loop.round_index == 2
        at_checkpoint = loop.rl.trainer.checksum()
        ray.kill(loop.rl.trainer.ranks[0])
        stats = loop.run()  # round 3 finds the trainer dead, restores round 2's checkpoint, runs round 3
        assert [s["round"] for s in stats] == [3]
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["round"] for m in lines] == [0, 1, 2, 3]  # 0: the evaluation before round 1
        assert stats[0]["global_step"] > lines[1]["global_step"]

        ray.kill(loop.rl.trainer.ranks[0])
        loop.recover_trainer()
        restored = loop.rl.trainer.checksum()
        assert restored == weights_checksum(AutoModelForCausalLM.from_pretrained(latest_checkpoint(run_dir)))
        assert latest_checkpoint(run_dir).name == "round-0003"
        assert at_checkpoint != restored and saved  # round 3 trained on from round 2's weights
        infos = ray.get([g.info.remote() for g in loop.rl.generators])
        assert all(i["checksum"] == restored for i in infos)  # generators reloaded: the restored trainer's
        assert all(i["version"] == loop.rl.version > stats[0]["weight_version"] for i in infos)  # version moved on
    finally:
        loop.shutdown()


def _metrics(run_dir):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_killed_driver_resumes_to_the_same_weights_and_metrics(local_ray, tmp_path, capsys):
    """CPU, fixed seed, one trainer process: bit-for-bit equal, not just close. The killed run is a driver of its
    own with the local Ray it started; the run it is compared with, and its resume, run here on the session's Ray
    (`iterft run` in this process), so the exact resume holds whatever Ray the run dir is resumed on."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "iterft_ray", "run"]

    straight = tmp_path / "straight"
    (tmp_path / "straight.yaml").write_text(yaml.safe_dump(tiny_config(straight, rounds=4)))
    assert main(["run", str(tmp_path / "straight.yaml")]) == 0

    broken = tmp_path / "broken"
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump(tiny_config(broken, rounds=4)))
    driver = subprocess.Popen([*cmd, str(config)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (broken / "checkpoints" / "round-0002").exists():
        assert driver.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    assert not (broken / "checkpoints" / "round-0004").exists()
    capsys.readouterr()
    assert main(["run", str(config), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out

    a = load_file(str(straight / "checkpoints" / "round-0004" / "model.safetensors"))
    b = load_file(str(broken / "checkpoints" / "round-0004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(straight) == _metrics(broken)
    for r in range(1, 5):
        x = pq.read_table(straight / "rounds" / f"{r:04d}" / "generations.parquet")
        y = pq.read_table(broken / "rounds" / f"{r:04d}" / "generations.parquet")
        assert x.equals(y), r


def test_async_run_killed_three_times_at_random_moments_resumes_exactly(local_ray, tmp_path):
    """Async mode (2 generators, staleness 1, a prompts file): the rollouts in flight at a checkpoint are saved
    with it, so a run whose driver is SIGKILLed three times and resumed ends bit-identical to one that was not.
    The killed drivers start a local Ray each; the run compared with and the last resume run in this process."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{i % 7}=", "answer": str(i + i % 7)}) + "\n"
                               for i in range(250)))

    def config(run_dir):
        c = tiny_config(run_dir, rounds=7, async_mode=True, max_staleness=1, warmup_passes=0, eval_every=3)
        c["data"] = {"prompts_file": str(prompts)}
        c["resources"].update(num_generators=2, generator_cpus=0.5)  # the local Ray has 2 CPUs on a 2-core machine
        path = tmp_path / f"{run_dir.name}.yaml"
        path.write_text(yaml.safe_dump(c))
        return str(path)

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "iterft_ray", "run"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main(["run", config(straight)]) == 0

    rng, seen, broken_config = random.Random(0), None, config(broken)
    for kill in range(3):
        log = tmp_path / f"driver-{kill}.log"
        with log.open("w") as output:
            driver = subprocess.Popen([*cmd, broken_config, *(["--resume"] if kill else [])], env=env,
                                      start_new_session=True, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while latest_checkpoint(broken) is None or latest_checkpoint(broken).name == seen:
            assert driver.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(rng.uniform(0, 1.5))  # mid-round, mid-sampling or mid-checkpoint: wherever it lands
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
        seen = latest_checkpoint(broken).name
    assert seen != "round-0007"  # the last kill came before the end
    assert main(["run", broken_config, "--resume"]) == 0

    a = load_file(str(straight / "checkpoints" / "round-0007" / "model.safetensors"))
    b = load_file(str(broken / "checkpoints" / "round-0007" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(straight) == _metrics(broken)
    for r in range(1, 8):
        for name in (f"rounds/{r:04d}/generations.parquet", f"accepted/round-{r:04d}.parquet"):
            assert pq.read_table(straight / name).equals(pq.read_table(broken / name)), name
    prompts_trained = [p for r in range(1, 8) for p in pq.read_table(broken / "rounds" / f"{r:04d}" /
                                                                      "generations.parquet")["prompt_id"].to_pylist()]
    assert len(set(prompts_trained)) * 4 == len(prompts_trained)  # no prompt lost or repeated: 4 samples each
