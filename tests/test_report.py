"""report: plots are valid PNGs, the HTML page is self-contained and escaped, no import-time side effects."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from nadray.metrics import detection_metrics
from nadray.report import Image, Table, history_table, render_html, timeline_entities, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _frames(seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    n = 600
    ts = pd.Timestamp("2024-03-01", tz="UTC") + pd.to_timedelta(np.sort(rng.uniform(0, 3 * 86400, n)), unit="s")
    entity = rng.choice(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"], n)
    label = np.where(entity == "10.0.0.4", (rng.uniform(size=n) < 0.3).astype(float), 0.0)
    label[:20] = np.nan
    frames = {}
    for name, sep in (("lstm", 2.0), ("isolation_forest", 0.5), ("ewma_zscore", 0.0)):
        score = rng.normal(size=n) + sep * np.nan_to_num(label)
        frames[name] = pd.DataFrame({
            "ts": ts, "entity": entity, "score": score, "threshold": 1.5, "is_anomaly": score >= 1.5,
            "label": label, "label_detail": np.where(label == 1, "C&C", "-"),
        })
    return frames


def _results(frames):
    res = {}
    for name, f in frames.items():
        res[name] = detection_metrics(f["label"], f["score"], 1.5, f["label_detail"], f["entity"],
                                      f["ts"].dt.tz_localize(None).to_numpy())
        res[name]["threshold_source"] = "validation"
    res["summary"] = {"model_version": "v-test", "test_rows": 600, "test_malicious": 50,
                      "model": {"version": "v-test", "data_range": {"min_ts": "2024-01-01"}, "config": {"data": {"sequence_length": 8}}}}
    res["split"] = {"boundaries": {"train": ["a", "b"], "val": ["b", "c"], "test": ["c", "d"]},
                    "counts": {"train": {"rows": 1}, "val": {"rows": 1}, "test": {"rows": 600}}}
    res["where_lstm_loses"] = ["ewma_zscore has fewer false alarms per entity-day than the LSTM on the test split: 0.1 vs 0.2 (-0.1)."]
    return res


def _valid_png(path) -> tuple[int, int]:
    import matplotlib.image as mpimg

    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # not a blank canvas
    return img.shape[:2]


def test_write_report_files_are_valid(tmp_path):
    frames = _frames()
    results = _results(frames)
    history = {"train_loss": [1.0, 0.8, 0.7], "val_loss": [1.1, 0.9, 0.95]}
    paths = write_report(str(tmp_path), results, frames, history)
    names = {p.split("/")[-1] for p in paths}
    assert names == {"metrics.json", "roc.png", "pr.png", "timelines.png", "loss.png", "report.html"}
    for png in ("roc.png", "pr.png", "timelines.png", "loss.png"):
        _valid_png(tmp_path / png)
    assert json.loads((tmp_path / "metrics.json").read_text())["summary"]["model_version"] == "v-test"
    html = (tmp_path / "report.html").read_text()
    for needle in ('<img src="roc.png"', '<img src="timelines.png"', "Where the LSTM loses", "fewer false alarms",
                   "v-test", "Recall per attack label", "sequence_length"):
        assert needle in html, needle
    assert "http" not in html.replace("http-equiv", "")  # self-contained: nothing fetched


def test_report_without_history_or_labels(tmp_path):
    frames = {"isolation_forest": _frames()["isolation_forest"].assign(label=np.nan)}
    results = {"isolation_forest": detection_metrics(np.full(600, np.nan), frames["isolation_forest"]["score"], 1.5)}
    paths = write_report(str(tmp_path), results, frames, None)
    assert not (tmp_path / "loss.png").exists()
    _valid_png(tmp_path / "roc.png")  # says "no labelled test records", still a valid image
    assert "Where the LSTM loses" not in (tmp_path / "report.html").read_text()
    assert len(paths) == 5


def test_timelines_include_every_entity_with_a_malicious_label():
    f = pd.DataFrame({"entity": ["a", "b", "c", "d"], "score": [9.0, 8.0, 7.0, 0.1], "label": [0, 0, 0, 1]})
    assert timeline_entities(f, top_n=2) == ["a", "b", "d"]


def test_history_formats():
    assert history_table({"train_loss": [1, 2], "val_loss": [3, 4]}) == [
        {"train_loss": 1, "val_loss": 3, "epoch": 1}, {"train_loss": 2, "val_loss": 4, "epoch": 2}]
    assert history_table([{"epoch": 3, "train_loss": 1.0}])[0]["epoch"] == 3
    assert history_table(None) == []


def test_render_html_sections_and_escaping():
    page = render_html("Nightly <run>", [
        ("Promotion", "challenger v2 promoted: PR-AUC 0.81 >= 0.80 - 0.01 & <ok>"),
        ("Drift", [{"feature": "log_dt", "psi": 0.31}, {"feature": "log_flows", "psi": 0.02}]),
        ("Flags", ["new entities: 3", "score shift: 0.05"]),
        ("Figure", Image("drift.png", "psi per feature")),
        ("Kv", {"version": "v2"}),
        ("Bold", Table([{"a": 1.0}], bold={(0, "a")})),
    ])
    assert page.startswith("<!DOCTYPE html>") and page.count("<section>") == 6
    assert "Nightly &lt;run&gt;" in page and "&amp; &lt;ok&gt;" in page and "<ok>" not in page
    assert "<td>log_dt</td><td>0.310</td>" in page
    assert "<li>new entities: 3</li>" in page and '<img src="drift.png" alt="psi per feature">' in page
    assert "<td><b>1.000</b></td>" in page


def test_import_has_no_side_effects():
    code = "import sys, nadray.report, nadray.evaluate, nadray.baselines; " \
           "print(sorted(m for m in ('matplotlib', 'sklearn', 'torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("n_entities", [0, 1])
def test_timelines_small_inputs(tmp_path, n_entities):
    from nadray.report import plot_timelines

    f = _frames()["lstm"].iloc[: 50 * n_entities]
    _valid_png(plot_timelines(f, str(tmp_path / "t.png")))
