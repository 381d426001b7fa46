"""The flow archive: Hive-partitioned Parquet (``date=YYYY-MM-DD``), local or ``s3://``.

Layout::

    <archive>/date=2018-12-21/part-<key>.parquet   flows (FLOW_SCHEMA, no ``date`` column inside)
    <archive>/_quarantine/part-<key>.parquet       quarantined records (QUARANTINE_SCHEMA)
    <archive>/_manifest/<sha256>.json              one per ingested input content, written last

Crash safety: every file is written under a name starting with ``.tmp-`` (local;
hidden from pyarrow dataset discovery and from :func:`dataset_paths`) and then
renamed to its final name; on S3 an object appears whole when its upload
completes, so the final key is written directly. Part names are deterministic
(``<key>`` is the input's content hash), so a rerun after a crash overwrites
rather than duplicates, and the manifest entry, written last, makes a finished
input a no-op the next time. Ingest writes ``_manifest/<sha256>.pending`` before
an input's first part and removes it after the manifest entry: the parts of an
input with a ``.pending`` marker and no ``.json`` entry (a run interrupted by a
crash or a storage outage) are hidden from readers until a rerun completes it.

Reading: :func:`read_flows` prunes partitions by date, casts to FLOW_SCHEMA and
sorts by ``schema.TIME_ORDER``. Ranges are half-open: ``start <= ts < end``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import re
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nadray import storage
from nadray.runtime import local_cpus
from nadray.schema import FLOW_SCHEMA, QUARANTINE_SCHEMA, TIME_ORDER

MANIFEST_DIR = "_manifest"
QUARANTINE_DIR = "_quarantine"
_DATE_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_EPOCH = _dt.date(1970, 1, 1)
_US_PER_DAY = 86_400 * 1_000_000
# At most this many day partitions written at once: enough to keep 16 cores or an S3
# connection pool busy, few enough that the parts in flight stay small in memory.
WRITE_THREADS = 16


# ------------------------------------------------------------------------ helpers


def _to_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def as_datetime(x: Any, name: str) -> _dt.datetime | None:
    """Accept None, 'YYYY-MM-DD[THH:MM[:SS]]', date, datetime or pandas Timestamp (UTC if naive)."""
    if x is None:
        return None
    if isinstance(x, str):
        try:
            d = _dt.datetime.fromisoformat(x)
        except ValueError:
            from nadray.errors import NadrayError

            raise NadrayError(f"{name}: expected a date like 2006-07-01 or an ISO time, got {x!r}") from None
    elif isinstance(x, _dt.datetime):
        d = x
    elif isinstance(x, _dt.date):
        d = _dt.datetime(x.year, x.month, x.day)
    elif hasattr(x, "to_pydatetime"):
        d = x.to_pydatetime()
    else:
        from nadray.errors import NadrayError

        raise NadrayError(f"{name}: expected a date or datetime, got {x!r}")
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return d.astimezone(_dt.timezone.utc)


def content_key(table: pa.Table) -> str:
    """A deterministic name for a table's content (sha256 of its Arrow IPC stream)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _write_atomic(uri: str, data: bytes) -> None:
    storage.write_bytes_atomic(uri, data)


# -------------------------------------------------------------------------- write


def write_flows(archive: str, table: pa.Table, key: str | None = None) -> list[str]:
    """Write canonical flows into their ``date=`` partitions; returns the part URIs.

    ``key`` names the part files (``part-<key>.parquet`` in each partition);
    default: the content hash of ``table``. Writing the same key again replaces
    the same files (no duplicates).
    """
    if table.num_rows == 0:
        return []
    table = table.select(FLOW_SCHEMA.names).cast(FLOW_SCHEMA)
    key = key or content_key(table)
    # One stable sort by TIME_ORDER, whose first key (ts) orders the days too: each day is
    # then one slice, sorted as a sort of that day alone would be. (A filter per day made
    # ingest quadratic in the days a file spans.)
    table = table.sort_by([(c, "ascending") for c in TIME_ORDER])
    day_no = (table["ts"].combine_chunks().cast(pa.int64()).to_numpy() // _US_PER_DAY)  # ts >= 0: schema.MIN_TS_US
    cuts = [0, *(np.flatnonzero(day_no[1:] != day_no[:-1]) + 1).tolist(), table.num_rows]
    parts = [(storage.join(archive, f"date={(_EPOCH + _dt.timedelta(days=int(day_no[lo]))).isoformat()}",
                           f"part-{key}.parquet"), lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]

    def put(part: tuple[str, int, int]) -> None:
        uri, lo, hi = part
        _write_atomic(uri, _to_bytes(table.slice(lo, hi - lo)))

    # A file spanning many days has one part per day. Parquet encoding, zstd, fsync and
    # S3 PUTs release the GIL, so parts are written side by side. The first error cancels
    # the parts not yet started (with S3 down, each would wait out its retries) and is
    # raised once the running ones stop; the .pending marker hides what was written.
    if len(parts) == 1:
        put(parts[0])
    else:
        futures = [_writers().submit(put, part) for part in parts]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and not f.cancelled() and f.exception()), None)
        if failed is not None:
            for f in futures:
                f.cancel()
            wait(futures)
            raise failed.exception()
    return [uri for uri, _, _ in parts]


_WRITERS: tuple[int, ThreadPoolExecutor] | None = None
_WRITERS_LOCK = threading.Lock()


def _writers() -> ThreadPoolExecutor:
    """This process's part-writing threads, kept between calls so that each keeps its S3
    client (``storage`` caches one per thread)."""
    global _WRITERS
    with _WRITERS_LOCK:
        if _WRITERS is None or _WRITERS[0] != os.getpid():  # a forked child gets its own
            threads = min(max(2, local_cpus()), WRITE_THREADS)
            _WRITERS = (os.getpid(), ThreadPoolExecutor(threads, thread_name_prefix="nadray-write"))
        return _WRITERS[1]


def quarantine_uri(archive: str, quarantine: str | None = None) -> str:
    return quarantine or storage.join(archive, QUARANTINE_DIR)


def write_quarantine(archive: str, table: pa.Table, key: str | None = None,
                     quarantine: str | None = None) -> str | None:
    """Write quarantined records as ``<quarantine>/part-<key>.parquet``; None when empty."""
    if table.num_rows == 0:
        return None
    table = table.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
    key = key or content_key(table)
    uri = storage.join(quarantine_uri(archive, quarantine), f"part-{key}.parquet")
    _write_atomic(uri, _to_bytes(table))
    return uri


def manifest_uri(archive: str, sha: str) -> str:
    return storage.join(archive, MANIFEST_DIR, f"{sha}.json")


def has_manifest(archive: str, sha: str) -> bool:
    return storage.exists(manifest_uri(archive, sha))


def read_manifest(archive: str, sha: str) -> dict:
    return storage.read_json(manifest_uri(archive, sha))


def write_manifest(archive: str, sha: str, entry: dict) -> None:
    """Record an ingested input (written last: its presence means the input is complete)."""
    storage.write_json_atomic(manifest_uri(archive, sha), entry)


def pending_uri(archive: str, sha: str) -> str:
    return storage.join(archive, MANIFEST_DIR, f"{sha}.pending")


def mark_pending(archive: str, sha: str, entry: dict) -> None:
    """Before an input's first part: its parts stay hidden until ``write_manifest`` + ``clear_pending``."""
    storage.write_json_atomic(pending_uri(archive, sha), entry)


def clear_pending(archive: str, sha: str) -> None:
    storage.rm(pending_uri(archive, sha))


def remove_unfinished(archive: str, sha: str, quarantine: str | None = None) -> int:
    """Remove the parts of an ingest of ``sha`` that stopped before its manifest entry.

    A rerun overwrites parts of the same name, but a large input's piece parts
    (``part-<sha>-<piece>``) are named by where its pieces were cut: a rerun that cuts
    elsewhere (another ``PIECE_BYTES``) would leave the old ones to be committed beside
    its own. Lists every partition: a crash's cleanup only. Returns the files removed.
    """
    if not storage.exists(pending_uri(archive, sha)) or has_manifest(archive, sha):
        return 0
    folders = [storage.join(archive, f"date={d}") for d in list_dates(archive)] + [quarantine_uri(archive, quarantine)]
    n = 0
    for folder in folders:
        for name in storage.ls(folder):
            if name == f"part-{sha}.parquet" or name.startswith(f"part-{sha}-"):
                storage.rm(storage.join(folder, name))
                n += 1
    return n


def uncommitted_keys(archive: str) -> set[str]:
    """Part keys of inputs whose ingest started (``.pending``) and never finished (no ``.json``)."""
    names = storage.ls(storage.join(archive, MANIFEST_DIR))
    done = {n[:-len(".json")] for n in names if n.endswith(".json")}
    return {n[:-len(".pending")] for n in names if n.endswith(".pending")} - done


def _committed(name: str, hidden: set[str]) -> bool:
    # part-<sha>.parquet, or part-<sha>-<piece>.parquet for an input written in pieces
    return not (hidden and name.startswith("part-") and name.endswith(".parquet")
                and name[len("part-"):-len(".parquet")].split("-", 1)[0] in hidden)


def list_manifest(archive: str) -> list[dict]:
    return [storage.read_json(storage.join(archive, MANIFEST_DIR, n))
            for n in storage.ls(storage.join(archive, MANIFEST_DIR)) if n.endswith(".json")]


# --------------------------------------------------------------------------- read


def list_dates(archive: str) -> list[str]:
    """The ``YYYY-MM-DD`` partitions present, sorted."""
    out = []
    for name in storage.ls(archive):
        m = _DATE_DIR.match(name)
        if m:
            out.append(m.group(1))
    return sorted(out)


def _dates_in_range(archive: str, start: Any, end: Any) -> list[str]:
    s = as_datetime(start, "start")
    e = as_datetime(end, "end")
    out = []
    for d in list_dates(archive):
        day = _dt.datetime.fromisoformat(d).replace(tzinfo=_dt.timezone.utc)
        if s is not None and day + _dt.timedelta(days=1) <= s:
            continue
        if e is not None and day >= e:
            continue
        out.append(d)
    return out


def dataset_paths(archive: str, start: Any = None, end: Any = None) -> list[str]:
    """URIs of the finished part files whose partition overlaps ``[start, end)``.

    Local paths for a local archive, ``s3://bucket/key`` for S3: pass them to
    ``ray.data.read_parquet``. Temporary (``.``/``_``-prefixed) files and the parts
    of an unfinished ingest (see :func:`uncommitted_keys`) are left out.
    """
    out = []
    dates = _dates_in_range(archive, start, end)
    hidden = uncommitted_keys(archive) if dates else set()
    for d in dates:
        folder = storage.join(archive, f"date={d}")
        for name in storage.ls(folder):
            if name.endswith(".parquet") and not name.startswith((".", "_")) and _committed(name, hidden):
                out.append(storage.join(folder, name))
    return out


def _read_parts(uris: list[str], schema: pa.Schema) -> pa.Table:
    if not uris:
        return schema.empty_table()
    fs, _ = storage.arrow_fs(uris[0])
    tables = []
    for u in uris:
        _, path = storage.get_fs(u)
        tables.append(pq.read_table(path, filesystem=fs, schema=schema))
    return pa.concat_tables(tables).cast(schema)


def read_flows(archive: str, start: Any = None, end: Any = None, columns: list[str] | None = None,
               paths: list[str] | None = None) -> pa.Table:
    """Flows with ``start <= ts < end`` (either may be None), as FLOW_SCHEMA, sorted by TIME_ORDER.

    ``paths``: the archive's ``dataset_paths`` for the same range, when the caller listed them already.
    """
    table = _read_parts(dataset_paths(archive, start, end) if paths is None else paths, FLOW_SCHEMA)
    s = as_datetime(start, "start")
    e = as_datetime(end, "end")
    if s is not None:
        table = table.filter(pc.greater_equal(table["ts"], pa.scalar(s, FLOW_SCHEMA.field("ts").type)))
    if e is not None:
        table = table.filter(pc.less(table["ts"], pa.scalar(e, FLOW_SCHEMA.field("ts").type)))
    table = table.sort_by([(c, "ascending") for c in TIME_ORDER])
    if columns is not None:
        table = table.select(columns)
    return table


def read_quarantine(archive: str, quarantine: str | None = None) -> pa.Table:
    """All quarantined records (QUARANTINE_SCHEMA), ordered by source then source_row."""
    q = quarantine_uri(archive, quarantine)
    hidden = uncommitted_keys(archive)
    uris = [storage.join(q, n) for n in storage.ls(q)
            if n.endswith(".parquet") and not n.startswith((".", "_")) and _committed(n, hidden)]
    table = _read_parts(uris, QUARANTINE_SCHEMA)
    return table.sort_by([("source", "ascending"), ("source_row", "ascending")])


def count_rows(archive: str, start: Any = None, end: Any = None) -> int:
    """Number of archived flow rows (from Parquet footers; no data read)."""
    if start is not None or end is not None:
        return read_flows(archive, start, end, columns=["ts"]).num_rows
    n = 0
    for u in dataset_paths(archive):
        fs, path = storage.arrow_fs(u)
        _, p = storage.get_fs(u)
        with fs.open_input_file(p) as f:
            n += pq.ParquetFile(f).metadata.num_rows
    return n
