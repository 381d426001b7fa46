"""CICFlowMeter CSV, CIC-IDS2017 column set ("GeneratedLabelledFlows" version).

Column names carry stray leading spaces (`` Destination Port``); they are matched
after trimming. The canonical record needs a time and both addresses, so the
file must have ``Source IP``, ``Destination IP`` and ``Timestamp`` (the
"MachineLearningCSV" version lacks them and is refused with a one-line error).
Records that are not UTF-8 (the 2017 files were written in Windows-1252, e.g.
``Web Attack \\x96 Brute Force``) are transcoded rather than quarantined.

Field mapping: ``Timestamp`` (``3/7/2017 8:55`` = day/month/year, or
``07/07/2017 03:30:00 PM``; no zone in the source: read as UTC, so times are the
capture site's local clock) -> ts; ``Source IP``/``Destination IP`` -> IPs;
``Source Port``/``Destination Port`` -> ports; ``Protocol`` (6/17/1 ...) -> tcp/udp/icmp;
``Flow Duration`` (microseconds) -> duration (seconds); ``Total Fwd Packets`` /
``Total Backward Packets`` -> src_pkts/dst_pkts; ``Total Length of Fwd Packets`` /
``Total Length of Bwd Packets`` (payload bytes) -> src_bytes/dst_bytes.

Labels: ``Label`` ``BENIGN`` -> 0, any other text -> 1 (``DDoS``, ``PortScan``,
``Web Attack ...``), empty -> null; the text is kept in ``label_detail``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from nadray.errors import InputError
from nadray.ingest.common import (
    ReadResult, Validator, assemble, decode_raw, map_labels, nonblank_lines, proto_name, split_records, unique_names,
)

FORMAT = "cicflowmeter"
NEEDED = ["Source IP", "Destination IP", "Timestamp", "Protocol", "Flow Duration"]
TIME_FORMATS = ["%d/%m/%Y %H:%M", "%d/%m/%Y %H:%M:%S", "%d/%m/%Y %I:%M:%S %p", "%d/%m/%Y %I:%M %p",
                "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M:%S.%f"]


def cic_label(text: str | None) -> int | None:
    if not text:
        return None
    return 0 if text.strip().upper() == "BENIGN" else 1


def read(data: bytes, source: str) -> ReadResult:
    lines = nonblank_lines(data, source)
    columns = unique_names([c.strip() for c in decode_raw(lines[0]).split(",")])
    missing = [c for c in NEEDED if c not in columns]
    if missing:
        hint = (" (this looks like the MachineLearningCSV version, which has no addresses or times; "
                "use the GeneratedLabelledFlows CSVs)") if "Source IP" in missing or "Timestamp" in missing else ""
        raise InputError(f"{source}: CICFlowMeter CSV lacks column(s) {', '.join(missing)}{hint}")
    recs = split_records(lines[1:], columns, b",", "CICFlowMeter", legacy_encoding="cp1252")
    t = recs.table
    v = Validator(t.num_rows)

    def col(name):
        return t.column(name).combine_chunks() if name in t.column_names else None

    nulls = ("",)
    out: dict[str, object] = {}
    out["ts"] = v.datetime_text(col("Timestamp"), "Timestamp", TIME_FORMATS, nulls=nulls)
    out["src_ip"] = v.required(col("Source IP"), "Source IP", nulls=nulls)
    out["dst_ip"] = v.required(col("Destination IP"), "Destination IP", nulls=nulls)
    out["proto"] = proto_name(v.required(col("Protocol"), "Protocol", nulls=nulls))
    for name, cname in (("Source Port", "src_port"), ("Destination Port", "dst_port")):
        a = col(name)
        out[cname] = None if a is None else v.integer(a, name, nulls=nulls, lo=0, hi=65535, out=pa.int32())
    dur_us = v.number(col("Flow Duration"), "Flow Duration", nulls=nulls)
    out["duration"] = pc.divide(dur_us, 1e6)
    for name, cname in (("Total Fwd Packets", "src_pkts"), ("Total Backward Packets", "dst_pkts"),
                        ("Total Length of Fwd Packets", "src_bytes"), ("Total Length of Bwd Packets", "dst_bytes")):
        a = col(name)
        out[cname] = None if a is None else v.integer(a, name, nulls=nulls)
    a = col("Label")
    if a is not None:
        text = v.optional_str(a, nulls=nulls)
        out["label_detail"] = text
        out["label"] = map_labels(text, cic_label)
    return assemble(source, FORMAT, recs.read, recs.rows, out, v, recs.lines, recs.bad)
