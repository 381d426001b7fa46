"""Archive -> Ray Data -> a time-ordered table -> train / validation / test splits.

Splits are by time, never random (a random split leaks the future into
training): global time quantiles (``data.train_fraction``, ``data.val_fraction``)
or explicit bounds (``data.train_end``, ``data.val_end``); sources named in
``data.holdout_sources`` go entirely to test (cross-capture evaluation).

Features and windows are computed on the whole time-ordered stream and then
masked by split, so a validation or test event is scored with its entity's
earlier records as context (their labels are never used for it).
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nadray import storage
from nadray.config import Config
from nadray.errors import NadrayError
from nadray.schema import FLOW_COLUMNS, FLOW_SCHEMA, TIME_ORDER

log = logging.getLogger("nadray.data")

# Training materialises its flows once and featurises them in the driver with
# vectorised numpy: on 2 cores every Ray shuffle costs 8-19 s of fixed overhead
# (RAY.md), far more than featurising a few million rows in-process (~1 M
# events/s). Above this many rows a warning says so: the driver must hold them.
SMALL_INPUT_ROWS = 5_000_000
# Archives whose partitions in range total less than this are read in-process with
# pyarrow (same partition pruning): a Ray Data read_parquet costs 5-25 s of fixed
# overhead on 2 busy cores (measured: 25 s for a 200 KB archive under load) and
# pyarrow reads 3-8 M rows/s. Larger ranges go through Ray Data's parallel read.
SMALL_READ_BYTES = 256 * 1024 * 1024


def _parse_time(value: Any, key: str) -> _dt.datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, _dt.datetime):
        d = value
    else:
        try:
            d = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise NadrayError(f"config key {key!r}: expected an ISO 8601 time like 2026-01-31T00:00:00Z, "
                              f"got {value!r}") from None
    return d if d.tzinfo else d.replace(tzinfo=_dt.timezone.utc)


def sort_flows(table: pa.Table) -> pa.Table:
    """Time order (ts, source, source_row)."""
    return table.sort_by([(c, "ascending") for c in TIME_ORDER])


def read_dataset(archive: str, start: Any = None, end: Any = None, paths: list[str] | None = None):
    """The archive's partitions overlapping [start, end) as a Ray Dataset (partition pruning).

    ``paths``: ``archive.dataset_paths`` for the same range, when the caller listed them already.
    """
    import ray

    from nadray import archive as archive_mod

    if paths is None:
        paths = archive_mod.dataset_paths(archive, start, end)
    if not paths:
        return None
    fs, _ = storage.arrow_fs(paths[0])
    local = [storage.get_fs(p)[1] for p in paths]
    ds = ray.data.read_parquet(local, filesystem=fs, partitioning=None)
    return ds.select_columns(list(FLOW_COLUMNS))


def load_flows(archive: str, cfg: Config, start: Any = None, end: Any = None) -> pa.Table:
    """All flows of ``archive`` in [start, end) (default ``data.start`` / ``data.end``), time-ordered.

    Read with Ray Data from the date partitions in range only, then materialised
    once (see ``SMALL_INPUT_ROWS``).
    """
    import ray

    from nadray.runtime import ensure_ray

    s = _parse_time(start if start is not None else cfg.data.start, "data.start")
    e = _parse_time(end if end is not None else cfg.data.end, "data.end")
    from nadray import archive as archive_mod

    paths = archive_mod.dataset_paths(archive, s, e)
    if not paths:
        raise NadrayError(f"archive {archive} has no flows between {s or 'the beginning'} and {e or 'the end'}")
    if _total_bytes(paths) <= SMALL_READ_BYTES:
        # Filtered and in time order already.
        table = archive_mod.read_flows(archive, s, e, paths=paths)
    else:
        ensure_ray()
        ds = read_dataset(archive, s, e, paths=paths)
        tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
        table = pa.concat_tables([t.select(FLOW_COLUMNS).cast(FLOW_SCHEMA) for t in tables]) if tables else \
            FLOW_SCHEMA.empty_table()
        ts_type = FLOW_SCHEMA.field("ts").type
        if s is not None:
            table = table.filter(pc.greater_equal(table["ts"], pa.scalar(s, ts_type)))
        if e is not None:
            table = table.filter(pc.less(table["ts"], pa.scalar(e, ts_type)))
        table = sort_flows(table)
    if table.num_rows == 0:
        raise NadrayError(f"archive {archive} has no flows between {s or 'the beginning'} and {e or 'the end'}")
    if table.num_rows > SMALL_INPUT_ROWS:
        log.warning("%d flows exceed the in-process size (%d); training uses them all but caps windows per "
                    "epoch at train.max_windows", table.num_rows, SMALL_INPUT_ROWS)
    return table


def _total_bytes(paths: list[str]) -> int:
    fs, _ = storage.get_fs(paths[0])
    with storage.unreachable_as_error(paths[0], "read"):
        return int(sum(fs.size(storage.get_fs(p)[1]) for p in paths))


@dataclass
class Splits:
    """Boolean masks over ``flows`` (the whole stream, time order) for train, val and test.

    ``.train``, ``.val``, ``.test`` are the corresponding tables.
    """

    flows: pa.Table
    train_mask: np.ndarray
    val_mask: np.ndarray
    test_mask: np.ndarray
    boundaries: dict[str, Any] = field(default_factory=dict)

    @property
    def train(self) -> pa.Table:
        return self.flows.filter(pa.array(self.train_mask))

    @property
    def val(self) -> pa.Table:
        return self.flows.filter(pa.array(self.val_mask))

    @property
    def test(self) -> pa.Table:
        return self.flows.filter(pa.array(self.test_mask))

    def counts(self) -> dict[str, int]:
        return {s: int(getattr(self, f"{s}_mask").sum()) for s in ("train", "val", "test")}


def holdout_mask(flows: pa.Table, holdout_sources: list[str]) -> np.ndarray:
    """Rows whose ``source`` contains any of ``holdout_sources``."""
    if not holdout_sources:
        return np.zeros(flows.num_rows, dtype=bool)
    src = flows.column("source")
    m = np.zeros(flows.num_rows, dtype=bool)
    for sub in holdout_sources:
        m |= pc.fill_null(pc.match_substring(src, sub), False).to_numpy(zero_copy_only=False)
    return m


def time_split(flows: pa.Table, cfg: Config) -> Splits:
    """Time-ordered train / val / test masks over ``flows`` (which it sorts by time order)."""
    flows = sort_flows(flows)
    ts = flows.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False) if flows.num_rows else np.zeros(0, "int64")
    held = holdout_mask(flows, cfg.data.holdout_sources)
    if cfg.data.holdout_sources and not held.any():
        raise NadrayError(f"data.holdout_sources {cfg.data.holdout_sources!r}: no flow's source matches")
    rest = np.flatnonzero(~held)
    t_end = _parse_time(cfg.data.train_end, "data.train_end")
    v_end = _parse_time(cfg.data.val_end, "data.val_end")
    to_us = lambda d: int(d.timestamp() * 1_000_000)  # noqa: E731
    if len(rest):
        sorted_ts = ts[rest]  # flows are time-sorted already
        n = len(rest)
        t1 = to_us(t_end) if t_end else int(sorted_ts[min(n - 1, int(n * cfg.data.train_fraction))])
        t2 = to_us(v_end) if v_end else int(
            sorted_ts[min(n - 1, int(n * (cfg.data.train_fraction + cfg.data.val_fraction)))])
        if v_end and not t_end and t1 > t2:
            t1 = t2
    else:
        t1 = t2 = 0
    if t_end and v_end and t2 < t1:
        raise NadrayError(f"data.val_end must be after data.train_end, got {cfg.data.val_end} <= {cfg.data.train_end}")
    train = ~held & (ts < t1)
    val = ~held & (ts >= t1) & (ts < t2)
    test = held | (~held & (ts >= t2))
    splits = Splits(flows, train, val, test, boundaries={
        "train_end": _iso(t1), "val_end": _iso(t2), "holdout_sources": list(cfg.data.holdout_sources),
    })
    counts = splits.counts()
    for name in ("train", "val"):
        if counts[name] == 0:
            key = "data.train_fraction / data.train_end" if name == "train" else "data.val_fraction / data.val_end"
            raise NadrayError(f"{name} split has no flows ({key}: boundaries {splits.boundaries}, {flows.num_rows} flows)")
    return splits


def _iso(us: int) -> str:
    return _dt.datetime.fromtimestamp(us / 1e6, tz=_dt.timezone.utc).isoformat()


def data_range(flows: pa.Table, mask: np.ndarray | None = None) -> dict[str, Any]:
    """min/max ts, sources and row count of (a subset of) flows: for the checkpoint."""
    t = flows if mask is None else flows.filter(pa.array(mask))
    if t.num_rows == 0:
        return {"rows": 0}
    mm = pc.min_max(t.column("ts"))
    return {
        "rows": int(t.num_rows),
        "min_ts": mm["min"].as_py().isoformat(),
        "max_ts": mm["max"].as_py().isoformat(),
        "sources": sorted(pc.unique(t.column("source")).to_pylist()),
    }
