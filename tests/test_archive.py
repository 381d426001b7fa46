"""The Parquet archive: partitions, pruning, time order, atomic parts, idempotence."""

from __future__ import annotations

import datetime as dt
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nadray import archive
from nadray.ingest import ingest, read_input
from nadray.schema import FLOW_SCHEMA


def _flows(days: list[str], source: str = "t.log") -> pa.Table:
    rows = []
    for i, d in enumerate(days):
        rows.append({"ts": dt.datetime.fromisoformat(d + "T12:00:00+00:00"), "src_ip": "10.0.0.1",
                     "dst_ip": "10.0.0.2", "proto": "tcp", "flows": 1, "source": source, "source_row": i})
    return pa.Table.from_pylist(rows, schema=FLOW_SCHEMA)


def test_partitions_and_ranges(tmp_path):
    a = str(tmp_path / "a")
    parts = archive.write_flows(a, _flows(["2020-01-02", "2020-01-01", "2020-01-03", "2020-01-01"]), key="k1")
    assert [os.path.basename(os.path.dirname(p)) for p in parts] == ["date=2020-01-01", "date=2020-01-02",
                                                                     "date=2020-01-03"]
    assert all(os.path.basename(p) == "part-k1.parquet" for p in parts)
    assert archive.list_dates(a) == ["2020-01-01", "2020-01-02", "2020-01-03"]
    assert archive.count_rows(a) == 4
    t = archive.read_flows(a)
    assert t.schema.equals(FLOW_SCHEMA)
    assert t["source_row"].to_pylist() == [1, 3, 0, 2]  # (ts, source, source_row) order
    assert archive.read_flows(a, "2020-01-02").num_rows == 2
    assert archive.read_flows(a, "2020-01-01", "2020-01-02").num_rows == 2  # end exclusive
    assert len(archive.dataset_paths(a, "2020-01-02", "2020-01-03")) == 1
    assert archive.read_flows(a, dt.datetime(2020, 1, 2, 13, tzinfo=dt.timezone.utc)).num_rows == 1
    # rewriting the same key replaces, never duplicates
    archive.write_flows(a, _flows(["2020-01-02", "2020-01-01", "2020-01-03", "2020-01-01"]), key="k1")
    assert archive.count_rows(a) == 4


def test_each_part_holds_its_utc_day_in_time_order(tmp_path):
    """Day boundaries to the microsecond, the epoch's own day, and every part file sorted by
    (ts, source, source_row) on its own (readers of one part rely on it)."""
    a = str(tmp_path / "a")
    times = ["2020-01-02T00:00:00", "2020-01-01T23:59:59.999999", "1970-01-01T00:00:00", "2020-01-02T00:00:00",
             "2020-01-01T00:00:00.000001", "2020-01-01T23:59:59.999999"]
    rows = [{"ts": dt.datetime.fromisoformat(t + "+00:00"), "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2",
             "proto": "tcp", "flows": 1, "source": src, "source_row": i}
            for i, (t, src) in enumerate(zip(times, ["b", "a", "a", "a", "a", "a"]))]
    parts = archive.write_flows(a, pa.Table.from_pylist(rows, schema=FLOW_SCHEMA), key="k")
    got = {os.path.basename(os.path.dirname(p)): pq.read_table(p) for p in parts}
    assert list(got) == ["date=1970-01-01", "date=2020-01-01", "date=2020-01-02"]
    assert [got[d]["source_row"].to_pylist() for d in got] == [[2], [4, 1, 5], [3, 0]]


def test_a_failed_part_fails_the_write_and_leaves_the_others_whole(tmp_path, monkeypatch):
    """Day parts are written side by side: one part's error still reaches the caller (ingest
    then keeps the input pending), and the parts written beside it are whole files."""
    a = str(tmp_path / "a")
    real = archive._write_atomic

    def flaky(uri: str, data: bytes) -> None:
        if "date=2020-01-02" in uri:
            raise OSError("disk full")
        real(uri, data)

    monkeypatch.setattr(archive, "_write_atomic", flaky)
    with pytest.raises(OSError, match="disk full"):
        archive.write_flows(a, _flows(["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-04"]), key="k")
    written = sorted(os.listdir(a))  # parts not started when it failed are cancelled
    assert written and set(written) <= {"date=2020-01-01", "date=2020-01-03", "date=2020-01-04"}
    assert all(pq.read_table(os.path.join(a, d, "part-k.parquet")).num_rows == 1 for d in written)


def test_a_failed_part_cancels_the_parts_not_yet_started(tmp_path, monkeypatch):
    """With the storage down every part fails after its retries: the write must stop at the
    first failure, not try the other days one by one."""
    import time

    calls = []

    def down(uri: str, data: bytes) -> None:
        calls.append(uri)
        time.sleep(0.05)  # a failing PUT takes a while
        raise OSError("storage down")

    monkeypatch.setattr(archive, "_write_atomic", down)
    days = [(dt.date(2020, 1, 1) + dt.timedelta(days=i)).isoformat() for i in range(40)]
    with pytest.raises(OSError, match="storage down"):
        archive.write_flows(str(tmp_path / "a"), _flows(days), key="k")
    assert len(calls) <= 2 * min(archive.WRITE_THREADS, max(2, os.cpu_count() or 1)), len(calls)


def test_part_writers_are_kept_between_writes(tmp_path, monkeypatch):
    """Each writer thread keeps its own S3 client (storage caches one per thread, ~200 ms to
    make), so the threads must outlive one write: two writes use no more threads than one pool."""
    import threading

    seen = []
    real = archive._write_atomic

    def record(uri: str, data: bytes) -> None:
        seen.append(threading.current_thread())
        real(uri, data)

    monkeypatch.setattr(archive, "_write_atomic", record)
    days = ["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-04", "2020-01-05"]
    archive.write_flows(str(tmp_path / "a"), _flows(days), key="k1")
    archive.write_flows(str(tmp_path / "a"), _flows(days), key="k2")
    assert len(seen) == 10 and threading.main_thread() not in seen
    assert len(set(seen)) <= archive._writers()._max_workers


def test_temporary_files_are_invisible(tmp_path):
    a = str(tmp_path / "a")
    archive.write_flows(a, _flows(["2020-01-01"]), key="k1")
    # a crash mid-write leaves only a dot- or underscore-prefixed file behind
    folder = tmp_path / "a" / "date=2020-01-01"
    pq.write_table(_flows(["2020-01-01"] * 3), folder / ".tmp-123-part-k2.parquet")
    pq.write_table(_flows(["2020-01-01"] * 3), folder / "_tmp-part-k3.parquet")
    assert archive.read_flows(a).num_rows == 1
    assert archive.count_rows(a) == 1
    import pyarrow.dataset as ds

    assert ds.dataset(str(tmp_path / "a"), format="parquet", partitioning="hive").count_rows() == 1


def test_crash_before_manifest_reruns_without_duplicates(shared_data, tmp_path):
    src = shared_data / "stratosphere_slips_testdata" / "port-scans" / "horizontal" / "conn.log"
    a = str(tmp_path / "a")
    ingest([str(src)], a)
    # simulate a crash after the parts were written but before the manifest
    for n in os.listdir(tmp_path / "a" / "_manifest"):
        os.remove(tmp_path / "a" / "_manifest" / n)
    rep = ingest([str(src)], a)
    assert rep.archived == 41 and rep.skipped == 0
    assert archive.count_rows(a) == 41
    assert len(archive.list_manifest(a)) == 1
    assert ingest([str(src)], a).skipped == 41


def test_custom_quarantine_location(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("date,l_ipn,r_asn,f\n2006-07-01,0,701,1\n2006-07-01,0,701,0\n")
    q = str(tmp_path / "q")
    rep = ingest([str(p)], str(tmp_path / "a"), quarantine=q)
    assert rep.archived == 1 and rep.quarantined == 1
    t = archive.read_quarantine(str(tmp_path / "a"), quarantine=q)
    assert t["reason"].to_pylist() == ["field 'f': expected an integer >= 1, got '0'"]
    assert archive.read_quarantine(str(tmp_path / "a")).num_rows == 0


def test_bad_range_argument(tmp_path):
    from nadray.errors import NadrayError

    with pytest.raises(NadrayError, match="start"):
        archive.read_flows(str(tmp_path), "last tuesday")


def test_read_input_matches_archive(shared_data, tmp_path):
    src = shared_data / "iot23_small_scenarios" / "CTU-Honeypot-Capture-7-1-labeled.csv"
    r = read_input(str(src))
    ingest([str(src)], str(tmp_path / "a"))
    back = archive.read_flows(str(tmp_path / "a"))
    assert back.equals(r.flows.sort_by([("ts", "ascending"), ("source", "ascending"), ("source_row", "ascending")]))
