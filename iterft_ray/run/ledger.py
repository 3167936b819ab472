"""The ledger of accepted samples: every round's accepted rows, with where each came from, under `accepted/`.

One Parquet file per round (`accepted/round-NNNN.parquet`), so the directory loads as one dataset
with `datasets.load_dataset("parquet", data_dir=RUN_DIR + "/accepted")`. A row is an accepted rollout
(the prompt's columns, its completion and token ids, `weight_version`, `generator_id`,
`sampling_seed`, `score`, `final_answer`) plus `round`, `filters` (the filter specs that accepted
it, as JSON) and `trained`: false for a row the trainer skips (an empty completion has no token to
learn from; `iterft_ray.data.rollouts.training_rows`).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from iterft_ray.storage import StoragePath

LEDGER_DIR = "accepted"


def ledger_path(out: StoragePath, round_number: int) -> StoragePath:
    """The ledger file of round `round_number` (1-based) in run directory `out`."""
    return out / LEDGER_DIR / f"round-{round_number:04d}.parquet"


def describe_filters(filters: list[Any]) -> str:
    """The filter specs as JSON for the ledger: names and options as configured (a callable by its name)."""
    def plain(spec: Any) -> Any:
        if isinstance(spec, (str, dict)):
            return spec
        return getattr(spec, "__qualname__", None) or repr(spec)

    return json.dumps([plain(spec) for spec in filters], sort_keys=True, default=repr)


def accepted_rows(round_number: int, filters: str, *tables: pa.Table) -> pa.Table:
    """The accepted rows of a round's scored batches with their provenance columns (see the module docstring)."""
    table = pa.concat_tables(tables) if tables else pa.table({})
    if table.num_rows == 0 and "accepted" not in table.column_names:
        return table
    table = table.filter(table["accepted"]).drop_columns(["accepted", "filter_error"])
    trained = pc.greater(pc.list_value_length(table["completion_ids"]), 0)
    return (table.append_column("round", pa.array([round_number] * table.num_rows, pa.int64()))
                 .append_column("filters", pa.array([filters] * table.num_rows, pa.string()))
                 .append_column("trained", trained))


@ray.remote(num_cpus=0)
def _write_ledger(path: StoragePath, round_number: int, filters: str, *tables: pa.Table) -> int:
    table = accepted_rows(round_number, filters, *tables)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    path.write_bytes(buffer.getvalue())
    return table.num_rows


def write_accepted(out: StoragePath, round_number: int, filters: str, tables: list[ray.ObjectRef]) -> ray.ObjectRef:
    """Write a round's accepted rows to the ledger from a task on the driver's node; returns rows written."""
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return _write_ledger.options(scheduling_strategy=here).remote(ledger_path(out, round_number), round_number,
                                                                  filters, *tables)
