"""Large inputs in pieces: a text flow log parsed about ``PIECE_BYTES`` at a time.

Why: parsing holds about five times a file's size (a 163 MB Zeek CSV of 1.2M flows
took +865 MB to ingest whole), so one daily conn.log of several GB would need tens of
GB. Every text format here has one record per line and its header at the top, so a
large file is cut at line ends, each later piece is given the file's header again, and
its ``source_row`` numbers are shifted by the records before it: the pieces together
hold the same flows, quarantine rows and counts as the whole file parsed at once.

An input of at most ``WHOLE_BYTES`` (most: Zeek rotates its logs hourly) is parsed
whole, exactly as ``read_input`` parses it. pcap is binary and never cut; a large one is
read from disk by the flow meter, not held (``_capture``).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import re
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from nadray import storage
from nadray.errors import InputError, StorageError
from nadray.ingest.common import ReadResult, shift_rows, strip_bom
from nadray.ingest.detect import PCAP_MAGIC, PCAPNG_MAGIC

# Decompressed bytes per piece. Parsing one holds about 5x this (~120k Zeek records).
# Ingesting a 326 MB Zeek CSV (2.4M flows, 2-core machine, alternated): 16 MB pieces
# 4.7-5.0 s and +0.33 GB peak, 64 MB pieces 5.8-5.9 s and +0.59 GB (a buffer over glibc's
# 32 MB mmap threshold is fresh zeroed pages each time; below it, reused heap).
PIECE_BYTES = 16 << 20
# Inputs up to this are parsed whole (about 5x it in memory at most), as before pieces
# existed: most logs are smaller (Zeek rotates hourly), and a whole parse skips the
# second read for the hash and the per-piece parts in the archive.
WHOLE_BYTES = 64 << 20
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)
_TEXT = re.compile(rb"\S")


def sizes(piece_bytes: int | None = None, whole_bytes: int | None = None) -> tuple[int, int]:
    """(bytes per piece, largest input parsed whole): the module's settings unless given."""
    piece = PIECE_BYTES if piece_bytes is None else piece_bytes
    if piece < 1:
        raise ValueError(f"piece_bytes: expected a positive byte count, got {piece}")
    return piece, max(WHOLE_BYTES, piece) if whole_bytes is None else max(whole_bytes, piece)


@contextlib.contextmanager
def _as_input_error(uri: str, gz: bool = False) -> Iterator[None]:
    """Any failure to reach or read ``uri`` becomes one InputError naming it."""
    try:
        with storage.unreachable_as_error(uri, "read"):
            yield
    except InputError:
        raise
    except StorageError as e:  # already one line naming the URI
        raise InputError(str(e)) from None
    except (OSError, EOFError, zlib.error, ValueError) as e:
        if gz and isinstance(e, _GZIP_ERRORS):
            raise InputError(f"{uri}: broken gzip data: {e}") from None
        raise InputError(f"{uri}: cannot read: {type(e).__name__}: {e}") from None


@contextlib.contextmanager
def open_raw(uri: str) -> Iterator[BinaryIO]:
    """The stored bytes of a local file or S3 object, as a stream; one-line errors naming ``uri``."""
    with _as_input_error(uri):
        fs, path = storage.get_fs(uri)
        if not fs.exists(path):
            raise InputError(f"{uri}: no such file or object")
        if fs.isdir(path):
            raise InputError(f"{uri}: is a folder, expected a file")
        f = fs.open(path, "rb")
    with f:
        yield f


def size(uri: str) -> int:
    """Stored size of ``uri`` in bytes (compressed, for a .gz)."""
    with _as_input_error(uri):
        fs, path = storage.get_fs(uri)
        return int(fs.size(path))


def sha256(uri: str) -> str:
    """Content hash of ``uri``, read a block at a time (never held whole)."""
    with _as_input_error(uri):
        return storage.sha256(uri)[0]


def read(f: BinaryIO, n: int, uri: str, gz: bool = False) -> bytes:
    """``f.read(n)`` (-1: the rest), any failure one InputError naming ``uri``."""
    with _as_input_error(uri, gz):
        return f.read(n)


def header(fmt: str, body: bytes) -> bytes:
    """The lines that must precede a later piece of a ``fmt`` file whose first piece is ``body``
    (for a Zeek TSV: those before the last '#fields' line of ``body``, ``_last_zeek_header``)."""
    body = strip_bom(body)
    first = _first_line(body)
    start = first.lstrip()
    if fmt == "zeek" and start.startswith(b"{"):
        return b""  # JSON lines: no header
    if fmt == "zeek" and start.startswith(b"#"):
        # TSV: the '#' block (separator, fields, unset/empty markers) of the last '#fields' line:
        # a header that comes back later in the file (logs joined with cat) holds from there on.
        return _last_zeek_header(body)
    if fmt == "unsw-nb15":
        from nadray.ingest.unsw import COLUMNS

        # Its CSVs may lack a header: give later pieces the documented one, which the adapter
        # reads as a header (a first data line would be checked as the file's shape).
        return (",".join(COLUMNS) + "\n").encode()
    return first if first.endswith(b"\n") else first + b"\n"


def _first_line(body: bytes) -> bytes:
    """The first non-blank line of ``body``, with its line end, as ``splitlines`` cuts lines,
    without splitting the rest of a 16 MB piece."""
    pos = 0
    while pos < len(body):
        end = body.find(b"\n", pos) + 1 or len(body)
        for ln in body[pos:end].splitlines(keepends=True):  # a bare CR ends a line here too
            if ln.strip():
                return ln
        pos = end
    return b""


def _last_zeek_header(body: bytes) -> bytes:
    """The '#' lines around the last '#fields' line of a Zeek TSV ``body`` (not a '#close' before it)."""
    k = len(body)
    while True:
        k = body.rfind(b"#fields", 0, k)
        line = body.rfind(b"\n", 0, k) + 1
        if k < 0 or not body[line:k].strip():  # at a line's start (maybe indented), not inside a record
            break
    if k < 0:
        return b""
    end = body.find(b"\n", k) + 1 or len(body)  # past the '#fields' line, then its '#types' and the like
    while end < len(body):
        nxt = body.find(b"\n", end) + 1 or len(body)
        text = body[end:nxt]
        if text.strip() and not text.lstrip().startswith(b"#"):
            break
        end = nxt
    begin = line
    while begin > 0:
        prev = body.rfind(b"\n", 0, begin - 1) + 1
        text = body[prev:begin].lstrip()
        if text and (not text.startswith(b"#") or text.startswith(b"#close")):  # blank lines are passed
            break
        begin = prev
    return body[begin:end].lstrip(b"\r\n")


def _shift(res: ReadResult, offset: int, piece: int) -> ReadResult:
    """``res`` as piece ``piece`` of its input, ``source_row`` counted past ``offset`` earlier records."""
    res = shift_rows(res, offset)
    res.piece = piece
    return res


def iter_pieces(raw: BinaryIO, uri: str, fmt: str = "auto", piece_bytes: int | None = None,
                local_path: str | None = None, whole_bytes: int | None = None) -> Iterator[ReadResult]:
    """Parse the input stream ``raw`` (``.gz`` transparently) in pieces of about ``piece_bytes``.

    Yields one ReadResult whose ``piece`` is None when the input has at most
    ``whole_bytes`` (default ``WHOLE_BYTES``; never below ``piece_bytes``) decompressed bytes (parsed
    exactly as ``read_input`` parses a file), else one per piece, numbered from 0, with
    ``source_row`` counted over the whole input. ``local_path``: ``uri`` on local disk,
    which pcap reads in place when the file is not compressed.
    """
    from nadray.ingest.core import parse_bytes

    piece_bytes, whole = sizes(piece_bytes, whole_bytes)
    gz = read(raw, 2, uri, gz=False) == b"\x1f\x8b"
    raw.seek(0)
    stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore[assignment]
    buf, eof = _fill(stream, bytearray(), whole + 1, uri, gz)
    if eof:  # small enough to parse whole
        data = bytes(buf)
        buf.clear()  # not held beside its copy while the parse runs
        yield parse_bytes(data, uri, fmt, local_path=None if gz else local_path)
        return
    if fmt == "pcap" or (fmt == "auto" and (bytes(buf[:4]) in PCAP_MAGIC or buf[:4] == PCAPNG_MAGIC)):
        # Binary: not cut in pieces. The flow meter reads a file, so one on local disk is
        # read in place; any other (S3, gzip) is first copied to a local temporary file.
        yield _capture(stream, buf, uri, None if gz else local_path, gz)
        return
    offset, piece, prefix = 0, 0, b""
    while True:
        if not eof:
            buf, eof = _fill(stream, buf, piece_bytes, uri, gz)
        if not buf:
            return
        cut = _cut(stream, buf, eof, piece_bytes, uri, gz)
        if piece and not _TEXT.search(buf, 0, cut):  # blank lines only: no records
            del buf[:cut]
            continue
        with memoryview(buf) as view:  # one copy per piece, with the header in front
            body = b"".join([prefix, view[:cut]])
        del buf[:cut]
        res = parse_bytes(body, uri, fmt)
        if piece == 0:
            fmt = res.format
            prefix = header(fmt, body)
        elif fmt == "zeek" and prefix.lstrip().startswith(b"#"):  # TSV: its header may come back, changed
            prefix = _last_zeek_header(body)  # (a JSON piece's first line is a record, maybe a bad one)
        del body
        yield _shift(res, offset, piece)
        offset += res.read
        piece += 1


def _capture(stream: BinaryIO, head: bytearray, uri: str, local_path: str | None, gz: bool) -> ReadResult:
    """A large pcap/pcapng through the flow meter without holding it: ``head`` is what was read."""
    import os
    import tempfile

    from nadray.ingest import pcap

    if local_path is not None:
        return pcap.read_file(local_path, uri)
    fd, tmp = tempfile.mkstemp(suffix=".pcap", prefix="nadray-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(head)
            head.clear()
            while chunk := read(stream, PIECE_BYTES, uri, gz):
                out.write(chunk)
        return pcap.read_file(tmp, uri)
    finally:
        os.remove(tmp)


def _fill(stream: BinaryIO, buf: bytearray, n: int, uri: str, gz: bool) -> tuple[bytearray, bool]:
    """``buf`` read up to ``n`` bytes; and whether the input ended first."""
    while len(buf) < n:
        chunk = read(stream, n - len(buf), uri, gz)
        if not chunk:
            return buf, True
        buf += chunk
    return buf, False


def _cut(stream: BinaryIO, buf: bytearray, eof: bool, piece_bytes: int, uri: str, gz: bool) -> int:
    """Length of the next piece at the front of ``buf``: whole lines, at most ``piece_bytes``
    unless one line is longer (then that line alone; ``buf`` is read on to its end)."""
    if eof and len(buf) <= piece_bytes:
        return len(buf)
    cut = buf.rfind(b"\n", 0, piece_bytes) + 1
    if cut:
        return cut
    nl = buf.find(b"\n", piece_bytes)
    while nl < 0:
        seen = len(buf)
        buf, eof = _fill(stream, buf, seen + piece_bytes, uri, gz)
        nl = buf.find(b"\n", seen)
        if eof and nl < 0:
            return len(buf)
    return nl + 1


def iter_input(uri: str, fmt: str = "auto", piece_bytes: int | None = None,
               whole_bytes: int | None = None) -> Iterator[ReadResult]:
    """Parse one input file (local or ``s3://``) a piece at a time, writing nothing (see ``iter_pieces``)."""
    with open_raw(uri) as f:
        yield from iter_pieces(f, uri, fmt, piece_bytes, None if storage.is_s3(uri) else uri, whole_bytes)


def iter_bytes(data: bytes, uri: str, fmt: str = "auto", piece_bytes: int | None = None,
               local_path: str | None = None, whole_bytes: int | None = None) -> Iterator[ReadResult]:
    """``iter_pieces`` over stored bytes already in memory (a small file read once for its hash)."""
    _, whole = sizes(piece_bytes, whole_bytes)
    if len(data) <= whole and data[:2] != b"\x1f\x8b":  # parsed whole, without a copy
        from nadray.ingest.core import parse_bytes

        yield parse_bytes(data, uri, fmt, local_path=local_path)
    else:
        yield from iter_pieces(io.BytesIO(data), uri, fmt, piece_bytes, local_path, whole_bytes)
