"""Landing -> staging -> main archive: the nightly job's data side.

A night never writes into the main archive until it has decided about promotion:

1. :func:`scan_landing` hashes every landing file and sorts them into *new*,
   *archived* (its content sha is in the main archive's manifest),
   *quarantined* (a whole file refused on an earlier night) and *other log* (a log
   of another kind, such as the ``dns.log`` a Zeek sensor ships beside its
   ``conn.log``, seen on an earlier night). A file written less than ``min_age_s`` before
   the scan is *too recent*: it may still be being copied, and a later, complete copy
   would be new content whose records the archive then holds twice. It waits for the
   next night.
2. :func:`stage` ingests only the new files into ``<archive>/_staging/<date>/``
   (an ordinary archive: parts, quarantine, manifest). The ``_`` prefix hides it
   from every reader of the main archive. A file that cannot be read at all is
   kept whole under the staging quarantine with its reason; a log of another kind
   is only recorded (``_other_logs/<sha>.json``), neither copied nor counted as refused.
3. :func:`load_window` reads main + staged parts of the window.
4. :func:`commit` copies staged parts into the main archive, then the whole-file
   quarantines, then the manifest entries (last: an input counts as archived only
   once its manifest entry exists), and removes the staging folder. Each input's
   parts are hidden from readers by a ``.pending`` marker until its manifest entry,
   so a commit interrupted half-way shows nothing; the next run removes what it had
   copied (a large file's piece parts are named by where it was cut) and redoes
   it: nothing doubles.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from nadray import archive as arc
from nadray import storage
from nadray.errors import NadrayError

log = logging.getLogger("nadray.nightly")

STAGING_DIR = "_staging"
# Whole input files refused by ingest (not a flow log, broken gzip, ...): the raw bytes
# as <sha>-<name> and a <sha>.json record (written last) with the reason.
FILES_QUARANTINE = "files"
# Landing files that are logs of another kind (Zeek dns.log, ssl.log...): a <sha>.json record
# each, so later nights pass them by. Not quarantined: nothing is wrong with them, and a Zeek
# sensor's other logs together are often larger than its conn.log.
OTHER_LOGS = "_other_logs"


@dataclass
class LandingFile:
    """One file of the landing area and what the main archive already knows of it."""

    uri: str
    sha256: str
    size: int
    status: str  # "new", "archived" (sha in the manifest), "quarantined" (refused earlier), "other log", "too recent"
    age_s: float | None = None  # seconds since it was last written, at the scan (None: the store does not say)


def staging_uri(archive: str, date: str) -> str:
    return storage.join(archive, STAGING_DIR, date)


def files_quarantine_uri(archive: str) -> str:
    return storage.join(arc.quarantine_uri(archive), FILES_QUARANTINE)


def other_logs_uri(archive: str) -> str:
    return storage.join(archive, OTHER_LOGS)


def list_landing(landing: str) -> list[tuple[str, float | None]]:
    """Files under ``landing`` (recursive), hidden and ``_``-prefixed names left out, sorted,
    each with when it was last written (epoch seconds, None when the store does not say)."""
    fs, path = storage.get_fs(landing)
    with storage.unreachable_as_error(landing, "list"):
        if not fs.exists(path):
            raise NadrayError(f"landing {landing}: no such folder or prefix")
        if not fs.isdir(path):
            return [(str(landing), storage.modified_at(fs.info(path)))]
        found = fs.find(path, detail=True)
        return [(uri, storage.modified_at(found[p])) for p, uri in storage.visible_files(landing, found)]


def scan_landing(landing: str, archive: str, min_age_s: float = 0.0) -> list[LandingFile]:
    """Hash every landing file; mark what the main archive already holds or refused, and what
    was written less than ``min_age_s`` ago (too recent: maybe still being copied)."""
    qdir, odir = files_quarantine_uri(archive), other_logs_uri(archive)
    out = []
    now = time.time()
    for uri, modified in list_landing(landing):
        age = None if modified is None else max(0.0, now - modified)
        sha, size = storage.sha256(uri)
        if arc.has_manifest(archive, sha):
            status = "archived"
        elif storage.exists(storage.join(qdir, f"{sha}.json")):
            status = "quarantined"
        elif storage.exists(storage.join(odir, f"{sha}.json")):
            status = "other log"
        elif age is not None and age < min_age_s:
            status = "too recent"
        else:
            status = "new"
        out.append(LandingFile(uri, sha, size, status, None if age is None else round(age, 1)))
    return out


@dataclass
class StageResult:
    """What staging ingested: the ingest report, the whole files refused, the other logs, counts."""

    staging: str
    ingest: Any  # nadray.ingest.IngestReport
    refused: list[dict[str, Any]]
    other_logs: list[dict[str, Any]]

    def counts(self) -> dict[str, int]:
        r = self.ingest
        return {"files": len(r.files), "read": r.read, "archived": r.archived, "quarantined_rows": r.quarantined,
                "skipped": r.skipped, "files_refused": len(self.refused), "other_logs": len(self.other_logs)}


def stage(new_files: list[LandingFile], archive: str, date: str) -> StageResult:
    """Ingest ``new_files`` into a fresh ``<archive>/_staging/<date>/``; refused files kept whole,
    logs of another kind recorded."""
    from nadray.ingest import ingest

    st = staging_uri(archive, date)
    storage.rm(st, recursive=True)  # leftovers of an interrupted run: redone from the landing files
    storage.makedirs(st)
    report = ingest([f.uri for f in new_files], st, skip_other_logs=True)
    by_uri = {f.uri: f for f in new_files}
    refused, other = [], []
    for fr in report.files:
        f = by_uri.get(fr.source)
        if f is None or fr.status in ("ingested", "already ingested"):
            continue
        if fr.status == "skipped: not a flow log":
            rec = {"sha256": f.sha256, "source": f.uri, "size": f.size, "reason": "not a flow log", "night": date}
            storage.write_json_atomic(storage.join(other_logs_uri(st), f"{f.sha256}.json"), rec)
            other.append(rec)
        else:
            reason = fr.message or fr.status
            name = posixpath.basename(f.uri.rstrip("/")) or "input"
            qdir = files_quarantine_uri(st)
            storage.write_bytes_atomic(storage.join(qdir, f"{f.sha256}-{name}"), storage.read_bytes(f.uri))
            rec = {"sha256": f.sha256, "source": f.uri, "size": f.size, "reason": reason, "night": date,
                   "file": f"{f.sha256}-{name}", "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            storage.write_json_atomic(storage.join(qdir, f"{f.sha256}.json"), rec)
            refused.append(rec)
            log.warning("landing file %s refused and kept whole for the quarantine: %s", f.uri, reason)
    return StageResult(st, report, refused, other)


def window_paths(archive: str, date: str, start: Any, end: Any) -> list[str]:
    """Part files of main + staging overlapping ``[start, end)``; a part present in both
    (copied by an interrupted commit) counts once."""
    main = arc.dataset_paths(archive, start, end)
    seen = {"/".join(p.replace(os.sep, "/").rsplit("/", 2)[-2:]) for p in main}
    st = staging_uri(archive, date)
    staged = []
    if storage.exists(st):
        for p in arc.dataset_paths(st, start, end):
            if "/".join(p.replace(os.sep, "/").rsplit("/", 2)[-2:]) not in seen:
                staged.append(p)
    return main + staged


def held_dates(archive: str, date: str) -> tuple[str, str] | None:
    """(first, last) ``YYYY-MM-DD`` partition of main + this night's staging, or None when
    both are empty: what an empty window's error tells the user to aim at."""
    dates = set(arc.list_dates(archive)) if storage.exists(archive) else set()
    st = staging_uri(archive, date)
    if storage.exists(st):
        dates |= set(arc.list_dates(st))
    return (min(dates), max(dates)) if dates else None


def load_window(archive: str, date: str, start: Any, end: Any) -> pa.Table:
    """Flows of main + staging with ``start <= ts < end``, time-ordered.

    Read with pyarrow in the driver: the window is materialised once there anyway
    (features and splits are computed in-process, as ``data.load_flows`` does after
    its Ray Data read), and on small clusters Ray Data's fixed cost per read
    dominates a night's window.
    """
    import pyarrow.parquet as pq

    from nadray.data import sort_flows
    from nadray.schema import FLOW_SCHEMA

    paths = window_paths(archive, date, start, end)
    if not paths:
        return FLOW_SCHEMA.empty_table()
    fs, _ = storage.arrow_fs(paths[0])
    tables = [pq.read_table(storage.get_fs(p)[1], filesystem=fs, schema=FLOW_SCHEMA) for p in paths]
    table = pa.concat_tables(tables).cast(FLOW_SCHEMA)
    ts_type = FLOW_SCHEMA.field("ts").type
    table = table.filter(pc.greater_equal(table["ts"], pa.scalar(start, ts_type)))
    table = table.filter(pc.less(table["ts"], pa.scalar(end, ts_type)))
    return sort_flows(table)


def _rel(uri: str, root: str) -> list[str]:
    rel = str(uri)[len(str(root)):].replace(os.sep, "/").strip("/")
    return rel.split("/")


def _copy(src: str, dst: str) -> None:
    storage.write_bytes_atomic(dst, storage.read_bytes(src))


def commit(archive: str, date: str) -> dict[str, int]:
    """Move what was staged for ``date`` into the main archive (parts first, manifest last)."""
    st = staging_uri(archive, date)
    if not storage.exists(st):
        return {"inputs": 0, "parts": 0, "files_refused": 0, "other_logs": 0}
    entries = arc.list_manifest(st)
    n_parts = 0
    final: list[dict[str, Any]] = []
    for e in entries:
        sha = e["sha256"]
        # Hidden from readers (.pending) until its manifest entry. What an interrupted commit
        # copied goes first: a large file's piece parts are named by where it was cut.
        arc.remove_unfinished(archive, sha)
        arc.mark_pending(archive, sha, {"sha256": sha, "source": e.get("source"), "night": date,
                                        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        parts = []
        for p in e.get("parts", []):
            dst = storage.join(archive, *_rel(p, st))
            _copy(p, dst)
            parts.append(dst)
            n_parts += 1
        qparts = []
        for q in e.get("quarantine_parts", [storage.join(arc.quarantine_uri(st), f"part-{e['sha256']}.parquet")]):
            if storage.exists(q):
                dst = storage.join(arc.quarantine_uri(archive), posixpath.basename(str(q).replace(os.sep, "/")))
                _copy(q, dst)
                qparts.append(dst)
        final.append({**e, "parts": parts, "quarantine_parts": qparts, "night": date})
    qsrc, qdst = files_quarantine_uri(st), files_quarantine_uri(archive)
    names = storage.ls(qsrc)
    records = [n for n in names if n.endswith(".json") and not n.startswith(".")]
    for n in names:
        if not n.endswith(".json") and not n.startswith("."):
            _copy(storage.join(qsrc, n), storage.join(qdst, n))
    for n in records:
        _copy(storage.join(qsrc, n), storage.join(qdst, n))
    other = [n for n in storage.ls(other_logs_uri(st)) if n.endswith(".json") and not n.startswith(".")]
    for n in other:
        _copy(storage.join(other_logs_uri(st), n), storage.join(other_logs_uri(archive), n))
    for e in final:
        arc.write_manifest(archive, e["sha256"], e)
        try:
            arc.clear_pending(archive, e["sha256"])
        except OSError:  # harmless: the manifest entry already commits the parts
            log.debug("could not remove the pending marker of %s", e["sha256"], exc_info=True)
    storage.rm(st, recursive=True)
    _remove_empty_parent(archive)
    return {"inputs": len(final), "parts": n_parts, "files_refused": len(records), "other_logs": len(other)}


def discard(archive: str, date: str) -> None:
    """Remove the staging folder of ``date`` (a failed or stopped night)."""
    try:
        storage.rm(staging_uri(archive, date), recursive=True)
        _remove_empty_parent(archive)
    except Exception as e:  # cleanup must never hide the night's own error
        log.warning("could not remove staging %s: %s", staging_uri(archive, date), e)


def _remove_empty_parent(archive: str) -> None:
    root = storage.join(archive, STAGING_DIR)
    if not storage.is_s3(archive) and storage.exists(root) and not storage.ls(root):
        os.rmdir(storage.get_fs(root)[1])


def as_dicts(files: list[LandingFile]) -> list[dict[str, Any]]:
    return [asdict(f) for f in files]
