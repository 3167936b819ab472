"""The command line as a user meets it: bad input is one line and exit 2 with nothing started or written,
a run directory is one run (refused, resumed, complete, overwritten), broken filters are loud."""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from ray_head import live_actors, live_placement_groups

from iterft_ray.cli import main
from iterft_ray.config import CHANGEABLE_ON_RESUME, RunConfig, load_config
from iterft_ray.run.records import metrics_figure

HERE = Path(__file__).resolve().parent


def raising_filter(prompt, completion, meta):
    raise RuntimeError("verifier is down")


def half_raising_filter(prompt, completion, meta):
    """Fails on prompts with an even id and rejects the rest: a round that accepts nothing."""
    if meta["prompt_id"] % 2 == 0:
        raise ValueError(f"no answer for prompt {meta['prompt_id']}")
    return False


def tiny_config(out: Path, **loop) -> dict:
    return {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"task": "addition", "task_options": {"num_train": 32, "num_heldout": 4, "num_warmup": 4}},
        "sampling": {"num_samples": 2, "max_new_tokens": 4},
        "trainer": {"learning_rate": 1e-3, "per_device_train_batch_size": 16},
        "resources": {"num_generators": 1, "filter_pool_size": 1},
        "loop": {"rounds": 1, "prompts_per_round": 8, "save_every": 1, "output_dir": str(out), **loop},
    }


def write_config(path: Path, config: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def error_line(capsys) -> str:
    """The one line a user error prints on stderr."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("iterft: error: "), err
    return err[0][len("iterft: error: "):]


def run_error(capsys) -> str:
    """The one error line of a run that stopped (actors' own logs come to stderr too)."""
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("iterft: error: ")]
    assert len(errors) == 1, errors
    return errors[0][len("iterft: error: "):]


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing started


@pytest.fixture
def no_ray(ray_down):
    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized()  # nothing started


BAD_SETTINGS = [
    (["sampling.num_samples=0"], "sampling.num_samples: expected a positive number"),
    (["trainer.learning_rate=abc"], "trainer.learning_rate: expected float"),
    (["trainer.learning_rate=-0.001"], "trainer.learning_rate: expected a number >= 0, got -0.001"),
    (["trainer.per_device_train_batch_size=0"], "trainer.per_device_train_batch_size: expected a positive number"),
    (["trainer.lr_scheduler_type=nonsense"], "trainer.lr_scheduler_type: expected one of ['linear', "),
    (["model.name_or_path=/nonexistent/model"], "model.name_or_path: /nonexistent/model is not a directory"),
    (["model.tokenizer=./no/such/tokenizer"], "model.tokenizer: ./no/such/tokenizer is not a directory"),
    (["model.name_or_path=no-such-org/no-such-model"], "model.name_or_path: 'no-such-org/no-such-model' is not a "
                                                       "local directory and not in the hub cache"),
    (["data.task=null", "data.task_options={}", "data.prompts_file=/nonexistent/prompts.jsonl"],
     "data.prompts_file: no such file /nonexistent/prompts.jsonl"),
    (["data.task=addition", "data.prompts_file=/nonexistent/prompts.jsonl"], "data.task, data.prompts_file: "),
    (["data.task_options.num_warmup=0", "loop.warmup_passes=2"], "loop.warmup_passes: 2 passes of warm-up"),
    (["data.task=null", "data.task_options={}", "data.prompts_file=/nonexistent/prompts.jsonl", "loop.warmup_passes=1"],
     "loop.warmup_passes: 1 passes of warm-up need demonstrations (data.warmup_file) or a task's warm-up examples, "
     "and data.prompts_file has none"),
    (["data.task_options.digits=0"], "data.task, data.task_options: addition: expected digits >= 1"),
    (["filters=[{name: exact_answr}]"], "filters[0]: unknown filter 'exact_answr'"),
    (["filters=[{name: exact_answer}, {name: best_of_k, n: 2}]"], "filters[1]: filter 'best_of_k': "),
    (["filters=[no_such_module:check]"], "filters[0]: filter 'no_such_module:check': cannot import it"),
    (["filters=[test_cli:no_such_function]"], "filters[0]: filter 'test_cli:no_such_function': cannot import it"),
    (["loop.max_filter_error_rate=1.5"], "loop.max_filter_error_rate: expected a number in (0, 1]"),
    (["loop"], "--set: expected section.key=value"),
]


@pytest.mark.parametrize("settings,message", BAD_SETTINGS, ids=[" ".join(s[0]) for s in BAD_SETTINGS])
def test_bad_input_is_one_line_exit_2_and_nothing_started_or_written(settings, message, tmp_path, capsys, no_ray):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(out, warmup_passes=0))
    code = main(["run", config, *[f"--set={s}" for s in settings]])
    assert code == 2
    assert error_line(capsys).startswith(message)
    assert not out.exists()


TYPO_CHECK = """
import sys
from iterft_ray.cli import main
code = main(["run", "tiny", "--set", "lop.rounds=1"])
print(code, sorted(m for m in ("torch", "transformers", "ray") if m in sys.modules))
"""


def test_a_typo_in_the_configs_own_sections_is_answered_before_torch_transformers_or_ray_load(tmp_path):
    """In a fresh process: the one-line error, exit 2, and none of the heavy modules imported (seconds each)."""
    out = subprocess.run([sys.executable, "-c", TYPO_CHECK], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.stdout.split("\n")[-2] == "2 []", out.stdout + out.stderr
    assert out.stderr.startswith("iterft: error: lop: unknown key"), out.stderr


def test_missing_config_and_missing_run_to_plot_are_one_line(tmp_path, capsys, no_ray):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert error_line(capsys).startswith("config: ")
    assert main(["plot", str(tmp_path / "nothere")]) == 2
    assert error_line(capsys) == f"{tmp_path / 'nothere'}: does not exist; expected the loop.output_dir of a run"
    assert main(["eval", str(tmp_path / "nothere")]) == 2
    assert error_line(capsys).startswith(f"RUN_DIR: {tmp_path / 'nothere'} does not exist; expected a run's")


def test_debug_shows_the_traceback(tmp_path, no_ray):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    with pytest.raises(Exception, match="model.name_or_path: /nonexistent/model is not a directory"):
        main(["run", config, "--set", "model.name_or_path=/nonexistent/model", "--debug"])


def test_resume_without_a_run_names_the_directory(tmp_path, capsys, no_ray):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "typo"))
    assert main(["run", config, "--resume"]) == 2
    assert error_line(capsys).startswith(f"loop.output_dir: {tmp_path / 'typo'} does not exist, so there is no run")
    assert not (tmp_path / "typo").exists()
    (tmp_path / "typo").mkdir()
    assert main(["run", config, "--resume"]) == 2
    assert error_line(capsys).startswith(f"loop.output_dir: {tmp_path / 'typo'} holds no checkpoint to resume")


def test_relative_input_paths_in_a_config_file_are_relative_to_the_file(tmp_path, capsys, monkeypatch, no_ray):
    """The prompts file beside the config is read (its bad row is named), wherever the command runs from."""
    beside = tmp_path / "project" / "configs"
    beside.mkdir(parents=True)
    (beside / "prompts.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": ""}\n', encoding="utf-8")
    config = tiny_config(Path("runs/x"))
    config["data"] = {"prompts_file": "prompts.jsonl"}
    path = write_config(beside / "run.yaml", config)
    monkeypatch.chdir(tmp_path)
    assert main(["run", path]) == 2
    assert error_line(capsys).startswith(f"data.prompts_file: {beside / 'prompts.jsonl'}: row 2: ")
    loaded = load_config(path)
    assert loaded.data.prompts_file == str(beside / "prompts.jsonl") and loaded.data.task is None
    assert loaded.loop.output_dir == "runs/x"  # outputs stay relative to the working directory
    # A path given on the command line is relative to the working directory, as a shell user expects.
    assert main(["run", path, "--set", "data.prompts_file=prompts.jsonl"]) == 2
    assert error_line(capsys) == "data.prompts_file: no such file prompts.jsonl"


def test_changeable_on_resume_names_real_keys():
    fields = {f"{section}.{name}" for section, value in RunConfig(model=None).to_dict().items()
              if isinstance(value, dict) for name in value}
    assert set(CHANGEABLE_ON_RESUME) <= fields


def test_a_failed_start_leaves_no_ray_process(tmp_path, monkeypatch, no_ray):
    """`main()` started a local Ray for the run (in a job script or a notebook too); a failed start stops it."""
    import psutil

    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    with pytest.raises(Exception, match="max_steps: lr_scheduler_type=<SchedulerType.COSINE: 'cosine'> decays"):
        main(["run", config, "--set", "trainer.lr_scheduler_type=cosine"])
    assert list(temp.iterdir())  # Ray really ran under it
    ray_processes = [p for p in psutil.process_iter(["cmdline"])
                     if any(str(temp) in arg for arg in p.info["cmdline"] or [])]
    # ray.shutdown() has signalled them; give them the moments they take to exit.
    gone, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not alive, [p.info["cmdline"] for p in alive]
    shutil.rmtree(temp, ignore_errors=True)


def test_plot_has_whole_rounds_the_run_name_and_filter_errors(tmp_path, capsys, no_ray):
    run = tmp_path / "my-run"
    run.mkdir()
    rows = [{"round": 0, "heldout_accuracy": 0.1}] + [
        {"round": r, "accept_rate": 0.1 * r, "loss": 1.0 / r, "filter_errors": r % 2} for r in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"{run / 'plot.png'}: accept_rate, loss, heldout_accuracy, filter_errors"
    fig, _ = metrics_figure(rows, "my-run")
    assert fig.get_suptitle() == "my-run"
    for ax in fig.axes:
        ticks = ax.get_xticks()
        assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks
    errors = next(ax for ax in fig.axes if ax.get_ylabel() == "filter_errors")
    assert list(errors.lines[0].get_ydata()) == [1, 0, 1]


# ---------------------------------------------------------------- runs on a local Ray


@pytest.fixture
def local_ray(ray_up, warm_actors):
    """The session's Ray (tests/conftest.py): filter actors import this module's filters by import string,
    as with `ray job submit --working-dir`. A run's actors serve the module's next run of the same shape
    (`warm_actors`); `assert_nothing_left` counts the actors a run left behind, not those kept warm."""


def assert_nothing_left():
    """No live actor and no placement group of the runs that ended."""
    alive = live_actors()
    assert not alive, alive
    pgs = live_placement_groups()
    assert not pgs, pgs


def metric_rounds(out: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_directory_is_one_run(local_ray, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(out))
    assert main(["run", config]) == 0
    record = json.loads((out / "run.json").read_text())
    run_id = record["run_id"]
    assert metric_rounds(out) == [0, 1]
    # The start's machine: the figures of a run repeat only on the same kind (torch's kernels by CPU).
    [started] = record["starts"]
    assert started["packages"]["torch"] == torch.__version__ and started["packages"]["ray"] == ray.__version__
    assert started["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert started["cpu"] and started["python"] == platform.python_version() and started["accelerators"] == []
    capsys.readouterr()
    assert_nothing_left()

    # A fresh run into it is refused, naming the directory and the ways on; nothing changes.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["run", config]) == 2
    message = run_error(capsys)
    assert message.startswith(f"loop.output_dir: {out} already holds a run")
    assert "--resume" in message and "--overwrite" in message and "another loop.output_dir" in message
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    # A resume with other settings than the run's names each one; cadence and length may change.
    assert main(["run", config, "--resume", "--set", "sampling.temperature=0.5", "--set", "loop.seed=1",
                 "--set", "loop.eval_every=3"]) == 2
    message = run_error(capsys)
    assert message.startswith("loop.seed, sampling.temperature: differ from the config of the run")
    assert "loop.eval_every" not in message.split(":")[0]

    # The run is complete: a resume says so and exits 0, Ray not even started.
    assert main(["run", config, "--resume"]) == 0
    assert f"run {out} is complete: 1 of 1 rounds done" in capsys.readouterr().out

    # A longer resume continues the same run.
    assert main(["run", config, "--resume", "--set", "loop.rounds=2"]) == 0
    assert metric_rounds(out) == [0, 1, 2]
    record = json.loads((out / "run.json").read_text())
    assert record["run_id"] == run_id and record["starts"][0] == started and len(record["starts"]) == 2
    checkpoint = json.loads((out / "checkpoints" / "round-0002" / "training_state.json").read_text())
    assert checkpoint["extra"]["run_id"] == run_id
    capsys.readouterr()

    # A checkpoint of another run in the directory is refused, not restored.
    (out / "run.json").write_text(json.dumps({"run_id": uuid.uuid4().hex}))
    assert main(["run", config, "--resume", "--set", "loop.rounds=3"]) == 2
    assert "belongs to another run" in run_error(capsys)

    # --overwrite deletes the old run's files (only those) and starts a new run.
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["run", config, "--overwrite"]) == 0
    deleted = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("--overwrite: deleted"))
    assert f"the run in {out} (run " in deleted and "config.yaml" in deleted and "checkpoints" in deleted, deleted
    assert metric_rounds(out) == [0, 1]
    assert not (out / "rounds" / "0002").exists() and not (out / "checkpoints" / "round-0002").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["run_id"] != run_id and len(record["starts"]) == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert len(list((out / "tensorboard").iterdir())) == 1  # one run's events, not three on top of each other
    assert_nothing_left()


def test_demo_resume_on_a_finished_run_says_complete(local_ray, tmp_path, capsys):
    small = [f"--set=loop.output_dir={tmp_path / 'demo'}", "--set=loop.rounds=1", "--set=loop.warmup_passes=0",
             "--set=loop.prompts_per_round=8", "--set=sampling.num_samples=2",
             "--set=data.task_options={digits: 2, reverse_answer: true, num_train: 32, num_heldout: 4, num_warmup: 0, "
             "num_validation: 4}"]
    main(["demo", *small])  # falls short of the demo's bar after one round; the run is complete all the same
    capsys.readouterr()
    assert main(["demo", "--resume", *small]) == 0
    assert "is complete: 1 of 1 rounds done" in capsys.readouterr().out


def test_filter_errors_are_on_the_summary_line_and_a_round_of_errors_stops_the_run(local_ray, tmp_path, capsys):
    # All 32 train prompts in the round: 16 have an even id, so 32 of the 64 rows error.
    config = write_config(tmp_path / "half.yaml", tiny_config(tmp_path / "half", prompts_per_round=32))
    assert main(["run", config, "--set", "filters=[test_cli:half_raising_filter]"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("round   1"))
    assert "| loss - |" in line  # nothing accepted, nothing trained on: no nan
    assert "| filter errors 32, first: half_raising_filter: ValueError: no answer for prompt" in line
    record = json.loads((tmp_path / "half" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["filter_errors"] == 32 and record["loss"] is None
    assert record["first_filter_error"].startswith("half_raising_filter: ValueError: no answer for prompt")

    # Half the rows is over a limit of 0.5: the run stops, as it does when every row errors by default.
    assert main(["run", config, "--overwrite", "--set", "filters=[test_cli:half_raising_filter]",
                 "--set", "loop.max_filter_error_rate=0.5"]) == 1
    assert run_error(capsys).startswith("round 1: 32 of 64 rows failed in the filters (50%, "
                                         "loop.max_filter_error_rate is 0.5); first error: half_raising_filter")

    config = write_config(tmp_path / "all.yaml", tiny_config(tmp_path / "all"))
    assert main(["run", config, "--set", "filters=[test_cli:raising_filter]"]) == 1
    printed = capsys.readouterr()
    [message] = [x.removeprefix("iterft: error: ") for x in printed.err.splitlines() if x.startswith("iterft: error: ")]
    # The evaluation before round 1 graded with the same failing filter, every row: its 0% says why.
    rows = pq.read_table(tmp_path / "all" / "eval" / "0000.parquet").num_rows
    before = next(x for x in printed.out.splitlines() if x.startswith("evaluation before round 1"))
    assert before.startswith("evaluation before round 1: greedy 0.0%")
    assert before.endswith(f"(filter errors {rows}, first: raising_filter: RuntimeError: verifier is down)"), before
    record = json.loads((tmp_path / "all" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["eval_filter_errors"] == rows and record["eval_first_filter_error"].startswith("raising_filter")
    assert message.startswith("round 1: 16 of 16 rows failed in the filters (100%, loop.max_filter_error_rate is 1); "
                              "first error: raising_filter: RuntimeError: verifier is down")
    assert str(tmp_path / "all" / "rounds" / "0001" / "generations.parquet") in message
    # Nothing was checkpointed: no validation split tracks a best, and the round that stopped is not saved.
    assert not (tmp_path / "all" / "checkpoints").exists()
    assert_nothing_left()


def test_a_failed_start_leaves_no_actor_or_placement_group(local_ray, tmp_path):
    """A decaying schedule without max_steps is refused inside the trainer actor, after the generators and filters
    started."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    with pytest.raises(Exception, match="max_steps: lr_scheduler_type=<SchedulerType.COSINE: 'cosine'> decays"):
        main(["run", config, "--set", "trainer.lr_scheduler_type=cosine"])
    assert_nothing_left()


def test_a_run_with_no_checkpoint_is_replaced_by_a_plain_rerun(tmp_path, capsys, no_ray):
    """What a start that failed in round 1, or a run killed before its first save, leaves: no checkpoint, so
    `--resume` cannot continue it and a plain rerun replaces it; once a checkpoint exists it is a run."""
    from iterft_ray.run.records import RunRecorder
    from iterft_ray.run.run_dir import RUN_RESULTS, check_start
    from iterft_ray.train.checkpoint import META, TENSORS

    out = tmp_path / "run"
    config = load_config(tiny_config(out))
    check_start(config).prepare_directory(config)  # run.json, config.yaml
    recorder = RunRecorder(out)
    recorder.reset()
    recorder.record({"round": 0, "heldout_accuracy": 0.0})
    recorder.close()
    (out / "rounds" / "0001").mkdir(parents=True)
    (out / "rounds" / "0001" / "generations.parquet").write_bytes(b"round 1, never trained")
    (out / "trainer").mkdir()
    (out / "checkpoints" / "round-0001.tmp").mkdir(parents=True)  # a save cut short
    (out / "accepted").mkdir()  # round 1's ledger, written beside its generations
    assert {"metrics.jsonl", "rounds", "accepted", "checkpoints", "tensorboard"} <= {
        name for name in RUN_RESULTS if (out / name).exists()}
    assert main(["run", write_config(tmp_path / "c.yaml", tiny_config(out)), "--resume"]) == 2
    assert "holds no checkpoint to resume" in error_line(capsys)

    start = check_start(config)
    start.prepare_directory(config)
    assert "replacing a run that stopped before its first checkpoint" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "run.json"]

    (out / "checkpoints" / "round-0001").mkdir(parents=True)
    for name in (META, TENSORS):
        (out / "checkpoints" / "round-0001" / name).write_text("{}")
    with pytest.raises(ValueError, match="already holds a run"):
        check_start(config)


def test_address_where_nothing_listens_is_one_line_not_a_hang(tmp_path, no_ray):
    """`ray.init` retries an unreachable GCS for minutes; the CLI dials the address first (timeout: no hang)."""
    from ray_head import free_port

    address = f"127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "iterft_ray", "run", "tiny", "--address", address, "--set",
                           f"loop.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=60,
                          cwd=HERE.parent)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith(f"iterft: error: --address: nothing accepts a connection at {address}")
    assert not (tmp_path / "run").exists()


def test_a_relative_output_dir_under_a_ray_job_goes_under_the_home_runs_dir(tmp_path, monkeypatch, no_ray):
    """A job's working directory is a copy in Ray's session directory; its runs must outlive the session."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from iterft_ray.run.run_dir import check_start

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    config = load_config(tiny_config(Path("runs/x")))
    assert os.fspath(check_start(config).out) == str(tmp_path / "runs" / "x")  # not a job: the working directory
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}")
    for given, expected in (("runs/x", tmp_path / "home" / "iterft-runs" / "runs" / "x"),
                            (str(tmp_path / "abs"), tmp_path / "abs"), ("~/mine", tmp_path / "home" / "mine")):
        config = load_config(tiny_config(Path(given)))
        assert os.fspath(check_start(config).out) == str(expected)
        assert config.loop.output_dir == str(expected)  # what config.yaml records
