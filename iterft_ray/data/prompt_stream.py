"""The order in which rounds take prompts: every prompt once per epoch, in a seeded order, epoch after epoch.

Round r takes rows [r * n, (r + 1) * n) of that endless sequence, so a position in it (the
epoch, and the rows of that epoch taken so far) is all a resume needs to go on with the
same prompts. Each epoch's order depends only on `loop.seed` and the epoch's number.

A built-in task's prompts are a small table in memory (`TablePrompts`). A prompts file or
a dataset is streamed (`PromptStream`): its shards (`prompts.PromptSource`) are read by
Ray Data tasks a few shards ahead of the rounds and reach the driver a block at a time,
so the driver's memory does not grow with the file. An epoch visits the shards in a
seeded order and each shard's rows in a seeded order: a shuffle as good as the shards
are small (4096 rows of a JSONL file or a dataset; a Parquet file's row groups). The
order is ours, not Ray Data's scheduling: the shard order is the input's order, and
`preserve_order` keeps blocks in it; each task's rows are permuted by a generator seeded
with (seed, epoch, shard). Skipping to a position reads only from the shard it falls in.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from iterft_ray.data.heldout import HeldOut
from iterft_ray.data.prompts import PromptDataError, PromptSource


class PromptCursor:
    """The run's place in the endless sequence of epochs of a prompt source: the source owns it.

    `next_rows(count)` hands out the next rows and moves on; `position` is the place as a
    checkpoint stores it, `{epoch, rows}`, and `seek(position)` goes back to one (a resume, a
    restored trainer). Subclasses give `num_rows` and `rows(start, count)`.
    """

    num_rows: int
    cursor: int = 0  # rows passed so far, over all epochs (held-out ones included)
    held_out: HeldOut | None = None  # eval.heldout_fraction: rows the rounds skip
    set_aside: Any = None  # a curriculum's `PassRecord` (iterft_ray.data.curriculum): prompts skipped for now

    def rows(self, start: int, count: int) -> pa.Table:
        raise NotImplementedError

    def next_rows(self, count: int) -> pa.Table:
        """The next `count` rows, skipping held-out and set-aside ones (the cursor moves only when they were read)."""
        if self.held_out is None and self.set_aside is None:
            table = self.rows(self.cursor, count)
            self.cursor += count
            return table
        # Each pass reads exactly as many rows as are still wanted, so it never takes more than it needs and
        # the ranges stay consecutive (a stream reads on without reopening).
        parts, need, passed = [], count, 0
        # Held-out prompts are the same every epoch; set-aside ones may come back in the next (curriculum.bring_back).
        horizon = self.num_rows * (1 if self.set_aside is None else 2)
        while need:
            start = self.cursor + passed
            table = self.rows(start, need)
            if self.set_aside is not None:
                table = self.set_aside.training_part(table, start, self.num_rows)
            if self.held_out is not None:
                table = self.held_out.training_part(table)
            passed += need
            if passed >= horizon and need == count and not table.num_rows:
                if self.set_aside is not None:
                    raise PromptDataError(f"curriculum: every one of the {self.num_rows} prompts is set aside or "
                                          "held out; set curriculum.bring_back: true, raise curriculum.solved_rounds "
                                          "or curriculum.max_attempts, or add prompts")
                raise PromptDataError(f"eval.heldout_fraction: {self.held_out.fraction} holds out all "
                                      f"{self.num_rows} prompts; lower it")
            parts.append(table)
            need -= table.num_rows
        self.cursor += passed
        return pa.concat_tables(parts).combine_chunks()

    def next_pass(self) -> pa.Table:
        """One pass over the source (`loop.prompts_per_round: all`): the next `num_rows` rows of the sequence, less
        the held-out and set-aside ones."""
        start = self.cursor
        table = self.rows(start, self.num_rows)
        if self.set_aside is not None:
            table = self.set_aside.training_part(table, start, self.num_rows)
        if self.held_out is not None:
            table = self.held_out.training_part(table)
        self.cursor += self.num_rows
        return table.combine_chunks()

    @property
    def position(self) -> dict[str, int]:
        """Where the next rows start, as {epoch, rows}."""
        return {"epoch": self.cursor // self.num_rows, "rows": self.cursor % self.num_rows}

    def seek(self, position: dict[str, int]) -> None:
        """Go to a stored `position` (one past the end of a source that shrank starts the next epoch)."""
        self.cursor = position["epoch"] * self.num_rows + min(position["rows"], self.num_rows)


def open_prompts(prompts: pa.Table | PromptSource, seed: int,
                 held_out: HeldOut | None = None) -> TablePrompts | PromptStream:
    """The rounds' view of a run's prompts: a task's table in memory, a file or dataset streamed; `held_out`
    prompts are skipped."""
    cursor = TablePrompts(prompts, seed) if isinstance(prompts, pa.Table) else PromptStream(prompts, seed)
    cursor.held_out = held_out
    return cursor


class TablePrompts(PromptCursor):
    """A table's rows in a seeded shuffle per epoch (`random.Random(seed + epoch)`)."""

    def __init__(self, table: pa.Table, seed: int):
        self.table, self.seed = table, seed
        self.num_rows = table.num_rows

    def rows(self, start: int, count: int) -> pa.Table:
        """Rows [start, start + count) of the endless sequence of epochs."""
        indices, total = [], self.num_rows
        for epoch in range(start // total, (start + count - 1) // total + 1):
            order = _permutation(total, self.seed + epoch)
            indices += [order[k - epoch * total] for k in range(max(start, epoch * total),
                                                                  min(start + count, (epoch + 1) * total))]
        return self.table.take(pa.array(indices, pa.int64()))

    def close(self) -> None:
        pass


class PromptStream(PromptCursor):
    """A prompt source's rows in a seeded order per epoch, read ahead by Ray Data (needs Ray started).

    Rounds ask for consecutive ranges, and the open stream goes on from where the last one
    ended; a range that starts elsewhere (a resume, a trainer restored from a checkpoint)
    reopens the stream there. A bad row raises `PromptDataError` naming the file and the
    row, after which the next call reopens the stream.
    """

    def __init__(self, source: PromptSource, seed: int):
        self.source, self.seed = source, seed
        self.num_rows = source.num_rows
        self._next: int | None = None  # the row the open stream yields next
        self._blocks: Iterator[pa.Table] | None = None
        self._epoch = 0
        self._carry: pa.Table | None = None  # rows read but not handed out yet
        self._skip = 0  # rows still to drop from the front of the stream (a start within a shard)

    def rows(self, start: int, count: int) -> pa.Table:
        """Rows [start, start + count) of the endless sequence of epochs."""
        if start != self._next:
            self._open(start)
        parts, need = [], count
        try:
            while need:
                if self._carry is None or not self._carry.num_rows:
                    self._carry = self._next_block()
                part = self._carry.slice(0, need)
                self._carry = self._carry.slice(part.num_rows)
                parts.append(part)
                need -= part.num_rows
        except BaseException as error:
            self.close()
            bad = _prompt_error(error)
            if bad is None:
                raise
            raise PromptDataError(f"{self.source.key}: {bad}") from None
        self._next = start + count
        return pa.concat_tables(parts).combine_chunks()

    def close(self) -> None:
        """Stop reading ahead; the next `rows` call reopens the stream."""
        if self._blocks is not None and hasattr(self._blocks, "close"):
            self._blocks.close()
        self._blocks, self._next, self._carry = None, None, None

    def shard_order(self, epoch: int) -> list[int]:
        """The order in which epoch `epoch` visits the source's shards."""
        return [int(i) for i in _rng(self.seed, epoch).permutation(len(self.source.shards))]

    def _open(self, start: int) -> None:
        self.close()
        self._epoch, offset = divmod(start, self.num_rows)
        order, seen = self.shard_order(self._epoch), 0
        for k, shard in enumerate(order):  # the shard the position falls in
            size = self.source.shards[shard].num_rows
            if seen + size > offset:
                break
            seen += size
        self._blocks = self._read(self._epoch, order[k:])
        self._skip = offset - seen
        self._next = start

    def _next_block(self) -> pa.Table:
        while True:
            if self._blocks is None:  # the epoch before is done
                self._epoch += 1
                self._blocks = self._read(self._epoch, self.shard_order(self._epoch))
            block = next(self._blocks, None)
            if block is None:
                self._blocks = None
                continue
            dropped = min(self._skip, block.num_rows)
            self._skip -= dropped
            if block.num_rows > dropped:
                return block.slice(dropped)

    def _read(self, epoch: int, shards: list[int]) -> Iterator[pa.Table]:
        """Ray Data reading `shards` in this order, each one's rows permuted, as a stream of blocks."""
        import ray
        from ray.data import TaskPoolStrategy

        items = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=min(len(shards), 64))
        context = items.context  # this dataset's own copy of the DataContext
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.target_max_block_size = 4 * 1024**2  # what the driver holds at once, however big a row group is
        # The file (or the datasets cache) is on the driver's node; no CPU asked, so reads never wait behind
        # the actors that hold the cluster's CPUs, and one task at a time is plenty for a round's prompts.
        # Pinned by the node-id label, as Ray Data pins its own local reads (NodeAffinitySchedulingStrategy
        # would go through the deprecated **ray_remote_args).
        here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
        shuffled = items.map_batches(_read_shards, batch_size=1, batch_format="pyarrow",
                                     fn_args=(self.source, self.seed, epoch), compute=TaskPoolStrategy(size=1),
                                     num_cpus=0, label_selector=here)
        _quiet_ray_data()
        return iter(shuffled.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1))


def _quiet_ray_data() -> None:
    """Keep Ray Data's own lines off the run's console: an "execution finished" per pass over the shards
    (logged at INFO whatever the DataContext says) and the note that progress bars are off (they are, above)."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _read_shards(batch: pa.Table, source: PromptSource, seed: int, epoch: int) -> Iterator[pa.Table]:
    """A Ray Data task: the batch's shards read and checked, each one's rows in their seeded order."""
    for shard in batch.column("shard").to_pylist():
        table = source.read_shard(shard)
        yield table.take(pa.array(_rng(seed, epoch, shard).permutation(table.num_rows)))


def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, *path])


def _permutation(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _prompt_error(error: BaseException) -> PromptDataError | None:
    """The `PromptDataError` a Ray Data task raised, found inside the errors that carried it to the driver."""
    seen: set[int] = set()
    stack: list[Any] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, PromptDataError):
            return cause
        if isinstance(e, PromptDataError) and e.args and not hasattr(e, "cause"):
            return e
        stack += [e.__cause__, e.__context__, cause if isinstance(cause, BaseException) else None]
    return None
