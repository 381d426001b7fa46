"""Reliability: the S3 server stops in the middle of a write (ingest, registry).

Each test starts its own SeaweedFS (tests/s3server.py) so that it can stop it
and start it again on the same data folder and ports, as a storage outage and
recovery would look to a running job. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from s3server import S3Server

from nadray import archive as arc
from nadray import registry, storage
from nadray.errors import ModelError, NadrayError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CAPTURES = ["CTU-Honeypot-Capture-4-1", "CTU-Malware-Capture-20-1", "CTU-Honeypot-Capture-7-1",
            "CTU-Malware-Capture-44-1"]  # the first two span two days: two partitions each


class RestartableS3(S3Server):
    """``S3Server`` whose ``stop()`` is a crash; ``start()`` again keeps its ports and data folder."""

    def stop(self) -> None:
        """SIGKILL: the storage goes away at once, as in a crash or a network cut (SIGTERM takes 15 s+)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> "RestartableS3":
        self.stop()
        return self.start()


@pytest.fixture
def s3(monkeypatch):
    server = RestartableS3().start()
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    # One attempt per request (botocore's default, 5 with backoff, makes each failed call ~10 s):
    # the outcome of an outage is the same, the test just does not wait for it.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    try:
        yield server
    finally:
        server.cleanup()


class StopAfter:
    """Stops ``server`` from another thread when ``trigger()`` is called, and waits until it is down."""

    def __init__(self, server: RestartableS3):
        self.server = server
        self.fired = threading.Event()
        self.down = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.fired.wait(120):
            self.server.stop()
            self.down.set()

    def trigger(self) -> None:
        if not self.fired.is_set():
            self.fired.set()
            assert self.down.wait(30), "S3 server did not stop"


def _inputs(shared_data: Path, tmp_path: Path) -> tuple[str, dict[str, int]]:
    """A folder of four real IoT-23 Zeek CSVs and, per file, how many flows it archives."""
    from nadray.ingest import read_input

    folder = tmp_path / "in"
    folder.mkdir()
    expected = {}
    for c in CAPTURES:
        dst = folder / f"{c}-labeled.csv"
        shutil.copy(shared_data / "iot23_small_scenarios" / dst.name, dst)
        expected[dst.name] = read_input(str(dst)).flows.num_rows
    return str(folder), expected


def _visible(archive_uri: str) -> dict[str, int]:
    """Rows per part file a reader sees (each part must read whole: no partial Parquet)."""
    out = {}
    for u in arc.dataset_paths(archive_uri):
        fs, _ = storage.arrow_fs(u)
        _, p = storage.get_fs(u)
        out[u] = pq.read_table(p, filesystem=fs).num_rows
    return out


def _check_consistent(archive_uri: str) -> tuple[int, int]:
    """Every manifest's parts exist and hold its count; nothing else is visible. (visible, committed)."""
    entries = arc.list_manifest(archive_uri)
    vis = _visible(archive_uri)
    committed = 0
    for e in entries:
        parts = [p for p in e["parts"]]
        assert all(p in vis for p in parts), f"manifest {e['source']} names a part that is not visible"
        assert sum(vis[p] for p in parts) == e["archived"], e["source"]
        committed += e["archived"]
    assert sum(vis.values()) == committed, (
        f"readers see {sum(vis.values())} rows but manifests commit {committed}: a partly written input is visible")
    return sum(vis.values()), committed


def test_s3_outage_mid_ingest_fails_clearly_and_rerun_completes(s3, shared_data, tmp_path, monkeypatch, capsys):
    from nadray.cli import main as cli_main
    from nadray.ingest import ingest

    folder, expected = _inputs(shared_data, tmp_path)
    archive_uri = f"s3://{s3.make_bucket()}/archive"
    stopper = StopAfter(s3)
    real_write = arc._write_atomic

    def write_then_outage(uri: str, data: bytes) -> None:
        real_write(uri, data)
        if "/date=" in uri:  # the first partition has landed: the storage goes away
            stopper.trigger()

    monkeypatch.setattr(arc, "_write_atomic", write_then_outage)
    t0 = time.time()
    report = ingest([folder], archive_uri)
    took = time.time() - t0
    print(f"ingest with the server stopped after the first partition: {took:.1f}s; failures:",
          *report.failed_inputs, sep="\n  ")
    assert stopper.down.is_set()
    assert not report.ok and report.archived == 0 and report.read == 0
    assert took < 60, f"an outage took {took:.0f}s to report"
    bucket = archive_uri.removeprefix("s3://").split("/")[0]
    for msg in report.failed_inputs:
        assert "\n" not in msg and "Traceback" not in msg and len(msg) < 600, msg
        assert bucket in msg, f"message does not name the archive: {msg}"
    # One line for the input that was being written, one saying the rest were not attempted.
    assert len(report.failed_inputs) == 2, report.failed_inputs
    assert CAPTURES[0] in report.failed_inputs[0] and "unreachable" in report.failed_inputs[0]
    assert "not attempted" in report.failed_inputs[1]

    # The CLI prints those lines and exits non-zero (server still down), no traceback.
    monkeypatch.setattr(arc, "_write_atomic", real_write)
    rc = cli_main(["ingest", folder, "--archive", archive_uri])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("nadray ingest: error:")]
    assert len(errors) == 2 and "unreachable" in errors[0], err

    # Storage back on the same data and ports: what is visible is what manifests commit.
    t1 = time.time()
    s3.start()
    print(f"restart {time.time() - t1:.1f}s")
    visible, committed = _check_consistent(archive_uri)
    assert committed == 0
    t1 = time.time()

    # A rerun completes with exact totals and no duplicates; a second rerun adds nothing.
    report = ingest([folder], archive_uri)
    assert report.ok, report.failed_inputs
    assert report.archived == sum(expected.values()) and report.skipped == 0
    visible, committed = _check_consistent(archive_uri)
    assert visible == committed == sum(expected.values())
    flows = arc.read_flows(archive_uri, columns=["source", "source_row"])
    assert flows.num_rows == sum(expected.values())
    keys = pc.binary_join_element_wise(flows["source"], pc.cast(flows["source_row"], "string"), "#")
    assert pc.count_distinct(keys).as_py() == flows.num_rows, "duplicate records after the rerun"
    print(f"rerun and checks {time.time() - t1:.1f}s")
    again = ingest([folder], archive_uri)
    assert again.ok and again.archived == 0 and again.skipped == sum(expected.values())
    assert arc.count_rows(archive_uri) == sum(expected.values())


def _register_args(shared_data: Path):
    from _iot23 import read_captures
    from test_serve_support import TRAIN_CAPTURES

    return read_captures(shared_data, TRAIN_CAPTURES[:1])


def test_s3_outage_mid_register_keeps_champion_and_rerun_completes(s3, shared_data, monkeypatch):
    from test_serve_support import register_model

    from nadray.scorer import Scorer

    reg = f"s3://{s3.make_bucket()}/registry"
    train = _register_args(shared_data)
    v1 = register_model(reg, train, seed=0)
    registry.promote(reg, v1, "test: first")
    champion_before = registry.champion(reg)

    # The server goes away after the weights are written, before checkpoint.json.
    stopper = StopAfter(s3)
    real_json = storage.write_json_atomic
    seen = []

    def outage_before_meta(uri, obj):
        if uri.endswith("/" + registry.META):
            seen.append(uri)
            stopper.trigger()
        return real_json(uri, obj)

    monkeypatch.setattr(storage, "write_json_atomic", outage_before_meta)
    t0 = time.time()
    with pytest.raises(Exception) as exc:
        register_model(reg, train, seed=1)
    took = time.time() - t0
    print(f"register with the server stopped: {took:.1f}s: {type(exc.value).__name__}: {exc.value}")
    assert seen and took < 120
    assert isinstance(exc.value, NadrayError), f"raw {type(exc.value).__name__} escaped: {exc.value}"
    msg = str(exc.value)
    assert "\n" not in msg and reg.removeprefix("s3://").split("/")[0] in msg, msg
    # With the storage down, loading is a one-line ModelError and promoting a StorageError, never botocore's.
    with pytest.raises(ModelError, match="unreachable"):
        Scorer.from_ref(reg)
    with pytest.raises(NadrayError, match="unreachable"):
        registry.promote(reg, v1, "during the outage")
    monkeypatch.setattr(storage, "write_json_atomic", real_json)

    s3.start()
    half = seen[0].rsplit("/", 2)[-2]
    assert storage.exists(storage.join(registry.version_uri(reg, half), registry.WEIGHTS))  # the half version
    assert registry.champion(reg) == champion_before
    assert registry.list_versions(reg) == [v1]
    with pytest.raises(ModelError, match="not found"):
        Scorer.from_ref(f"{reg}@{half}")
    with pytest.raises(ModelError):
        registry.promote(reg, half, "must not promote a half version")
    assert Scorer.from_ref(reg).version == v1

    # The rerun registers and promotes.
    v2 = register_model(reg, train, seed=1)
    assert registry.list_versions(reg) == sorted([v1, v2])
    registry.promote(reg, v2, "rerun")
    s = Scorer.from_ref(reg)
    assert s.version == v2 and np.isfinite(s.threshold.value)


@pytest.fixture
def s3_down(monkeypatch):
    """AWS_* pointing at a loopback port where no S3 server listens (a server that is down)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nadray-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nadray-test-secret")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")


def test_unreachable_inputs_are_one_line_errors_naming_them(s3_down, tmp_path, capsys):
    """Inputs and landing on storage that is down: one line naming the URI, never botocore's traceback."""
    from nadray.cli import main as cli_main
    from nadray.errors import InputError, StorageError
    from nadray.nightly import staging
    from nadray.retrain import retrain
    from nadray.score import _expand

    src = "s3://nadray-down/in/conn.log.labeled"
    rc = cli_main(["ingest", src, "--archive", str(tmp_path / "archive")])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("nadray ingest: error:")]
    assert len(lines) == 1 and src in lines[0] and "unreachable" in lines[0], err
    assert lines[0].count(src) == 1, lines[0]

    with pytest.raises(NadrayError, match="unreachable") as exc:
        _expand([src])
    assert src in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(StorageError, match="unreachable"):
        staging.list_landing("s3://nadray-down/landing")
    from nadray.ingest.core import load_bytes

    with pytest.raises(InputError, match="unreachable"):
        load_bytes(src)

    night = retrain("s3://nadray-down/landing", str(tmp_path / "archive"), str(tmp_path / "registry"),
                    date="2026-11-26")
    assert night.status == "failed" and "unreachable" in night.error and "\n" not in night.error, night.error
    assert not (tmp_path / "registry" / "champion.json").exists()


def test_s3_outage_mid_score_fails_clearly_and_names_what_it_left(s3, shared_data, tmp_path, monkeypatch, caplog):
    """`nadray score` writing to S3 when the storage goes away after its first output file:
    one line naming the output, a warning naming the files it could not remove (nothing can
    be deleted while the storage is down), and with the storage back those files are all
    that is there, and a rerun writes a whole output of its own beside them."""
    from test_serve_support import register_model

    from nadray import score as score_mod
    from nadray.errors import StorageError
    from nadray.scorer import Scorer

    reg = str(tmp_path / "reg")
    registry.promote(reg, register_model(reg, _register_args(shared_data), seed=0), "test")
    paths = [str(shared_data / "iot23_small_scenarios" / f"{c}-labeled.csv") for c in CAPTURES[2:]]
    out = f"s3://{s3.make_bucket()}/scores"
    monkeypatch.setattr(score_mod, "DRIVER_SCORE_ROWS", 100)  # 367 flows: 4 blocks of entities
    stopper = StopAfter(s3)
    real = Scorer.score_table
    calls: list[int] = []

    def outage_after_first_file(self, flows, *args):
        calls.append(flows.num_rows)
        if len(calls) == 2:  # block 1's file is written: the storage goes away
            stopper.trigger()
        return real(self, flows, *args)

    monkeypatch.setattr(Scorer, "score_table", outage_after_first_file)
    t0 = time.time()
    with caplog.at_level("WARNING", logger="nadray.score"), pytest.raises(StorageError) as err:
        score_mod.score(reg, paths, out)
    msg = str(err.value)
    print(f"score with the server stopped after its first file: {time.time() - t0:.1f}s: {msg}")
    assert "\n" not in msg and out in msg and "unreachable" in msg and len(msg) < 600, msg
    assert len(calls) == 2, "scoring went on after the storage was gone"
    left_msgs = [r.getMessage() for r in caplog.records if "could not remove the partial output" in r.getMessage()]
    assert len(left_msgs) == 1, [r.getMessage() for r in caplog.records]
    prefix = left_msgs[0].split("partial output ", 1)[1].split("*", 1)[0].rsplit("/", 1)[1]
    assert prefix.startswith("scores-")

    s3.start()
    left = storage.ls(out)
    assert len(left) == 1 and left[0].startswith(prefix), (prefix, left)
    monkeypatch.setattr(Scorer, "score_table", real)
    report = score_mod.score(reg, paths, out)
    assert report.rows_scored == report.read == sum(t.num_rows for t, _, _ in score_mod.read_pieces(paths, "auto", []))
    # A file per block, and one of the flows two blocks hold.
    assert len(report.files) == 5 and not any(prefix in f for f in report.files)
