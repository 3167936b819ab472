"""A user's own filter module beside the config is found by `iterft run` and by every actor, without PYTHONPATH."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_iterft_run_finds_a_filter_module_in_the_working_directory(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    (tmp_path / "mymod.py").write_text(textwrap.dedent(f"""
        import os

        def check(prompt, completion, meta):
            open(os.path.join({str(calls)!r}, f"{{os.getpid()}}-{{meta['sample_id']}}"), "w").close()
            return True
    """))
    config = yaml.safe_load((REPO / "iterft_ray" / "configs" / "tiny.yaml").read_text())
    config["filters"] = ["mymod:check"]
    config["loop"].update(rounds=1, save_every=1, output_dir="runs/mine")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    iterft = Path(sys.executable).with_name("iterft")
    # PYTHONPATH names only this checkout, so the run tests this code (the venv's editable
    # install may point at another one); the user's module is found through the working directory.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    run = subprocess.run([str(iterft), "run", "run.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=540)

    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in rows if row.get("round") == 1]
    expected = config["loop"]["prompts_per_round"] * config["sampling"]["num_samples"]
    assert trained and trained[0]["accepted"] == expected and trained[0]["filter_errors"] == 0
    # check() ran once per training row, in the filter processes (and on the evaluation's rows, "r-1000000-...")
    assert len([c for c in calls.iterdir() if c.name.split("-", 1)[1].startswith("r0-")]) == expected


def test_a_cluster_run_ships_the_working_directory_modules(tmp_path, monkeypatch):
    """Nodes of a cluster lack the driver's directory: its *.py files go as runtime_env py_modules."""
    from iterft_ray.ray_start import _working_dir_modules

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _working_dir_modules() is None
    (tmp_path / "mymod.py").write_text("def check(prompt, completion, meta):\n    return True\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "big.bin").write_bytes(b"0" * 1000)

    assert _working_dir_modules() == {"py_modules": [str(tmp_path / "mymod.py")]}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # under `ray job submit`: the job's runtime_env rules
    assert _working_dir_modules() is None
