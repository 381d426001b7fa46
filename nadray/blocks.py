"""Batch scoring's units of work: the input's entities, split into blocks.

A record is scored with its entity's earlier records, and features are per entity,
so a block holds every flow of the entities it owns and scores only theirs
(``Scorer.score_table(flows, entities)``). A flow between entities of two blocks
(internal, or with neither side local) is in both, and its score is the higher of
the two answers (``merge_split``): a flow's score is the highest of its entities'
(DESIGN.md), and Serve's shards merge the same way (``serving.routing``).

Blocks are entities, not connected components of the entity graph: on most real
captures one component holds 75-100% of the flows (every host talks to the
gateway or a DNS server), so components left one block.

An input of more than ``SPILL_ROWS`` flows is not held: ``Spill`` writes it to
local Parquet one piece (an input file, or an archive partition) at a time while
counting events per entity, then regroups the pieces into one file per block. The
driver then holds a piece or a block at a time, never the whole input; the local
disk holds about the input's size in Parquet, twice at most, until scoring ends.
"""

from __future__ import annotations

import heapq
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

# Inputs of more flows than this go through local spill files (module docstring): about
# 200 MB of Arrow held at most, while a spill costs ~2 us a flow of the ~35 scoring takes.
SPILL_ROWS = 1_000_000
KEYS = ["_flow", "_split"]  # the columns a block's table carries besides the flows


def pack(events: np.ndarray, n_blocks: int) -> np.ndarray:
    """Block of each entity, from its event count: largest first into the emptiest block, so
    no block is larger than its largest entity or than one entity above the others."""
    n_blocks = max(1, min(int(n_blocks), len(events)))
    block_of = np.zeros(len(events), dtype="int64")
    if n_blocks > 1:
        heap = [(0, k) for k in range(n_blocks)]
        for c in np.argsort(-events, kind="stable").tolist():
            load, k = heapq.heappop(heap)
            block_of[c] = k
            heapq.heappush(heap, (load + int(events[c]), k))
    return block_of


def block_rows(event_block: np.ndarray, fi: np.ndarray, n: int, n_blocks: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(ascending flow rows of each block, split: bool per flow) from each event's block."""
    m = max(n, 1)
    pairs = np.unique(event_block * m + fi)  # (block, flow), each once, by block then flow
    blk, row = pairs // m, pairs % m
    cut = np.searchsorted(blk, np.arange(n_blocks + 1))
    return [row[cut[k]:cut[k + 1]] for k in range(n_blocks)], np.bincount(row, minlength=n) > 1


def with_keys(table: pa.Table, flow: Any, split: Any) -> pa.Table:
    """``table`` with the input row (``_flow``) and the split flag of each flow appended."""
    return table.append_column("_flow", pa.array(flow, pa.int64())).append_column("_split", pa.array(split, pa.bool_()))


def merge_split_files(files: list[str], max_flow: int, rows: int) -> Iterator[pa.Table]:
    """``merge_split`` of split rows spilled to ``files``, ``rows`` input rows (``_flow``) at a
    time: the two rows of a flow are in the same range, and each read skips the row groups
    whose statistics lie outside it."""
    import pyarrow.dataset as ds

    data = ds.dataset(files, format="parquet")
    for lo in range(0, max_flow + 1, rows):
        t = data.to_table(filter=(ds.field("_flow") >= lo) & (ds.field("_flow") < lo + rows))
        if t.num_rows:
            yield merge_split([t])


def merge_split(parts: list[pa.Table]) -> pa.Table:
    """One row per flow from the blocks' rows of split flows (column ``_flow``): the highest
    score, ties to the entity first in code point order (``Scorer.flow_scores``' rule)."""
    t = pa.concat_tables(parts).sort_by([("_flow", "ascending"), ("score", "descending"), ("entity", "ascending")])
    f = t.column("_flow").to_numpy()
    first = np.r_[True, f[1:] != f[:-1]] if len(f) else np.zeros(0, bool)
    return t.filter(pa.array(first)).drop_columns(["_flow"])


class EntityBlocks:
    """An input held in memory, split into entity blocks (``entity_blocks``)."""

    def __init__(self, flows: pa.Table, rows: list[np.ndarray], owned: list[np.ndarray], split: np.ndarray):
        self.flows = flows
        self.rows = rows  # input rows of each block's flows, ascending
        self.owned = owned  # entity names (object) each block scores; each entity in one block
        self.split = split  # bool per input flow: its entities are in two blocks
        self.n_split = int(split.sum())

    def __len__(self) -> int:
        return len(self.owned)

    def tables(self) -> Iterator[pa.Table]:
        """Each block's flows with ``KEYS``, made when asked: one block held at a time."""
        for rows in self.rows:
            yield with_keys(self.flows.take(pa.array(rows)), rows, self.split[rows])


def entity_blocks(flows: pa.Table, encoder: Any, n_blocks: int) -> EntityBlocks:
    """At most ``n_blocks`` blocks of entities of about equal events, each with every flow of its entities."""
    fi, entity = encoder.flow_entities(flows)
    codes, names = pd.factorize(entity)
    block_of = pack(np.bincount(codes, minlength=len(names)), n_blocks)
    used = int(block_of.max()) + 1 if len(names) else 1
    rows, split = block_rows(block_of[codes], fi, flows.num_rows, used)
    names = np.asarray(names, dtype=object)
    return EntityBlocks(flows, rows, [names[block_of == k] for k in range(used)], split)


class SpilledBlocks:
    """Entity blocks of a spilled input: one local Parquet file each, read when asked."""

    def __init__(self, files: list[str], owned: list[np.ndarray], n_split: int):
        self.files = files
        self.owned = owned
        self.n_split = n_split  # flows held by two blocks

    def __len__(self) -> int:
        return len(self.owned)

    def tables(self) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        for f in self.files:
            yield pq.read_table(f)


class Spill:
    """A large input on local disk: its pieces as read, then one file per entity block.

    Use as a context manager: the folder (under ``TMPDIR``, made on first use) goes when
    it closes. Score output waiting to be merged spills there too (``score._Output``).
    """

    def __init__(self, encoder: Any):
        self.encoder = encoder
        self.dir: str | None = None
        self.pieces: list[str] = []
        self.events: dict[Any, int] = {}  # events per entity over every piece
        self.rows = 0

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def file(self, name: str) -> str:
        """A path in the spill folder, made on first use."""
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="nadray-score-")
        return os.path.join(self.dir, name)

    def add(self, flows: pa.Table) -> None:
        import pyarrow.parquet as pq

        _, entity = self.encoder.flow_entities(flows)
        for e, c in pd.Series(entity, dtype=object).value_counts(sort=False).items():
            self.events[e] = self.events.get(e, 0) + int(c)
        path = self.file(f"piece-{len(self.pieces):06d}.parquet")
        pq.write_table(flows, path)
        self.pieces.append(path)
        self.rows += flows.num_rows

    def blocks(self, n_blocks: int) -> SpilledBlocks:
        """Regroup the pieces (each removed once read) into at most ``n_blocks`` block files."""
        import pyarrow.parquet as pq

        names = np.array(list(self.events), dtype=object)
        block_of = pack(np.fromiter(self.events.values(), dtype="int64", count=len(names)), n_blocks)
        used = int(block_of.max()) + 1 if len(names) else 1
        index = pd.Index(names)
        files = [self.file(f"block-{k:06d}.parquet") for k in range(used)]
        writers: dict[int, pq.ParquetWriter] = {}
        offset = n_split = 0
        try:
            for p in self.pieces:
                t = pq.read_table(p)
                fi, entity = self.encoder.flow_entities(t)
                rows, split = block_rows(block_of[index.get_indexer(entity)], fi, t.num_rows, used)
                n_split += int(split.sum())
                for k, r in enumerate(rows):
                    if len(r):
                        part = with_keys(t.take(pa.array(r)), offset + r, split[r])
                        if k not in writers:
                            writers[k] = pq.ParquetWriter(files[k], part.schema)
                        writers[k].write_table(part)
                offset += t.num_rows
                del t
                os.remove(p)
        finally:
            for w in writers.values():
                w.close()
        self.pieces = []
        # Every block has a file: each holds at least one entity, and each entity has events.
        return SpilledBlocks(files, [names[block_of == k] for k in range(used)], n_split)
