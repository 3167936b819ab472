"""The main job end to end: the demo config (two rounds) in-process, and the job through `ray job submit`'s API."""

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import matplotlib.image
import pyarrow.parquet as pq
import pytest
import ray
from transformers import AutoModelForCausalLM, AutoTokenizer

from iterft_ray.cli import main
from iterft_ray.run.records import PANEL_INCHES, PLOT_DPI, RunRecorder, metrics_figure, plot_metrics, plotted_metrics
from ray_head import RAY_CLI, free_port, loopback_env, ray_head

ROOT = Path(__file__).resolve().parents[1]


def assert_run_files(run: Path, rounds: int):
    assert (run / "config.yaml").exists()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    before, metrics = metrics[0], metrics[1:]
    assert before["round"] == 0 and 0 <= before["heldout_accuracy"] <= 1  # held-out accuracy before round 1
    assert [m["round"] for m in metrics] == list(range(1, rounds + 1))
    for key in ("accept_rate", "reward_mean", "loss", "num_target_tokens", "generate_time", "filter_time",
                "train_time", "sync_time"):
        assert all(key in m for m in metrics), key
    assert "heldout_accuracy" in metrics[-1]  # every loop.eval_every rounds and always after the last
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
    assert drawn == plotted_metrics([before, *metrics])
    assert {"eval_greedy", "eval_pass@*"} <= set(drawn)
    assert image.shape[0] == round(PANEL_INCHES * len(drawn) * PLOT_DPI)  # one panel (one curve) per metric
    return metrics


def test_recorder_plot_shows_every_round_after_close(tmp_path):
    """plot.png is drawn on a background thread; close() waits for the newest drawing."""
    recorder = RunRecorder(tmp_path)
    for r in range(1, 6):
        recorder.record({"round": r, "loss": 1.0 / r, "accept_rate": 0.1 * r})
    recorder.close()
    assert (tmp_path / "plot.png").stat().st_mtime_ns >= (tmp_path / "metrics.jsonl").stat().st_mtime_ns
    assert not (tmp_path / "plot.tmp.png").exists()
    image = matplotlib.image.imread(tmp_path / "plot.png")
    assert image.shape[0] == round(PANEL_INCHES * 2 * PLOT_DPI)  # loss and accept_rate


def test_plot_breaks_the_loss_at_rounds_without_one_and_draws_shares_in_percent():
    rows = [{"round": 0, "heldout_accuracy": 0.25}] + [
        {"round": r, "accept_rate": a, "loss": loss, "filter_errors": 0, "reward_mean": 0.5}
        for r, a, loss in ((1, 0.1, 2.0), (2, 0.0, None), (3, 0.3, 1.0), (4, 0.4, 0.5))]
    rows[3]["heldout_accuracy"] = 0.5  # evaluated before round 1 and after round 3 only
    fig, _ = metrics_figure(rows, "run")
    panels = {ax.get_ylabel(): ax for ax in fig.axes}
    loss = panels["loss"].lines[0]
    assert list(loss.get_xdata()) == [1, 2, 3, 4]
    assert loss.get_ydata()[1] != loss.get_ydata()[1]  # NaN at round 2: no line from round 1 to round 3
    assert list(panels["accept_rate (%)"].lines[0].get_ydata()) == pytest.approx([10, 0, 30, 40])
    # Held-out accuracy is measured every few rounds: its points are joined, not broken.
    assert list(panels["heldout_accuracy (%)"].lines[0].get_ydata()) == [25, 50]
    # A metric that never changed gets an axis from 0 to its value (0 to 1 for zero), not +-0.04 around it.
    low, high = panels["filter_errors"].get_ylim()
    assert low < 0 < 1 <= high < 1.2
    low, high = panels["reward_mean"].get_ylim()
    assert low < 0 and 0.5 < high < 0.6


def test_demo_config_two_rounds_writes_every_file(tmp_path, ray_up):
    code = main(["run", "demo", "--set", "loop.rounds=2", "--set", f"loop.output_dir={tmp_path / 'run'}",
                 "--set", "loop.save_every=1"])  # on the session's Ray (tests/conftest.py)
    assert code == 0
    assert_run_files(tmp_path / "run", rounds=2)
    assert (tmp_path / "run" / "checkpoints" / "round-0001").exists()


@contextmanager
def local_head_at():
    """A Ray head from `ray start` on loopback with token auth (the user's ~/.ray/auth_token), stopped on exit."""
    env = loopback_env()
    subprocess.run([RAY_CLI, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    port, dashboard = free_port(), free_port()
    args = ["--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", "--include-dashboard=true", "--disable-usage-stats",
            # Not the default 52365: the session's shared Ray (conftest.py) may hold it, and an agent that
            # cannot bind never registers ("No available agent to submit job").
            f"--dashboard-agent-listen-port={free_port()}"]
    with ray_head(args, env):
        yield f"http://127.0.0.1:{dashboard}"


@pytest.fixture
def job_runs_dir():
    """A relative loop.output_dir of a job lands under ~/iterft-runs (README "Running on Ray"); removed after."""
    name = f"test-jobs-{uuid.uuid4().hex[:8]}"
    yield name, Path.home() / "iterft-runs" / name
    for run in (name, f"{name}-demo"):
        shutil.rmtree(Path.home() / "iterft-runs" / run, ignore_errors=True)


def test_ray_job_submit_runs_the_job(job_runs_dir, tmp_path):
    """The README's job on a head of 2 CPUs (this machine's), with the README's relative output_dir: `tiny`
    whole and `demo` for one round; the files are where the job said, after the job and the head (whose
    session directory held the job's working directory) are gone."""
    relative, expected = job_runs_dir
    with local_head_at() as head:
        logs = _submit(head, "tiny", relative)
        demo_logs = _submit(head, "demo", relative + "-demo", "loop.rounds=1", "eval.num_samples=1")
    written = re.search(r"run written to (\S+)", logs)
    assert written and Path(written.group(1)) == expected, logs
    assert "starting run " in logs and f" in {expected}" in logs, logs
    assert_run_files(expected, rounds=2)
    assert "round   1" in demo_logs and (Path(f"{expected}-demo") / "checkpoints" / "round-0001").is_dir(), demo_logs


def _submit(local_head: str, config: str, output_dir: str, *overrides: str) -> str:
    with pytest.raises(urllib.error.HTTPError) as refused:  # token authentication is on
        urllib.request.urlopen(f"{local_head}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)

    for _ in range(6):  # a fresh head's job agent may not be registered yet: Ray answers "try again later"
        submit = subprocess.run(
            [RAY_CLI, "job", "submit", "--address", local_head, "--working-dir", str(ROOT),
             "--runtime-env", str(ROOT / "jobs" / "runtime_env.yaml"), "--",
             sys.executable, "jobs/iterative_sft.py", "--config", config, "--set", f"loop.output_dir={output_dir}",
             *[a for o in overrides for a in ("--set", o)]],
            env=loopback_env(), cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        logs = submit.stdout + submit.stderr
        if "No available agent to submit job" not in logs:
            break
        time.sleep(5)  # the agent registers within seconds of the head, later on a loaded machine
    assert submit.returncode == 0, logs
    assert "succeeded" in logs.lower() and "round   1" in logs, logs
    return logs


EMBEDDED = """
import ray
from ray._private.authentication import authentication_utils as auth_utils
from iterft_ray.ray_start import init_ray
init_ray()
print(ray.get_runtime_context().gcs_address, auth_utils.is_token_auth_enabled())
"""


def test_embedded_ray_listens_on_loopback_with_token_auth():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_", "RAY_ENABLE"))}
    out = subprocess.run([sys.executable, "-c", EMBEDDED], env=env, capture_output=True, text=True, timeout=120)
    address, token_auth = out.stdout.split()[-2:]
    assert address.startswith("127.0.0.1:"), out.stdout + out.stderr
    assert token_auth == "True"
