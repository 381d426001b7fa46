"""``nadray score``: batch scoring with Ray Data over a pool of Scorer actors.

A record is scored with its entity's earlier records in the same input as
context, and features are per entity, so a unit of work must hold every record
of the entities it scores, and nothing more. The driver splits the input's
*entities* into blocks of about equal events (``entity_blocks``); a block holds
every flow that touches one of its entities and scores only those entities'
events (``Scorer.score_table(flows, entities)``). A flow between entities of
two blocks (internal, or with neither side local) is in both, and its score is
the higher of the two answers, as a flow's score is the highest of its
entities' (DESIGN.md). That is the Serve shards' rule (``serving.routing``)
and gives exactly the scores one ``score_table`` over the whole input would.

Blocks are entities, not connected components of the entity graph: on real
captures one component holds 75-100% of the flows (every host talks to the
gateway or a DNS server), so components left one block, one actor, and a
driver holding every score at once.

Inputs of at most ``DRIVER_SCORE_ROWS`` flows skip Ray altogether: one ``Scorer``
scores the whole table in the driver and pyarrow writes one Parquet file (local
or ``s3://``). A Ray Data job costs a fixed ~10 s on 2 cores (actor start and
model load, ``from_arrow``, the write), about what one Scorer needs for
``DRIVER_SCORE_ROWS`` flows on one core, so below it no actor pool can pay for
itself. Larger inputs go through Ray Data, unless the pool would be one actor
(a cluster of at most 2 CPUs, see ``_pool``): one actor does the driver's work
in series plus that fixed cost (BENCHMARKS.md: the forced Ray Data row), so the driver
then scores the same blocks one after another, so that scoring's working memory
is bounded by a block, as on the actors. Either way the driver writes each
block's flows that are in no other block as they come, and the split flows,
merged, last. A failed run removes the files it wrote. All paths give the same
rows and scores (tests/test_score.py).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from nadray import storage
from nadray.errors import InputError, NadrayError

log = logging.getLogger("nadray.score")

# Inputs up to this many flows are scored in the driver (no Ray job): see the module docstring.
DRIVER_SCORE_ROWS = 100_000


@dataclass
class ScoreReport:
    output: str
    model_version: str
    read: int = 0
    rows_scored: int = 0
    anomalies: int = 0
    quarantined: int = 0
    inputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    path: str = ""  # "driver" (one Scorer, pyarrow write) or "ray-data" (actor pool)
    files: list[str] = field(default_factory=list)  # the Parquet files this call wrote

    def summary(self) -> str:
        rate = self.rows_scored / self.seconds if self.seconds else 0.0
        return (f"scored {self.rows_scored} rows with model {self.model_version} -> {self.output}\n"
                f"read {self.read}, quarantined {self.quarantined}, anomalies {self.anomalies} "
                f"({100.0 * self.anomalies / max(1, self.rows_scored):.2f}%), {self.seconds:.1f} s ({rate:,.0f} rows/s)")


class _ScorerActor:
    """Ray Data actor: loads the model once, scores entity blocks (``EntityBlocks``)."""

    def __init__(self, model_ref: str, owned: list[np.ndarray]):
        from nadray.scorer import Scorer

        self.scorer = Scorer.from_ref(model_ref)
        self.owned = owned

    def __call__(self, batch: pa.Table) -> pa.Table:
        from nadray.scorer import _to_flow_table

        k = int(batch.column("_block")[0].as_py())
        out = _to_arrow(self.scorer.score_table(_to_flow_table(batch), self.owned[k]))
        return out.append_column("_flow", batch.column("_flow")).append_column("_split", batch.column("_split"))


def _to_arrow(scores) -> pa.Table:
    """The score output DataFrame as the Arrow table both paths write."""
    return pa.Table.from_pandas(scores, preserve_index=False)


class _Output:
    """Writes the score files as blocks come: a block's flows that no other block holds at
    once, the split flows (``_split``) when every block is in, merged (``merge_split``)."""

    def __init__(self, fs, path: str, prefix: str, report: ScoreReport):
        self.fs, self.path, self.prefix, self.report = fs, path.rstrip("/"), prefix, report
        self.split: list[pa.Table] = []

    def add(self, block: pa.Table) -> None:
        """``block``: score output plus ``_flow`` (input row) and ``_split`` (bool)."""
        split = block.column("_split").to_numpy(zero_copy_only=False)
        if split.any():
            self.split.append(block.filter(pa.array(split)).drop_columns(["_split"]))
        self.write(block.filter(pa.array(~split)).drop_columns(["_flow", "_split"]))

    def close(self) -> None:
        if self.split:
            self.write(merge_split(self.split))
            self.split = []

    def write(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        if table.num_rows == 0:
            return
        f = f"{self.path}/{self.prefix}_{len(self.report.files):06d}.parquet"
        pq.write_table(table, f, filesystem=self.fs)
        self.report.files.append(f)
        self.report.rows_scored += table.num_rows
        self.report.anomalies += int(np.count_nonzero(table.column("is_anomaly").to_numpy(zero_copy_only=False)))


def runs_in_driver(n_flows: int, driver_rows: int | None = None) -> bool:
    """Whether ``score`` scores ``n_flows`` flows in the driver (else with Ray Data).

    ``driver_rows`` given: exactly ``n_flows <= driver_rows`` (0 always takes Ray Data).
    Default: up to ``DRIVER_SCORE_ROWS``, or any size when the actor pool would be one actor.
    """
    if driver_rows is not None:
        return n_flows <= driver_rows
    if n_flows <= DRIVER_SCORE_ROWS:
        return True
    cpus = _available_cpus()
    return cpus is not None and _pool(cpus)[0] == 1


def _available_cpus() -> float | None:
    """CPUs of the Ray cluster this process uses or would start (embedded Ray takes every
    core); None for a cluster named by RAY_ADDRESS and not joined yet (Ray Data sizes it)."""
    import ray

    from nadray.runtime import cluster_cpus

    if ray.is_initialized():
        return cluster_cpus()
    if os.environ.get("RAY_ADDRESS"):
        return None
    return float(os.cpu_count() or 1)


def _expand(inputs: list[str]) -> list[str]:
    """Files named directly, plus the files inside named folders (sorted, hidden ones skipped)."""
    out = []
    for p in inputs:
        fs, path = storage.get_fs(p)
        with storage.unreachable_as_error(p, "list"):
            if fs.isdir(path):
                names = [n for n in storage.ls(p) if not n.startswith((".", "_"))]
                out.extend(storage.join(p, n) for n in names if not fs.isdir(storage.get_fs(storage.join(p, n))[1]))
            elif fs.exists(path):
                out.append(p)
            else:
                raise InputError(f"input {p}: not found")
    return out


def read_inputs(inputs: list[str], fmt: str) -> tuple[pa.Table, int, int]:
    """(flows in time order, records read, records quarantined)."""
    from nadray.data import sort_flows
    from nadray.schema import FLOW_SCHEMA

    tables, read, quarantined = [], 0, 0
    if fmt == "archive":
        from nadray.archive import read_flows

        for a in inputs:
            t = read_flows(a)
            tables.append(t)
            read += t.num_rows
    else:
        from nadray.ingest import read_input

        for path in _expand(inputs):
            r = read_input(path, fmt)
            tables.append(r.flows)
            read += int(r.read)
            quarantined += r.quarantined  # records, not whole-file notes (as ingest counts)
    table = pa.concat_tables([t.cast(FLOW_SCHEMA) for t in tables]) if tables else FLOW_SCHEMA.empty_table()
    return sort_flows(table), read, quarantined


@dataclass
class EntityBlocks:
    """The entities of an input split into blocks (``entity_blocks``)."""

    rows: list[np.ndarray]  # input rows of each block's flows, ascending
    owned: list[np.ndarray]  # entity names (object) each block scores; each entity in one block
    split: np.ndarray  # bool per input flow: its entities are in two blocks

    def take(self, flows: pa.Table, k: int) -> pa.Table:
        return flows.take(pa.array(self.rows[k]))


def entity_blocks(flows: pa.Table, encoder: Any, n_blocks: int) -> EntityBlocks:
    """At most ``n_blocks`` blocks of entities of about equal events, each with every flow of its entities.

    Largest entity first into the emptiest block: a block is never smaller than its
    largest entity (an entity's events are scored in one sequence), and otherwise within
    one entity of the others.
    """
    import heapq

    n = flows.num_rows
    fi, entity = encoder.flow_entities(flows)
    codes, names = pd.factorize(entity)
    events = np.bincount(codes, minlength=len(names))
    n_blocks = max(1, min(int(n_blocks), len(names)))
    block_of = np.zeros(len(names), dtype="int64")
    if n_blocks > 1:
        heap = [(0, k) for k in range(n_blocks)]
        for c in np.argsort(-events, kind="stable").tolist():
            load, k = heapq.heappop(heap)
            block_of[c] = k
            heapq.heappush(heap, (load + int(events[c]), k))
    # (block, flow) pairs, each once, sorted by block then flow.
    pairs = np.unique(block_of[codes] * max(n, 1) + fi)
    blk, row = pairs // max(n, 1), pairs % max(n, 1)
    cut = np.searchsorted(blk, np.arange(n_blocks + 1))
    names = np.asarray(names, dtype=object)
    return EntityBlocks(rows=[row[cut[k]:cut[k + 1]] for k in range(n_blocks)],
                        owned=[names[block_of == k] for k in range(n_blocks)],
                        split=np.bincount(row, minlength=n) > 1)


def merge_split(parts: list[pa.Table]) -> pa.Table:
    """One row per flow from the blocks' rows of split flows (column ``_flow``): the highest
    score, ties to the entity first in code point order (``Scorer.flow_scores``' rule)."""
    t = pa.concat_tables(parts).sort_by([("_flow", "ascending"), ("score", "descending"), ("entity", "ascending")])
    f = t.column("_flow").to_numpy()
    first = np.r_[True, f[1:] != f[:-1]] if len(f) else np.zeros(0, bool)
    return t.filter(pa.array(first)).drop_columns(["_flow"])


def _pool(cpus: float) -> tuple[int, float]:
    """(actors, CPUs per actor) leaving CPU for reads and writes (RAY.md: the 2-CPU deadlock)."""
    if cpus <= 2:
        return 1, 0.5
    return max(1, int(cpus // 2)), 1.0


def score(model_ref: str, inputs: list[str], output: str, fmt: str = "auto",
          driver_rows: int | None = None) -> ScoreReport:
    """Score raw files (``fmt`` as for ingest) or archives (``fmt="archive"``) and write Parquet to ``output``.

    Inputs of at most ``driver_rows`` flows (default ``DRIVER_SCORE_ROWS``) are scored in the
    driver without Ray; larger ones with a Ray Data pool of Scorer actors. Same output either way.
    """
    from nadray.scorer import Scorer

    t0 = time.time()
    if not inputs:
        raise NadrayError("score: no inputs given")
    scorer = Scorer.from_ref(model_ref)  # fails fast, naming the ref, before any work
    flows, read, quarantined = read_inputs(inputs, fmt)
    report = ScoreReport(output=output, model_version=scorer.version, read=read, quarantined=quarantined,
                         inputs=list(inputs))
    if flows.num_rows == 0:
        raise NadrayError(f"score: inputs {inputs} hold no readable records ({quarantined} quarantined)")
    log.info("score: %d records read, %d quarantined, in %.1f s; scoring with model %s", read, quarantined,
             time.time() - t0, scorer.version)
    fs, path = storage.arrow_fs(output)
    if not storage.is_s3(output):
        storage.makedirs(output)
    prefix = f"scores-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    n_in = flows.num_rows
    try:
        # An S3 outage mid-write is one line naming the output, not a botocore traceback.
        with storage.unreachable_as_error(output, "write the scores"):
            out = _Output(fs, path, prefix, report)
            if runs_in_driver(n_in, driver_rows):
                report.path = "driver"
                _score_in_driver(scorer, flows, out)
            else:
                report.path = "ray-data"
                _score_ray_data(model_ref, scorer, flows, out)
        del flows
        if report.rows_scored != n_in:
            raise NadrayError(f"score: wrote {report.rows_scored} rows for {n_in} input records")
    except BaseException:
        # A failed run leaves no partial output to be mistaken for a whole one.
        _remove_written(fs, path, prefix, storage.join(output, prefix))
        raise
    report.seconds = time.time() - t0
    return report


def _remove_written(fs, path: str, prefix: str, shown: str) -> None:
    """Best effort: delete this call's files (``prefix*``); the original error is what matters.

    ``shown``: the files' common prefix as the user wrote the output (``s3://...``)."""
    try:
        for f in _written_files(fs, path, prefix):
            fs.delete_file(f)
    except Exception as e:  # noqa: BLE001 - e.g. the store went away, which the caller's error says
        log.warning("score: could not remove the partial output %s*: delete those files once the storage "
                    "is back (%s: %s)", shown, type(e).__name__, storage.one_line(e))


def _score_in_driver(scorer, flows: pa.Table, out: _Output) -> None:
    """One Scorer in this process; above ``DRIVER_SCORE_ROWS`` flows, entity blocks of about
    that size one after another (bounded memory)."""
    n_blocks = -(-flows.num_rows // DRIVER_SCORE_ROWS)
    if n_blocks <= 1:
        out.write(_to_arrow(scorer.score_table(flows)))
        return
    blocks = entity_blocks(flows, scorer.encoder, n_blocks)
    used = len(blocks.rows)
    for k in range(used):
        t0 = time.time()
        table = _to_arrow(scorer.score_table(blocks.take(flows, k), blocks.owned[k]))
        rows = blocks.rows[k]
        out.add(table.append_column("_flow", pa.array(rows)).append_column("_split", pa.array(blocks.split[rows])))
        # progress on a long input, a block (about DRIVER_SCORE_ROWS flows) at a time
        log.info("score: entity block %d/%d, %d flows, %.1f s", k + 1, used, table.num_rows, time.time() - t0)
    out.close()


def _score_ray_data(model_ref: str, scorer, flows: pa.Table, out: _Output) -> None:
    """Entity blocks -> a fixed pool of Scorer actors -> this process writes what they return."""
    import ray
    from ray.data import ActorPoolStrategy

    from nadray.runtime import cluster_cpus, ensure_ray

    ensure_ray()
    actors, cpus_per_actor = _pool(cluster_cpus())
    blocks = entity_blocks(flows, scorer.encoder, n_blocks=4 * actors)
    used = len(blocks.rows)
    log.info("score: %d flows in %d entity blocks (%d flows in two) to %d Ray Data scoring actor(s)",
             flows.num_rows, used, int(blocks.split.sum()), actors)
    tables = []
    for k in range(used):
        rows = blocks.rows[k]
        tables.append(blocks.take(flows, k).append_column("_block", pa.array(np.full(len(rows), k, "int32")))
                      .append_column("_flow", pa.array(rows)).append_column("_split", pa.array(blocks.split[rows])))
    ds = ray.data.from_arrow(tables)
    del tables
    scored = ds.map_batches(
        _ScorerActor, fn_constructor_args=(model_ref, blocks.owned), batch_size=None, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
    )
    for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        out.add(table)
    out.close()


def _written_files(fs, path: str, prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=False, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(prefix))
