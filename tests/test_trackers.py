"""`trainer.report_to: [wandb, mlflow]`: a run's metrics in both trackers, offline (W&B offline mode, an MLflow
file store), read back with each tracker's own reader."""

import glob
import json
import struct

import pytest

from iterft_ray.cli import main
from iterft_ray.config import load_config


def wandb_records(path: str) -> list:
    """The records of an offline W&B run file (`run-<id>.wandb`): W&B's LevelDB-style log of `Record` protobufs.

    A 7-byte file header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte header
    (CRC, length, type: 1 whole, 2 first, 3 middle, 4 last); a block's tail shorter than a header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(path: str) -> tuple[dict, list[dict]]:
    """(config, history rows) of an offline W&B run file."""
    config, rows = {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        elif kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return config, rows


def test_report_to_wandb_and_mlflow_get_every_round_with_the_config(tmp_path, monkeypatch, ray_up):
    from mlflow import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = tmp_path / "run"
    code = main(["run", "tiny", "--set", f"loop.output_dir={run}", "--set", "trainer.report_to=[wandb, mlflow]"])
    assert code == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [m for m in metrics if m["round"] > 0]
    assert [m["round"] for m in rounds] == [1, 2]
    # Sync mode samples the newest weights: no round's samples are stale, trained or not.
    assert all(m["staleness"] == 0 for m in rounds)

    # One run per `iterft run`: the driver's (the trainer's ranks open none of their own).
    (wandb_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    config, history = wandb_history(wandb_file)
    assert config["loop"]["output_dir"] == str(run) and config["trainer"]["report_to"] == ["wandb", "mlflow"]
    by_round = {row["round"]: row for row in history if "round" in row}
    for m in rounds:
        row = by_round[m["round"]]
        assert row["_step"] == m["round"]
        for key in ("accept_rate", "reward_mean", "loss", "staleness", "eval_greedy", "eval_pass@1"):
            if m.get(key) is not None:
                assert row[key] == pytest.approx(m[key]), key
        assert "train/step_time" in row and "train/updates" in row  # the trainer's step statistics, same run
    assert by_round[0]["eval_greedy"] == metrics[0]["eval_greedy"]  # the evaluation before round 1
    assert "warmup/loss" in by_round[0]

    client = MlflowClient()
    (experiment,) = client.search_experiments()
    (mlflow_run,) = client.search_runs([experiment.experiment_id])  # the trainer's ranks opened none of their own
    assert mlflow_run.data.params["loop.output_dir"] == str(run)
    accept = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, "accept_rate")}
    assert accept == {m["round"]: pytest.approx(m["accept_rate"]) for m in rounds}
    assert {m.step for m in client.get_metric_history(mlflow_run.info.run_id, "train/num_tokens")} == {1, 2}
    passed = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, "eval_pass_at_1")}
    assert passed == {m["round"]: pytest.approx(m["eval_pass@1"]) for m in metrics if "eval_pass@1" in m}
    assert mlflow_run.info.status == "FINISHED"


def test_report_to_mlflow_without_a_store_is_refused_at_load(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/iterft-no-store")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match=r"^trainer\.report_to: mlflow cannot use MLFLOW_TRACKING_URI="):
        load_config({"model": {"name_or_path": "tiny-llama"}, "trainer": {"report_to": ["mlflow"]}})
    with pytest.raises(ValueError, match=r"^trainer\.report_to: expected an integration name"):
        load_config({"model": {"name_or_path": "tiny-llama"}, "trainer": {"report_to": [3]}})
