"""UNSW-NB15 raw CSV (the 49-column ``UNSW-NB15_1.csv`` ... ``_4.csv`` files).

The raw files have no header; a copy with a header line (the 49 names below, any
case) is accepted too. They may start with a UTF-8 byte-order mark and use CRLF.
Columns: srcip, sport, dstip, dsport, proto, state, dur, sbytes, dbytes, sttl,
dttl, sloss, dloss, service, Sload, Dload, Spkts, Dpkts, swin, dwin, stcpb, dtcpb,
smeansz, dmeansz, trans_depth, res_bdy_len, Sjit, Djit, Stime, Ltime, Sintpkt,
Dintpkt, tcprtt, synack, ackdat, is_sm_ips_ports, ct_state_ttl, ct_flw_http_mthd,
is_ftp_login, ct_ftp_cmd, ct_srv_src, ct_srv_dst, ct_dst_ltm, ct_src_ltm,
ct_src_dport_ltm, ct_dst_sport_ltm, ct_dst_src_ltm, attack_cat, Label.

Field mapping: ``Stime`` (epoch seconds) -> ts; ``srcip``/``dstip`` -> IPs;
``sport``/``dsport`` (decimal, hex like ``0x000b``, or ``-``) -> ports; ``proto``;
``state`` -> conn_state; ``service`` (``-`` -> null); ``dur`` -> duration;
``sbytes``/``dbytes`` -> src_bytes/dst_bytes; ``Spkts``/``Dpkts`` -> src_pkts/dst_pkts.

Labels: ``Label`` 1 -> 1, 0 -> 0 (anything else quarantines the row);
``attack_cat`` (e.g. ``Exploits``, ``Fuzzers``; trimmed) -> label_detail, empty -> null.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from nadray.errors import InputError
from nadray.ingest.common import ReadResult, Validator, assemble, decode_raw, nonblank_lines, split_records

FORMAT = "unsw-nb15"
COLUMNS = ("srcip,sport,dstip,dsport,proto,state,dur,sbytes,dbytes,sttl,dttl,sloss,dloss,service,Sload,Dload,"
           "Spkts,Dpkts,swin,dwin,stcpb,dtcpb,smeansz,dmeansz,trans_depth,res_bdy_len,Sjit,Djit,Stime,Ltime,"
           "Sintpkt,Dintpkt,tcprtt,synack,ackdat,is_sm_ips_ports,ct_state_ttl,ct_flw_http_mthd,is_ftp_login,"
           "ct_ftp_cmd,ct_srv_src,ct_srv_dst,ct_dst_ltm,ct_src_ltm,ct_src_dport_ltm,ct_dst_sport_ltm,"
           "ct_dst_src_ltm,attack_cat,Label").split(",")
_LOWER = [c.lower() for c in COLUMNS]


def read(data: bytes, source: str) -> ReadResult:
    lines = nonblank_lines(data, source)
    first = [c.strip().lower() for c in decode_raw(lines[0]).split(",")]
    if "srcip" in first:
        if first != _LOWER:
            extra = sorted(set(first) - set(_LOWER))
            missing = [c for c in COLUMNS if c.lower() not in first]
            raise InputError(f"{source}: not a raw UNSW-NB15 CSV: header differs from the 49 documented columns "
                             f"(missing {', '.join(missing) or '-'}; unknown {', '.join(extra) or '-'})")
        lines = lines[1:]
    elif len(first) != len(COLUMNS):
        raise InputError(f"{source}: not a raw UNSW-NB15 CSV: expected 49 comma-separated fields, "
                         f"got {len(first)} in the first line")
    recs = split_records(lines, COLUMNS, b",", "UNSW-NB15")
    t = recs.table
    v = Validator(t.num_rows)

    def col(name):
        return t.column(name).combine_chunks()

    nulls = ("", "-")
    out: dict[str, object] = {
        "ts": v.epoch_seconds(col("Stime"), "Stime", nulls=nulls),
        "src_ip": v.required(col("srcip"), "srcip", nulls=nulls),
        "dst_ip": v.required(col("dstip"), "dstip", nulls=nulls),
        "proto": pc.utf8_lower(v.required(col("proto"), "proto", nulls=nulls)),
        "src_port": v.integer(col("sport"), "sport", nulls=nulls, lo=0, hi=65535, hex_ok=True, out=pa.int32()),
        "dst_port": v.integer(col("dsport"), "dsport", nulls=nulls, lo=0, hi=65535, hex_ok=True, out=pa.int32()),
        "duration": v.number(col("dur"), "dur", nulls=nulls),
        "src_bytes": v.integer(col("sbytes"), "sbytes", nulls=nulls),
        "dst_bytes": v.integer(col("dbytes"), "dbytes", nulls=nulls),
        "src_pkts": v.integer(col("Spkts"), "Spkts", nulls=nulls),
        "dst_pkts": v.integer(col("Dpkts"), "Dpkts", nulls=nulls),
        "conn_state": v.optional_str(col("state"), nulls=nulls),
        "service": v.optional_str(col("service"), nulls=nulls),
        "label": v.integer(col("Label"), "Label", nulls=(), lo=0, hi=1, required=True, out=pa.int8()),
        "label_detail": v.optional_str(col("attack_cat"), nulls=("",)),
    }
    return assemble(source, FORMAT, recs.read, recs.rows, out, v, recs.lines, recs.bad)
