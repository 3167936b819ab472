"""What a run leaves on disk: metrics.jsonl, TensorBoard logs, plot.png, per-round generations.parquet."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# Metrics drawn in plot.png, one panel each, when the run has them.
PLOTTED = ("accept_rate", "reward_mean", "loss", "heldout_accuracy", "num_target_tokens", "round_time")


@ray.remote(num_cpus=0)
def _write_parquet(path: str, *tables: pa.Table) -> int:
    """Write rollout batches to one Parquet file (temp file + rename); returns rows written."""
    table = pa.concat_tables(tables) if tables else pa.table({})
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(target)
    return table.num_rows


def write_generations(path: Path, tables: list[ray.ObjectRef]) -> ray.ObjectRef:
    """Write scored rollouts to `path` from a task on the driver's node.

    The rows go straight from the object store to the driver's disk; the driver
    process itself never holds them.
    """
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return _write_parquet.options(scheduling_strategy=here).remote(str(path), *tables)


class RunRecorder:
    """Appends one line per round to metrics.jsonl, mirrors it to TensorBoard and redraws plot.png."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.metrics_path = out_dir / "metrics.jsonl"
        self._tensorboard = None

    def reset(self) -> None:
        """A fresh run starts a fresh metrics.jsonl."""
        self.metrics_path.unlink(missing_ok=True)

    def truncate(self, rounds: int) -> None:
        """Keep only the metrics of rounds 1..rounds: a resumed run records the later ones again."""
        if self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["round"] <= rounds]
            self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def record(self, stats: dict[str, Any]) -> None:
        """Append a round's statistics (NaN, e.g. the loss of a round that accepted nothing, becomes null)."""
        clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in stats.items()}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        self._write_tensorboard(stats)
        plot_metrics(self.out_dir)

    def _write_tensorboard(self, stats: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self._tensorboard is None:
            self._tensorboard = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, stats["round"])
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(run_dir: str | Path) -> tuple[Path, list[str]]:
    """Draw plot.png: one panel per metric in PLOTTED that the run has, over rounds.

    Returns the file and the metrics drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    names = [m for m in PLOTTED if any(isinstance(r.get(m), (int, float)) for r in rows)]
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.2 * max(1, len(names))), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        points = [(r["round"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("round")
    fig.tight_layout()
    out = Path(run_dir) / "plot.png"
    tmp = out.with_name("plot.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(out)
    return out, names
