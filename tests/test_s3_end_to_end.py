"""`nadray ingest / train / evaluate / score` with every path on s3:// (SeaweedFS on loopback)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from nadray import storage
from nadray.cli import main

CAPTURES = ["CTU-Honeypot-Capture-4-1", "CTU-Malware-Capture-44-1"]
SMALL = ["train.max_epochs=2", "train.batch_size=64", "model.hidden_size=16", "data.sequence_length=8",
         "train.cpus_per_worker=1"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_on_s3(ray_session, s3_bucket, shared_data, capsys):
    archive, registry = f"{s3_bucket}/archive", f"{s3_bucket}/registry"
    inputs = [str(shared_data / "iot23_small_scenarios" / f"{c}-labeled.csv") for c in CAPTURES]
    assert main(["ingest", *inputs, "--archive", archive]) == 0
    sets = [x for s in SMALL for x in ("--set", s)]
    assert main(["train", "--archive", archive, "--registry", registry, *sets]) == 0
    out = capsys.readouterr().out
    assert "registered" in out and "(champion)" in out
    # The Train run's checkpoints went to the registry's bucket too.
    assert storage.ls(f"{registry}/_runs")

    report = f"{s3_bucket}/report"
    assert main(["evaluate", "--archive", archive, "--model", registry, "--report", report]) == 0
    assert {"metrics.json", "report.html"} <= set(storage.ls(report))
    # A summary a person reads, not the checkpoint's metadata as JSON: one row per detector
    # and where the report went.
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) < 40, out
    assert lines[1].split()[:3] == ["detector", "ROC-AUC", "PR-AUC"]
    assert {"lstm", "isolation_forest", "ewma_zscore"} <= {ln.split()[0] for ln in lines[2:] if ln.strip()}
    assert f"report: {report}/report.html" in out

    scores = f"{s3_bucket}/scores"
    assert main(["score", "--model", registry, "--input", inputs[1], "--output", scores]) == 0
    fs, path = storage.arrow_fs(scores)
    table = pq.read_table(path, filesystem=fs)
    n = sum(1 for line in open(inputs[1]) if line.strip()) - 1
    assert table.num_rows == n
    assert {"source", "source_row", "ts", "entity", "score", "is_anomaly", "threshold", "model_version"} <= set(
        table.column_names)


def test_s3_client_reused_but_never_stale(s3_bucket, monkeypatch):
    """One client per thread and AWS settings: another process's objects are listed at
    once (no listing cache), and changed settings get a new client."""
    import s3fs

    uri = f"{s3_bucket}/shared"
    storage.write_bytes_atomic(f"{uri}/a", b"1")
    assert storage.ls(uri) == ["a"]
    fs, _ = storage.get_fs(uri)
    assert storage.get_fs(uri)[0] is fs
    # Another writer (its own client, as a Ray worker or another job would be).
    other = s3fs.S3FileSystem(client_kwargs=storage._s3_client_kwargs(), skip_instance_cache=True)
    other.pipe(f"{uri.removeprefix('s3://')}/b", b"2")
    assert storage.ls(uri) == ["a", "b"]
    assert storage.exists(f"{uri}/b") and storage.read_bytes(f"{uri}/b") == b"2"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated")
    assert storage.get_fs(uri)[0] is not fs


def test_a_landing_on_s3_gives_each_files_age(s3_bucket, shared_data):
    """The nightly scan reads when each landing object was written from the S3 listing itself
    (LastModified), so a just-uploaded one waits for the next night."""
    from nadray.nightly import staging

    src = shared_data / "iot23_small_scenarios" / f"{CAPTURES[1]}-labeled.csv"
    storage.write_bytes_atomic(f"{s3_bucket}/landing/day1/c44.csv", src.read_bytes())
    (f,) = staging.scan_landing(f"{s3_bucket}/landing", f"{s3_bucket}/archive", min_age_s=300)
    assert f.uri == f"{s3_bucket}/landing/day1/c44.csv" and f.status == "too recent"
    assert f.age_s is not None and 0 <= f.age_s < 300
    (f,) = staging.scan_landing(f"{s3_bucket}/landing", f"{s3_bucket}/archive")
    assert f.status == "new"
