"""Stanford CS448B "ipasn" daily aggregates (``date,l_ipn,r_asn,f``).

One input row says: local host ``l_ipn`` had ``f`` flows with remote autonomous
system ``r_asn`` on day ``date``. It becomes one canonical summary row:

* ``ts`` = the day at 00:00 UTC; ``src_ip`` = the host id as text (``"3"``);
  ``dst_ip`` = ``"AS<r_asn>"``; ``flows`` = ``f`` (must be >= 1);
* ``proto`` = ``"unknown"`` (the data set has no protocol); ports, bytes,
  packets, duration: null;
* ``label`` = null, ``label_detail`` = null: the data set's ground truth is per
  host (an investigation date), not per row; see ``nadray.datasets.cs448b_ground_truth()``.

Accepted headers: the original ``date,l_ipn,r_asn,f``; the mo7903 copy's
``date,l_ipn,Bytes,Time`` (really ``r_asn,f``); the Solostriker copy's
``date,l_ipn,r_asn,f,suspicious`` with ``M/D/YYYY`` dates (the empty
``suspicious`` column is ignored). Dates may be ``YYYY-MM-DD`` or ``M/D/YYYY``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from nadray.errors import InputError
from nadray.ingest.common import ReadResult, Validator, assemble, decode_raw, nonblank_lines, split_records

FORMAT = "cs448b"
HEADERS = {
    ("date", "l_ipn", "r_asn", "f"): "original",
    ("date", "l_ipn", "bytes", "time"): "mo7903 (Bytes = r_asn, Time = f)",
    ("date", "l_ipn", "r_asn", "f", "suspicious"): "Solostriker",
}


def header_kind(cols: list[str]) -> str | None:
    return HEADERS.get(tuple(c.strip().lower() for c in cols))


def _iso_day(arr: pa.Array) -> pa.Array:
    return pc.cast(arr, pa.timestamp("us")).cast(pa.int64())


def read(data: bytes, source: str) -> ReadResult:
    lines = nonblank_lines(data, source)
    header = [c.strip() for c in decode_raw(lines[0]).split(",")]
    if header_kind(header) is None:
        raise InputError(f"{source}: not a cs448b ipasn file: header {','.join(header)!r}, "
                         "expected date,l_ipn,r_asn,f (or date,l_ipn,Bytes,Time or date,l_ipn,r_asn,f,suspicious)")
    canon = ["date", "l_ipn", "r_asn", "f", "suspicious"][: len(header)]
    recs = split_records(lines[1:], canon, b",", "cs448b")
    t = recs.table
    v = Validator(t.num_rows)
    date = t.column("date").combine_chunks()
    ts = v.datetime_text(date, "date", ["%Y-%m-%d", "%m/%d/%Y"], fast_regex=r"^\d{4}-\d{2}-\d{2}$", fast_fn=_iso_day)
    host = v.integer(t.column("l_ipn").combine_chunks(), "l_ipn", required=True)
    asn = v.integer(t.column("r_asn").combine_chunks(), "r_asn", required=True)
    f = v.integer(t.column("f").combine_chunks(), "f", lo=1, required=True)
    out = {
        "ts": ts,
        "src_ip": pc.cast(host, pa.string()),
        "dst_ip": pc.binary_join_element_wise("AS", pc.cast(asn, pa.string()), ""),
        "proto": "unknown",
        "flows": f,
    }
    return assemble(source, FORMAT, recs.read, recs.rows, out, v, recs.lines, recs.bad)
