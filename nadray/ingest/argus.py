"""Argus bidirectional flows (``.binetflow``), comma- or tab-separated.

Header: ``StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,sTos,dTos,
TotPkts,TotBytes[,SrcBytes][,SrcPkts][,srcUdata,dstUdata][,Label]``.

Field mapping: ``StartTime`` (``2019/04/04 16:23:00.325010``; relative clocks
``1970/01/01 ...`` are kept as they are; the text has no zone and is read as UTC)
-> ts; ``Dur`` -> duration; ``Proto`` -> proto (lower case); ``SrcAddr``/``DstAddr``
-> src_ip/dst_ip; ``Sport``/``Dport`` -> ports (decimal or hex like ``0x0303``;
empty -> null); ``State`` -> conn_state; ``SrcBytes`` -> src_bytes,
``TotBytes - SrcBytes`` -> dst_bytes; ``SrcPkts`` -> src_pkts, ``TotPkts - SrcPkts``
-> dst_pkts (both null when the file has no ``SrcPkts``; likewise bytes without
``SrcBytes``). Argus counts whole packets, so these bytes include headers.

Labels (``Label`` column, may be missing or empty): text containing Botnet,
Malware, Malicious or Attack -> 1; Normal, Benign or LEGITIMATE -> 0;
Background, anything else, or empty -> null. ``label_detail`` keeps the text
(``flow=From-Botnet-V42-UDP-DNS``); empty -> null.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from nadray.errors import InputError
from nadray.ingest.common import (
    ReadResult, Validator, assemble, decode_raw, false_if_null, map_labels, nonblank_lines, split_records,
)

FORMAT = "argus"
REQUIRED = ["StartTime", "Proto", "SrcAddr", "DstAddr"]
TIME_FORMATS = ["%Y/%m/%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S", "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S"]


def _fast_time(arr: pa.Array) -> pa.Array:
    iso = pc.replace_substring(arr, "/", "-")
    return pc.cast(iso, pa.timestamp("us")).cast(pa.int64())


def read(data: bytes, source: str) -> ReadResult:
    lines = nonblank_lines(data, source)
    head = decode_raw(lines[0]).strip()
    sep = "\t" if head.count("\t") > head.count(",") else ","
    columns = [c.strip() for c in head.split(sep)]
    lower = {c.lower(): c for c in columns}
    missing = [c for c in REQUIRED if c.lower() not in lower]
    if missing:
        raise InputError(f"{source}: not an Argus binetflow: missing column(s) {', '.join(missing)}")
    recs = split_records(lines[1:], columns, sep.encode(), "Argus")
    t = recs.table
    v = Validator(t.num_rows)

    def col(name):
        c = lower.get(name.lower())
        return None if c is None else t.column(c).combine_chunks()

    nulls = ("",)
    out: dict[str, object] = {}
    out["ts"] = v.datetime_text(col("StartTime"), "StartTime", TIME_FORMATS, nulls=nulls,
                                fast_regex=r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,6})?$", fast_fn=_fast_time)
    out["proto"] = pc.utf8_lower(v.required(col("Proto"), "Proto", nulls=nulls))
    out["src_ip"] = v.required(col("SrcAddr"), "SrcAddr", nulls=nulls)
    out["dst_ip"] = v.required(col("DstAddr"), "DstAddr", nulls=nulls)
    for name, cname in (("Sport", "src_port"), ("Dport", "dst_port")):
        a = col(name)
        out[cname] = None if a is None else v.integer(a, name, nulls=nulls, lo=0, hi=65535, hex_ok=True,
                                                       out=pa.int32())
    a = col("Dur")
    out["duration"] = None if a is None else v.number(a, "Dur", nulls=nulls)
    a = col("State")
    out["conn_state"] = None if a is None else v.optional_str(a, nulls=nulls)
    tot_b = v.integer(col("TotBytes"), "TotBytes", nulls=nulls) if col("TotBytes") is not None else None
    tot_p = v.integer(col("TotPkts"), "TotPkts", nulls=nulls) if col("TotPkts") is not None else None
    for sname, tot, sc, dc in (("SrcBytes", tot_b, "src_bytes", "dst_bytes"), ("SrcPkts", tot_p, "src_pkts", "dst_pkts")):
        a = col(sname)
        if a is None or tot is None:
            continue
        src = v.integer(a, sname, nulls=nulls)
        dst = pc.subtract(tot, src)
        neg = false_if_null(pc.less(dst, 0))
        v.fail(neg, sname, f"at most Tot{sname[3:]}", a)
        out[sc] = src
        out[dc] = pc.if_else(neg, pa.scalar(None, pa.int64()), dst)
    a = col("Label")
    if a is not None:
        text = v.optional_str(a, nulls=nulls)
        out["label_detail"] = text
        out["label"] = map_labels(text)
    return assemble(source, FORMAT, recs.read, recs.rows, out, v, recs.lines, recs.bad)
