"""The canonical flow record (DESIGN.md) and the quarantine record, as Arrow schemas.

Every ingest adapter produces tables of ``FLOW_SCHEMA``; everything downstream
(features, scoring, baselines) reads only these columns.
"""

from __future__ import annotations

import pyarrow as pa

TS_TYPE = pa.timestamp("us", tz="UTC")

FLOW_SCHEMA = pa.schema(
    [
        pa.field("ts", TS_TYPE, nullable=False),
        pa.field("src_ip", pa.string(), nullable=False),
        pa.field("dst_ip", pa.string(), nullable=False),
        pa.field("proto", pa.string(), nullable=False),
        pa.field("src_port", pa.int32()),
        pa.field("dst_port", pa.int32()),
        pa.field("duration", pa.float64()),
        pa.field("src_bytes", pa.int64()),
        pa.field("dst_bytes", pa.int64()),
        pa.field("src_pkts", pa.int64()),
        pa.field("dst_pkts", pa.int64()),
        pa.field("conn_state", pa.string()),
        pa.field("service", pa.string()),
        pa.field("flows", pa.int64(), nullable=False),
        pa.field("label", pa.int8()),
        pa.field("label_detail", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        # Not in DESIGN.md's required set: the source's own "is this side local"
        # flags (Zeek local_orig / local_resp). They decide the entity before
        # data.local_networks does; null where the source has no such flag.
        pa.field("local_orig", pa.bool_()),
        pa.field("local_resp", pa.bool_()),
    ]
)

FLOW_COLUMNS = FLOW_SCHEMA.names

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_row", pa.int64()),  # null when the problem is the whole file
        pa.field("raw", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("ingested_at", TS_TYPE, nullable=False),
    ]
)

# Earliest and latest timestamps accepted as real traffic. Relative-clock captures
# (1970-01-01) are accepted; anything outside this range is an unparseable clock.
MIN_TS_US = 0
MAX_TS_US = 4102444800 * 1_000_000  # 2100-01-01

# Time order is always (ts, source, source_row): ties on ts are broken by the
# record's place in its input, so every run orders records the same way.
TIME_ORDER = ["ts", "source", "source_row"]
