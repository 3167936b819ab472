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
    JSONL rows are numbered by line.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        rows = list(enumerate(table.to_pylist(), start=1))
    elif path.suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
        table = _table_from_rows(path, rows)
    else:
        raise ValueError(f"data.prompts_file: expected a .jsonl or .parquet file, got {path}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    if column not in table.column_names:
        raise ValueError(f"{path}: no column {column!r} (columns: {table.column_names})")
    for number, row in rows:
        value = row.get(column)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: row {number}: column {column!r} must be a non-empty string, got {value!r}")
        if not _is_unicode(value):
            raise ValueError(f"{path}: row {number}: column {column!r} is not valid Unicode text")
    if column != "prompt":
        if "prompt" in table.column_names:
            table = table.drop_columns(["prompt"])
        table = table.rename_columns(["prompt" if c == column else c for c in table.column_names])
    if "prompt_id" not in table.column_names:
        table = table.append_column("prompt_id", pa.array(range(table.num_rows), pa.int64()))
    return table


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}: row {number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def _table_from_rows(path: Path, rows: list[tuple[int, dict]]) -> pa.Table:
    """Columns are the union of all rows' keys; a column whose values change type is an error naming the row."""
    names = list(dict.fromkeys(key for _, row in rows for key in row))
    columns = {}
    for name in names:
        for number, row in rows:
            if isinstance(row.get(name), str) and not _is_unicode(row[name]):
                raise ValueError(f"{path}: row {number}: column {name!r} is not valid Unicode text")
        values = [row.get(name) for _, row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            kinds = [(n, type(row[name])) for n, row in rows if row.get(name) is not None]
            number, kind = next((n, k) for n, k in kinds if k is not kinds[0][1])
            raise ValueError(
                f"{path}: row {number}: column {name!r} holds a {kind.__name__} where earlier rows hold "
                f"{kinds[0][1].__name__}"
            ) from None
    return pa.table(columns)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
