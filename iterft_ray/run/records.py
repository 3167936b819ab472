"""What a run leaves in its output directory: metrics.jsonl, TensorBoard logs, plot.png, per-round generations.parquet.

The directory is a `StoragePath`: local disk or an object store, each file written whole.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from iterft_ray.run.trackers import Tracker, numeric_metrics
from iterft_ray.storage import StoragePath

# Metrics drawn in plot.png, one panel each, when the run has them.
# "eval_pass@*" is one panel with every pass@k; heldout_accuracy (eval_greedy's old name) only for older runs.
PLOTTED = ("accept_rate", "reward_mean", "loss", "eval_greedy", "val_greedy", "heldout_accuracy", "eval_pass@*", "filter_errors",
           "num_target_tokens", "round_time")
# Shares plotted in percent, as the console prints them.
PERCENT = ("accept_rate", "eval_greedy", "val_greedy", "heldout_accuracy", "eval_pass@*")
PANEL_INCHES, PLOT_DPI = 1.8, 80


@ray.remote(num_cpus=0)
def _write_parquet(path: StoragePath, *tables: pa.Table) -> int:
    """Write rollout batches to one Parquet file, whole (see `StoragePath.write_bytes`); returns rows written."""
    table = pa.concat_tables(tables) if tables else pa.table({})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    path.write_bytes(buffer.getvalue())
    return table.num_rows


def write_generations(path: StoragePath, tables: list[ray.ObjectRef]) -> ray.ObjectRef:
    """Write scored rollouts to `path` from a task on the driver's node.

    The rows go straight from the object store to the output directory; the driver
    process itself never holds them.
    """
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return _write_parquet.options(scheduling_strategy=here).remote(path, *tables)


class RunRecorder:
    """Writes metrics.jsonl (one line per round), mirrors it to TensorBoard and redraws plot.png.

    metrics.jsonl is rewritten whole each round, so a reader (or a resume) never meets a
    half-written line, in a store as on disk. TensorBoard's writer knows only local
    files: for a run in a store it writes to a local directory whose files are uploaded
    after each round.
    """

    def __init__(self, out_dir: StoragePath | str | Path, trackers: list[Tracker] | None = None):
        """`trackers` (W&B, MLflow: see trackers.py) get every recorded row and step's statistics too."""
        self.out_dir = StoragePath.of(out_dir)
        self.trackers = list(trackers or [])
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self._rows = _parse_metrics(self.metrics_path.read_text()) if self.metrics_path.is_file() else []
        self._tensorboard = None
        self._tensorboard_local = None if self.out_dir.is_local else tempfile.mkdtemp(prefix="iterft-tensorboard-")
        self._purge_round: int | None = None
        # plot.png is drawn on a background thread, off the round's critical path (the
        # driver mostly waits on Ray meanwhile); a redraw still queued when the next round
        # asks for one is dropped, since the newer one shows every round anyway.
        self._plotter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iterft-plot")
        self._plot: Future | None = None

    def reset(self) -> None:
        """A fresh run starts a fresh metrics.jsonl."""
        self._rows = []
        self.metrics_path.delete()

    def truncate(self, rounds: int) -> None:
        """Keep only the records of rounds 1..rounds: a resumed run records the later ones again.

        metrics.jsonl loses their lines, rounds/ their directories, eval/ and accepted/ their files,
        and TensorBoard is told to drop their events (`purge_step`), so no round shows twice or
        from a run it was not in.
        """
        self._rows = [row for row in self._rows if row["round"] <= rounds]
        if self.metrics_path.exists():
            self._write_metrics()
        for folder in ("rounds", "eval", "accepted"):
            for path in (self.out_dir / folder).iterdir():
                number = path.name.split(".")[0].removeprefix("round-")
                if number.isdigit() and int(number) > rounds:
                    path.delete()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        self._purge_round = rounds + 1

    def record(self, stats: dict[str, Any], step_stats: dict[str, Any] | None = None) -> None:
        """Add a round's statistics (NaN, e.g. the loss of a round that accepted nothing, becomes null).

        `step_stats`, the trainer's statistics of the round's step, go to the trackers only, as `train/*`.
        """
        self._rows.append({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in stats.items()})
        self._write_metrics()
        self._write_tensorboard(stats)
        self.track(stats["round"], stats, step_stats or {})
        if self._plot is not None:
            self._plot.cancel()
        self._plot = self._plotter.submit(plot_metrics, self.out_dir, list(self._rows))
        self._plot.add_done_callback(_report_plot_error)

    def track(self, round_index: int, stats: dict[str, Any], step_stats: dict[str, Any], prefix: str = "") -> None:
        """Log `stats` (keyed `prefix` + name) and `step_stats` (keyed `train/` + name) at `round_index` to every
        tracker (the warm-up's step statistics are logged at round 0 under `warmup/`)."""
        metrics = {**numeric_metrics(stats, prefix), **numeric_metrics(step_stats, "train/")}
        for tracker in self.trackers:
            tracker.log(metrics, round_index)

    def _write_metrics(self) -> None:
        self.metrics_path.write_text("".join(json.dumps(row, allow_nan=False) + "\n" for row in self._rows))

    def flush(self) -> None:
        """Wait until plot.png shows every recorded round."""
        if self._plot is not None:
            self._plot.exception()

    def _write_tensorboard(self, stats: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self._tensorboard is None:
            log_dir = self._tensorboard_local or (self.out_dir / "tensorboard")
            self._tensorboard = SummaryWriter(log_dir=str(log_dir), purge_step=self._purge_round)
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, stats["round"])
        self._tensorboard.flush()
        self._upload_tensorboard()

    def _upload_tensorboard(self) -> None:
        if self._tensorboard_local is not None:
            (self.out_dir / "tensorboard").upload_files(self._tensorboard_local)

    def close(self) -> None:
        self._plotter.shutdown(wait=True)
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._upload_tensorboard()
        if self._tensorboard_local is not None:
            shutil.rmtree(self._tensorboard_local, ignore_errors=True)


def _report_plot_error(plot: Future) -> None:
    """A failed redraw is reported, never raised: the run matters more than its picture."""
    if not plot.cancelled() and plot.exception() is not None:
        error = plot.exception()
        print(f"plot.png not redrawn: {type(error).__name__}: {error}", flush=True)


def _parse_metrics(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_metrics(run_dir: StoragePath | str | Path) -> list[dict[str, Any]]:
    run_dir = StoragePath.of(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        what = "does not exist" if not run_dir.exists() else "has no metrics.jsonl"
        raise FileNotFoundError(f"{run_dir}: {what}; expected the loop.output_dir of a run")
    return _parse_metrics(path.read_text())


def plot_metrics(run_dir: StoragePath | str | Path, rows: list[dict[str, Any]] | None = None) -> tuple[StoragePath, list[str]]:
    """Draw plot.png (see `metrics_figure`), titled with the run directory's name.

    `rows` defaults to the run's metrics.jsonl. Returns the file and the metrics drawn.
    """
    run_dir = StoragePath.of(run_dir)
    rows = read_metrics(run_dir) if rows is None else rows
    title = Path(run_dir).resolve().name if run_dir.is_local else run_dir.name
    fig, names = metrics_figure(rows, title)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=PLOT_DPI)
    out = run_dir / "plot.png"
    out.write_bytes(image.getvalue())
    return out, names


def _pass_at_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The eval_pass@k keys the rows have, by k."""
    keys = {k for r in rows for k, v in r.items() if k.startswith("eval_pass@") and isinstance(v, (int, float))}
    return sorted(keys, key=lambda k: int(k.removeprefix("eval_pass@")))


def plotted_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The panels of plot.png for these rows: each PLOTTED metric they have ("eval_pass@*": every pass@k, one panel)."""
    have = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "eval_greedy" in have:
        have.discard("heldout_accuracy")  # the same numbers
    return [m for m in PLOTTED if (_pass_at_keys(rows) if m == "eval_pass@*" else m in have)]


def metrics_figure(rows: list[dict[str, Any]], title: str) -> tuple[Any, list[str]]:
    """One panel per metric in PLOTTED that the rows have, over whole rounds; returns (figure, metrics drawn).

    A round that records a metric as null (the loss of a round that accepted nothing) is a gap in
    its line, not a line drawn across it; a metric a round leaves out (held-out accuracy between
    evaluations) is not. Shares are drawn in percent, as the console prints them.
    """
    from matplotlib.figure import Figure  # not pyplot: no global state, safe off the main thread
    from matplotlib.ticker import MaxNLocator

    names = plotted_metrics(rows)
    n = max(1, len(names))
    fig = Figure(figsize=(6, PANEL_INCHES * n))
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)
    # Fixed margins: tight_layout measured every tick label and cost as much as the drawing.
    fig.subplots_adjust(left=0.14, right=0.97, top=1 - 0.3 / n, bottom=0.35 / n, hspace=0.15)
    fig.suptitle(title, fontsize=9, y=1 - 0.05 / n)
    for ax, name in zip(axes[:, 0], names):
        curves = _pass_at_keys(rows) if name == "eval_pass@*" else [name]
        percent = name in PERCENT
        scale = 100.0 if percent else 1.0
        values: list[float] = []
        for curve in curves:
            points = [(r["round"], r[curve] * scale if _is_number(r[curve]) else math.nan) for r in rows if curve in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=curve)
            values += [v for _, v in points if not math.isnan(v)]
        if len(curves) > 1:
            ax.legend(fontsize=6)
        label = "eval_pass@k" if name == "eval_pass@*" else name
        ax.set_ylabel(f"{label} (%)" if percent else label, fontsize=8)
        if values and max(values) == min(values):
            ax.set_ylim(*_constant_limits(values[0], percent))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole
    axes[-1, 0].set_xlabel("round")
    return fig, names


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _constant_limits(value: float, percent: bool) -> tuple[float, float]:
    """Axis limits for a panel whose metric never changed: from 0 to the value (0 to 100 for a share),
    so the line reads as "0 filter errors" or "3.2 every round", not as the middle of a +-0.04 range."""
    if percent:
        low, high = 0.0, 100.0
    else:
        low, high = min(0.0, value), max(0.0, value)
        if low == high:
            high = 1.0
    margin = 0.05 * (high - low)
    return low - margin, high + margin
