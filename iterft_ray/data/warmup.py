"""Warm-up demonstrations from a file (`data.warmup_file`), trained on before round 1 like a task's warm-up examples.

A JSONL file, one demonstration a line: `{"prompt": "...", "completion": "..."}`, the
fields of TRL's prompt-completion datasets. The completion is the target (the prompt's
tokens are masked out of the loss); with `data.chat_template` both are rendered as a
user and an assistant turn, as a task's warm-up examples are. With `data.chat_template` a line
may instead be a conversation, `{"messages": [{"role", "content"}, ...]}` as TRL's conversational
datasets have it (a tool call and its result, say): every assistant turn is a target, the other
messages are context. Other fields are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_warmup_file(path: str | Path) -> list[dict]:
    """The demonstrations of `path` as `{"prompt", "completion"}` or `{"messages"}` dicts; a bad line raises
    ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file {path}")
    if path.suffix != ".jsonl":
        raise ValueError(f"{path}: expected a .jsonl file of {{\"prompt\": ..., \"completion\": ...}} lines")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e.msg})") from None
            if isinstance(row, dict) and "messages" in row:
                examples.append({"messages": _checked_messages(row["messages"], path, number)})
                continue
            fields = {k: row.get(k) for k in ("prompt", "completion")} if isinstance(row, dict) else {}
            if not (isinstance(fields.get("prompt"), str) and fields["prompt"]
                    and isinstance(fields.get("completion"), str) and fields["completion"]):
                got = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}, line {number}: expected non-empty strings \"prompt\" and \"completion\", "
                                 f"got {got}")
            examples.append(fields)
    if not examples:
        raise ValueError(f"{path}: no demonstrations")
    return examples


def _checked_messages(messages, path: Path, number: int) -> list[dict[str, str]]:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok or not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{path}, line {number}: expected \"messages\" as a list of {{\"role\", \"content\"}} "
                         "strings with at least one assistant message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def is_conversation(example: dict) -> bool:
    """Whether a warm-up example is a conversation (`{"messages": [...]}`) rather than a prompt and completion."""
    return "messages" in example
