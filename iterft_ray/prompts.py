"""Prompt sources: a built-in task's splits, or a JSONL / Parquet file with a prompt column."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .config import DataConfig
from .tasks import Task, get_task


def load_prompts(data: DataConfig) -> tuple[pa.Table, pa.Table | None, Task | None]:
    """(train prompts, held-out prompts or None, task or None) for a run's data config."""
    if data.prompts_file is not None:
        return read_prompt_file(data.prompts_file, data.prompt_column), None, None
    task = get_task(data.task, **data.task_options)
    return pa.Table.from_pylist(task.train_prompts), pa.Table.from_pylist(task.heldout_prompts), task


def read_prompt_file(path: str | Path, column: str = "prompt") -> pa.Table:
    """Read prompts from `.jsonl` or `.parquet`; errors name the file, the row and the column.

    The table gets `prompt` (from `column`) and `prompt_id` (the row number unless the
    file has one); other columns ride along into the rollouts, where filters see them.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        table = pq.read_table(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: row {number}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: row {number}: expected a JSON object")
                rows.append(row)
        table = pa.Table.from_pylist(rows)
    else:
        raise ValueError(f"data.prompts_file: expected a .jsonl or .parquet file, got {path}")
    if column not in table.column_names:
        raise ValueError(f"{path}: no column {column!r} (columns: {table.column_names})")
    prompts = table[column].to_pylist()
    for number, value in enumerate(prompts, start=1):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: row {number}: column {column!r} must be a non-empty string, got {value!r}")
    if column != "prompt":
        table = table.rename_columns(["prompt" if c == column else c for c in table.column_names])
    if "prompt_id" not in table.column_names:
        table = table.append_column("prompt_id", pa.array(range(table.num_rows), pa.int64()))
    return table
