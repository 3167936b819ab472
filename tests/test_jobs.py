"""The main job end to end: the demo config (two rounds) in-process, and the job through `ray job submit`'s API."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from iterft_ray.cli import main
from iterft_ray.records import PLOTTED, plot_metrics

ROOT = Path(__file__).resolve().parents[1]


def assert_run_files(run: Path, rounds: int):
    assert (run / "config.yaml").exists()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(1, rounds + 1))
    for key in ("accept_rate", "reward_mean", "loss", "num_target_tokens", "generate_time", "filter_time",
                "train_time", "sync_time", "heldout_accuracy"):
        assert all(key in m for m in metrics), key
    for r in range(1, rounds + 1):
        table = pq.read_table(run / "rounds" / f"{r:04d}" / "generations.parquet")
        assert table.num_rows == metrics[r - 1]["samples"]
        assert {"score", "accepted", "weight_version", "completion", "prompt"} <= set(table.column_names)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    AutoModelForCausalLM.from_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(checkpoint)
    image = matplotlib.image.imread(run / "plot.png")
    _, drawn = plot_metrics(run)
    assert drawn == [m for m in PLOTTED if any(isinstance(x.get(m), (int, float)) for x in metrics)]
    assert image.shape[0] == int(2.2 * len(drawn) * 80)  # one panel (one curve) per metric
    return metrics


def test_demo_config_two_rounds_writes_every_file(tmp_path):
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        code = main(["run", "demo", "--set", "loop.rounds=2", "--set", f"loop.output_dir={tmp_path / 'run'}",
                     "--set", "loop.save_every=1"])
    finally:
        ray.shutdown()
    assert code == 0
    assert_run_files(tmp_path / "run", rounds=2)
    assert (tmp_path / "run" / "checkpoints" / "round-0001").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_head(tmp_path):
    """A Ray head started with `ray start` on loopback, stopped afterwards."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    port, dashboard = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run(
        [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=120,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_runs_the_job(local_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(local_head)
    runtime_env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(ROOT)
    run = tmp_path / "job-run"
    job = client.submit_job(
        entrypoint=f"{sys.executable} jobs/iterative_sft.py --config tiny --set loop.output_dir={run}",
        runtime_env=runtime_env,
    )
    deadline = time.time() + 300
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, client.get_job_logs(job)
        time.sleep(2)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)
    assert "round   2" in client.get_job_logs(job)
    assert_run_files(run, rounds=2)
