"""A round's sampling beyond one fixed n: sequential best-of-n in waves, STaR's hinted pass, and the pass-rate
curriculum that sets prompts aside; each resumes exactly."""

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from iterft_ray.config import CurriculumConfig, RecipeConfig, SamplingConfig
from iterft_ray.data.curriculum import PassRecord
from iterft_ray.data.prompt_stream import TablePrompts
from iterft_ray.data.prompts import PromptDataError
from iterft_ray.engines.hf import HFEngine
from iterft_ray.run.loop import IterativeLoop, _summary_line
from iterft_ray.run.waves import RoundSampler, check_rationalize

# The module's trainers reuse its earlier trainers' actors (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("warm_actors")


@pytest.fixture(scope="module")
def local_ray(shared_ray):
    shared_ray.up()


def config(out, filters, num_train=8, rounds=2, prompts_per_round=4, **sections):
    c = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"task": "addition", "task_options": {"num_train": num_train, "num_heldout": 1, "num_warmup": 1}},
        "sampling": {"num_samples": 2, "max_new_tokens": 4},
        "trainer": {"learning_rate": 1e-3, "per_device_train_batch_size": 32},
        "resources": {"num_generators": 1, "filter_pool_size": 1},
        "filters": [f"toy_filters:{filters}"],
        "eval": {"num_samples": 0},
        "loop": {"rounds": rounds, "prompts_per_round": prompts_per_round, "output_dir": str(out), "save_every": 1,
                 "eval_every": 100, "warmup_passes": 0},
    }
    for section, values in sections.items():
        c[section] = {**c.get(section, {}), **values}
    return c


def generations(out, round_number):
    return pq.read_table(out / "rounds" / f"{round_number:04d}" / "generations.parquet")


def run_rounds(c, rounds=None, resume=False):
    loop = IterativeLoop(c, resume=resume)
    try:
        stats = [loop.round() for _ in range(rounds or c["loop"]["rounds"] - loop.round_index)]
        return stats, loop.pass_record.state()
    finally:
        loop.shutdown()


# ---------------------------------------------------------------- STaR


def test_hinted_pass_samples_from_the_hint_and_records_the_plain_prompt(llama_path):
    """The engine samples a hinted row from the template's text, and the row keeps the plain prompt's ids."""
    engine = HFEngine(llama_path, None, False)
    sampling = SamplingConfig(num_samples=2, max_new_tokens=4)
    plain = pa.table({"prompt_id": pa.array([4, 6], pa.int64()), "prompt": ["12+30=", "7+5="], "answer": ["42", "12"]})
    first = engine.sample(plain, sampling, seed=1, weight_version=0, generator_id=0, round_index=0)
    recipe = RecipeConfig(rationalize=True, hint_template="(answer: {answer}) {prompt}")
    sampler = RoundSampler(sampling, recipe, sample=None, score=None, fetch=None)
    prompts = first.take([0, 2]).select(["prompt_id", "prompt", "answer", "prompt_ids"])
    hinted_prompts = sampler._hinted_prompts(prompts, [2, 2])
    assert hinted_prompts["prompt"].to_pylist() == ["(answer: 42) 12+30=", "(answer: 12) 7+5="]

    hinted = engine.sample(hinted_prompts, sampling, seed=9, weight_version=0, generator_id=0, round_index=0)
    as_plain_text = engine.sample(pa.table({"prompt_id": pa.array([4, 6], pa.int64()),
                                            "prompt": hinted_prompts["prompt"]}), sampling, seed=9,
                                  weight_version=0, generator_id=0, round_index=0)
    assert hinted["completion"].to_pylist() == as_plain_text["completion"].to_pylist()  # sampled from the hint
    assert hinted["prompt"].to_pylist() == ["12+30="] * 2 + ["7+5="] * 2  # recorded as the plain prompt
    assert hinted["prompt_ids"].to_pylist() == [first["prompt_ids"][0].as_py()] * 2 + [first["prompt_ids"][2].as_py()] * 2
    assert hinted["hinted"].to_pylist() == [True] * 4 and first["hinted"].to_pylist() == [False] * 4
    assert hinted["sample_id"].to_pylist() == ["r0-p4-s2", "r0-p4-s3", "r0-p6-s2", "r0-p6-s3"]
    assert hinted.column_names == first.column_names


def test_rationalize_needs_an_answer_column_and_a_fillable_template():
    with pytest.raises(ValueError, match="recipe.rationalize"):
        check_rationalize(RecipeConfig(rationalize=True), ["prompt_id", "prompt"])
    with pytest.raises(ValueError, match="recipe.hint_template"):
        check_rationalize(RecipeConfig(rationalize=True, hint_template="{prompt} {why}"), ["prompt", "answer"])
    check_rationalize(RecipeConfig(rationalize=False), ["prompt"])


def test_star_trains_on_hinted_samples_of_the_prompts_it_failed(local_ray, tmp_path):
    out = tmp_path / "star"
    c = config(out, "hint_or_odd", rounds=1, prompts_per_round=8)
    c["algorithm"] = "star"
    c["recipe"] = {"steps_first": None}  # one pass over the rows, so the tokens trained are the ledger's
    loop = IterativeLoop(c)
    try:
        assert loop.config.recipe.rationalize and loop.config.recipe.hint_template == "(answer: {answer}) {prompt}"
        stats = loop.round()
    finally:
        loop.shutdown()
    table = generations(out, 1)
    plain, hinted = table.filter(pc.invert(table["hinted"])), table.filter(table["hinted"])
    failed = sorted({p for p in plain["prompt_id"].to_pylist() if p % 2 == 0})
    assert failed and sorted(set(hinted["prompt_id"].to_pylist())) == failed  # hinted: the failed prompts only
    assert hinted.num_rows == len(failed) and all(hinted["accepted"].to_pylist())  # recipe.hinted_samples: 1
    ids = {r["prompt_id"]: (r["prompt"], r["prompt_ids"]) for r in plain.to_pylist()}
    assert all((r["prompt"], r["prompt_ids"]) == ids[r["prompt_id"]] for r in hinted.to_pylist())
    assert stats["hinted"] == stats["hinted_accepted"] == hinted.num_rows
    assert stats["samples"] == table.num_rows == 8 * 2 + hinted.num_rows
    assert stats["accepted"] == table.filter(table["accepted"]).num_rows == table.num_rows - 2 * len(failed)
    ledger = pq.read_table(out / "accepted" / "round-0001.parquet")
    assert sum(ledger["hinted"].to_pylist()) == hinted.num_rows
    trained = ledger.filter(ledger["trained"])
    assert stats["num_target_tokens"] == sum(len(ids) for ids in trained["completion_ids"].to_pylist())


# ---------------------------------------------------------------- sequential best-of-n


WAVES = {"sampling": {"num_samples": 2, "max_new_tokens": 4, "until_accepted": 2, "max_samples": 6}}


def test_waves_stop_once_k_are_accepted_within_the_budget(local_ray, tmp_path):
    out = tmp_path / "waves"
    stats, _ = run_rounds(config(out, "by_sample", num_train=6, prompts_per_round=6, rounds=1, **WAVES))
    table = generations(out, 1)
    generated = {v["values"]: v["counts"] for v in pc.value_counts(table["prompt_id"]).to_pylist()}
    assert {p: n for p, n in generated.items()} == {p: [2, 4, 6][p % 3] for p in range(6)}
    accepted = table.filter(table["accepted"])
    per_prompt = {v["values"]: v["counts"] for v in pc.value_counts(accepted["prompt_id"]).to_pylist()}
    assert per_prompt == {p: 2 for p in range(6) if p % 3 != 2}  # at most k: the second wave's extra one capped
    capped = [r["sample_id"] for r in table.to_pylist() if r["prompt_id"] % 3 == 1 and not r["accepted"]]
    assert sorted(s.rsplit("-s", 1)[1] for s in capped) == ["0", "0", "3", "3"]  # s1, s2 kept; s3 capped
    assert len(set(table["sample_id"].to_pylist())) == table.num_rows == stats[0]["samples"] == 2 * (2 + 4 + 6)
    assert len(set(zip(table["prompt_id"].to_pylist(), table["sampling_seed"].to_pylist()))) == 2 * 3 + 2 * 2 + 2
    assert stats[0]["waves"] == 3 and stats[0]["accepted"] == 8 and stats[0]["passed_before_cap"] == 10
    assert "| waves 3 (2 passed past until_accepted, not accepted)" in _summary_line(stats[0])
    assert not any(table["hinted"].to_pylist())  # no rationalize: no hinted row
    assert pq.read_table(out / "accepted" / "round-0001.parquet").num_rows == 8


@pytest.mark.parametrize("async_mode", [False, True], ids=["sync", "async"])
def test_waves_resume_samples_the_same_rows(local_ray, tmp_path, async_mode):
    """A run stopped after its first checkpoint and resumed writes the generations of one that was not."""
    def c(name):
        return config(tmp_path / name, "by_sample", num_train=6, prompts_per_round=3, rounds=2,
                      loop={"async_mode": async_mode, "max_staleness": 1}, **WAVES)

    run_rounds(c("straight"))
    run_rounds(c("broken"), rounds=1)
    run_rounds(c("broken"), resume=True)
    for r in (1, 2):
        a, b = generations(tmp_path / "straight", r), generations(tmp_path / "broken", r)
        assert a.num_rows > 3 * 2  # later waves were sampled
        for column in ("sample_id", "completion", "accepted", "sampling_seed"):
            assert a[column].to_pylist() == b[column].to_pylist(), (r, column)


# ---------------------------------------------------------------- the curriculum


def test_pass_record_rules_and_bring_back():
    """Solved in `solved_rounds` consecutive rounds, or never accepted after `max_attempts` tries: set aside for
    the rest of the epoch (for good without bring_back)."""
    table = pa.table({"prompt_id": pa.array(range(4), pa.int64()), "prompt": ["a", "b", "c", "d"]})
    for bring_back in (True, False):
        record = PassRecord(CurriculumConfig(solved_rounds=2, max_attempts=4, bring_back=bring_back))
        cursor = TablePrompts(table, seed=0)
        cursor.set_aside = record
        drawn = cursor.next_rows(4)["prompt_id"].to_pylist()
        assert record.update(1, {0: [2, 2], 1: [2, 0], 2: [2, 1], 3: [2, 2]}) == []
        assert record.update(2, {0: [2, 2], 1: [2, 0], 2: [2, 1], 3: [2, 1]}) == ["0", "1"]
        assert sorted(drawn) == [0, 1, 2, 3] and record.prompts["0"] == [4, 4, 2, 2, 4]
        if bring_back:
            assert sorted(cursor.next_rows(4)["prompt_id"].to_pylist()) == [0, 1, 2, 3]  # the next epoch: back
            assert record.set_aside == {} and record.brought_back == 2 and record.prompts["1"][4] == 0
        else:
            assert sorted(cursor.next_rows(2)["prompt_id"].to_pylist()) == [2, 3]
            record.update(3, {2: [2, 2], 3: [2, 2]})
            record.update(4, {2: [2, 2], 3: [2, 2]})
            with pytest.raises(PromptDataError, match="curriculum"):
                cursor.next_rows(1)


def test_curriculum_sets_prompts_aside_brings_them_back_and_survives_a_resume(local_ray, tmp_path):
    """8 prompts, 4 a round: even ones always accepted (solved after 1 round), odd ones never (2 tries). Each
    epoch's prompts are set aside for its rest; the next epoch brings them back, after a resume too."""
    out = tmp_path / "curriculum"
    c = config(out, "even", num_train=8, prompts_per_round=4, rounds=4,
               curriculum={"solved_rounds": 1, "max_attempts": 2, "bring_back": True})
    first, saved = run_rounds(c, rounds=2)
    assert [s["set_aside"] for s in first] == [4, 8] and first[1]["brought_back"] == 0
    assert all(saved["set_aside"][str(p)] == 0 for p in range(8))  # set aside in epoch 0
    assert all(saved["prompts"][str(p)][:2] == [2, 2 if p % 2 == 0 else 0] for p in range(8))

    resumed = IterativeLoop(c, resume=True)
    try:
        assert resumed.pass_record.state() == saved
        later = [resumed.round(), resumed.round()]
    finally:
        resumed.shutdown()
    assert [s["brought_back"] for s in later] == [4, 8] and [s["samples"] for s in later] == [8, 8]
    epoch0 = {p for r in (1, 2) for p in generations(out, r)["prompt_id"].to_pylist()}
    epoch1 = {p for r in (3, 4) for p in generations(out, r)["prompt_id"].to_pylist()}
    assert epoch0 == epoch1 == set(range(8))
