"""What a user's terminal shows: the run's own lines and no library's warnings, bars or tracebacks."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from iterft_ray.cli import CtrlC

ROOT = Path(__file__).resolve().parents[1]

# Lines of libraries that reached every run's console before (issue 26, item 9).
LIBRARY_LINES = [
    r"Token authentication is enabled",                  # Ray's note on the project's own token setup
    r"RayDeprecationWarning",                            # from the project's own Ray Data call
    r"execution finished in",                            # Ray Data, per pass over the shards
    r"Progress bars disabled",                           # Ray Data, on the bars the project turned off
    r"Started a local Ray instance",                     # Ray's INFO
    r"Loading weights|Writing model shards",             # transformers' bars in the actors
    r"Traceback \(most recent call last\)",
    r"Warning|WARNING",
]


def _iterft(*args: str, **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    return subprocess.Popen([sys.executable, "-m", "iterft_ray", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _library_lines(console: str) -> list[str]:
    return [line for line in console.splitlines() if any(re.search(p, line) for p in LIBRARY_LINES)]


def test_the_tiny_run_shows_its_own_lines_only(tmp_path):
    run = _iterft("run", "tiny", "--set", f"loop.output_dir={tmp_path / 'run'}")
    console, _ = run.communicate(timeout=300)
    assert run.returncode == 0, console
    assert _library_lines(console) == [], console
    lines = [line for line in console.splitlines() if line.strip()]
    assert lines[0].startswith("starting run ") and lines[0].endswith(f" in {tmp_path / 'run'}"), console
    assert any(line.startswith("warm-up: 1 pass,") for line in lines), console
    assert any(line.startswith("evaluation before round 1: greedy ") for line in lines), console
    rounds = [line for line in lines if line.startswith("round ")]
    assert [line.split("|")[0].split()[1] for line in rounds] == ["1", "2"], console
    assert "| eval greedy " in rounds[-1]  # after the last round, always
    assert lines[-1] == f"run written to {tmp_path / 'run'}", console


def test_ctrl_c_is_one_line_and_exit_130_and_a_streamed_run_is_quiet(tmp_path):
    """A prompts file streams through Ray Data (its lines were on every round); Ctrl-C in round 3."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(64)))
    config = {
        "model": {"name_or_path": "tiny-llama"}, "data": {"prompts_file": str(prompts)},
        "filters": [{"name": "length_bounds", "min_chars": 1}],
        "sampling": {"num_samples": 2, "max_new_tokens": 4}, "trainer": {"per_device_train_batch_size": 32},
        "loop": {"rounds": 1000, "prompts_per_round": 16, "save_every": 1, "output_dir": str(tmp_path / "run")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = _iterft("run", str(tmp_path / "c.yaml"), start_new_session=True)  # its own group, as at a terminal
    seen = []
    for line in run.stdout:
        seen.append(line)
        if line.startswith("round   2 "):
            os.killpg(run.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
            break
    rest, _ = run.communicate(timeout=120)
    console = "".join(seen) + rest
    assert run.returncode == 130, console
    assert console.rstrip().splitlines()[-1] == "interrupted; resume with --resume", console
    assert _library_lines(console) == [], console
    assert (tmp_path / "run" / "checkpoints" / "round-0001").exists()  # what --resume continues from


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped KeyboardInterrupt
def test_a_ctrl_c_that_python_drops_is_still_seen():
    """Python drops a KeyboardInterrupt raised while a destructor runs (so does a callback from Ray's C++ core);
    the command line remembers the Ctrl-C (`CtrlC`) and its loop stops before the next round."""
    class Dropping:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs in here, and its KeyboardInterrupt goes nowhere
            sum(range(1000))

    before = signal.getsignal(signal.SIGINT)
    with CtrlC() as ctrl_c:
        Dropping()
        assert ctrl_c.pressed
    assert signal.getsignal(signal.SIGINT) is before  # the handler it replaced is back
