"""The rollout batch's one schema: what an engine adds to the prompt columns and what the filters add after it."""

import pyarrow as pa

from iterft_ray.data.rollouts import SAMPLE_SCHEMA, SCORE_SCHEMA, combine_summaries, summarize
from iterft_ray.engines.hf import HFEngine
from iterft_ray.config import SamplingConfig
from iterft_ray.verify.scoring import RolloutScorer


def test_sampled_then_scored_columns_are_the_schema(llama_path):
    prompts = pa.table({"prompt_id": pa.array([7, 8], pa.int64()), "prompt": ["12+30=", "7+5="], "answer": ["42", "12"]})
    engine = HFEngine(llama_path, None, False)
    rows = engine.sample(prompts, SamplingConfig(num_samples=3, max_new_tokens=4), seed=1, weight_version=5,
                         generator_id=2, round_index=1)
    assert rows.column_names == prompts.column_names + SAMPLE_SCHEMA.names
    assert [rows.schema.field(n).type for n in SAMPLE_SCHEMA.names] == SAMPLE_SCHEMA.types
    assert rows.num_rows == 6 and set(rows["weight_version"].to_pylist()) == {5}

    scorer = RolloutScorer([{"name": "length_bounds", "max_chars": 2}], timeout_s=10.0)
    try:
        scored = scorer.score(rows)
    finally:
        scorer.close()
    assert scored.column_names == rows.column_names + SCORE_SCHEMA.names
    assert [scored.schema.field(n).type for n in SCORE_SCHEMA.names] == SCORE_SCHEMA.types
    accepted = sum(len(c) <= 2 for c in rows["completion"].to_pylist())
    summary = combine_summaries([summarize(scored), summarize(scored)])
    assert summary["rows"] == 12 and summary["accepted"] == 2 * accepted
    assert summary["weight_versions"] == {5: 12}
