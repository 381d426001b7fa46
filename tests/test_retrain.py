"""The nightly pipeline in-process: champion, idempotence, a refused file, safety on failure, drift.

Two Ray Train fits in all (the first night, and the night that fails after training);
everything else is pure pyarrow / numpy on the bundled IoT-23 captures.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from _strictjson import strict_loads

from nadray import archive as arc
from nadray import datasets
from nadray import registry as reg
from nadray.config import Config, load_config
from nadray.nightly import compare, staging
from nadray.retrain import notify_serve, retrain

TINY = ["train.max_epochs=1", "train.patience=1", "model.hidden_size=8", "data.sequence_length=8",
        "train.max_windows=2000", "train.batch_size=256", "nightly.window_days=400", "nightly.eval_days=1",
        "nightly.min_file_age_s=0"]  # files land just before each night runs
FRESH = ["nightly.min_file_age_s=0"]


def _land(landing: Path, *scenarios: str) -> None:
    landing.mkdir(parents=True, exist_ok=True)
    for s in scenarios:
        src = datasets.path(f"iot23-{s}")
        shutil.copyfile(src, landing / src.name)


def _champion_bytes(registry: str) -> bytes:
    return (Path(reg.model_root(registry)) / reg.CHAMPION).read_bytes()


@pytest.fixture(scope="module")
def night1(tmp_path_factory, ray_session):
    """One completed night: two captures and a file that is not a flow log."""
    root = tmp_path_factory.mktemp("nightly")
    landing, archive, registry = root / "landing", str(root / "archive"), str(root / "registry")
    _land(landing, "CTU-Malware-Capture-20-1", "CTU-Malware-Capture-21-1")
    (landing / "notes.txt").write_text("span port moved to the core switch\n")
    cfg = load_config(None, TINY)
    report = retrain(str(landing), archive, registry, date="2018-10-04", cfg=cfg)
    return root, landing, archive, registry, cfg, report


def test_night_registers_a_champion_and_reports_the_refused_file(night1):
    root, landing, archive, registry, cfg, report = night1
    assert report.ok and report.status == "complete", report.summary()
    champ = reg.champion(registry)
    assert champ is not None and champ["version"] == report.record["challenger_version"]
    assert reg.list_versions(registry) == [champ["version"]]
    assert arc.count_rows(archive) == 3209 + 3286
    # The unreadable file is kept whole, reported, and the night still completed.
    refused = report.record["ingest"]["refused"]
    assert [Path(r["source"]).name for r in refused] == ["notes.txt"]
    assert "cannot recognise the format" in refused[0]["reason"]
    qdir = Path(archive) / "_quarantine" / "files"
    assert (qdir / f"{refused[0]['sha256']}.json").exists()
    assert (qdir / f"{refused[0]['sha256']}-notes.txt").read_text().startswith("span port")
    assert "notes.txt" in report.summary()
    assert not (Path(archive) / "_staging").exists()
    night_dir = Path(reg.model_root(registry)) / "nights" / "2018-10-04"
    night = strict_loads((night_dir / "night.json").read_text())
    assert night["status"] == "complete" and night["decision"]["basis"] == "no champion"
    assert {s["name"] for s in night["steps"]} >= {"ingest", "train", "evaluate", "drift", "decide", "commit", "promote"}
    html = (night_dir / "report.html").read_text()
    assert "Decision" in html and "Drift" in html and "PSI" in html
    assert (night_dir / "roc.png").exists() and report.report.endswith("report.html")
    # The version is tagged with the night.
    meta = strict_loads((Path(reg.version_uri(registry, champ["version"])) / reg.META).read_text())
    assert meta["night"]["date"] == "2018-10-04" and meta["night"]["key"] == night["key"]
    # Loaded from the registry, it scores the window exactly as the challenger the night
    # evaluated and promoted (every fitted part of the scorer was registered).
    from nadray.evaluate import flow_frame

    flows = arc.read_flows(archive)
    splits, tcfg, _ = compare.plan_split(flows, cfg)
    loaded = compare.score_champion(registry, champ["version"], splits, tcfg, flow_frame(splits.flows))
    evaluated = night["comparison"]["detectors"]["challenger"]
    for key in ("roc_auc", "pr_auc", "precision", "recall", "fpr"):
        assert loaded.metrics[key] == pytest.approx(evaluated[key], abs=1e-9), key


def test_the_same_night_again_is_a_no_op(night1, capsys):
    root, landing, archive, registry, cfg, report = night1
    before = (_champion_bytes(registry), arc.count_rows(archive), reg.list_versions(registry))
    again = retrain(str(landing), archive, registry, date="2018-10-04", cfg=cfg)
    assert again.ok and again.status == "already done"
    assert (_champion_bytes(registry), arc.count_rows(archive), reg.list_versions(registry)) == before
    # The command line says so and exits 0.
    from nadray.cli import main

    argv = ["retrain", "--landing", str(landing), "--archive", archive, "--registry", registry, "--date", "2018-10-04"]
    argv += [a for kv in TINY for a in ("--set", kv)]
    assert main(argv) == 0
    assert "already done" in capsys.readouterr().out
    assert reg.list_versions(registry) == before[2]


def test_a_night_that_fails_after_training_changes_neither_champion_nor_archive(night1, monkeypatch):
    root, landing, archive, registry, cfg, _ = night1
    _land(landing, "CTU-Malware-Capture-44-1")
    champion_before, rows_before = _champion_bytes(registry), arc.count_rows(archive)
    manifests_before = sorted(os.listdir(Path(archive) / "_manifest"))

    def boom(*a, **k):
        raise RuntimeError("injected failure at the promotion decision")

    monkeypatch.setattr(compare, "decide", boom)
    report = retrain(str(landing), archive, registry, date="2019-01-10", cfg=cfg)
    assert not report.ok and report.status == "failed"
    assert "injected failure" in report.error and "FAILED" in report.summary()
    assert _champion_bytes(registry) == champion_before
    assert arc.count_rows(archive) == rows_before
    assert sorted(os.listdir(Path(archive) / "_manifest")) == manifests_before
    assert not (Path(archive) / "_staging").exists()
    night = json.loads((Path(reg.model_root(registry)) / "nights" / "2019-01-10" / "night.json").read_text())
    assert night["status"] == "failed" and night["archive_committed"] is False
    # Warm start was tried against the champion (used when the features match).
    assert "used" in night["warm_start"]


def test_an_interrupted_commit_is_repaired_by_the_rerun(tmp_path, monkeypatch):
    from nadray.ingest import stream

    landing, archive = tmp_path / "landing", str(tmp_path / "archive")
    _land(landing, "CTU-Malware-Capture-44-1")
    date = "2019-01-10"
    monkeypatch.setattr(stream, "WHOLE_BYTES", 5000)  # a large file, in miniature: parsed in pieces
    monkeypatch.setattr(stream, "PIECE_BYTES", 5000)
    files = staging.scan_landing(str(landing), archive)
    assert [f.status for f in files] == ["new"]
    staging.stage(files, archive, date)
    # Readers of the main archive see nothing of the staged data.
    assert arc.count_rows(archive) == 0 and arc.list_dates(archive) == []

    def crash(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(arc, "write_manifest", crash)
    with pytest.raises(OSError):
        staging.commit(archive, date)  # parts copied, manifest not written
    monkeypatch.undo()
    assert list(Path(archive).glob("date=*/part-*.parquet"))  # copied, and yet
    assert arc.count_rows(archive) == 0  # hidden from readers until the manifest entry
    files = staging.scan_landing(str(landing), archive)
    assert [f.status for f in files] == ["new"]  # no manifest entry: not archived yet
    # The rerun cuts the file elsewhere, in fewer pieces: some of the first commit's piece
    # parts have names the rerun does not write.
    monkeypatch.setattr(stream, "WHOLE_BYTES", 12000)
    monkeypatch.setattr(stream, "PIECE_BYTES", 12000)
    staging.stage(files, archive, date)
    lo, hi = "2019-01-01", "2019-02-01"
    assert staging.load_window(archive, date, arc.as_datetime(lo, "s"), arc.as_datetime(hi, "e")).num_rows == 237
    staging.commit(archive, date)
    assert arc.count_rows(archive) == 237  # the interrupted commit's copies removed: nothing doubled
    assert [f.status for f in staging.scan_landing(str(landing), archive)] == ["archived"]


def test_a_night_whose_files_predate_the_window_says_where_the_flows_are(tmp_path):
    # 2019 flows landed on a 2026 night with the default 30-day window: no Ray, no model,
    # nothing archived, and the error names the dates the data do cover.
    landing, archive, registry = tmp_path / "landing", str(tmp_path / "archive"), str(tmp_path / "registry")
    _land(landing, "CTU-Malware-Capture-44-1")
    report = retrain(str(landing), archive, registry, date="2026-11-26", cfg=load_config(None, FRESH))
    assert not report.ok
    text = report.summary()
    assert "no flows in the window 2026-10-28 .. 2026-11-27 (nightly.window_days=30)" in text, text
    assert "they hold flows dated 2019-01-10 .. 2019-01-10: pass --date within that range" in text, text
    assert arc.count_rows(archive) == 0 and reg.champion(registry) is None


def test_a_night_with_nothing_readable_says_so(tmp_path):
    # Only a file that is not a flow log: refused, and the error says there is nothing at all.
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "notes.txt").write_text("span port moved to the core switch\n")
    report = retrain(str(landing), str(tmp_path / "archive"), str(tmp_path / "registry"), date="2026-11-26",
                     cfg=load_config(None, FRESH))
    assert not report.ok
    assert "and its staging; they hold no flows" in report.summary(), report.summary()


def test_a_zeek_sensors_other_logs_are_passed_by_not_refused(tmp_path, shared_data):
    """A Zeek sensor ships dns.log, ssl.log... beside conn.log. They are logs, not damaged flow
    logs: recorded once and passed by on later nights, never copied into the quarantine or
    counted as refused. A file that is no log at all is still refused whole."""
    zeek = shared_data / "stratosphere_slips_testdata" / "test9-mixed-zeek-dir"
    landing, archive = tmp_path / "landing", str(tmp_path / "archive")
    sensor = landing / "sensor1" / "2019-01-10"
    sensor.mkdir(parents=True)
    for name in ["dns.log", "ssl.log"]:
        shutil.copyfile(zeek / name, sensor / name)
    _land(landing, "CTU-Malware-Capture-44-1")
    (landing / "notes.txt").write_text("span port moved to the core switch\n")
    files = staging.scan_landing(str(landing), archive)
    assert [f.status for f in files] == ["new"] * 4
    st = staging.stage([f for f in files if f.status == "new"], archive, "2019-01-10")
    assert sorted(Path(o["source"]).name for o in st.other_logs) == ["dns.log", "ssl.log"]
    assert [Path(r["source"]).name for r in st.refused] == ["notes.txt"]
    assert st.counts()["other_logs"] == 2 and st.counts()["files_refused"] == 1 and st.counts()["archived"] == 237
    assert [Path(m.split(":")[0]).name for m in st.ingest.failed_inputs] == ["notes.txt"]  # the others passed by
    assert staging.commit(archive, "2019-01-10")["other_logs"] == 2
    kept = sorted(p.name for p in (Path(archive) / "_quarantine" / "files").iterdir())
    assert len(kept) == 2 and any(k.endswith("-notes.txt") for k in kept)  # the notes' bytes and record only
    status = {Path(f.uri).name: f.status for f in staging.scan_landing(str(landing), archive)}
    assert status == {"dns.log": "other log", "ssl.log": "other log", "notes.txt": "quarantined",
                      datasets.path("iot23-CTU-Malware-Capture-44-1").name: "archived"}
    assert arc.count_rows(archive) == 237
    # The night's summary names them as skipped, apart from the refused file.
    landing2, archive2 = tmp_path / "landing2", str(tmp_path / "archive2")
    shutil.copytree(landing, landing2)
    report = retrain(str(landing2), archive2, str(tmp_path / "registry"), date="2026-11-26",
                     cfg=load_config(None, FRESH))
    text = report.summary()
    assert "1 files refused, 2 other logs skipped" in text, text
    assert f"skipped: {landing2 / sensor.relative_to(landing) / 'dns.log'}: not a flow log" in text, text
    assert "refused: " + str(landing2 / "notes.txt") in text, text


def test_a_file_written_just_before_the_scan_waits_for_the_next_night(tmp_path):
    """A file may still be being copied into the landing: archived now, it would be cut short, and
    its complete copy (new content) archived again in full. One written less than
    nightly.min_file_age_s ago waits, and the night says so."""
    landing, archive = tmp_path / "landing", str(tmp_path / "archive")
    _land(landing, "CTU-Malware-Capture-44-1", "CTU-Malware-Capture-42-1")
    old = landing / datasets.path("iot23-CTU-Malware-Capture-42-1").name
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    files = {Path(f.uri).name: f for f in staging.scan_landing(str(landing), archive, min_age_s=300)}
    fresh = files[datasets.path("iot23-CTU-Malware-Capture-44-1").name]
    assert fresh.status == "too recent" and 0 <= fresh.age_s < 300
    assert files[old.name].status == "new" and files[old.name].age_s >= 3600
    report = retrain(str(landing), archive, str(tmp_path / "registry"), date="2026-11-26", cfg=load_config(None, []))
    text = report.summary()
    assert "ingest: 1 new files, 4426 rows archived" in text, text
    assert f"waiting: {landing / fresh.uri.rsplit('/', 1)[-1]}: written " in text, text
    assert "under nightly.min_file_age_s=300.0: left for the next night" in text, text
    assert '"too_recent": 1' in text, text


# --------------------------------------------------------------------------- drift (no Train fit)


def _capture(name: str) -> pa.Table:
    from nadray.data import sort_flows
    from nadray.ingest import read_input

    return sort_flows(read_input(str(datasets.path(f"iot23-{name}"))).flows)


def test_drift_flags_another_capture_but_not_a_held_back_part_of_the_same_one():
    from nadray.data import sort_flows
    from nadray.features import FeatureEncoder

    cfg = Config()
    same = _capture("CTU-Malware-Capture-20-1")
    held = np.random.default_rng(0).random(same.num_rows) < 0.3
    enc = FeatureEncoder.fit(same.filter(pa.array(~held)), cfg)
    quiet = compare.drift_step(enc.transform(same), ~held, held, cfg)
    assert not quiet["flagged"], quiet["reasons"]
    assert quiet["max_psi"] < cfg.nightly.psi_limit and quiet["n_new_entities"] == 0

    both = sort_flows(pa.concat_tables([same, _capture("CTU-Honeypot-Capture-4-1")]))
    old = np.array([("20-1" in s) for s in both.column("source").to_pylist()])
    enc = FeatureEncoder.fit(both.filter(pa.array(old)), cfg)
    loud = compare.drift_step(enc.transform(both), old, ~old, cfg)
    assert loud["flagged"] and loud["max_psi"] > cfg.nightly.psi_limit
    assert any(r["over_limit"] for r in loud["features"]) and loud["n_new_entities"] >= 1


# --------------------------------------------------------------------------- night.json is strict JSON


def test_night_json_writes_undefined_values_as_null_and_says_why(tmp_path, monkeypatch):
    import pandas as pd

    from nadray import evaluate
    from nadray.drift import drift_report
    from nadray.nightly import report as night_report

    cfg = Config()
    # Drift with an empty comparison side, as drift_report makes it.
    drift = drift_report(np.ones((20, 2)), np.empty((0, 2)), ["a", "b"], np.ones(20), np.array([]), None, None,
                         cfg.nightly.psi_limit, cfg.nightly.score_shift_limit)
    # A window with one label class: ROC-AUC and PR-AUC are undefined.
    flows = pd.DataFrame({"label": [0.0] * 6, "label_detail": ["-"] * 6,
                          "ts": np.datetime64("2019-01-10", "us") + np.arange(6).astype("timedelta64[h]")})
    scores = np.linspace(0, 1, 6)
    metrics = evaluate.flow_metrics(flows, np.ones(6, bool), scores, 0.5, np.array(["h"] * 6, dtype=object))
    # The challenger's scores are all NaN on its training part: score KS undefined.
    splits = SimpleNamespace(train_mask=np.arange(6) < 3, test_mask=np.arange(6) >= 3)
    stability = compare._stability(np.r_[[np.nan] * 3, scores[3:]], 0.5, flows["label"].to_numpy(), splits)
    record = {"date": "2019-01-10", "status": "complete", "drift": drift,
              "comparison": {"detectors": {"challenger": metrics}, "stability": {"challenger": stability}},
              "steps": [{"name": "drift", "seconds": 0.1, "counts": {"max_psi": float("nan")}}],
              "numbers": [np.float32("inf"), -float("inf"), np.float64(0.25)]}
    registry = str(tmp_path / "registry")
    night_report.write(registry, "nadray", "2019-01-10", record)
    text = (Path(night_report.night_uri(registry, "nadray", "2019-01-10")) / "night.json").read_text()
    night = strict_loads(text)
    assert night["drift"]["max_psi"] is None and night["drift"]["score_shift"]["ks"] is None
    assert "no finite score on one side" in night["drift"]["undefined"]["score_shift"]
    ch = night["comparison"]["detectors"]["challenger"]
    assert ch["roc_auc"] is None and ch["undefined"]["roc_auc"] == "undefined: one class (0 malicious, 6 benign)"
    st = night["comparison"]["stability"]["challenger"]
    assert st["ks"] is None and st["undefined"]["ks"].startswith("undefined: no finite score")
    assert night["steps"][0]["counts"]["max_psi"] is None and night["numbers"] == [None, None, 0.25]
    # And the record's sanitising is what keeps NaN out: without it the write fails loudly.
    from nadray import storage

    monkeypatch.setattr(storage, "jsonable", lambda obj: obj)
    with pytest.raises(ValueError, match="not JSON compliant"):
        night_report.write(registry, "nadray", "2019-01-11", {"date": "2019-01-11", "max_psi": float("nan")})


# --------------------------------------------------------------------------- decision, split, notify (pure)


def _side(metric=None, far=None, ks=None):
    return {"metrics": {"pr_auc": metric}, "stability": {"false_alarm_rate": far, "ks": ks}}


def test_decision_rules():
    cfg = Config()
    cfg.nightly.tolerance = 0.01
    assert compare.decide(_side(0.5), None, cfg).basis == "no champion"
    d = compare.decide(_side(0.795), _side(0.80), cfg)
    assert d.promote and d.basis == "labelled" and "0.7950" in d.reasons[0] and "0.7900" in d.reasons[0]
    d = compare.decide(_side(0.70), _side(0.80), cfg)
    assert not d.promote and "worse" in d.reasons[0]
    # No malicious records in the window: false alarms and score stability decide.
    d = compare.decide(_side(None, far=0.01, ks=0.1), _side(None, far=0.02, ks=0.3), cfg)
    assert d.promote and d.basis == "unlabelled"
    d = compare.decide(_side(None, far=0.10, ks=0.1), _side(None, far=0.02, ks=0.3), cfg)
    assert not d.promote
    d = compare.decide(_side(None, far=0.01, ks=0.9), _side(None, far=0.02, ks=0.3), cfg)
    assert not d.promote and "stability" in " ".join(d.reasons)


def test_comparison_window_is_the_last_days_with_flows():
    from nadray.data import sort_flows

    flows = sort_flows(pa.concat_tables([_capture("CTU-Malware-Capture-20-1"), _capture("CTU-Malware-Capture-42-1")]))
    cfg = Config()
    cfg.nightly.eval_days = 1
    splits, _, info = compare.plan_split(flows, cfg)
    assert info["eval_days"] == ["2019-01-10"]
    assert splits.test_mask.sum() == 4426  # all of 42-1, nothing of 20-1
    ts = flows.column("ts").cast(pa.int64()).to_numpy()
    assert ts[splits.train_mask].max() < ts[splits.val_mask].min() <= ts[splits.val_mask].max() < ts[splits.test_mask].min()


def test_notify_serve_sends_the_token_and_never_raises(monkeypatch):
    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen["path"], seen["auth"] = self.path, self.headers.get("Authorization")
            body = b'{"version": "v2", "changed": true}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("NADRAY_API_TOKEN", "s3cret")
        out = notify_serve(f"http://127.0.0.1:{server.server_port}/")
        assert out["status"] == "ok" and out["answer"]["changed"] is True
        assert seen == {"path": "/admin/reload", "auth": "Bearer s3cret"}
    finally:
        server.shutdown()
    bad = notify_serve(f"http://127.0.0.1:{server.server_port}", timeout_s=2)
    assert bad["status"] == "failed" and bad["error"]
