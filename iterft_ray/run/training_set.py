"""What a round trains on (`recipe.train_on`): this round's accepted samples, or the ledger's of earlier rounds too.

`round` trains on the scored batches as they are. `all` and `last_rounds` add the accepted rows of
earlier rounds, read back from the ledger (`iterft_ray.run.ledger`), which every round writes before it
ends: the training set is then rebuilt from files, so a resumed run trains on exactly what the
uninterrupted one would have. Rows are deduplicated by (prompt_id, completion), as the `deduplicate`
selector does, the newest round's row kept.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from iterft_ray.config import RecipeConfig
from iterft_ray.data.rollouts import ScoredRollouts
from iterft_ray.run.ledger import ledger_path
from iterft_ray.storage import StoragePath

# What the trainer reads of a row (`iterft_ray.data.rollouts.training_rows`), and the accepted flag it filters on.
TRAINING_COLUMNS = ("prompt_id", "completion", "prompt_ids", "completion_ids", "completion_mask")


def earlier_rounds(recipe: RecipeConfig, round_number: int) -> list[int]:
    """The earlier rounds (1-based) whose accepted samples round `round_number` also trains on."""
    if recipe.train_on == "all":
        return list(range(1, round_number))
    if recipe.train_on == "last_rounds":
        return list(range(max(1, round_number - recipe.last_rounds + 1), round_number))
    return []


def training_set(recipe: RecipeConfig, out: StoragePath, round_number: int,
                 scored: ScoredRollouts) -> ScoredRollouts | list[ray.ObjectRef]:
    """The batches round `round_number` trains on: `scored` itself, or one table (a reference) that adds the
    ledger's rows of the earlier rounds, built by a task on the driver's node, where the ledger is written."""
    rounds = earlier_rounds(recipe, round_number)
    if recipe.train_on == "round":
        return scored
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    paths = [ledger_path(out, n) for n in rounds]
    return [_gather.options(scheduling_strategy=here).remote(paths, *scored.tables)]


def deduplicated(tables: list[pa.Table]) -> pa.Table:
    """The accepted rows of `tables` (oldest first), one per (prompt_id, completion), the newest kept, with
    `accepted` set."""
    parts = [t.filter(t["accepted"]) if "accepted" in t.column_names else t for t in tables if t.num_rows]
    if not parts:
        return pa.table({"accepted": pa.array([], pa.bool_())})
    # A ledger from before completion masks lacks the column: null there, all ones to `training_rows`.
    parts = [t.select([c for c in TRAINING_COLUMNS if c in t.column_names]) for t in parts]
    rows = pa.concat_tables(parts, promote_options="permissive")
    keys = [f"{p}\x00{c}" for p, c in zip(rows["prompt_id"].to_pylist(), _completion_keys(rows))]
    newest = {key: i for i, key in enumerate(keys)}
    keep = sorted(newest.values())
    rows = rows.take(pa.array(keep, pa.int64()))
    return rows.append_column("accepted", pa.array([True] * rows.num_rows, pa.bool_()))


def _completion_keys(rows: pa.Table) -> list[str]:
    """What makes two rows of a prompt the same sample: the completion's text; for trajectories (whose text is
    the final answer only) their token ids."""
    if "completion_mask" in rows.column_names and any(0 in (m or []) for m in rows["completion_mask"].to_pylist()):
        return [",".join(map(str, ids)) for ids in rows["completion_ids"].to_pylist()]
    return rows["completion"].to_pylist()


@ray.remote(num_cpus=0)
def _gather(paths: list[StoragePath], *current: pa.Table) -> pa.Table:
    earlier = [pq.read_table(io.BytesIO(p.read_bytes())) for p in paths]
    return deduplicated(earlier + list(current))
