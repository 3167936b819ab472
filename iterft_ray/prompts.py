"""Prompt sources (a built-in task's splits, or a JSONL / Parquet file with a prompt column) and chat templates.

With `data.chat_template` the driver turns each prompt into the tokens of the tokenizer's
chat template (`with_chat_template`) and sends them along as a `prompt_ids` column: the
engines sample from exactly those tokens and the rollouts carry them to the trainer, so
nothing re-tokenizes the templated text (which would add a second BOS).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .config import DataConfig, ModelConfig
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
    if "messages" in table.column_names:
        _check_messages(path, rows)
        if column not in table.column_names:
            # Filters see the prompt text: a conversation's last user message.
            prompts = [[m["content"] for m in row["messages"] if m["role"] == "user"][-1] for _, row in rows]
            table = table.append_column(column, pa.array(prompts, pa.string()))
            rows = [(number, {**row, column: text}) for (number, row), text in zip(rows, prompts)]
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


def _check_messages(path: Path, rows: list[tuple[int, dict]]) -> None:
    """Each row's `messages` is a non-empty list of {role, content} strings with a user message."""
    for number, row in rows:
        messages = row.get("messages")
        if (not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise ValueError(f"{path}: row {number}: column 'messages' must be a non-empty list of "
                             f"{{role, content}} strings, got {messages!r}")
        if not any(m["role"] == "user" for m in messages):
            raise ValueError(f"{path}: row {number}: column 'messages' has no user message")


def load_chat_tokenizer(model: ModelConfig):
    """The run's tokenizer, loaded on the driver, for `data.chat_template`; it must have a template."""
    from transformers import AutoTokenizer

    from .tiny import resolve_model_path

    path = model.tokenizer or resolve_model_path(model.name_or_path, **model.tiny_overrides)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    if not tokenizer.chat_template:
        raise ValueError(f"data.chat_template: true, but the tokenizer of {model.tokenizer or model.name_or_path} "
                         "has no chat template; use an instruct model's tokenizer (model.tokenizer) or set "
                         "data.chat_template: false")
    return tokenizer


def conversation(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A prompt as chat messages: the system prompt (if any), then the prompt as the user's message."""
    return [*([{"role": "system", "content": system_prompt}] if system_prompt else []),
            {"role": "user", "content": prompt}]


def with_chat_template(prompts: pa.Table, tokenizer, system_prompt: str | None = None) -> pa.Table:
    """`prompts` with a `prompt_ids` column: each row's chat-template tokens, the assistant's turn opened.

    A row's `messages` (when the table has that column) are used as given; otherwise its
    `prompt` becomes a user message after `system_prompt`. The ids are the template's
    tokens as `apply_chat_template` makes them (no special tokens added to the rendered
    text), and the engines sample from them unchanged.
    """
    texts = prompts.column("prompt").to_pylist()
    given = prompts.column("messages").to_pylist() if "messages" in prompts.column_names else [None] * len(texts)
    conversations = [messages or conversation(text, system_prompt) for text, messages in zip(texts, given)]
    ids = [_template_ids(tokenizer, c, add_generation_prompt=True) for c in conversations]
    if "prompt_ids" in prompts.column_names:
        prompts = prompts.drop_columns(["prompt_ids"])
    return prompts.append_column("prompt_ids", pa.array(ids, pa.list_(pa.int32())))


def chat_example_ids(tokenizer, prompt: str, completion: str, system_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a supervised chat example: the prompt's template tokens (as `with_chat_template`
    makes them, labels -100) and the assistant's turn as the template closes it (its end-of-turn token
    included, so the model learns to stop where sampling stops)."""
    messages = conversation(prompt, system_prompt)
    prompt_ids = _template_ids(tokenizer, messages, add_generation_prompt=True)
    full = _template_ids(tokenizer, [*messages, {"role": "assistant", "content": completion}])
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        completion_ids = full[len(prompt_ids):]
    else:  # a template that renders past turns differently (e.g. drops reasoning): the text and EOS
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def _template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    # transformers 5 returns a BatchEncoding here; it tokenizes the rendered text with add_special_tokens=False.
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=True)
    return list(out["input_ids"])


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
