"""Test helper: IoT-23 Zeek CSVs (shared/data) as canonical flow tables.

Uses ``nadray.ingest.read_input`` when it is available, else a minimal pandas
reader, so model tests do not depend on the ingest module's progress.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from nadray.schema import FLOW_SCHEMA, TIME_ORDER


def _pandas_read(path: Path) -> pa.Table:
    df = pd.read_csv(path)
    lab = df["label"].astype(str).str.lower()
    out = pd.DataFrame({
        "ts": pd.to_datetime((df["ts"] * 1e6).round().astype("int64"), unit="us", utc=True),
        "src_ip": df["id.orig_h"].astype(str), "dst_ip": df["id.resp_h"].astype(str),
        "proto": df["proto"].astype(str).str.lower(),
        "src_port": df["id.orig_p"].astype("Int32"), "dst_port": df["id.resp_p"].astype("Int32"),
        "duration": pd.to_numeric(df["duration"], errors="coerce"),
        "src_bytes": pd.to_numeric(df["orig_bytes"], errors="coerce").astype("Int64"),
        "dst_bytes": pd.to_numeric(df["resp_bytes"], errors="coerce").astype("Int64"),
        "src_pkts": pd.to_numeric(df["orig_pkts"], errors="coerce").astype("Int64"),
        "dst_pkts": pd.to_numeric(df["resp_pkts"], errors="coerce").astype("Int64"),
        "conn_state": df["conn_state"].astype("string"), "service": df["service"].astype("string"),
        "flows": np.ones(len(df), dtype="int64"),
        "label": np.where(lab == "malicious", 1, np.where(lab == "benign", 0, -1)).astype("int8"),
        "label_detail": df["detailed-label"].astype("string"),
        "source": path.name, "source_row": np.arange(len(df), dtype="int64"),
        "local_orig": pd.array([None] * len(df), dtype="boolean"),
        "local_resp": pd.array([None] * len(df), dtype="boolean"),
    })
    out["label"] = out["label"].astype("Int8").where(out["label"] >= 0)
    return pa.Table.from_pandas(out, schema=FLOW_SCHEMA, preserve_index=False)


def read_capture(shared_data: Path, name: str) -> pa.Table:
    path = Path(shared_data) / "iot23_small_scenarios" / f"{name}-labeled.csv"
    try:
        from nadray.ingest import read_input

        return read_input(str(path), "zeek").flows
    except Exception:
        return _pandas_read(path)


def read_captures(shared_data: Path, names: list[str]) -> pa.Table:
    t = pa.concat_tables([read_capture(shared_data, n) for n in names])
    return t.sort_by([(c, "ascending") for c in TIME_ORDER])
