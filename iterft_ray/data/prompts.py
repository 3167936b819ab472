"""Prompt sources (a built-in task's splits, a JSONL / Parquet file, or a Hugging Face dataset) and chat templates.

A file or a dataset is read in shards (a Parquet row group; 4096 rows of a JSONL file or a
dataset), so that no process holds all of it: `prompt_stream.PromptStream` feeds the rounds
from them shard by shard. Opening a source checks what is cheap up front (the schema, the
first rows, the row count); every other row is checked when its shard is read, with the
same errors naming the file, the row and the column.

With `data.chat_template` the driver turns each prompt into the tokens of the tokenizer's
chat template (`with_chat_template`) and sends them along as a `prompt_ids` column: the
engines sample from exactly those tokens and the rollouts carry them to the trainer, so
nothing re-tokenizes the templated text (which would add a second BOS).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from iterft_ray.config import DataConfig
from iterft_ray.data.tasks import Task, get_task

# Rows per shard of a JSONL file or a dataset: the unit that is read, shuffled and skipped at once.
SHARD_ROWS = 4096


class PromptDataError(ValueError):
    """Prompt rows that cannot be used; the message names the file (or dataset), the row and the column."""


@dataclass(frozen=True)
class Shard:
    first_row: int  # index of its first row in the source (the default prompt_id)
    num_rows: int
    where: int = 0  # Parquet: the row group; JSONL: the byte offset of its first row
    first_line: int = 0  # JSONL: the line number of its first row (errors count lines)


def load_prompts(data: DataConfig) -> tuple[pa.Table | PromptSource, pa.Table | None, Task | None]:
    """(train prompts, held-out prompts or None, task or None) for a run's data config.

    A task's prompts and a reasoning-gym data set's are a table; a file's or dataset's are a `PromptSource`, opened
    (schema and first rows checked) but not read.
    """
    if data.prompts_file is not None:
        return PromptFile(data.prompts_file, data.prompt_column), None, None
    if data.dataset is not None:
        return PromptDataset(data.dataset, data.prompt_column), None, None
    if data.reasoning_gym is not None:
        from iterft_ray.data.reasoning_gym import prompt_table

        return prompt_table(data.reasoning_gym, "data.reasoning_gym"), None, None
    task = get_task(data.task, **data.task_options)
    return pa.Table.from_pylist(task.train_prompts), pa.Table.from_pylist(task.heldout_prompts), task


class PromptSource:
    """Prompt rows read shard by shard: `read_shard(i)` is a checked table with `prompt` and `prompt_id`.

    `key` is the config key that names the source in errors; `name` is how errors name
    it (the file); `column_names` are the columns of the rows it yields.
    """

    key: str
    name: str
    column: str
    shards: list[Shard]
    column_names: list[str]

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    def read_shard(self, index: int) -> pa.Table:
        shard = self.shards[index]
        table, numbers = self._read(shard)
        return _prompt_table(self.name, table, numbers, shard.first_row, self.column)

    def _read(self, shard: Shard) -> tuple[pa.Table, list[int]]:
        """A shard's raw rows and their numbers as errors name them."""
        raise NotImplementedError

    def _open(self, head: pa.Table, numbers: list[int]) -> None:
        """Check the first rows (and through them the schema) now, not in the middle of a run."""
        if not self.shards:
            raise PromptDataError(f"{self.name}: no rows")
        self.column_names = _prompt_table(self.name, head, numbers, 0, self.column).column_names


class PromptFile(PromptSource):
    """A `.jsonl` or `.parquet` prompts file with a prompt column (`data.prompt_column`).

    Rows get `prompt` (from the column, or a `messages` conversation's last user message)
    and `prompt_id` (the row's index unless the file has one); other columns ride along
    into the rollouts, where filters see them. JSONL rows are numbered by line; a JSONL
    file's columns and their types are those of its first shard's rows, and a later row
    that adds a column or changes a type is an error naming it.
    """

    key = "data.prompts_file"

    def __init__(self, path: str | Path, column: str = "prompt"):
        self.path, self.column, self.name = Path(path), column, str(path)
        self.schema: pa.Schema | None = None  # JSONL: the first shard's column types
        if self.path.suffix == ".parquet":
            self._open_parquet()
        elif self.path.suffix in (".jsonl", ".json"):
            self._open_jsonl()
        else:
            raise PromptDataError(f"{path}: expected a .jsonl or .parquet file")

    def _open_parquet(self) -> None:
        try:
            # Buffered, not pre-buffered: the first rows are read page by page, not a whole row group at once.
            file = pq.ParquetFile(self.path, buffer_size=1 << 20, pre_buffer=False)
        except pa.ArrowInvalid as e:
            raise PromptDataError(f"{self.path}: not a Parquet file ({e})") from None
        self.shards, first = [], 0
        for group in range(file.metadata.num_row_groups):
            rows = file.metadata.row_group(group).num_rows
            if rows:
                self.shards.append(Shard(first, rows, group))
                first += rows
        head = next(file.iter_batches(batch_size=SHARD_ROWS), None)
        head = pa.Table.from_batches([head]) if head is not None else file.schema_arrow.empty_table()
        self._open(head, list(range(1, head.num_rows + 1)))

    def _open_jsonl(self) -> None:
        """One pass over the lines for the shards' byte offsets (no row is kept), then the first shard read whole."""
        self.shards, rows, offset = [], 0, 0
        starts: list[tuple[int, int, int]] = []
        with self.path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    if rows % SHARD_ROWS == 0:
                        starts.append((rows, offset, number))
                    rows += 1
                offset += len(raw)
        self.shards = [Shard(first, min(SHARD_ROWS, rows - first), where, line) for first, where, line in starts]
        head, numbers = self._read(self.shards[0]) if self.shards else (pa.table({}), [])
        self.schema = head.schema
        self._open(head, numbers)

    def _read(self, shard: Shard) -> tuple[pa.Table, list[int]]:
        if self.path.suffix == ".parquet":
            table = pq.ParquetFile(self.path).read_row_group(shard.where)
            return table, list(range(shard.first_row + 1, shard.first_row + table.num_rows + 1))
        rows = []
        with self.path.open("rb") as f:
            f.seek(shard.where)
            number = shard.first_line
            while len(rows) < shard.num_rows:
                raw = f.readline()
                if raw.strip():
                    rows.append((number, _json_row(self.path, number, raw)))
                number += 1
        return _table_from_rows(self.path, rows, self.schema), [number for number, _ in rows]


class PromptDataset(PromptSource):
    """Prompts of a Hugging Face dataset, `datasets.load_dataset(path, name, split=split, **the other keys)`.

    `load_dataset` turns local files or a hub dataset into memory-mapped Arrow files in the
    datasets cache; shards are row ranges of those, read where the driver runs (the cache is
    on its node). Rows are numbered from 1 in errors.
    """

    key = "data.dataset"

    def __init__(self, spec: dict[str, Any], column: str = "prompt"):
        import datasets

        options = dict(spec)
        path, name, split = options.pop("path"), options.pop("name", None), options.pop("split")
        self.column, self.name = column, f"{path}{f' ({name})' if name else ''} split {split}"
        try:
            dataset = datasets.load_dataset(path, name, split=split, **options)
        except Exception as e:  # datasets raises many kinds for a missing path, a bad split or an offline hub
            raise PromptDataError(f"cannot load {self.name}: {type(e).__name__}: {e}") from None
        if not isinstance(dataset, datasets.Dataset):
            raise PromptDataError(f"{self.name}: expected a dataset with random access, got {type(dataset).__name__}; "
                                  "remove data.dataset.streaming")
        self.dataset = dataset
        self.shards = [Shard(first, min(SHARD_ROWS, dataset.num_rows - first))
                       for first in range(0, dataset.num_rows, SHARD_ROWS)]
        head, numbers = self._read(self.shards[0]) if self.shards else (pa.table({}), [])
        self._open(head, numbers)

    def _read(self, shard: Shard) -> tuple[pa.Table, list[int]]:
        table = self.dataset.with_format("arrow")[shard.first_row: shard.first_row + shard.num_rows]
        return table, list(range(shard.first_row + 1, shard.first_row + table.num_rows + 1))


def read_prompt_file(path: str | Path, column: str = "prompt") -> pa.Table:
    """A whole prompts file as one checked table: for small files and inspection (a run streams its file)."""
    source = PromptFile(path, column)
    return pa.concat_tables([source.read_shard(i) for i in range(len(source.shards))])


def _prompt_table(name: str, table: pa.Table, numbers: list[int], first_row: int, column: str) -> pa.Table:
    """Raw rows -> rows with a checked `prompt` and a `prompt_id`; errors name `name`, the row and the column."""
    if "messages" in table.column_names:
        messages = table.column("messages").to_pylist()
        _check_messages(name, numbers, messages)
        if column not in table.column_names:
            # Filters see the prompt text: a conversation's last user message.
            prompts = [[m["content"] for m in conversation if m["role"] == "user"][-1] for conversation in messages]
            table = table.append_column(column, pa.array(prompts, pa.string()))
    if column not in table.column_names:
        raise PromptDataError(f"{name}: no column {column!r} (columns: {table.column_names})")
    for number, value in zip(numbers, table.column(column).to_pylist()):
        if not isinstance(value, str) or not value:
            raise PromptDataError(f"{name}: row {number}: column {column!r} must be a non-empty string, got {value!r}")
        if not _is_unicode(value):
            raise PromptDataError(f"{name}: row {number}: column {column!r} is not valid Unicode text")
    if column != "prompt":
        if "prompt" in table.column_names:
            table = table.drop_columns(["prompt"])
        table = table.rename_columns(["prompt" if c == column else c for c in table.column_names])
    if "prompt_id" not in table.column_names:
        table = table.append_column("prompt_id", pa.array(range(first_row, first_row + table.num_rows), pa.int64()))
    return table


def _check_messages(name: str, numbers: list[int], values: list[Any]) -> None:
    """Each row's `messages` is a non-empty list of {role, content} strings with a user message."""
    for number, messages in zip(numbers, values):
        if (not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise PromptDataError(f"{name}: row {number}: column 'messages' must be a non-empty list of "
                                  f"{{role, content}} strings, got {messages!r}")
        if not any(m["role"] == "user" for m in messages):
            raise PromptDataError(f"{name}: row {number}: column 'messages' has no user message")


def _json_row(path: Path, number: int, raw: bytes) -> dict:
    """Line `number` of a JSONL file as a dict; errors name the file and the line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PromptDataError(f"{path}: row {number}: not UTF-8 text") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptDataError(f"{path}: row {number}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise PromptDataError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
    return row


def _table_from_rows(path: Path, rows: list[tuple[int, dict]], schema: pa.Schema | None = None) -> pa.Table:
    """Rows as a table: the columns of `schema` (a file's first shard's), or the union of the rows' keys.

    A column whose values change type, or (given a schema) a row with a column the schema
    lacks, is an error naming the row.
    """
    names = list(dict.fromkeys(key for _, row in rows for key in row))
    if schema is not None:
        extra = next((name for name in names if name not in schema.names), None)
        if extra is not None:
            number = next(n for n, row in rows if extra in row)
            raise PromptDataError(f"{path}: row {number}: column {extra!r} is not in the file's first {SHARD_ROWS} "
                                  f"rows (columns: {schema.names}); put a row that has it first")
        names = schema.names
    columns = {}
    for name in names:
        for number, row in rows:
            if isinstance(row.get(name), str) and not _is_unicode(row[name]):
                raise PromptDataError(f"{path}: row {number}: column {name!r} is not valid Unicode text")
        kind = schema.field(name).type if schema is not None else None
        try:
            columns[name] = pa.array([row.get(name) for _, row in rows], type=kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            raise PromptDataError(_type_change(path, rows, name, kind)) from None
    return pa.table(columns, schema=schema)


def _type_change(path: Path, rows: list[tuple[int, dict]], name: str, kind: pa.DataType | None) -> str:
    """The message for a column whose values do not share a type: the first row that breaks it."""
    if kind is not None:
        for number, row in rows:
            try:
                pa.array([row.get(name)], type=kind)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                return (f"{path}: row {number}: column {name!r} holds {row[name]!r}, where the file's first rows "
                        f"hold {kind}")
    kinds = [(n, type(row[name])) for n, row in rows if row.get(name) is not None]
    number, other = next(((n, k) for n, k in kinds if k is not kinds[0][1]), kinds[-1])
    return (f"{path}: row {number}: column {name!r} holds a {other.__name__} where earlier rows hold "
            f"{kinds[0][1].__name__}")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def prompt_table(prompts: pa.Table | list[str] | list[dict]) -> pa.Table:
    """Prompts as an Arrow table with `prompt_id` and `prompt` (ids 0..n-1 when not given)."""
    if isinstance(prompts, pa.Table):
        table = prompts
    elif prompts and all(isinstance(p, str) for p in prompts):
        table = pa.table({"prompt": list(prompts)})
    elif prompts and all(isinstance(p, dict) for p in prompts):
        table = pa.Table.from_pylist(list(prompts))
    else:
        raise TypeError("prompts: expected a non-empty list of strings or dicts, or a pyarrow Table")
    if "prompt" not in table.column_names:
        raise ValueError(f"prompts: no 'prompt' column (columns: {table.column_names})")
    if "prompt_id" not in table.column_names:
        table = table.append_column("prompt_id", pa.array(range(table.num_rows), pa.int64()))
    return table
