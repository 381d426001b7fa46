"""Zeek ``conn.log`` in its three shapes: TSV, JSON lines, and the IoT-23 CSV conversion.

Shapes recognised (see docs/INGEST.md):

* **TSV** with Zeek's header lines (``#separator``, ``#fields``, ``#types``,
  ``#unset_field`` = ``-``, ``#empty_field`` = ``(empty)``). Lines starting with
  ``#`` (also ``#close``) are not records. The Stratosphere labelled variant
  (``conn.log.labeled``) has extra ``label`` and ``detailedlabel`` fields; when
  the header lists them space-separated after ``tunnel_parents`` (as the raw
  IoT-23 files do), runs of three spaces in records are read as separators.
* **JSON lines** (``{"ts": ..., "id.orig_h": ...}``), ``ts`` as epoch seconds or
  an ISO 8601 string; missing keys are unset.
* **IoT-23 CSV** (comma-separated, header ``ts,uid,id.orig_h,...,label,detailed-label``,
  unset values as empty fields or ``-``).

Field mapping: ``ts`` -> ts, ``id.orig_h``/``id.resp_h`` -> src_ip/dst_ip,
``id.orig_p``/``id.resp_p`` -> ports, ``proto``, ``service``, ``duration``,
``orig_bytes``/``resp_bytes`` (payload bytes) -> src_bytes/dst_bytes,
``orig_pkts``/``resp_pkts`` -> src_pkts/dst_pkts, ``conn_state``,
``local_orig``/``local_resp`` (``T``/``F``) -> local_orig/local_resp.
Required: ts, id.orig_h, id.resp_h, proto.

Labels (when a ``label`` column exists): text containing Malicious (or Botnet,
Malware, Attack) -> 1; Benign / benign / Normal -> 0; Unknown, ``-``, empty -> null.
``label_detail`` keeps the source text: ``label`` alone, or ``label: detailed-label``
when the detailed label is set (e.g. ``Malicious: PartOfAHorizontalPortScan``).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nadray.errors import InputError
from nadray.ingest.common import (
    ReadResult, Records, TypedMiss, Validator, assemble, concat_results, convert_in_chunks, decode_raw, fast_records,
    has_padding, label_of_text, map_labels, split_lines, split_records, strip_bom,
)

FORMAT = "zeek"
REQUIRED = ["ts", "id.orig_h", "id.resp_h", "proto"]
CONN_HINTS = {"conn_state", "orig_bytes", "duration", "orig_pkts", "history"}
LABEL_COLS = ("label",)
DETAIL_COLS = ("detailed-label", "detailedlabel", "detailed_label")
USED = set(REQUIRED) | {"id.orig_p", "id.resp_p", "duration", "orig_bytes", "resp_bytes", "orig_pkts", "resp_pkts",
                        "conn_state", "service", "local_orig", "local_resp"} | set(LABEL_COLS) | set(DETAIL_COLS)
# The fast paths let pyarrow.csv read these as numbers, and the null spellings as null, in
# its parallel parse, instead of the conversion casting and comparing text afterwards (on
# 16 cores the conversion was most of ingest's time). Integers stay text: Arrow's integer
# parser reads '0x1f', which the rules refuse, and finding hex fields in the bytes cost
# more than the cast (Validator.integer checks each column's own bytes).
NUMBERS = {"ts": pa.float64(), "duration": pa.float64()}
CSV_NULLS = ("", "-", "(empty)")


def is_conn_columns(cols) -> bool:
    cols = set(cols)
    return all(c in cols for c in REQUIRED) and bool(cols & CONN_HINTS)


def read(data: bytes, source: str) -> ReadResult:
    """Parse a Zeek conn log (any of the three shapes) into canonical flows + quarantine."""
    fast = _read_tsv_fast(data, source)
    if fast is None:
        fast = _read_csv_fast(data, source)
    if fast is not None:
        return fast
    lines = split_lines(data)
    first = next((ln for ln in lines if ln.strip()), b"")
    s = first.lstrip()
    if s.startswith(b"#"):
        return _read_tsv(lines, source)
    if s.startswith(b"{"):
        return _read_json(lines, source)
    return _read_csv(lines, source)


def _unescape(v: str) -> str:
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), v)


def _read_tsv_fast(data: bytes, source: str) -> ReadResult | None:
    """Plain Zeek TSV (header block, records, optional '#close'): one pyarrow.csv call."""
    if not data.startswith(b"#separator \\x09\n"):
        return None
    pos = 0
    header: list[bytes] = []
    while data.startswith(b"#", pos):
        end = data.find(b"\n", pos)
        if end < 0:
            return None
        header.append(data[pos:end])
        pos = end + 1
    # The records are data[start:end], never sliced off (that would copy the file).
    start, end = pos, len(data)
    tail = data.rfind(b"\n#close", start)
    if tail >= 0 and b"\n" not in data[tail + 1:].rstrip(b"\n"):
        end = tail + 1
    if data.find(b"\n#", start, end) >= 0 or data.find(b"   ", start, end) >= 0:
        return None
    fields = next((h for h in header if h.startswith(b"#fields\t")), None)
    if fields is None or b" " in fields:
        return None
    columns = fields.decode("utf-8", "replace").split("\t")[1:]
    _check_columns(columns, source)
    unset = next((h.split(b"\t", 1)[1].decode() for h in header if h.startswith(b"#unset_field\t")), "-")
    empty = next((h.split(b"\t", 1)[1].decode() for h in header if h.startswith(b"#empty_field\t")), "(empty)")
    return _read_records_fast(data, columns, b"\t", start, end, (unset, empty, ""), source)


@dataclass
class _TsvHeader:
    """The header lines in effect for a run of TSV records."""

    sep: bytes = b"\t"
    columns: list[str] | None = None
    unset: str = "-"
    empty: str = "(empty)"
    spaced: bool = False  # label fields listed space-separated (raw IoT-23): runs of 3 spaces separate

    def update(self, text: str) -> None:
        """Apply one '#' line (others, such as #path, #open, #close, #types, change nothing read)."""
        sep = self.sep.decode()
        if text.startswith("#separator"):
            self.sep = _unescape(text[len("#separator"):].strip() or "\\x09").encode()
        elif text.startswith("#fields"):
            self.columns, self.spaced = [], False
            for p in text.rstrip("\n").split(sep)[1:]:
                if " " in p.strip():
                    self.spaced = True
                    self.columns.extend(p.split())
                else:
                    self.columns.append(p.strip())
        elif text.startswith("#unset_field"):
            self.unset = text.split(sep, 1)[-1].strip() or "-"
        elif text.startswith("#empty_field"):
            self.empty = text.split(sep, 1)[-1].strip() or "(empty)"


def _tsv_runs(lines: list[bytes]) -> list[tuple[_TsvHeader, list[bytes]]]:
    """The records in runs, each with the header in effect: a header block that comes back
    after records (logs joined with ``cat``, maybe across a restart that changed the fields)
    holds for the records after it. Adjacent runs under the same header are one run."""
    runs: list[tuple[_TsvHeader, list[bytes]]] = []
    head, data = _TsvHeader(), []
    for ln in lines:
        if not ln.strip():
            continue
        st = ln.lstrip() if ln[:1] in (b" ", b"\t") else ln
        if st[:1] != b"#":
            data.append(ln)
            continue
        if data:  # a header after records: a new run, starting from the current header
            runs.append((head, data))
            head, data = replace(head), []  # update() gives '#fields' a new list: no copy needed
        head.update(decode_raw(st))
    runs.append((head, data))
    merged = [runs[0]]
    for h, d in runs[1:]:
        if h == merged[-1][0]:
            merged[-1][1].extend(d)
        elif d:
            merged.append((h, d))
    return merged


def _read_tsv(lines: list[bytes], source: str) -> ReadResult:
    runs = _tsv_runs(lines)
    parts = [_read_tsv_run(head, data, source) for head, data in runs]
    return parts[0] if len(parts) == 1 else concat_results(parts)


def _read_tsv_run(head: _TsvHeader, data: list[bytes], source: str) -> ReadResult:
    if head.columns is None:
        raise InputError(f"{source}: Zeek log without a '#fields' header line")
    _check_columns(head.columns, source)
    if head.spaced:
        data = [ln.replace(b"   ", head.sep) for ln in data]
    recs = split_records(data, head.columns, head.sep, "Zeek", keep=USED)
    return _convert(recs, source, nulls=(head.unset, head.empty, ""))


def _csv_header(line: bytes, source: str) -> tuple[list[str], bytes]:
    header = decode_raw(line).strip()
    sep = b"\t" if header.count("\t") > header.count(",") else b","
    columns = [c.strip() for c in header.split(sep.decode())]
    _check_columns(columns, source)
    return columns, sep


def _read_csv_fast(data: bytes, source: str) -> ReadResult | None:
    """Clean CSV (header on the first line, then records only): the bytes after the
    header go to pyarrow.csv in one call, never split into lines (``common.fast_records``).

    None when the file needs the line-by-line path (blank or comment lines, a
    record with the wrong field count, bad UTF-8, a bare CR, ...), which gives the
    same rows and ``source_row`` numbers.
    """
    data = strip_bom(data)
    if b"\r" in data and b"\r\n" in data:  # memchr first: a two-byte search is slow on text with many LFs
        data = data.replace(b"\r\n", b"\n")  # as split_lines does
    nl = data.find(b"\n")
    if nl <= 0:
        return None
    first = data[:nl]
    start = first.lstrip()
    if not start.strip() or start[:1] in (b"#", b"{") or first[:1] in (b" ", b"\t"):
        return None
    start = nl + 1  # the records: data[start:], never sliced off (that would copy the file)
    if data[start:start + 1] in (b"", b"\n"):
        return None
    columns, sep = _csv_header(first, source)
    return _read_records_fast(data, columns, sep, start, None, CSV_NULLS, source)


def _read_records_fast(data: bytes, columns: list[str], sep: bytes, start: int, end: int | None, nulls,
                       source: str) -> ReadResult | None:
    """Both fast paths' records ``data[start:end]``: one ``pyarrow.csv`` call that reads the
    floats and the null spellings itself (``fast_records(types=...)``), with the padding scan
    beside it (both release the GIL), then the conversion. Where a value breaks a rule
    (TypedMiss) the records are read again as text, so the flows and the quarantine (which
    quotes raw values) are exactly the line path's; a clean file is read once. Values are
    trimmed where the file has padding, as the line paths trim: a value means the same
    whichever path its file takes. None: the file needs the line path."""
    with ThreadPoolExecutor(1, thread_name_prefix="nadray-padding") as pool:
        scan = pool.submit(has_padding, data, start, end, sep)
        recs = fast_records(data, columns, sep, keep=USED, start=start, end=end, types=NUMBERS, nulls=nulls)
        padded = scan.result()
    if recs is not None and recs.typed:
        try:
            return _convert(recs, source, nulls=nulls, padded=padded)
        except TypedMiss:
            recs = fast_records(data, columns, sep, keep=USED, start=start, end=end)
    if recs is None:
        return None
    return _convert(recs, source, nulls=nulls, padded=padded)


def _read_csv(lines: list[bytes], source: str) -> ReadResult:
    it = iter(i for i, ln in enumerate(lines) if ln.strip())
    h = next(it, None)
    if h is None:
        raise InputError(f"{source}: empty file")
    columns, sep = _csv_header(lines[h], source)
    data = lines[h + 1:]
    recs = fast_records(b"\n".join(data), columns, sep, keep=USED) if all(data[:1]) else None
    if recs is None:
        data = [ln for ln in data if ln.strip()]
        recs = split_records(data, columns, sep, "Zeek CSV", keep=USED)
    return _convert(recs, source, nulls=("", "-", "(empty)"))


def _json_str(v) -> str:
    if v is None:
        return ""
    if v is True:
        return "T"
    if v is False:
        return "F"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return ",".join(_json_str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v)
    return str(v)


def _read_json(lines: list[bytes], source: str) -> ReadResult:
    data = [ln for ln in lines if ln.strip()]
    wanted = ["ts", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "service", "duration",
              "orig_bytes", "resp_bytes", "orig_pkts", "resp_pkts", "conn_state", "local_orig", "local_resp",
              "label", "detailed-label", "detailedlabel"]
    cols: dict[str, list[str]] = {c: [] for c in wanted}
    rows: list[int] = []
    good_lines: list[bytes] = []
    bad: list[tuple[int, str, str]] = []
    loads = json.loads
    for i, ln in enumerate(data):
        try:
            obj = loads(ln)
        except (ValueError, UnicodeDecodeError) as e:
            bad.append((i, decode_raw(ln), f"record is not valid JSON ({str(e).split(':')[0]})"))
            continue
        if not isinstance(obj, dict):
            bad.append((i, decode_raw(ln), f"record is not a JSON object, got {type(obj).__name__}"))
            continue
        for c in wanted:
            cols[c].append(_json_str(obj.get(c)))
        rows.append(i)
        good_lines.append(ln)
    table = pa.table({c: pa.array(v, pa.string()) for c, v in cols.items()})
    if not any(cols["detailed-label"]):
        table = table.drop_columns(["detailed-label"])
    if not any(cols["detailedlabel"]):
        table = table.drop_columns(["detailedlabel"])
    if not any(cols["label"]):
        table = table.drop_columns(["label"])
    recs = Records(table.column_names, table, np.asarray(rows, dtype=np.int64), good_lines, bad, len(data))
    return _convert(recs, source, nulls=("", "-", "(empty)"), missing_ok=True)


def _check_columns(columns: list[str], source: str) -> None:
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise InputError(f"{source}: not a Zeek conn log: missing column(s) {', '.join(missing)} "
                         f"(columns: {', '.join(columns[:12])}{', ...' if len(columns) > 12 else ''})")


def _bool(v: Validator, arr: pa.Array, name: str, nulls) -> pa.Array:
    arr = v.trim(arr)
    isnull = v.unset(arr, nulls)
    if pc.all(isnull).as_py():  # unset in the whole log, as in most captures: nothing to read
        return pa.nulls(len(arr), pa.bool_())
    low = pc.utf8_lower(arr)
    t = pc.is_in(low, value_set=pa.array(["t", "true", "1"]))
    f = pc.is_in(low, value_set=pa.array(["f", "false", "0"]))
    v.fail(pc.and_(pc.invert(isnull), pc.invert(pc.or_(t, f))), name, "T or F", arr)
    return pc.if_else(t, True, pc.if_else(f, False, pa.scalar(None, pa.bool_())))


def _zeek_label_detail(v: Validator, label: pa.Array, detail: pa.Array | None, nulls) -> pa.Array:
    lab = v.optional_str(label, nulls)
    if detail is None:
        return lab
    det = v.trim(detail)
    det_set = pc.invert(v.unset(det, nulls))
    joined = pc.binary_join_element_wise(pc.fill_null(lab, ""), det, ": ")
    return pc.if_else(det_set, joined, lab)


def _convert(recs: Records, source: str, nulls, missing_ok: bool = False, padded: bool = True) -> ReadResult:
    """String (or number, ``Records.typed``) columns -> canonical flows. Values are trimmed
    before the rules unless ``padded=False`` says none has padding (``common.has_padding``)."""
    return convert_in_chunks(recs, lambda r: _convert_rows(r, source, nulls, missing_ok, padded))


def _convert_rows(recs: Records, source: str, nulls, missing_ok: bool, padded: bool) -> ReadResult:
    t = recs.table
    n = t.num_rows
    v = Validator(n, trim=padded, typed=recs.typed)
    names = t.column_names

    def col(name):
        return t.column(name).combine_chunks() if name in names else None

    out: dict[str, object] = {}
    out["ts"] = v.epoch_seconds(col("ts"), "ts", nulls=nulls, iso_ok=True)
    out["src_ip"] = v.required(col("id.orig_h"), "id.orig_h", nulls=nulls)
    out["dst_ip"] = v.required(col("id.resp_h"), "id.resp_h", nulls=nulls)
    out["proto"] = pc.utf8_lower(v.required(col("proto"), "proto", nulls=nulls))
    for zname, cname in (("id.orig_p", "src_port"), ("id.resp_p", "dst_port")):
        a = col(zname)
        out[cname] = None if a is None else v.integer(a, zname, nulls=nulls, lo=0, hi=65535, out=pa.int32())
    a = col("duration")
    out["duration"] = None if a is None else v.number(a, "duration", nulls=nulls)
    for zname, cname in (("orig_bytes", "src_bytes"), ("resp_bytes", "dst_bytes"),
                         ("orig_pkts", "src_pkts"), ("resp_pkts", "dst_pkts")):
        a = col(zname)
        out[cname] = None if a is None else v.integer(a, zname, nulls=nulls)
    for zname in ("conn_state", "service"):
        a = col(zname)
        out[zname] = None if a is None else v.optional_str(a, nulls=nulls)
    for zname in ("local_orig", "local_resp"):
        a = col(zname)
        out[zname] = None if a is None else _bool(v, a, zname, nulls)
    lab = next((col(c) for c in LABEL_COLS if c in names), None)
    if lab is not None:
        det = next((col(c) for c in DETAIL_COLS if c in names), None)
        out["label_detail"] = _zeek_label_detail(v, lab, det, nulls)
        out["label"] = map_labels(v.trim(lab), label_of_text)
    return assemble(source, FORMAT, recs.read, recs.rows, out, v, recs.lines, recs.bad)
