import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import ray

from iterft_ray.verify.filters import (
    best_of_k,
    deduplicate,
    exact_answer,
    length_bounds,
    regex,
    resolve_filter,
    score_threshold,
    top_fraction,
)
from iterft_ray.verify.scoring import RolloutScorer, score_rollouts


def prefers_short(prompt: str, completion: str, meta: dict) -> float:
    """A reward filter for the import-string tests, imported as f"{__name__}:prefers_short"."""
    return 1.0 / (1 + len(completion))


def _rollouts(completions: list[str], prompt_ids: list[int] | None = None) -> pa.Table:
    prompt_ids = prompt_ids or [0] * len(completions)
    return pa.table(
        {
            "sample_id": [f"s{i}" for i in range(len(completions))],
            "prompt_id": pa.array(prompt_ids, pa.int64()),
            "prompt": ["37+45="] * len(completions),
            "completion": completions,
            "answer": ["82"] * len(completions),
        }
    )


def _scored(scores: list[float], accepted: list[bool], prompt_ids: list[int]) -> pa.Table:
    """A batch as selectors see it, after the row filters."""
    return pa.table(
        {
            "prompt_id": pa.array(prompt_ids, pa.int64()),
            "completion": [f"c{i}" for i in range(len(scores))],
            "score": pa.array(scores, pa.float64()),
            "accepted": accepted,
        }
    )


def test_exact_answer_accepts_correct_completions_and_keeps_rejected_rows():
    scored = score_rollouts(_rollouts(["82", "81", "", " 82\n"]), [exact_answer()])

    assert scored.num_rows == 4
    assert scored["accepted"].to_pylist() == [True, False, False, True]
    assert scored["score"].to_pylist() == [1.0, 0.0, 0.0, 1.0]
    assert scored["filter_error"].to_pylist() == [None] * 4
    assert scored.schema.field("score").type == pa.float64()
    assert scored["sample_id"].to_pylist() == ["s0", "s1", "s2", "s3"]


def test_regex_accepts_when_the_pattern_matches():
    scored = score_rollouts(_rollouts(["82", "82 xyz", "abc"]), [regex(r"^\d+$")])

    assert scored["accepted"].to_pylist() == [True, False, False]


def test_length_bounds_are_inclusive():
    scored = score_rollouts(_rollouts(["", "a", "abc", "abcd"]), [length_bounds(1, 3)])

    assert scored["accepted"].to_pylist() == [False, True, True, False]


def test_numbers_add_to_the_score_and_gates_reject():
    filters = [prefers_short, length_bounds(max_chars=3), prefers_short]

    scored = score_rollouts(_rollouts(["a", "abc", "abcdefg"]), filters)

    assert scored["score"].to_pylist() == pytest.approx([1.0, 0.5, 1 / 8])
    assert scored["accepted"].to_pylist() == [True, True, False]


def test_filter_meta_is_the_row_without_prompt_and_completion():
    def show(prompt, completion, meta):
        raise ValueError(repr((prompt, completion, meta)))

    scored = score_rollouts(_rollouts(["82"]), [show])

    expected = ("37+45=", "82", {"sample_id": "s0", "prompt_id": 0, "answer": "82"})
    assert scored["filter_error"][0].as_py() == f"show: ValueError: {expected!r}"


def test_import_string_resolves_to_the_function():
    assert resolve_filter(f"{__name__}:prefers_short") is prefers_short
    assert resolve_filter({"name": f"{__name__}:prefers_short"}) is prefers_short

    scored = score_rollouts(_rollouts(["a", "abc"]), [f"{__name__}:prefers_short"])
    assert scored["score"].to_pylist() == [0.5, 0.25]


@pytest.mark.parametrize("spec", ["no_such_module_xyz:f", f"{__name__}:no_such_function"])
def test_bad_import_string_is_an_error_naming_it(spec):
    with pytest.raises(ValueError, match=spec):
        resolve_filter(spec)


def test_import_string_with_options_is_an_error():
    with pytest.raises(ValueError, match="prefers_short.*takes none"):
        resolve_filter({"name": f"{__name__}:prefers_short", "scale": 2})


def test_dict_specs_build_the_built_ins():
    table = _rollouts(["82", "82", "8", "82 xyz", " 82"])

    scored = score_rollouts(
        table, [{"name": "regex", "pattern": r"^\s*\d+"}, "exact_answer", {"name": "deduplicate"}]
    )

    assert scored["accepted"].to_pylist() == [True, False, False, False, True]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "best_of_k", "kk": 2}, "'best_of_k'.*kk"),
        ({"name": "best_of_k", "k": 0}, "'best_of_k'.*k >= 1"),
        ({"name": "top_fraction", "fraction": 1.5}, "'top_fraction'.*fraction"),
        ({"name": "top_fraction"}, "'top_fraction'.*fraction"),
        ({"name": "length_bounds", "min_chars": 5, "max_chars": 2}, "'length_bounds'"),
        ({"name": "length_bounds", "min_chars": "5", "max_chars": 9}, "'length_bounds'"),
        ({"name": "score_threshold", "min_score": "high"}, "'score_threshold'"),
        ({"name": "regex", "pattern": "("}, "'regex'.*bad pattern"),
        ({"name": "exact_answer", "task": "chess"}, "'chess'"),
        ({"name": "no_such_filter"}, "'no_such_filter'.*best_of_k"),
        ({"pattern": "x"}, "'name'"),
    ],
)
def test_bad_specs_are_errors_naming_the_filter(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_filter(spec)


def test_a_raising_filter_rejects_only_its_rows():
    def strict(prompt, completion, meta):
        if completion == "boom":
            raise RuntimeError("cannot parse")
        return True

    scored = score_rollouts(_rollouts(["82", "boom", "81"]), [strict, exact_answer()])

    assert scored["accepted"].to_pylist() == [True, False, False]
    errors = scored["filter_error"].to_pylist()
    assert errors[0] is None and errors[2] is None
    assert "RuntimeError: cannot parse" in errors[1]
    assert "strict" in errors[1]


def test_a_hanging_filter_is_cut_off_and_the_batch_goes_on():
    def hangs_on_slow(prompt, completion, meta):
        if completion == "slow":
            time.sleep(5)
        return True

    scored = score_rollouts(
        _rollouts(["82", "slow", "82"]), [hangs_on_slow, exact_answer()], timeout_s=0.2
    )

    assert scored["accepted"].to_pylist() == [True, False, True]
    errors = scored["filter_error"].to_pylist()
    assert "timeout after 0.2s" in errors[1]
    assert errors[0] is None and errors[2] is None


def test_a_filter_returning_neither_bool_nor_number_rejects_with_an_error():
    scored = score_rollouts(_rollouts(["82"]), [lambda p, c, m: "yes"])

    assert scored["accepted"].to_pylist() == [False]
    assert "expected a bool or a number" in scored["filter_error"][0].as_py()


def test_deduplicate_keeps_the_first_accepted_copy_per_prompt():
    table = _rollouts(["82", "82", "82", "81", "82"], prompt_ids=[0, 0, 0, 0, 1])
    table = table.append_column("score", pa.array([1.0] * 5)).append_column(
        "accepted", pa.array([False, True, True, True, True])
    )

    assert deduplicate().select(table).to_pylist() == [False, True, False, True, True]


def test_best_of_k_keeps_the_k_best_accepted_rows_per_prompt():
    table = _scored(
        scores=[0.1, 0.9, 0.5, 0.99, 0.3, 0.2],
        accepted=[True, True, True, False, True, True],
        prompt_ids=[0, 0, 0, 0, 1, 1],
    )

    assert best_of_k(2).select(table).to_pylist() == [False, True, True, False, True, True]
    assert best_of_k(1).select(table).to_pylist() == [False, True, False, False, True, False]


def test_top_fraction_rounds_up_over_the_accepted_rows():
    table = _scored(
        scores=[0.1, 0.9, 0.5, 0.99, 0.3],
        accepted=[True, True, True, False, True],
        prompt_ids=[0, 1, 2, 3, 4],
    )

    assert top_fraction(0.5).select(table).to_pylist() == [False, True, True, False, False]
    assert top_fraction(0.1).select(table).to_pylist() == [False, True, False, False, False]


def test_top_fraction_is_not_fooled_by_float_rounding():
    table = _scored(scores=[float(i) for i in range(25)], accepted=[True] * 25, prompt_ids=[0] * 25)

    assert sum(top_fraction(0.28).select(table).to_pylist()) == 7  # 0.28 * 25 == 7.000000000000001


def test_score_threshold_keeps_accepted_rows_at_or_above_it():
    table = _scored(
        scores=[0.2, 0.5, 0.7, 0.9], accepted=[True, True, True, False], prompt_ids=[0] * 4
    )

    assert score_threshold(0.5).select(table).to_pylist() == [False, True, True, False]


def test_selectors_run_after_row_filters_and_only_narrow_acceptance():
    # RAFT: per prompt, the shortest correct answer.
    table = _rollouts([" 82 ", "82", "81", "  82", "82 "], prompt_ids=[0, 0, 0, 1, 1])

    scored = score_rollouts(table, [exact_answer(), prefers_short, best_of_k(1)])

    assert scored["accepted"].to_pylist() == [False, True, False, False, True]
    assert scored.num_rows == 5


class AcceptAll:
    """A user-written selector that tries to re-accept every row."""

    def select(self, table: pa.Table) -> pa.BooleanArray:
        return pa.array([True] * table.num_rows)


def test_a_selector_cannot_re_accept_rejected_rows():
    scored = score_rollouts(_rollouts(["82", "81"]), [exact_answer(), AcceptAll()])

    assert scored["accepted"].to_pylist() == [True, False]


def test_row_filter_after_a_selector_is_an_error():
    with pytest.raises(ValueError, match="before selectors"):
        score_rollouts(_rollouts(["82"]), [best_of_k(1), exact_answer()])


@pytest.mark.parametrize("column", ["prompt_id", "prompt", "completion"])
def test_missing_column_is_an_error_naming_it(column):
    with pytest.raises(ValueError, match=repr(column)):
        score_rollouts(_rollouts(["82"]).drop_columns([column]), [exact_answer()])


def test_built_ins_survive_pickling_for_ray_actors():
    filters = [exact_answer(), regex(r"^\d+$"), length_bounds(1, 5), deduplicate(), best_of_k(2)]
    table = _rollouts(["82", "82", "81 x", "82 xyzw"], prompt_ids=[0, 0, 0, 1])

    copies = pickle.loads(pickle.dumps(filters))

    assert score_rollouts(table, copies).equals(score_rollouts(table, filters))
    assert score_rollouts(table, copies)["accepted"].to_pylist() == [True, False, False, False]


def test_filter_actor_modules_import_neither_torch_nor_transformers():
    """A filter actor starts fast: its module chain must not pull in the ML stack."""
    code = ("import sys, iterft_ray.actors.filter_pool; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# Row filters run in worker processes: real timeouts, several rows at once.


def spins_in_c(prompt, completion, meta):
    """Holds the GIL inside one C call: a thread-based timeout never gets to run."""
    if completion == "spin":
        Path(meta["pid_dir"], "spinner").write_text(str(os.getpid()))
        return sum(range(10**13)) > 0
    return True


def loops_forever(prompt, completion, meta):
    while completion == "spin":
        pass
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("spinner", [spins_in_c, loops_forever])
def test_a_filter_spinning_in_c_is_killed_at_the_timeout(tmp_path, spinner):
    table = _rollouts(["82", "spin", "82", "81"]).append_column("pid_dir", pa.array([str(tmp_path)] * 4))

    scored = score_rollouts(table, [spinner, exact_answer()], timeout_s=2, processes=2)

    assert scored["accepted"].to_pylist() == [True, False, True, False]
    errors = scored["filter_error"].to_pylist()
    assert errors[1] == f"{spinner.__name__}: TimeoutError: timeout after 2s"
    assert errors[0] is None and errors[2] is None and errors[3] is None
    if spinner is spins_in_c:
        assert not _pid_alive(int((tmp_path / "spinner").read_text()))


def waits_for_company(prompt, completion, meta):
    """Returns only once `meta["company"]` calls have started; logs its start and end."""
    started = Path(meta["log_dir"], f"start-{meta['sample_id']}")
    started.write_text(repr(time.time()))
    while len(list(Path(meta["log_dir"]).glob("start-*"))) < meta["company"]:
        time.sleep(0.01)
    Path(meta["log_dir"], f"end-{meta['sample_id']}").write_text(repr(time.time()))
    return float(os.getpid())


def _max_overlap(log_dir: Path, sample_ids: list[str]) -> int:
    events = []
    for sid in sample_ids:
        events.append((float((log_dir / f"start-{sid}").read_text()), 1))
        events.append((float((log_dir / f"end-{sid}").read_text()), -1))
    running = peak = 0
    for _, step in sorted(events):
        running += step
        peak = max(peak, running)
    return peak


def test_several_rows_are_scored_at_once(tmp_path):
    table = _rollouts(["82"] * 8)
    table = table.append_column("log_dir", pa.array([str(tmp_path)] * 8))
    table = table.append_column("company", pa.array([4] * 8))

    scored = score_rollouts(table, [waits_for_company], timeout_s=60, processes=4)

    assert scored["filter_error"].to_pylist() == [None] * 8
    assert scored["accepted"].to_pylist() == [True] * 8
    assert len(set(scored["score"].to_pylist())) == 4  # each row's score is its process id
    assert _max_overlap(tmp_path, scored["sample_id"].to_pylist()) == 4


def dies(prompt, completion, meta):
    if completion == "die":
        Path(meta["log_dir"], "died").write_text(str(os.getpid()))
        os._exit(3)
    return True


def _batch(log_dir: Path, completions: list[str], company: int) -> pa.Table:
    log_dir.mkdir()
    table = _rollouts(completions)
    table = table.append_column("log_dir", pa.array([str(log_dir)] * len(completions)))
    return table.append_column("company", pa.array([company] * len(completions)))


def test_a_scorer_keeps_its_processes_and_replaces_dead_ones(tmp_path):
    scorer = RolloutScorer([dies, waits_for_company], timeout_s=30, processes=2)
    try:
        first = scorer.score(_batch(tmp_path / "1", ["82", "82"], company=2))
        crashed = scorer.score(_batch(tmp_path / "2", ["die", "82"], company=1))
        after = scorer.score(_batch(tmp_path / "3", ["82", "82"], company=2))
    finally:
        scorer.close()

    pids = set(first["score"].to_pylist())
    dead = float((tmp_path / "2" / "died").read_text())
    assert len(pids) == 2 and dead in pids
    assert crashed["filter_error"][0].as_py() == "dies: filter process died with exit code 3"
    assert crashed["accepted"].to_pylist() == [False, True]
    later = set(after["score"].to_pylist())
    assert len(later) == 2 and dead not in later
    assert later & pids == pids - {dead}  # the survivor is reused, the dead one replaced


HEAVY_FILTERS = """
import os, pathlib
with open(pathlib.Path(os.environ["IFT_IMPORT_LOG"]), "a") as log:  # one line per import of this module
    log.write(f"{os.getpid()}\\n")

def dies_on_die(prompt, completion, meta):
    if completion == "die":
        os._exit(3)
    return True

def short(prompt, completion, meta):
    return len(completion) < 5
"""


def test_filter_processes_load_a_filter_module_once_for_every_worker_and_replacement(tmp_path, monkeypatch):
    """A user's filter module may import torch (seconds): the workers, the replacement of a dead one, and a
    second scorer's workers (another list of the same module's filters) fork from the one process that
    imported it."""
    (tmp_path / "heavy_filters.py").write_text(HEAVY_FILTERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("IFT_IMPORT_LOG", str(tmp_path / "imports.log"))
    first = RolloutScorer(["heavy_filters:dies_on_die"], timeout_s=30, processes=3)
    second = RolloutScorer(["heavy_filters:short", "heavy_filters:dies_on_die"], timeout_s=30, processes=2)
    try:
        imported_here = (tmp_path / "imports.log").read_text().split()  # resolving the specs imported it here
        assert first.score(_rollouts(["82", "die", "7", "die"]))["accepted"].to_pylist() == [True, False, True, False]
        assert second.score(_rollouts(["82", "toolong", "die"]))["accepted"].to_pylist() == [True, False, False]
        assert first.score(_rollouts(["1", "2", "3"]))["accepted"].to_pylist() == [True, True, True]
    finally:
        first.close()
        second.close()
    imports = (tmp_path / "imports.log").read_text().split()
    assert imported_here == [str(os.getpid())]
    assert len(imports) == 2, imports  # here, and once in the zygote: not in each of the 5+ workers


def test_unpicklable_filters_are_an_error_before_any_process_starts():
    import threading

    lock = threading.Lock()

    def holds_a_lock(prompt, completion, meta):
        return lock is not None

    with pytest.raises(ValueError, match="holds_a_lock.*cannot be pickled"):
        RolloutScorer([holds_a_lock])


def test_a_filter_actor_scores_rows_at_once_and_kills_a_spinning_filter(tmp_path, ray_up):
    from iterft_ray.actors.filter_pool import FilterPool

    table = _rollouts(["82"] * 3 + ["spin"])
    table = table.append_column("log_dir", pa.array([str(tmp_path)] * 4))
    table = table.append_column("company", pa.array([3] * 4))
    table = table.append_column("pid_dir", pa.array([str(tmp_path)] * 4))
    table = table.append_column("weight_version", pa.array([0] * 4, pa.int64()))
    # On the session's Ray (tests/conftest.py), whose workers import this module by name, as with
    # `ray job submit --working-dir`.
    pool = FilterPool([spins_in_c, waits_for_company], size=1, timeout_s=20, processes=4)
    scored_ref, summary_ref = pool.score(ray.put(table))
    scored, summary = ray.get([scored_ref, summary_ref])
    small = ray.put(table.slice(0, 1))
    override_pids = [ray.get(pool.score(small, [returns_pid])[0])["score"][0].as_py() for _ in range(2)]
    del pool  # its actor goes, as it did with the Ray that ended here

    assert summary["rows"] == 4 and summary["accepted"] == 3 and summary["errors"] == 1
    assert scored["filter_error"][3].as_py() == "spins_in_c: TimeoutError: timeout after 20s"
    assert _max_overlap(tmp_path, scored["sample_id"].to_pylist()[:3]) == 3
    assert override_pids[0] == override_pids[1]  # an override's processes are kept for the next batch too


def returns_pid(prompt, completion, meta):
    return float(os.getpid())


def test_best_of_k_with_a_seed_breaks_ties_by_sample_not_by_row_order():
    import random

    from iterft_ray.verify.filters import best_of_k

    rows = [{"prompt_id": p, "sample_id": f"r0-p{p}-s{s}", "score": 1.0, "accepted": True}
            for p in range(4) for s in range(6)]
    chosen = []
    for order in range(3):
        shuffled = rows[:]
        random.Random(order).shuffle(shuffled)
        table = pa.Table.from_pylist(shuffled)
        mask = best_of_k(2, seed=7).select(table).to_pylist()
        chosen.append({r["sample_id"] for r, keep in zip(shuffled, mask) if keep})
    assert chosen[0] == chosen[1] == chosen[2] and len(chosen[0]) == 8
    first = best_of_k(2).select(pa.Table.from_pylist(rows)).to_pylist()
    assert {r["sample_id"] for r, keep in zip(rows, first) if keep} == {f"r0-p{p}-s{s}" for p in range(4)
                                                                         for s in (0, 1)}  # no seed: earlier rows
    assert best_of_k(2, seed=8).select(pa.Table.from_pylist(rows)).to_pylist() != \
        best_of_k(2, seed=7).select(pa.Table.from_pylist(rows)).to_pylist()
