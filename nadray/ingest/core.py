"""``read_input`` and ``ingest``: inputs -> adapters -> archive, with counts that add up."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import logging
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from nadray import archive as arc
from nadray import storage
from nadray.errors import InputError, NadrayError, StorageError
from nadray.ingest import detect as _detect
from nadray.ingest import stream
from nadray.ingest.common import ReadResult

log = logging.getLogger(__name__)

FORMATS = ["zeek", "argus", "cicflowmeter", "unsw-nb15", "cs448b", "pcap"]
_HEAD = 1 << 16
# Seconds between progress lines while a large file is ingested in pieces.
PROGRESS_S = 10.0


class NotAFlowLog(InputError):
    """A log of another kind (Zeek dns.log, Suricata EVE, ...): skipped inside folders."""


class UnknownFormat(InputError):
    """Content that no adapter recognises."""


class EmptyInput(InputError):
    """A file with nothing but whitespace."""


def _adapter(fmt: str):
    if fmt == "zeek":
        from nadray.ingest import zeek as m
    elif fmt == "argus":
        from nadray.ingest import argus as m
    elif fmt == "cicflowmeter":
        from nadray.ingest import cicflowmeter as m
    elif fmt == "unsw-nb15":
        from nadray.ingest import unsw as m
    elif fmt == "cs448b":
        from nadray.ingest import cs448b as m
    elif fmt == "pcap":
        from nadray.ingest import pcap as m
    else:
        raise InputError(f"format: expected one of auto, {', '.join(FORMATS)}, got {fmt!r}")
    return m


# ---------------------------------------------------------------------------- reading


def load_bytes(uri: str) -> bytes:
    """The raw bytes of a local file or S3 object; a one-line InputError when unreadable."""
    with stream.open_raw(uri) as f:
        return stream.read(f, -1, uri)


def decompress(data: bytes, source: str) -> bytes:
    """Gunzip when ``data`` is gzip (by magic bytes), else return it unchanged."""
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{source}: broken gzip data: {e}") from None


def _blank(data: bytes) -> bool:
    return not data or data.isspace()  # without copying the file, as strip() would


def parse_bytes(data: bytes, source: str, fmt: str = "auto", local_path: str | None = None) -> ReadResult:
    """Parse decompressed content; ``local_path`` lets pcap read the file in place."""
    if _blank(data):
        raise EmptyInput(f"{source}: empty file")
    if fmt == "auto":
        found = _detect.detect(data[:_HEAD])
        if found == _detect.NOT_FLOW_LOG:
            raise NotAFlowLog(f"{source}: not a flow log (a Zeek or JSON log of another kind, e.g. dns.log)")
        if found == _detect.KDD:
            raise UnknownFormat(f"{source}: KDD Cup 99 / NSL-KDD connection records hold no timestamp and no host "
                                f"address, so they cannot be put in per-host time order; nadray reads flow logs "
                                f"that have both")
        if found is None:
            raise UnknownFormat(f"{source}: cannot recognise the format (expected pcap/pcapng, Zeek conn log, "
                                f"Argus binetflow, CICFlowMeter, UNSW-NB15 or cs448b CSV); try --format")
        fmt = found
    adapter = _adapter(fmt)
    try:
        if fmt == "pcap":
            return adapter.read(data, source, path=local_path)
        return adapter.read(data, source)
    except NadrayError:
        raise
    except Exception as e:  # never a traceback for a bad input: one line naming the file
        log.debug("parsing %s as %s failed", source, fmt, exc_info=True)
        raise InputError(f"{source}: cannot read as {fmt}: {type(e).__name__}: {e}") from None


def read_input(path: str, fmt: str = "auto") -> ReadResult:
    """Parse one input file (local or ``s3://``, ``.gz`` transparently) without writing anything.

    Returns a :class:`ReadResult` (``.flows`` FLOW_SCHEMA, ``.quarantine``
    QUARANTINE_SCHEMA, ``.read``, ``.format``). Raises ``InputError`` (one line,
    naming the file) when the input cannot be read at all.
    """
    raw = load_bytes(path)
    data = decompress(raw, path)
    return parse_bytes(data, path, fmt, local_path=_in_place(path, raw, data))


def _in_place(uri: str, raw: bytes, data: bytes) -> str | None:
    """``uri`` when its bytes on local disk are ``data`` (pcap reads such a file in place)."""
    return uri if (not storage.is_s3(uri) and data is raw) else None


# ----------------------------------------------------------------------------- report


@dataclass
class FileReport:
    """What happened to one input file."""

    source: str
    status: str  # "ingested", "already ingested", "skipped: not a flow log", "skipped: unrecognised", "failed"
    format: str | None = None
    read: int = 0
    archived: int = 0
    quarantined: int = 0
    skipped: int = 0
    message: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class IngestReport:
    """Counts of one ``ingest`` run: ``read == archived + quarantined + skipped``."""

    archive: str
    read: int = 0
    archived: int = 0
    quarantined: int = 0
    skipped: int = 0
    files: list[FileReport] = field(default_factory=list)
    failed_inputs: list[str] = field(default_factory=list)
    rows_per_s: float = 0.0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """False iff some input could not be read at all."""
        return not self.failed_inputs

    def summary(self) -> str:
        lines = [f"ingest into {self.archive}"]
        for f in self.files:
            if f.status == "ingested":
                extra = f" ({'; '.join(f.notes)})" if f.notes else ""
                lines.append(f"  {f.source} [{f.format}]: read {f.read}, archived {f.archived}, "
                             f"quarantined {f.quarantined}{extra}")
            elif f.status == "already ingested":
                lines.append(f"  {f.source}: already ingested ({f.skipped} rows skipped)")
            elif f.status.startswith("skipped"):
                lines.append(f"  {f.source}: {f.status}")
        for msg in self.failed_inputs:
            lines.append(f"  FAILED {msg}")
        lines.append(f"read {self.read} = archived {self.archived} + quarantined {self.quarantined} "
                     f"+ skipped {self.skipped} (already ingested)")
        lines.append(f"throughput: {self.rows_per_s:,.0f} rows/s")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- ingest


def input_files(inp: str, exclude: str | None = None) -> list[tuple[str, bool]]:
    """The files one input names, as (URI, found in a folder): the file itself, or every visible
    file under the folder (recursive, sorted: ``storage.visible_files``) but ``exclude`` and what
    is under it. Raises InputError naming ``inp`` when there is none, StorageError when its
    storage cannot be reached."""
    with storage.unreachable_as_error(inp, "list"):
        fs, path = storage.get_fs(inp)
        if not fs.exists(path):
            raise InputError(f"{inp}: no such file or folder")
        if not fs.isdir(path):
            return [(inp, False)]
        skip = storage.get_fs(exclude)[1].rstrip("/") if exclude else None
        found = [(uri, True) for p, uri in storage.visible_files(inp)
                 if not (skip and (p == skip or p.startswith(skip + "/")))]
    if not found:
        raise InputError(f"{inp}: folder holds no files")
    return found


def _expand(inp: str, archive: str) -> tuple[list[tuple[str, bool]], str | None]:
    """``input_files`` for ingest, never the archive itself; an error as its one-line message."""
    try:
        return input_files(inp, exclude=archive), None
    except NadrayError as e:  # InputError, StorageError: one line naming the URI
        return [], str(e)
    except (OSError, ValueError) as e:
        return [], f"{inp}: cannot list: {type(e).__name__}: {e}"


def _under(uri: str, roots: list[str]) -> bool:
    _, p = storage.get_fs(uri)
    for r in roots:
        _, rp = storage.get_fs(r)
        if storage.is_s3(uri) == storage.is_s3(r) and (p == rp or p.startswith(rp.rstrip("/") + "/")):
            return True
    return False


def _ingest_one(uri: str, from_folder: bool, archive: str, fmt: str, quarantine: str | None,
                piece_bytes: int | None = None, whole_bytes: int | None = None,
                skip_other_logs: bool = False) -> FileReport:
    piece_bytes, whole = stream.sizes(piece_bytes, whole_bytes)
    if stream.size(uri) <= whole:  # held anyway: one read gives the hash and the records
        raw = load_bytes(uri)
        sha = hashlib.sha256(raw).hexdigest()
        opened = contextlib.nullcontext(raw)
    else:  # too large to hold: hashed in one pass, then parsed a piece at a time
        raw = None
        sha = stream.sha256(uri)
        opened = stream.open_raw(uri)
    if arc.has_manifest(archive, sha):
        n = int(arc.read_manifest(archive, sha).get("read", 0))
        return FileReport(uri, "already ingested", read=n, skipped=n)
    local = None if storage.is_s3(uri) else uri
    with opened as f:
        pieces = (stream.iter_bytes(raw, uri, fmt, piece_bytes, local, whole) if raw is not None
                  else stream.iter_pieces(f, uri, fmt, piece_bytes, local, whole))
        try:
            first = next(pieces)
        except NotAFlowLog:
            if fmt == "auto" and (from_folder or skip_other_logs):
                return FileReport(uri, "skipped: not a flow log")
            raise
        except (UnknownFormat, EmptyInput):
            if fmt == "auto" and from_folder:
                return FileReport(uri, "skipped: unrecognised format")
            raise
        if arc.remove_unfinished(archive, sha, quarantine):  # an earlier attempt stopped midway
            log.info("ingest: %s: removed the parts of an earlier, unfinished ingest", uri)
        # Parts stay hidden from readers until the manifest entry commits them (archive.uncommitted_keys).
        arc.mark_pending(archive, sha, {"sha256": sha, "source": uri,
                                        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        fr = FileReport(uri, "ingested", format=first.format)
        parts, qparts = _write_pieces(archive, sha, itertools.chain([first], pieces), quarantine, fr)
    arc.write_manifest(archive, sha, {
        "sha256": sha, "source": uri, "format": fr.format, "read": fr.read,
        "archived": fr.archived, "quarantined": fr.quarantined, "notes": fr.notes,
        "parts": parts, "quarantine_parts": qparts,
        "ingested_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    try:
        arc.clear_pending(archive, sha)
    except OSError:  # harmless: the .json entry already commits the parts
        log.debug("could not remove the pending marker of %s", uri, exc_info=True)
    return fr


def _write_pieces(archive: str, sha: str, pieces: Iterable[ReadResult], quarantine: str | None,
                  fr: FileReport) -> tuple[list[str], list[str]]:
    """Write each piece's flows and quarantine, counting into ``fr``; (flow parts, quarantine parts)."""
    parts: list[str] = []
    qparts: list[str] = []
    t0 = shown = time.perf_counter()
    try:
        for res in pieces:
            key = sha if res.piece is None else f"{sha}-{res.piece:05d}"
            parts += arc.write_flows(archive, res.flows, key=key)
            q = arc.write_quarantine(archive, res.quarantine, key=key, quarantine=quarantine)
            qparts += [q] if q else []
            fr.read += res.read
            fr.archived += res.flows.num_rows
            fr.quarantined += res.quarantined
            fr.notes += [n for n in res.notes if n not in fr.notes]
            if res.piece is not None and time.perf_counter() - shown >= PROGRESS_S:  # a large file's progress
                shown = time.perf_counter()
                log.info("ingest: %s: %d records in %.0f s (piece %d)", fr.source, fr.read, shown - t0, res.piece + 1)
    except NadrayError as e:
        if not isinstance(e, StorageError):  # a later piece was unreadable: the file is refused whole
            _discard(archive, sha, parts + qparts)
        raise
    return parts, qparts


def _discard(archive: str, sha: str, uris: list[str]) -> None:
    """Remove what a refused input had written (its .pending marker hides it until then)."""
    try:
        for u in uris:
            storage.rm(u)
        arc.clear_pending(archive, sha)
    except Exception:  # the input's own error matters more; a rerun removes what is left (remove_unfinished)
        log.debug("could not remove the parts of refused input %s", sha, exc_info=True)


def ingest(inputs: list[str], archive: str, fmt: str = "auto", quarantine: str | None = None,
           skip_other_logs: bool = False) -> IngestReport:
    """Read files and folders into the archive; bad records go to the quarantine.

    Parameters
    ----------
    inputs : files or folders, local or ``s3://`` (folders are searched recursively;
        there, files that are not flow logs are skipped and reported).
    archive : archive root (local folder or ``s3://bucket/prefix``).
    fmt : ``auto`` (detect per file from content) or one of ``FORMATS``.
    quarantine : where quarantined records go (default ``<archive>/_quarantine``).
    skip_other_logs : skip a file named directly that is a log of another kind (Zeek
        ``dns.log``), as in a folder, instead of failing it: the nightly job names the
        landing folder's new files one by one.

    Returns an :class:`IngestReport`; ``ok`` is False when some input could not be
    read at all (its one-line message is in ``failed_inputs``).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"format: expected one of auto, {', '.join(FORMATS)}, got {fmt!r}")
    report = IngestReport(archive=str(archive))
    storage.makedirs(archive)
    t0 = time.perf_counter()
    busy = 0.0
    parsed_rows = 0
    stopped = None
    for inp in inputs:
        if stopped:
            break
        files, err = _expand(str(inp), str(archive))
        if err:
            log.debug("%s", err)
            report.failed_inputs.append(err)
            continue
        for uri, from_folder in files:
            t1 = time.perf_counter()
            try:
                fr = _ingest_one(uri, from_folder, str(archive), fmt, quarantine, skip_other_logs=skip_other_logs)
            except StorageError as e:
                fr = FileReport(uri, "failed", message=f"{uri}: {e}")
                report.failed_inputs.append(fr.message)
                log.debug("%s", fr.message)
                if _under(e.uri, [str(archive), arc.quarantine_uri(str(archive), quarantine)]):
                    # Every other input would wait out the same retries: stop now, say so once.
                    stopped = (f"{archive}: ingest stopped: the archive's storage is unreachable; "
                               f"the remaining inputs were not attempted (rerun to finish)")
            except NadrayError as e:
                fr = FileReport(uri, "failed", message=str(e))
                report.failed_inputs.append(str(e))
                log.debug("%s", e)
            except Exception as e:  # storage trouble etc.: still one line, never a traceback
                log.debug("ingest of %s failed", uri, exc_info=True)
                fr = FileReport(uri, "failed", message=f"{uri}: {type(e).__name__}: {e}")
                report.failed_inputs.append(fr.message)
                log.debug("%s", fr.message)
            if fr.status == "ingested":
                busy += time.perf_counter() - t1
                parsed_rows += fr.read
            report.files.append(fr)
            report.read += fr.read
            report.archived += fr.archived
            report.quarantined += fr.quarantined
            report.skipped += fr.skipped
            if stopped:
                break
    if stopped:
        report.failed_inputs.append(stopped)
    report.elapsed_s = time.perf_counter() - t0
    report.rows_per_s = parsed_rows / busy if busy > 0 else 0.0
    return report
