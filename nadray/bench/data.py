"""Benchmark inputs: real IoT-23 Zeek logs replicated to any size, and a process-tree RSS sampler.

Replication keeps entities distinct: copy ``k`` (k >= 1) shifts every timestamp by
``k`` times the data's span (plus a day) and renames each local host
``a.b.c.d`` to the unique-local IPv6 address ``fd00::k:a:b:c:d`` (RFC 4193, so it
stays local and becomes a new entity); remote peers keep their addresses.
"""

from __future__ import annotations

import ipaddress
import math
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

DAY_US = 86_400 * 1_000_000


def iot23_files(folder: str | None = None) -> list[str]:
    """IoT-23-style Zeek CSVs: ``*.csv`` / ``*.csv.gz`` in ``folder``, else the eight
    scenarios shipped in ``nadray/datasets`` (so the benchmark runs anywhere nadray is
    installed)."""
    if folder is None:
        from nadray import datasets

        return [str(p) for p in datasets.iot23_paths()]
    files = sorted(str(p) for p in Path(folder).iterdir() if p.name.endswith((".csv", ".csv.gz")))
    if not files:
        raise FileNotFoundError(f"--data {folder}: no .csv or .csv.gz Zeek logs in that folder")
    return files


def load_base(files: list[str]) -> pa.Table:
    """All files through ``nadray.ingest.read_input``, in time order (FLOW_SCHEMA)."""
    from nadray.ingest import read_input

    t = pa.concat_tables([read_input(f, "zeek").flows for f in files])
    return t.take(pc.sort_indices(t, [("ts", "ascending"), ("source", "ascending"), ("source_row", "ascending")]))


def _rename(values: pa.ChunkedArray | pa.Array, k: int) -> pa.Array:
    """Local IPv4 hosts of copy ``k`` -> ``fd00::k:a:b:c:d``; everything else unchanged."""
    if k == 0:
        return values
    uniq = pc.unique(values)
    mapped = []
    for s in uniq.to_pylist():
        try:
            a = ipaddress.ip_address(s)
        except (ValueError, TypeError):
            mapped.append(s)
            continue
        if a.version == 4 and a.is_private:
            mapped.append("fd00::{:x}:{}".format(k, ":".join(s.split("."))))
        else:
            mapped.append(s)
    return pc.take(pa.array(mapped, pa.string()), pc.index_in(values, value_set=uniq))


def _span_us(ts_us: np.ndarray) -> int:
    return int(ts_us.max() - ts_us.min()) + DAY_US if len(ts_us) else DAY_US


def replicate_flows(base: pa.Table, n: int) -> pa.Table:
    """``n`` canonical flows: ``base`` repeated with shifted time and renamed local hosts."""
    ts = base.column("ts").cast(pa.int64()).to_numpy()
    span = _span_us(ts)
    parts = []
    for k in range(max(1, math.ceil(n / base.num_rows))):
        t = base.set_column(base.schema.get_field_index("ts"), "ts",
                            pa.array(ts + k * span, pa.int64()).cast(base.schema.field("ts").type))
        for col in ("src_ip", "dst_ip"):
            t = t.set_column(t.schema.get_field_index(col), col, _rename(t.column(col), k))
        if k:
            t = t.set_column(t.schema.get_field_index("source"), "source",
                             pc.binary_join_element_wise(f"copy{k}", t.column("source"), "/"))
        parts.append(pa.Table.from_arrays(t.columns, schema=base.schema))
    return pa.concat_tables(parts).slice(0, n).combine_chunks()


def read_zeek_csv_strings(files: list[str]) -> pa.Table:
    """The raw IoT-23 CSV text as all-string columns (the columns all files share)."""
    tables = []
    for f in files:
        with pa.input_stream(f, compression="detect") as s:
            head = s.read(1 << 16).split(b"\n", 1)[0].decode()
        cols = [c.strip() for c in head.split(",")]
        tables.append(pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in cols}, strings_can_be_null=False, null_values=[])))
    common = [c for c in tables[0].column_names if all(c in t.column_names for t in tables)]
    return pa.concat_tables([t.select(common) for t in tables])


def write_zeek_csv(raw: pa.Table, n: int, path: str) -> str:
    """Write ``n`` records of an IoT-23 style Zeek CSV, replicated from ``raw`` (string columns)."""
    ts = pc.cast(raw.column("ts"), pa.float64()).to_numpy()
    span = _span_us((ts * 1e6).astype("int64")) / 1e6
    parts = []
    for k in range(max(1, math.ceil(n / raw.num_rows))):
        t = raw.set_column(raw.schema.get_field_index("ts"), "ts", pc.cast(pa.array(ts + k * span), pa.string()))
        for col in ("id.orig_h", "id.resp_h"):
            t = t.set_column(t.schema.get_field_index(col), col, _rename(t.column(col), k))
        parts.append(t)
    with open(path, "wb") as f:  # pyarrow quotes header names even with quoting_style="none"
        f.write((",".join(raw.column_names) + "\n").encode())
        pacsv.write_csv(pa.concat_tables(parts).slice(0, n), f,
                        write_options=pacsv.WriteOptions(quoting_style="none", include_header=False))
    return path


def json_records(flows: pa.Table) -> list[dict]:
    """Canonical flows as the HTTP API's JSON records (ts in epoch seconds, nulls left out)."""
    t = flows.set_column(flows.schema.get_field_index("ts"), "ts",
                         pc.divide(pc.cast(flows.column("ts").cast(pa.int64()), pa.float64()), 1e6))
    return [{k: v for k, v in r.items() if v is not None} for r in t.to_pylist()]


# --------------------------------------------------------------------------- memory


def tree_rss_mb() -> float:
    """RSS of this process and its descendants (an embedded Ray's raylet and workers), in MB.

    Shared pages (the object store) are counted once per process that maps them.
    """
    import psutil

    try:
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


class RssSampler:
    """Peak of ``tree_rss_mb`` (and of this process alone) while the ``with`` block runs."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak_tree_mb = 0.0
        self.peak_driver_mb = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        self.peak_driver_mb = max(self.peak_driver_mb, me.memory_info().rss / 2**20)
        self.peak_tree_mb = max(self.peak_tree_mb, tree_rss_mb())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# --------------------------------------------------------------------------- machine


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    import ray
    import torch

    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": mem_gb, "gpu": gpu or "none",
            "load_avg_1m_at_start": load, "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "pyarrow": pa.__version__, "platform": platform.platform()}


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out
