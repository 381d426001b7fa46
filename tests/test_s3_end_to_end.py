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

    scores = f"{s3_bucket}/scores"
    assert main(["score", "--model", registry, "--input", inputs[1], "--output", scores]) == 0
    fs, path = storage.arrow_fs(scores)
    table = pq.read_table(path, filesystem=fs)
    n = sum(1 for line in open(inputs[1]) if line.strip()) - 1
    assert table.num_rows == n
    assert {"source", "source_row", "ts", "entity", "score", "is_anomaly", "threshold", "model_version"} <= set(
        table.column_names)
