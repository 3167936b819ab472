"""Streamed prompt sources: a prompts file or a dataset feeds the rounds through Ray Data without the
driver holding it, in a seeded order per epoch, and a resumed run takes the same prompts per round."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

from iterft_ray.train.checkpoint import META
from iterft_ray.config import load_config
from iterft_ray.run.loop import IterativeLoop
from iterft_ray.run.run_dir import check_start
from iterft_ray.data.prompt_stream import PromptStream
from iterft_ray.data.prompts import PromptDataError, PromptFile, read_prompt_file


@pytest.fixture(scope="module", autouse=True)
def local_ray(shared_ray, warm_actors):
    shared_ray.up()  # the session's Ray (tests/conftest.py); a run's actors serve the next (`warm_actors`)


def addition_rows(n, start=0):
    return [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(start, start + n)]


def write_parquet(path, rows, row_group_size):
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ids(table):
    return table.column("prompt_id").to_pylist()


# ---------------------------------------------------------------- the order


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_epochs_are_seeded_shuffles_and_a_reopened_stream_goes_on_alike(tmp_path, fmt):
    total = 9000 if fmt == "jsonl" else 230  # 3 JSONL shards of <= 4096 rows; Parquet row groups of 50
    path = (write_jsonl(tmp_path / "p.jsonl", addition_rows(total)) if fmt == "jsonl"
            else write_parquet(tmp_path / "p.parquet", addition_rows(total), 50))
    source = PromptFile(path)
    assert source.num_rows == total and len(source.shards) == (3 if fmt == "jsonl" else 5)
    n = total // 7 + 3  # rounds cross shards and epochs at odd places
    rounds = 2 * total // n + 2
    stream = PromptStream(source, seed=5)
    taken = [stream.rows(r * n, n) for r in range(rounds)]
    sequence = [i for t in taken for i in ids(t)]
    epochs = [sequence[:total], sequence[total: 2 * total]]
    assert all(sorted(e) == list(range(total)) for e in epochs)  # every prompt once per epoch
    assert epochs[0] != epochs[1] and epochs[0] != list(range(total))  # reshuffled, not file order
    rows = {r["prompt_id"]: r for r in read_prompt_file(path).to_pylist()}
    assert all(rows[r["prompt_id"]] == r for t in taken[:3] for r in t.to_pylist())  # rows intact
    stream.close()

    again = PromptStream(source, seed=5)
    assert [ids(again.rows(r * n, n)) for r in range(3)] == [ids(t) for t in taken[:3]]
    again.close()
    other = PromptStream(source, seed=6)
    assert ids(other.rows(0, n)) != ids(taken[0])
    other.close()

    # A resumed run opens a new stream at a stored position: mid-shard, and in the second epoch.
    for r in (3, total // n + 1):
        straight = PromptStream(source, seed=5)
        straight.cursor = r * n
        position = straight.position
        resumed = PromptStream(source, seed=5)
        resumed.seek(json.loads(json.dumps(position)))
        assert [ids(resumed.next_rows(n)) for k in range(2)] == [ids(taken[r]), ids(taken[r + 1])]
        resumed.close()


def test_a_bad_row_in_a_later_shard_fails_as_it_streams_naming_the_file_and_row(tmp_path):
    rows = addition_rows(6000)
    rows[5000]["prompt"] = ""  # line 5001, in the second shard: not read when the file is opened
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    source = PromptFile(path)
    stream = PromptStream(source, seed=0)
    with pytest.raises(PromptDataError) as info:
        for r in range(4):
            stream.rows(r * 2000, 2000)
    message = str(info.value)
    assert message.startswith("data.prompts_file: ") and str(path) in message and "row 5001" in message, message
    assert "'prompt'" in message and "Traceback" not in message
    stream.close()


def test_first_rows_and_schema_are_checked_when_the_file_opens(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [{"text": "a"}] * 10, 5)
    with pytest.raises(PromptDataError, match=r"no column 'prompt'"):
        PromptFile(path)
    path = write_parquet(tmp_path / "n.parquet", [{"prompt": i} for i in range(10)], 5)
    with pytest.raises(PromptDataError, match=r"row 1: column 'prompt' must be a non-empty string, got 0"):
        PromptFile(path)
    rows = addition_rows(5000)
    rows[4500]["extra"] = 1  # a column the first shard lacks: named with its row when that shard is read
    source = PromptFile(write_jsonl(tmp_path / "p.jsonl", rows))
    with pytest.raises(PromptDataError, match=r"row 4501: column 'extra' is not in the file's first 4096 rows"):
        source.read_shard(1)


# ---------------------------------------------------------------- the driver's memory


CHILD = textwrap.dedent("""
    import re, sys
    import ray
    from iterft_ray.data.prompt_stream import PromptStream
    from iterft_ray.data.prompts import PromptFile

    ray.init(address=sys.argv[2], logging_level="ERROR")
    stream = PromptStream(PromptFile(sys.argv[1]), seed=0)
    top = max(max(stream.rows(r * 256, 256).column("prompt_id").to_pylist()) for r in range(4))
    stream.close()
    # VmHWM: the peak of this process image; getrusage's ru_maxrss would carry the forking parent's peak over exec
    print(top, int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read())[1]) // 1024)
""")


def test_driver_memory_does_not_grow_with_the_prompts_file(tmp_path):
    """3 million rows against 1000: the driver's peak RSS differs by less than 150 MB (a whole-file read: ~1.5 GB)."""
    def prompts_file(name, n):
        numbers = pc.cast(pa.array(np.arange(n)), pa.string())
        table = pa.table({"prompt": pc.binary_join_element_wise(numbers, pa.scalar("+1="), ""), "answer": numbers})
        pq.write_table(table, tmp_path / name)  # pyarrow's default row groups: about a million rows each
        return tmp_path / name

    address = ray.get_runtime_context().gcs_address
    peaks = {}
    for n in (1000, 3_000_000):
        child = subprocess.run([sys.executable, "-c", CHILD, str(prompts_file(f"{n}.parquet", n)), address],
                               capture_output=True, text=True, timeout=300)
        assert child.returncode == 0, child.stderr[-3000:]
        top, peaks[n] = map(int, child.stdout.split()[-2:])
        assert top < n and (n < 10_000 or top > 1000)  # the big file's rows, shuffled across it, were read
    print(peaks)
    assert peaks[3_000_000] - peaks[1000] < 150, peaks


# ---------------------------------------------------------------- datasets


def test_dataset_streams_through_load_dataset_with_the_rest_of_its_keys(tmp_path):
    data = tmp_path / "gsm"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"question": r["prompt"], "answer": r["answer"]} for r in addition_rows(50)])
    spec = {"path": str(data), "split": "train", "cache_dir": str(tmp_path / "cache")}
    config = load_config({"model": {"name_or_path": "tiny-llama"},
                          "data": {"dataset": spec, "prompt_column": "question"},
                          "loop": {"output_dir": str(tmp_path / "run")}})
    source = check_start(config).prompts
    assert source.num_rows == 50 and {"prompt", "answer", "prompt_id"} <= set(source.column_names)
    stream = PromptStream(source, seed=1)
    epoch = pa.concat_tables([stream.rows(k * 20, 20) for k in range(3)]).slice(0, 50)
    stream.close()
    assert sorted(ids(epoch)) == list(range(50))
    assert all(r["prompt"] == f"{r['prompt_id']}+1=" and r["answer"] == str(r["prompt_id"] + 1) for r in epoch.to_pylist())


@pytest.mark.parametrize("data, message", [
    ({"dataset": {"path": "d", "split": "train"}, "prompts_file": "p.jsonl"}, "data.prompts_file, data.dataset: "),
    ({"dataset": {"path": "d", "split": "train"}, "task": "addition"}, "data.task, data.dataset: "),
    ({"dataset": {"path": "d"}}, "data.dataset.split: "),
    ({"dataset": {"split": "train"}}, "data.dataset.path: "),
    ({"dataset": {"path": "d", "split": "train", "streaming": True}}, "data.dataset.streaming: "),
])
def test_dataset_settings_that_cannot_work_are_refused_by_key(data, message):
    with pytest.raises(ValueError) as info:
        load_config({"model": {"name_or_path": "tiny-llama"}, "data": data})
    assert str(info.value).startswith(message), str(info.value)


def test_missing_dataset_is_refused_before_ray_starts(tmp_path):
    config = load_config({"model": {"name_or_path": "tiny-llama"},
                          "data": {"dataset": {"path": str(tmp_path / "nope"), "split": "train"}},
                          "loop": {"output_dir": str(tmp_path / "run")}})
    with pytest.raises(ValueError, match=r"^data\.dataset: cannot load .*nope"):
        check_start(config)


# ---------------------------------------------------------------- resume


def test_a_trainer_restored_from_a_checkpoint_takes_the_same_prompts_as_the_run_before(tmp_path):
    """The trainer dies after round 3's checkpoint was lost: the loop goes back to round 2's checkpoint, whose
    stored stream position makes round 3 again bit for bit, mid-shard in the second epoch. (A fresh process
    resuming opens a new stream at the same position: the order test above shows it yields the same rows.)"""
    path = write_parquet(tmp_path / "p.parquet", addition_rows(13, start=10), 5)  # shards of 5, 5, 3 rows
    out = tmp_path / "run"
    loop = IterativeLoop({"model": {"name_or_path": "tiny-llama"}, "data": {"prompts_file": str(path)},
                          "filters": [{"name": "length_bounds", "min_chars": 1}],
                          "sampling": {"num_samples": 2, "max_new_tokens": 4},
                          "trainer": {"learning_rate": 1e-3, "per_device_train_batch_size": 16, "optim": "adamw_torch"},
                          "resources": {"num_generators": 1, "filter_pool_size": 1},
                          "loop": {"rounds": 3, "prompts_per_round": 8, "save_every": 2, "output_dir": str(out)}})
    try:
        loop.run()
        positions = [json.loads((out / "checkpoints" / f"round-{r:04d}" / META).read_text())["extra"]["prompt_position"]
                     for r in (2, 3)]
        assert positions == [{"epoch": 1, "rows": 3}, {"epoch": 1, "rows": 11}]  # 13 rows an epoch
        first = pq.read_table(out / "rounds" / "0003" / "generations.parquet")
        shutil.rmtree(out / "checkpoints" / "round-0003")
        ray.kill(loop.rl.trainer.ranks[0])
        loop.recover_trainer()
        assert loop.round_index == 2
        loop.config.loop.rounds, loop.config.loop.save_every = 5, 10  # round 3 again, not checkpointed this time
        loop.round()
        # Bad rows where round 4 reads (as if far into a big file): the run stops before round 4,
        # with round 3 checkpointed at its place in the stream, and says how to go on.
        write_parquet(path, [{"prompt": "", "answer": "0"}] * 13, 5)
        with pytest.raises(PromptDataError) as info:
            loop.round()
        message = str(info.value)
        assert message.startswith(f"data.prompts_file: {path}: row ") and "column 'prompt' must be a non-empty" in message
        assert "round 4 stopped before it started; rounds 1-3 are saved" in message and "--resume" in message
        saved = json.loads((out / "checkpoints" / "round-0003" / META).read_text())["extra"]["prompt_position"]
        assert saved == {"epoch": 1, "rows": 11}
    finally:
        loop.shutdown()
    again = pq.read_table(out / "rounds" / "0003" / "generations.parquet")
    assert set(again["prompt_id"].to_pylist()) == set(first["prompt_id"].to_pylist())
    # The same rows, bit for bit; only the weight version moved on (a restored trainer's versions only go up).
    assert again.drop_columns(["weight_version"]).equals(first.drop_columns(["weight_version"]))
    assert min(again["weight_version"].to_pylist()) > max(first["weight_version"].to_pylist())
    rounds = [set(pq.read_table(out / "rounds" / r / "generations.parquet")["prompt_id"].to_pylist())
              for r in ("0001", "0002")]
    assert len(rounds[0]) == 8 and rounds[0] | rounds[1] == set(range(13))  # epoch 1: every prompt once
