"""``nadray score``: batch scoring with Ray Data over a pool of Scorer actors.

A record is scored with its entity's earlier records in the same input as
context, so each Ray Data batch must hold whole entity histories. Flows link
entities (an internal flow belongs to both its endpoints), so records are
grouped by *connected component* of the entity graph, the components packed
into one block per actor task, and each block scored with
``Scorer.score_table``: exactly the scores the online endpoint would give on
the same records replayed in time order.

Grouping happens in the driver (vectorised; scipy's connected components),
whatever the input size: on 2 cores a Ray shuffle costs 8-19 s of fixed
overhead (RAY.md) against about a second in-process.

Inputs of at most ``DRIVER_SCORE_ROWS`` flows skip Ray altogether: one ``Scorer``
scores the whole table in the driver and pyarrow writes one Parquet file (local
or ``s3://``). A Ray Data job costs a fixed ~10 s on 2 cores (actor start and
model load, ``from_arrow``, the write), about what one Scorer needs for
``DRIVER_SCORE_ROWS`` flows on one core, so below it no actor pool can pay for
itself. Larger inputs go through Ray Data, unless the pool would be one actor
(a cluster of at most 2 CPUs, see ``_pool``): one actor does the driver's work
in series plus that fixed cost (BENCHMARKS.md: the forced Ray Data row), so the driver
then scores the same whole-entity blocks one after another, so that scoring's
working memory is bounded by a block, as on the actors. A failed run removes the
files it wrote. All paths give the same rows and
scores (tests/test_score.py), and all count what they wrote without a second
Ray job (Parquet footers and one boolean column, read with pyarrow).
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
    """Ray Data actor: loads the model once, scores whole-entity blocks."""

    def __init__(self, model_ref: str):
        from nadray.scorer import Scorer

        self.scorer = Scorer.from_ref(model_ref)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from nadray.scorer import _to_flow_table

        return _to_arrow(self.scorer.score_table(_to_flow_table(batch)))


def _to_arrow(scores) -> pa.Table:
    """The score output DataFrame as the Arrow table both paths write."""
    return pa.Table.from_pandas(scores, preserve_index=False)


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


def entity_blocks(flows: pa.Table, encoder: Any, n_blocks: int) -> list[pa.Table]:
    """Split ``flows`` into at most ``n_blocks`` tables, each holding whole connected entity groups."""
    block_of, used = entity_block_of(flows, encoder, n_blocks)
    return [flows.filter(pa.array(block_of == k)) for k in range(used)]


def entity_block_of(flows: pa.Table, encoder: Any, n_blocks: int) -> tuple[np.ndarray, int]:
    """(block of each flow, number of blocks): at most ``n_blocks`` non-empty blocks numbered
    from 0, each holding whole connected entity groups. A caller scoring them one after
    another takes each block when it needs it, so only one copy is held beside ``flows``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    fi, entity = encoder.flow_entities(flows)
    ent_codes = pd.factorize(entity)[0]
    n_ent = int(ent_codes.max()) + 1 if len(ent_codes) else 0
    # Edges: consecutive events of the same flow (a flow has one or two events).
    order = np.argsort(fi, kind="stable")
    f_sorted, e_sorted = fi[order], ent_codes[order]
    same = f_sorted[1:] == f_sorted[:-1]
    a, b = e_sorted[:-1][same], e_sorted[1:][same]
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n_ent, n_ent))
    n_comp, comp = connected_components(graph, directed=False)
    flow_comp = np.empty(flows.num_rows, dtype="int64")
    flow_comp[f_sorted] = comp[e_sorted]
    # Pack components into blocks, largest first into the emptiest block.
    sizes = np.bincount(flow_comp, minlength=n_comp)
    n_blocks = max(1, min(n_blocks, n_comp))
    load = np.zeros(n_blocks, dtype="int64")
    block_of = np.empty(n_comp, dtype="int64")
    for c in np.argsort(-sizes, kind="stable"):
        k = int(np.argmin(load))
        block_of[c] = k
        load[k] += sizes[c]
    # Renumber the non-empty blocks 0.. in order.
    renumber = np.cumsum(load > 0) - 1
    return renumber[block_of[flow_comp]], int((load > 0).sum())


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
            if runs_in_driver(n_in, driver_rows):
                report.path = "driver"
                _score_in_driver(scorer, flows, fs, path, prefix, report)
            else:
                report.path = "ray-data"
                _score_ray_data(model_ref, scorer, flows, fs, path, prefix)
                report.files, report.rows_scored, report.anomalies = _count_written(fs, path, prefix)
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


def _score_in_driver(scorer, flows: pa.Table, fs, path: str, prefix: str, report: ScoreReport) -> None:
    """One Scorer in this process; above ``DRIVER_SCORE_ROWS`` flows, whole-entity blocks of about
    that size one after another (bounded memory), one Parquet file each."""
    import pyarrow.parquet as pq

    n_blocks = -(-flows.num_rows // DRIVER_SCORE_ROWS)
    block_of, used = (None, 1) if n_blocks <= 1 else entity_block_of(flows, scorer.encoder, n_blocks)
    for k in range(used):
        t0 = time.time()
        block = flows if block_of is None else flows.filter(pa.array(block_of == k))
        table = _to_arrow(scorer.score_table(block))
        del block
        if used > 1:  # progress on a long input, a block (about DRIVER_SCORE_ROWS flows) at a time
            log.info("score: entity block %d/%d, %d flows, %.1f s", k + 1, used, table.num_rows, time.time() - t0)
        f = f"{path.rstrip('/')}/{prefix}_{k:06d}.parquet"
        pq.write_table(table, f, filesystem=fs)
        report.files.append(f)
        report.rows_scored += table.num_rows
        report.anomalies += int(np.count_nonzero(table.column("is_anomaly").to_numpy(zero_copy_only=False)))


def _score_ray_data(model_ref: str, scorer, flows: pa.Table, fs, path: str, prefix: str) -> None:
    """Whole-entity blocks -> a fixed pool of Scorer actors -> Parquet files named ``prefix_*``."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.datasource import FilenameProvider

    from nadray.runtime import cluster_cpus, ensure_ray

    ensure_ray()
    actors, cpus_per_actor = _pool(cluster_cpus())
    blocks = entity_blocks(flows, scorer.encoder, n_blocks=4 * actors)
    log.info("score: %d flows in %d entity blocks to %d Ray Data scoring actor(s)", flows.num_rows, len(blocks), actors)
    ds = ray.data.from_arrow(blocks)
    scored = ds.map_batches(
        _ScorerActor, fn_constructor_args=(model_ref,), batch_size=None, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
    )
    scored.write_parquet(path, filesystem=fs, filename_provider=FilenameProvider(dataset_uuid=prefix,
                                                                                 file_format="parquet"))


def _written_files(fs, path: str, prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=False, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(prefix))


def _count_written(fs, path: str, prefix: str) -> tuple[list[str], int, int]:
    """(files, rows, anomalies) of the Parquet files named ``prefix*`` under ``path``: pyarrow, no Ray job."""
    import pyarrow.parquet as pq

    files = _written_files(fs, path, prefix)
    rows = anomalies = 0
    for f in files:
        col = pq.read_table(f, columns=["is_anomaly"], filesystem=fs).column("is_anomaly")
        rows += len(col)
        anomalies += int(np.count_nonzero(col.to_numpy(zero_copy_only=False)))
    return files, rows, anomalies
