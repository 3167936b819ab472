"""Trackers: a run's metrics in Weights & Biases and MLflow, one tracker run per `iterft run`.

`trainer.report_to` names them, as `TrainingArguments.report_to` does. The driver logs to
them, not the trainer actor: it holds every round's metrics (the rows of metrics.jsonl) and
receives the trainer's step statistics, so one tracker run gets both, with the run's
config, and the trainer's ranks never open runs of their own. The trainer's
`TrainingArguments.report_to` keeps the other integrations asked for (tensorboard, ...).

MLflow names metrics without `@`: `eval_pass@k` is `eval_pass_at_k` there. Each tracker reads its
usual environment: `WANDB_PROJECT` (default "iterft"), `WANDB_MODE`,
`WANDB_DIR`; `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`. A resumed run is a new
tracker run in the same group (W&B) / with the same `iterft.run_id` tag (MLflow).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Protocol

from iterft_ray.config import RunConfig, report_to_list

# The trackers the driver logs to; any other `report_to` entry is the trainer's.
TRACKERS = ("wandb", "mlflow")


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], round_index: int) -> None: ...

    def close(self) -> None: ...


def trainer_report_to(trainer: dict[str, Any]) -> list[str]:
    """What the trainer's TrainingArguments get of `trainer.report_to`: everything but the driver's trackers."""
    return [name for name in report_to_list(trainer.get("report_to")) if name not in TRACKERS]


def open_trackers(config: RunConfig, name: str, run_id: str) -> list[Tracker]:
    """One run in each tracker `trainer.report_to` names, titled `name`, holding the run's config."""
    wanted = [t for t in report_to_list(config.trainer.get("report_to")) if t in TRACKERS]
    opened: list[Tracker] = []
    try:
        for tracker in wanted:
            opened.append((WandbTracker if tracker == "wandb" else MlflowTracker)(config.to_dict(), name, run_id))
    except BaseException:
        for t in opened:
            t.close()
        raise
    return opened


def numeric_metrics(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of `stats` (a round's row, a step's statistics), keyed `prefix` + name."""
    return {prefix + k: float(v) for k, v in stats.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")}


class WandbTracker:
    """A W&B run; metrics logged at step = round, so rounds line up with metrics.jsonl and TensorBoard."""

    def __init__(self, config: dict[str, Any], name: str, run_id: str):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "iterft"), name=name, group=run_id,
                              config=config, reinit="create_new")

    def log(self, metrics: dict[str, float], round_index: int) -> None:
        self.run.log(metrics, step=round_index)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run (through `MlflowClient`, so no process-global active run); the config as flat params."""

    # MLflow takes at most this many params per batch and this many characters per value.
    _PARAMS_PER_BATCH, _PARAM_CHARS = 100, 6000

    def __init__(self, config: dict[str, Any], name: str, run_id: str):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient()
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME")
        experiment_id = "0"
        if experiment:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=name, tags={"iterft.run_id": run_id}).info.run_id
        params = [Param(k, str(v)[: self._PARAM_CHARS]) for k, v in _flatten(config).items()]
        for i in range(0, len(params), self._PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + self._PARAMS_PER_BATCH])

    def log(self, metrics: dict[str, float], round_index: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_metric_name(k), v, now, round_index)
                                                    for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_metric_name(name: str) -> str:
    """`name` as MLflow takes it (alphanumerics, `_-. :/`): `eval_pass@4` is `eval_pass_at_4`."""
    return re.sub(r"[^\w\-. :/]", "_", name.replace("@", "_at_"))


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"loop": {"rounds": 2}}` as `{"loop.rounds": 2}` (lists and empty sections as their text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
