"""Prompt files (JSONL, Parquet): good files load with their extra columns; bad ones
give an error that names the file, the row and the column."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iterft_ray.config import load_config
from iterft_ray.data.prompts import load_prompts, read_prompt_file


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def raises_naming(path, *parts, error=ValueError):
    """Reading `path` raises `error` whose message names the file and every one of `parts`."""
    with pytest.raises(error) as info:
        read_prompt_file(*path) if isinstance(path, tuple) else read_prompt_file(path)
    message = str(info.value)
    file = path[0] if isinstance(path, tuple) else path
    assert str(file) in message, f"file not named: {message!r}"
    for part in parts:
        assert re.search(part, message), f"{part!r} not in {message!r}"
    return message


# ---------------------------------------------------------------- good files

ROWS = [
    {"prompt": "12+30=", "answer": "42"},
    {"prompt": "7+5=", "answer": "12"},
    {"prompt": "1+1=", "answer": "2"},
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_good_file_keeps_extra_columns_and_numbers_rows(tmp_path, fmt):
    path = tmp_path / f"p.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(path, ROWS)
    table = read_prompt_file(path)
    assert {"prompt", "prompt_id", "answer"} <= set(table.column_names)
    assert table["prompt"].to_pylist() == [r["prompt"] for r in ROWS]
    assert table["answer"].to_pylist() == [r["answer"] for r in ROWS]
    assert table["prompt_id"].to_pylist() == [0, 1, 2]
    assert len(set(table.column_names)) == len(table.column_names)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_custom_column_and_given_prompt_id(tmp_path, fmt):
    rows = [{"question": r["prompt"], "answer": r["answer"], "prompt_id": f"q{i}"} for i, r in enumerate(ROWS)]
    path = tmp_path / f"p.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(path, rows)
    table = read_prompt_file(path, "question")
    assert table["prompt"].to_pylist() == [r["prompt"] for r in ROWS]
    assert table["prompt_id"].to_pylist() == ["q0", "q1", "q2"]
    assert table["answer"].to_pylist() == ["42", "12", "2"]
    assert "question" not in table.column_names


def test_blank_lines_are_skipped_and_row_numbers_are_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n   \n{"prompt": ""}\n', encoding="utf-8")
    raises_naming(path, r"\brow 4\b", "prompt")


def test_custom_column_when_file_also_has_a_prompt_column(tmp_path):
    """`prompt_column: question` on a file that also has `prompt`: the result must have
    one `prompt` column (the chosen one), or the read must fail naming the file and column."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q1", "prompt": "old", "answer": "1"}])
    try:
        table = read_prompt_file(path, "question")
    except ValueError as e:
        assert str(path) in str(e) and "prompt" in str(e), str(e)
        return
    assert table.column_names.count("prompt") == 1, table.column_names
    assert table["prompt"].to_pylist() == ["q1"]


def test_extra_column_only_on_later_rows_is_kept(tmp_path):
    """A column that the first row lacks must not be dropped silently (filters read it)."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", "answer": "2"}])
    try:
        table = read_prompt_file(path)
    except ValueError as e:
        assert str(path) in str(e) and re.search(r"\brow 1\b", str(e)) and "answer" in str(e), str(e)
        return
    assert "answer" in table.column_names, table.column_names
    assert table["answer"].to_pylist() == [None, "2"]


# ---------------------------------------------------------------- bad files


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_missing_column_names_file_and_column(tmp_path, fmt):
    path = tmp_path / f"p.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(path, [{"text": "a"}, {"text": "b"}])
    raises_naming(path, "'prompt'")
    raises_naming((path, "question"), "'question'")


def test_first_row_missing_the_column_names_the_row(tmp_path):
    """Only row 1 lacks the prompt: the error should name row 1, not claim the column is absent."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    raises_naming(path, r"\brow 1\b", "prompt")


@pytest.mark.parametrize("value", [None, "", 3, 2.5, True, ["a"], {"a": 1}])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_bad_prompt_value_names_file_row_and_column(tmp_path, fmt, value):
    rows = [{"prompt": "ok"}, {"prompt": "fine"}, {"prompt": value}]
    path = tmp_path / f"p.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    else:
        try:  # a Parquet column has one type: a mixed column cannot be written, so the bad value is alone
            write_parquet(path, rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            write_parquet(path, [{"prompt": value}])
            raises_naming(path, r"\brow 1\b", "'prompt'")
            return
    raises_naming(path, r"\brow 3\b", "'prompt'")


def test_missing_key_on_a_later_row_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"text": "b"}])
    raises_naming(path, r"\brow 2\b", "'prompt'")


def test_parquet_null_prompt_names_row(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [{"prompt": "a"}, {"prompt": None}], pa.schema([("prompt", pa.string())]))
    raises_naming(path, r"\brow 2\b", "'prompt'")


def test_invalid_json_line_names_file_and_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"\n', encoding="utf-8")
    raises_naming(path, r"\brow 2\b", "JSON")


@pytest.mark.parametrize("line", ['["a", "b"]', '"just a string"', "3", "null", "NaN"])
def test_non_object_json_line_names_file_and_row(tmp_path, line):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n' + line + "\n", encoding="utf-8")
    raises_naming(path, r"\brow 2\b")


def test_unsupported_suffix_names_the_file(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\na\n", encoding="utf-8")
    raises_naming(path, r"\.jsonl", r"\.parquet")


def test_prompt_of_another_type_than_earlier_rows_names_file_row_and_column(tmp_path):
    """Row 1 has a string prompt, row 2 a number: the error names row 2 and the column."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": 3}\n', encoding="utf-8")
    raises_naming(path, r"\brow 2\b", "prompt")


def test_extra_column_of_mixed_types_names_file_and_column(tmp_path):
    """`answer` is a number on row 1 and a string on row 2: a clear error naming the
    file, the row and the column, or a table that keeps both values."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n{"prompt": "b", "answer": "x"}\n', encoding="utf-8")
    try:
        table = read_prompt_file(path)
    except ValueError as e:
        assert str(path) in str(e) and re.search(r"\brow 2\b", str(e)) and "answer" in str(e), str(e)
        return
    assert table["prompt"].to_pylist() == ["a", "b"]
    assert [str(v) for v in table["answer"].to_pylist()] == ["1", "x"]


def test_non_utf8_bytes_name_file_and_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b\xff"}\n')
    raises_naming(path, r"\brow 2\b")


def test_lone_surrogate_prompt_names_file_row_and_column(tmp_path):
    """JSON may spell a lone surrogate (\\ud800), which is no Unicode text."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "x\\ud800"}\n', encoding="utf-8")
    raises_naming(path, r"\brow 2\b", "prompt")


def test_empty_file_names_the_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n", encoding="utf-8")
    raises_naming(path)


def test_missing_file_names_the_file(tmp_path):
    raises_naming(tmp_path / "nope.jsonl", error=OSError)


# ---------------------------------------------------------------- through the config


def test_load_prompts_from_config(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"q": r["prompt"], "answer": r["answer"]} for r in ROWS])
    config = load_config(
        {"model": {"name_or_path": "tiny-llama"}, "data": {"task": None, "prompts_file": str(path), "prompt_column": "q"}}
    )
    source, heldout, task = load_prompts(config.data)  # opened to stream: its first rows checked, none kept
    assert source.num_rows == 3 and set(source.column_names) == {"prompt", "answer", "prompt_id"}
    train = source.read_shard(0)
    assert train["prompt"].to_pylist() == [r["prompt"] for r in ROWS]
    assert train["answer"].to_pylist() == [r["answer"] for r in ROWS]
    assert train["prompt_id"].to_pylist() == [0, 1, 2]
    assert heldout is None and task is None


def test_load_prompts_from_config_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": None}])
    config = load_config({"model": {"name_or_path": "tiny-llama"}, "data": {"prompts_file": str(path)}})
    with pytest.raises(ValueError) as info:
        load_prompts(config.data)
    assert str(path) in str(info.value) and re.search(r"\brow 2\b", str(info.value)) and "'prompt'" in str(info.value)
