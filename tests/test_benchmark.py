"""jobs/benchmark.py: the smallest configuration runs and reports every figure.

Performance is measured by the benchmark, not asserted here: no timing floors.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import math
from pathlib import Path

import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parents[1]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("nadray_benchmark_job", REPO / "jobs" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_replication_keeps_entities_distinct():
    from nadray.bench.data import iot23_files, load_base, replicate_flows

    base = load_base(iot23_files()[:2])
    n = base.num_rows * 2 + 7
    rep = replicate_flows(base, n)
    assert rep.num_rows == n and rep.schema == base.schema
    second = rep.slice(base.num_rows, base.num_rows)
    # Later copies: later in time, local IPv4 hosts renamed (new entities), remote peers kept.
    assert second.column("ts")[0].as_py() > base.column("ts")[base.num_rows - 1].as_py()
    ips = lambda t: {ip for c in ("src_ip", "dst_ip") for ip in t.column(c).to_pylist()}  # noqa: E731
    local4 = {ip for ip in ips(base) if ipaddress.ip_address(ip).version == 4 and ipaddress.ip_address(ip).is_private}
    assert local4 and not local4 & ips(second)
    assert any(ip.startswith("fd00::1:") for ip in ips(second))
    assert all(s.startswith("copy1/") for s in second.column("source").to_pylist())


def test_zeek_csv_replica_reads_back(tmp_path):
    from nadray.bench.data import iot23_files, read_zeek_csv_strings, write_zeek_csv
    from nadray.ingest import read_input

    raw = read_zeek_csv_strings(iot23_files()[:2])
    n = raw.num_rows + 50
    res = read_input(write_zeek_csv(raw, n, str(tmp_path / "conn.csv")), "zeek")
    assert res.flows.num_rows == n and res.quarantined == 0
    assert isinstance(res.flows, pa.Table)


def test_floors_are_checked_not_asserted():
    bm = _benchmark_module()
    out = {"batch_score_vs_torch": 0.4, "batch_score_vs_isolation_forest": 2.0, "serve_added_p50_ms": 3.0,
           "train_ray_vs_plain_torch": 0.9}
    verdict = {f["key"]: f["pass"] for f in bm.check_floors(out)}
    assert verdict == {"batch_score_vs_torch": False, "batch_score_vs_isolation_forest": True,
                       "serve_added_p50_ms": True, "train_ray_vs_plain_torch": True, "ingest_vs_pyarrow_csv": None}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_run_reports_every_figure(ray_session, tmp_path):
    bm = _benchmark_module()
    out = bm.run("smoke", command="pytest smoke")
    text = json.dumps(out, default=float)  # JSON-safe
    assert json.loads(text)["mode"] == "smoke"
    for key in bm.REQUIRED_KEYS:
        v = out[key]
        assert isinstance(v, (int, float)) and math.isfinite(v), (key, v)
        if key != "serve_added_p50_ms":  # a difference of two noisy medians: may be <= 0
            assert v > 0, (key, v)
    assert len(out["stages"]["batch"]["sizes"]) == 3
    # The Ray Train worker, started from build_trainer's run config, runs with one malloc arena.
    assert out["stages"]["train"]["worker_malloc_arena_max"] == "1"
    assert {"cpu", "cores"} <= set(out["machine"]) and out["date"] and out["command"] == "pytest smoke"
    assert [f["key"] for f in out["floors"]] == [k for k, *_ in bm.FLOORS]
    table = bm.table(out)
    assert "PASS" in table or "FAIL" in table
