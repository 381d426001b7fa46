"""``nadray score``: batch scoring with Ray Data over a pool of Scorer actors.

A record is scored with its entity's earlier records in the same input as
context. The driver splits the input's entities into blocks (``nadray.blocks``:
each block holds every flow of its entities and scores only theirs; a flow
between two blocks takes the higher score), so every path gives exactly the
scores one ``Scorer.score_table`` over the whole input would, and the scores the
online endpoint gives the same records replayed in time order.

Inputs of at most ``DRIVER_SCORE_ROWS`` flows skip Ray altogether: one ``Scorer``
scores the whole table in the driver and pyarrow writes one Parquet file (local
or ``s3://``). A Ray Data job costs a fixed ~10 s on 2 cores (actor start and
model load, ``from_arrow``, the write), about what one Scorer needs for
``DRIVER_SCORE_ROWS`` flows on one core, so below it no actor pool can pay for
itself. Larger inputs go through Ray Data, unless the pool would be one actor
(a cluster of at most 2 CPUs, see ``_pool``): one actor does the driver's work
in series plus that fixed cost (BENCHMARKS.md: the forced Ray Data row), so the driver
then scores the same blocks one after another. Blocks hold about
``DRIVER_SCORE_ROWS`` flows, so scoring's working memory is bounded by a block on
either path; inputs over ``blocks.SPILL_ROWS`` flows are not even held, but read
into local spill files and regrouped by block. The driver writes each block's
flows that are in no other block as they come, and the split flows, merged, last.
A failed run removes the files it wrote. All paths give the same rows and scores
(tests/test_score.py).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nadray import storage
from nadray.archive import as_datetime
from nadray.blocks import (KEYS, EntityBlocks, Spill, SpilledBlocks, entity_blocks, merge_split, merge_split_files,
                           with_keys)
from nadray.errors import InputError, NadrayError

log = logging.getLogger("nadray.score")

# Inputs up to this many flows are scored in the driver (no Ray job): see the module docstring.
DRIVER_SCORE_ROWS = 100_000
# Scoring an archive from --start reads this much before it as context, not written: a host's
# scores depend on its last data.context_window + sequence_length events (96 by default), which
# a host busy enough to matter has within a day; from a cold start its first scores run high.
RANGE_CONTEXT_DAYS = 1.0
# Spilled split flows are written in row groups of this many rows: a merge of one range of
# flows reads only the row groups whose statistics overlap it.
SPLIT_ROW_GROUP = 65_536


@dataclass
class ScoreReport:
    output: str
    model_version: str
    read: int = 0
    context: int = 0  # of ``read``: flows before ``start``, read as context and not scored
    rows_scored: int = 0
    anomalies: int = 0
    quarantined: int = 0
    inputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    path: str = ""  # "driver" (one Scorer, pyarrow write) or "ray-data" (actor pool)
    files: list[str] = field(default_factory=list)  # the Parquet files this call wrote
    skipped: list[str] = field(default_factory=list)  # "<file>: <why>" for files in folders that are no flow log

    def summary(self) -> str:
        rate = self.rows_scored / self.seconds if self.seconds else 0.0
        return (f"scored {self.rows_scored} rows with model {self.model_version} -> {self.output}\n"
                f"read {self.read}{f' ({self.context} of them as context before the range)' if self.context else ''}, "
                f"quarantined {self.quarantined}, anomalies {self.anomalies} "
                f"({100.0 * self.anomalies / max(1, self.rows_scored):.2f}%), {self.seconds:.1f} s ({rate:,.0f} rows/s)"
                + "".join(f"\n  skipped {s}" for s in self.skipped))


class _ScorerActor:
    """Ray Data actor: loads the model once, scores entity blocks (``nadray.blocks``)."""

    def __init__(self, model_ref: str, owned: list[np.ndarray]):
        from nadray.scorer import Scorer

        self.scorer = Scorer.from_ref(model_ref)
        self.owned = owned

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _score_block(self.scorer, batch, self.owned[int(batch.column("_block")[0].as_py())])


def _score_block(scorer, block: pa.Table, owned: np.ndarray) -> pa.Table:
    """One entity block (flows plus ``blocks.KEYS``) -> its score rows, with the same keys."""
    from nadray.scorer import _to_flow_table

    out = _to_arrow(scorer.score_table(_to_flow_table(block), owned))
    return with_keys(out, block.column("_flow"), block.column("_split"))


# The score output's Arrow types, fixed: every file of one output, and the split flows
# merged across blocks, must agree, whatever a block holds (a block whose label details
# are all missing would otherwise get a column of Arrow's null type).
SCORE_SCHEMA = pa.schema([
    ("source", pa.large_string()), ("source_row", pa.int64()), ("ts", pa.timestamp("us", tz="UTC")),
    ("entity", pa.large_string()), ("score", pa.float64()), ("is_anomaly", pa.bool_()),
    ("threshold", pa.float64()), ("model_version", pa.large_string()), ("label", pa.int8()),
    ("label_detail", pa.large_string()),
])


def _to_arrow(scores) -> pa.Table:
    """The score output DataFrame as the Arrow table every path writes (``SCORE_SCHEMA``)."""
    return pa.Table.from_pandas(scores, schema=SCORE_SCHEMA, preserve_index=False)


class _Output:
    """Writes the score files as blocks come: a block's flows that no other block holds at
    once, the split flows (``_split``) when every block is in, merged (``merge_split``).
    Until then they wait in memory, or, past ``blocks.SPILL_ROWS`` rows (on a network whose
    traffic is mostly between its own hosts they are much of the input), in ``spill``'s
    folder, merged from there a range of flows at a time."""

    def __init__(self, fs, path: str, prefix: str, report: ScoreReport, spill: Spill, since: Any = None):
        self.fs, self.path, self.prefix, self.report, self.spill = fs, path.rstrip("/"), prefix, report, spill
        self.since = since  # flows before it were read as context only (``score(start=...)``): not written
        self.split: list[pa.Table] = []
        self.held = 0  # rows in self.split
        self.spilled: list[str] = []
        self.max_flow = -1

    def add(self, block: pa.Table) -> None:
        """``block``: score output plus ``blocks.KEYS`` (input row, split flag)."""
        from nadray import blocks

        split = block.column("_split").to_numpy(zero_copy_only=False)
        if split.any():
            part = block.filter(pa.array(split)).drop_columns(["_split"])
            self.split.append(part)
            self.held += part.num_rows
            self.max_flow = max(self.max_flow, int(part.column("_flow").to_numpy().max()))
            if self.held > blocks.SPILL_ROWS:
                self._spill_split()
        self.write(block.filter(pa.array(~split)).drop_columns(KEYS))

    def _spill_split(self) -> None:
        import pyarrow.parquet as pq

        f = self.spill.file(f"split-{len(self.spilled):06d}.parquet")
        pq.write_table(pa.concat_tables(self.split), f, row_group_size=SPLIT_ROW_GROUP)
        self.spilled.append(f)
        self.split, self.held = [], 0

    def close(self) -> None:
        from nadray import blocks

        if self.spilled:
            if self.split:
                self._spill_split()
            for merged in merge_split_files(self.spilled, self.max_flow, blocks.SPILL_ROWS):
                self.write(merged)
        elif self.split:
            self.write(merge_split(self.split))
        self.split, self.spilled = [], []

    def write(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        if self.since is not None:
            table = table.filter(pc.greater_equal(table.column("ts"), self.since))
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


def _expand(inputs: list[str]) -> list[tuple[str, bool]]:
    """(file, found in a folder) for each input, found as ``nadray ingest`` finds them (folders recursive)."""
    from nadray.ingest.core import input_files

    return [f for p in inputs for f in input_files(p)]


def read_pieces(inputs: list[str], fmt: str, skipped: list[str], start: Any = None,
                end: Any = None) -> Iterator[tuple[pa.Table, int, int]]:
    """(flows as FLOW_SCHEMA, records read, records quarantined) per input file (or piece of a large one)
    or archive partition (its flows with ``start <= ts < end``). As in ingest, a file found in a folder
    that is no flow log (Zeek's dns.log beside its conn.log) is skipped with ``fmt="auto"``: its
    "<file>: <why>" goes to ``skipped``."""
    from nadray.schema import FLOW_SCHEMA

    if fmt == "archive":
        from nadray.archive import dataset_paths, read_flows

        for a in inputs:
            with storage.unreachable_as_error(a, "list"):
                parts = dataset_paths(a, start, end)
            for p in parts:
                t = read_flows(a, start, end, paths=[p])
                yield t, t.num_rows, 0
    else:
        from nadray.ingest.core import EmptyInput, NotAFlowLog, UnknownFormat
        from nadray.ingest.stream import iter_input

        for path, from_folder in _expand(inputs):
            pieces = iter_input(path, fmt)  # a large file a piece at a time
            try:
                first = next(pieces, None)
            except (NotAFlowLog, UnknownFormat, EmptyInput) as e:
                if fmt != "auto" or not from_folder:
                    raise
                skipped.append(f"{path}: {'not a flow log' if isinstance(e, NotAFlowLog) else 'unrecognised format'}")
                continue
            for r in itertools.chain([first] if first else [], pieces):
                # records, not whole-file notes (as ingest counts)
                yield r.flows.cast(FLOW_SCHEMA), int(r.read), int(r.quarantined)


def _pool(cpus: float) -> tuple[int, float]:
    """(actors, CPUs per actor) leaving CPU for reads and writes (RAY.md: the 2-CPU deadlock)."""
    if cpus <= 2:
        return 1, 0.5
    return max(1, int(cpus // 2)), 1.0


def score(model_ref: str, inputs: list[str], output: str, fmt: str = "auto",
          driver_rows: int | None = None, start: Any = None, end: Any = None,
          context_days: float = RANGE_CONTEXT_DAYS) -> ScoreReport:
    """Score raw files (``fmt`` as for ingest) or archives (``fmt="archive"``) and write Parquet to ``output``.

    ``start``/``end`` (archives only; dates or ISO times, UTC): only the flows with ``start <= ts <
    end`` are scored, with the ``context_days`` before ``start`` read as their hosts' context.
    Inputs of at most ``driver_rows`` flows (default ``DRIVER_SCORE_ROWS``) are scored in the
    driver without Ray; larger ones with a Ray Data pool of Scorer actors. Same output either way.
    """
    from nadray import blocks
    from nadray.data import sort_flows
    from nadray.scorer import Scorer

    t0 = time.time()
    if not inputs:
        raise NadrayError("score: no inputs given")
    if (start is not None or end is not None) and fmt != "archive":
        raise NadrayError(f"score: --start/--end select flows of an archive (--format archive), not of "
                          f"--format {fmt} inputs, which are scored whole")
    if not (isinstance(context_days, (int, float)) and 0 <= context_days <= 366):
        raise NadrayError(f"score: --context-days: expected a number of days in [0, 366], got {context_days!r}")
    since = as_datetime(start, "start")
    read_from = None if since is None else since - _dt.timedelta(days=context_days)
    scorer = Scorer.from_ref(model_ref)  # fails fast, naming the ref, before any work
    with Spill(scorer.encoder) as spill:
        held: list[pa.Table] = []
        read = quarantined = n_in = n_context = 0
        skipped: list[str] = []
        for t, r, q in read_pieces(inputs, fmt, skipped, read_from, end):
            read, quarantined, n_in = read + r, quarantined + q, n_in + t.num_rows
            if since is not None:
                n_context += int(pc.sum(pc.less(t.column("ts"), since)).as_py() or 0)
            held.append(t)
            if n_in > blocks.SPILL_ROWS:  # too large to hold: to local disk, a piece at a time
                for h in held:
                    spill.add(h)
                held = []
        report = ScoreReport(output=output, model_version=scorer.version, read=read, quarantined=quarantined,
                             inputs=list(inputs), skipped=skipped, context=n_context)
        if n_in == n_context and (start is not None or end is not None):
            raise NadrayError(f"score: archive {inputs} holds no flows from {start or 'its start'} to "
                              f"{end or 'its end'}")
        if n_in == 0:
            raise NadrayError(f"score: inputs {inputs} hold no readable records ({quarantined} quarantined"
                              f"{f', {len(skipped)} files in folders skipped' if skipped else ''})")
        log.info("score: %d records read, %d quarantined, in %.1f s%s; scoring with model %s", read, quarantined,
                 time.time() - t0, f" (spilled to {spill.dir})" if spill.rows else "", scorer.version)
        flows = None if spill.rows else sort_flows(pa.concat_tables(held))
        del held
        fs, path = storage.arrow_fs(output)
        if not storage.is_s3(output):
            storage.makedirs(output)
        prefix = f"scores-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        try:
            # An S3 outage mid-write is one line naming the output, not a botocore traceback.
            with storage.unreachable_as_error(output, "write the scores"):
                out = _Output(fs, path, prefix, report, spill, since)
                in_driver = runs_in_driver(n_in, driver_rows)
                report.path = "driver" if in_driver else "ray-data"
                if in_driver and flows is not None and n_in <= DRIVER_SCORE_ROWS:
                    out.write(_to_arrow(scorer.score_table(flows)))
                else:
                    pool = None if in_driver else _pool(_cluster_cpus())
                    n_blocks = max(-(-n_in // DRIVER_SCORE_ROWS), 4 * pool[0] if pool else 1)
                    units = spill.blocks(n_blocks) if flows is None else entity_blocks(flows, scorer.encoder, n_blocks)
                    del flows
                    if pool is None:
                        _score_in_driver(scorer, units, out)
                    else:
                        _score_ray_data(model_ref, units, pool, out)
            if report.rows_scored != n_in - n_context:
                raise NadrayError(f"score: wrote {report.rows_scored} rows for {n_in - n_context} input records")
        except BaseException:
            # A failed run leaves no partial output to be mistaken for a whole one.
            _remove_written(fs, path, prefix, storage.join(output, prefix))
            raise
    report.seconds = time.time() - t0
    return report


def _cluster_cpus() -> float:
    from nadray.runtime import cluster_cpus, ensure_ray

    ensure_ray()
    return cluster_cpus()


def _remove_written(fs, path: str, prefix: str, shown: str) -> None:
    """Best effort: delete this call's files (``prefix*``); the original error is what matters.

    ``shown``: the files' common prefix as the user wrote the output (``s3://...``)."""
    try:
        for f in _written_files(fs, path, prefix):
            fs.delete_file(f)
    except Exception as e:  # noqa: BLE001 - e.g. the store went away, which the caller's error says
        log.warning("score: could not remove the partial output %s*: delete those files once the storage "
                    "is back (%s: %s)", shown, type(e).__name__, storage.one_line(e))


def _score_in_driver(scorer, blocks: EntityBlocks | SpilledBlocks, out: _Output) -> None:
    """One Scorer in this process, one entity block after another (bounded memory)."""
    log.info("score: %d entity blocks (%d flows in two) scored in this process", len(blocks), blocks.n_split)
    t0 = time.time()
    for k, table in enumerate(blocks.tables()):
        out.add(_score_block(scorer, table, blocks.owned[k]))
        # progress on a long input, a block (about DRIVER_SCORE_ROWS flows) at a time
        log.info("score: entity block %d/%d, %d flows, %.1f s", k + 1, len(blocks), table.num_rows, time.time() - t0)
        t0 = time.time()
    out.close()


def _score_ray_data(model_ref: str, blocks: EntityBlocks | SpilledBlocks, pool: tuple[int, float],
                    out: _Output) -> None:
    """Entity blocks -> a fixed pool of Scorer actors (``_pool``) -> this process writes what they return."""
    import ray
    from ray.data import ActorPoolStrategy

    actors, cpus_per_actor = pool
    log.info("score: %d entity blocks (%d flows in two) to %d Ray Data scoring actor(s)", len(blocks),
             blocks.n_split, actors)
    # Into the object store one block at a time (Ray spills it to disk when full), not all in this process.
    refs = [ray.put(t.append_column("_block", pa.array(np.full(t.num_rows, k, "int32"))))
            for k, t in enumerate(blocks.tables())]
    scored = ray.data.from_arrow_refs(refs).map_batches(
        _ScorerActor, fn_constructor_args=(model_ref, blocks.owned), batch_size=None, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
    )
    del refs
    for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        out.add(table)
    out.close()


def _written_files(fs, path: str, prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=False, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(prefix))
