"""evaluate: LSTM and baselines on one split, where the LSTM loses, the command, the cs448b experiment."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from _strictjson import strict_loads
from test_baselines import iot23

from nadray.config import Config, set_key
from nadray.cs448b_experiment import cs448b_daily_ewma, cs448b_experiment
from nadray.errors import InputError
from nadray.evaluate import (
    SplitMasks,
    evaluate_split,
    score_split,
    split_masks,
    summarize,
    where_lstm_loses,
)
from nadray.metrics import detection_metrics


def small_cfg() -> Config:
    cfg = Config()
    set_key(cfg, "data.sequence_length", 8)
    set_key(cfg, "model.hidden_size", 16)
    return cfg


@pytest.fixture(scope="module")
def flows(shared_data):
    return iot23(shared_data)


@pytest.fixture(scope="module")
def test_mask(flows):
    m = np.zeros(flows.num_rows, dtype=bool)
    m[int(flows.num_rows * 0.8):] = True
    return m


class FakeScorer:
    """The Scorer seam (score_table, threshold, version, meta) with scores made from the labels."""

    def __init__(self, quality: str, threshold: float = 0.5):
        from nadray.threshold import Threshold

        self.quality = quality
        self.threshold = Threshold(threshold)
        self.version = f"fake-{quality}"
        self.meta = {"config": Config().to_dict(), "history": [{"train_loss": 1.0, "val_loss": 1.1}]}

    def score_table(self, flows):
        y = flows.column("label").to_numpy(zero_copy_only=False).astype("float64")
        rng = np.random.default_rng(0)
        s = np.nan_to_num(y, nan=0.0) if self.quality == "perfect" else rng.uniform(size=len(y))
        df = pd.DataFrame({
            "source": flows.column("source").to_pylist(), "source_row": flows.column("source_row").to_numpy(),
            "ts": flows.column("ts").to_pandas(), "entity": flows.column("src_ip").to_pylist(), "score": s,
        })
        # Output in reverse order: evaluate must align on (source, source_row), not position.
        return df.iloc[::-1].reset_index(drop=True)


# --------------------------------------------------------------------------- where the LSTM loses


def _metrics(y, s, thr):
    ts = np.datetime64("2024-01-01") + np.arange(len(y)).astype("timedelta64[h]")
    return detection_metrics(y, s, thr, entity=np.array(["h1", "h2"] * (len(y) // 2)), ts=ts)


def test_where_lstm_loses_names_each_metric_a_baseline_wins():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(90), np.ones(10)]
    lstm = rng.uniform(size=100)  # chance level
    good = y + rng.uniform(0, 0.5, size=100)  # separates the classes
    res = {"lstm": _metrics(y, lstm, 0.9), "ewma_zscore": _metrics(y, good, 1.0)}
    losses = where_lstm_loses(res)
    text = " ".join(losses)
    for metric in ("ROC-AUC", "PR-AUC", "F1", "recall", "false alarms per entity-day"):
        assert metric in text, metric
    assert all(s.startswith("ewma_zscore ") for s in losses)
    roc = next(s for s in losses if "ROC-AUC" in s)
    assert f"{res['ewma_zscore']['roc_auc']:.3f} vs {res['lstm']['roc_auc']:.3f}" in roc
    # The other way round, nothing: the LSTM is not beaten.
    assert where_lstm_loses({"lstm": res["ewma_zscore"], "ewma_zscore": res["lstm"]}) == []
    # Ties are not losses; missing metrics are not compared.
    assert where_lstm_loses({"lstm": res["lstm"], "hgb": dict(res["lstm"])}) == []
    assert where_lstm_loses({"lstm": {**res["lstm"], "roc_auc": None}, "hgb": {"n": 1, "roc_auc": 0.9}}) == []


# --------------------------------------------------------------------------- splits


def test_split_masks_from_test_mask_and_from_splits(flows, test_mask):
    from nadray.data import time_split

    m = split_masks(flows, test_mask, Config())
    assert m.test.sum() == test_mask.sum()
    before = int(np.flatnonzero(test_mask)[0])
    assert m.train.sum() + m.val.sum() == before and abs(m.train.sum() / before - 0.75) < 0.01
    assert m.train[:10].all() and m.boundaries["train"][0] <= m.boundaries["val"][0]

    splits = time_split(flows, Config())
    s = split_masks(splits.flows, splits)
    assert (s.test == splits.test_mask).all() and "cuts" in s.boundaries
    # Splits over a differently ordered table: matched on (source, source_row).
    s2 = split_masks(flows.slice(0).take(np.arange(flows.num_rows)[::-1]), splits)
    assert s2.test.sum() == splits.test_mask.sum()

    with pytest.raises(InputError, match="overlap"):
        split_masks(flows, SplitMasks(test_mask, ~test_mask, test_mask))
    with pytest.raises(InputError, match="test_mask: expected a boolean array of shape"):
        split_masks(flows, np.ones(3, dtype=bool))


# --------------------------------------------------------------------------- evaluate_split


def test_evaluate_split_baselines_per_label_detail_and_false_alarms(flows, test_mask):
    res = evaluate_split(None, flows, test_mask, small_cfg())
    assert {"isolation_forest", "hgb", "ewma_zscore", "split", "summary", "where_lstm_loses"} <= set(res)
    iso = res["isolation_forest"]
    assert iso["n"] == test_mask.sum() and iso["threshold_source"] == "validation"
    assert iso["roc_auc"] >= 0.7  # quality floor on real data
    assert any("C&C" in d for d in iso["recall_per_label_detail"])
    assert iso["false_alarms_per_entity_day"] is not None and iso["entity_days"] > 0
    assert res["split"]["counts"]["test"]["rows"] == int(test_mask.sum())
    json.dumps(res)  # JSON-safe as is


def test_hgb_is_skipped_without_both_labels(flows, test_mask):
    import pyarrow as pa

    unlabelled = flows.set_column(flows.schema.get_field_index("label"), "label",
                                  pa.nulls(flows.num_rows, pa.int8()))
    res = evaluate_split(None, unlabelled, test_mask, small_cfg(), baselines=["isolation_forest", "hgb"])
    assert "hgb" not in res and "both 0 and 1" in res["summary"]["skipped"]["hgb"]
    assert res["isolation_forest"]["roc_auc"] is None  # no labels: no ranking metric, no crash
    assert res["isolation_forest"]["undefined"]["roc_auc"] == "undefined: no labelled records"
    strict_loads(json.dumps(res, allow_nan=False))  # metrics.json is strict JSON


def test_jsonable_writes_non_finite_numbers_as_null():
    from nadray.storage import jsonable

    obj = {"a": float("nan"), "b": np.float32("inf"), "c": [np.float64(-np.inf), 1.5, np.int64(2)], 3: (True,)}
    assert jsonable(obj) == {"a": None, "b": None, "c": [None, 1.5, 2], "3": [True]}


def test_detection_metrics_say_why_a_metric_is_undefined():
    """What training stores in checkpoint.json says why a null is null, as metrics.json does."""
    ts = np.datetime64("2019-01-10", "us") + np.arange(4).astype("timedelta64[h]")
    one_class = detection_metrics(np.zeros(4), np.arange(4.0), 2.0, entity=np.array(["h"] * 4, object), ts=ts)
    assert one_class["roc_auc"] is None and one_class["undefined"] == {
        "roc_auc": "undefined: one class (0 malicious, 4 benign)", "pr_auc": "undefined: one class (0 malicious, 4 benign)",
        "recall": "undefined: no malicious records", "f1": "undefined: no malicious records"}
    # No malicious record: recall is not 0 (a miss) but undefined; precision is measured (2 false alerts).
    assert one_class["recall"] is one_class["f1"] is None and one_class["precision"] == 0.0
    unlabelled = detection_metrics(np.full(4, np.nan), np.arange(4.0), 2.0, entity=np.array(["h"] * 4, object), ts=ts)
    assert unlabelled["undefined"]["roc_auc"] == "undefined: no labelled records"
    assert unlabelled["precision"] is unlabelled["recall"] is unlabelled["f1"] is None
    assert unlabelled["undefined"]["precision"] == unlabelled["undefined"]["recall"] == "undefined: no labelled records"
    assert unlabelled["undefined"]["fpr"] == unlabelled["undefined"]["false_alarms_per_entity_day"] == \
        "undefined: no benign records"
    both = detection_metrics(np.array([0, 1, 0, 1.0]), np.arange(4.0), 2.0)
    assert "undefined" not in both


def test_evaluate_split_with_lstm_scorer_seam(flows, test_mask):
    perfect = evaluate_split(FakeScorer("perfect"), flows, test_mask, small_cfg())
    assert perfect["lstm"]["roc_auc"] == 1.0 and perfect["lstm"]["threshold_source"] == "checkpoint"
    assert perfect["where_lstm_loses"] == [] and perfect["summary"]["lstm_beats_every_baseline"]
    chance = evaluate_split(FakeScorer("random", threshold=0.99), flows, test_mask, small_cfg())
    assert any(s.startswith("isolation_forest has a higher ROC-AUC") for s in chance["where_lstm_loses"])
    assert chance["summary"]["model_version"] == "fake-random"


def _tiny_model(flows, cfg, seed=0):
    """An untrained LSTM with a real encoder and threshold: the Scorer without Ray Train."""
    import torch

    from nadray.data import time_split
    from nadray.features import FeatureEncoder
    from nadray.model import EventLSTM, ModelArgs
    from nadray.threshold import Threshold

    splits = time_split(flows, cfg)
    enc = FeatureEncoder.fit(splits.train, cfg)
    torch.manual_seed(seed)
    args = ModelArgs.from_config(cfg, enc.n_features)
    model = EventLSTM(args)
    return model, args, enc, splits


def test_evaluate_split_with_a_real_scorer(flows):
    from nadray.scorer import Scorer
    from nadray.threshold import Threshold

    cfg = small_cfg()
    model, args, enc, splits = _tiny_model(flows, cfg)
    scorer = Scorer(model, enc, Threshold(0.0), {"config": cfg.to_dict()}, version="tiny")
    data = score_split(scorer, splits.flows, splits, cfg)
    res = summarize(data)
    assert res["lstm"]["n"] == splits.test_mask.sum()
    assert np.isfinite(data.detectors["lstm"].scores).all()
    frame = data.frame("lstm")
    assert list(frame.columns)[:5] == ["source", "source_row", "ts", "entity", "score"]
    assert len(frame) == splits.test_mask.sum()
    # The stream already encoded (as training does), with or without its event scores: the same results.
    events = enc.transform(splits.flows)
    for given in ({"events": events}, {"events": events, "event_scores": scorer.event_scores(events)}):
        again = score_split(scorer, splits.flows, splits, cfg, **given)
        for name, det in data.detectors.items():
            assert np.array_equal(again.detectors[name].scores, det.scores), name
            assert list(again.detectors[name].entity) == list(det.entity) and again.detectors[name].threshold == det.threshold
        assert summarize(again) == res


def test_evaluate_command_writes_metrics_and_report(flows, tmp_path, ray_session):
    """`nadray evaluate` on a registered tiny model: the split comes from the checkpoint's config.

    No Ray Train: the model is untrained, registered with the registry API (the
    archive is read with Ray Data, hence the session's Ray).
    """
    from nadray import archive, registry
    from nadray.evaluate import evaluate
    from nadray.scorer import Scorer
    from nadray.threshold import Threshold

    cfg = small_cfg()
    set_key(cfg, "data.val_fraction", 0.25)
    model, args, enc, splits = _tiny_model(flows, cfg)
    scorer = Scorer(model, enc, Threshold(0.0), {})
    val = scorer.score_table(splits.val)
    thr = Threshold.calibrate(val["score"].to_numpy(), val["label"].to_numpy(dtype="float64", na_value=np.nan))
    arch, reg = str(tmp_path / "archive"), str(tmp_path / "registry")
    archive.write_flows(arch, flows)
    meta = {
        "config": cfg.to_dict(), "model_args": args.to_dict(), "encoder": enc.to_dict(),
        "threshold": thr.to_dict(), "history": [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.2},
                                                {"epoch": 2, "train_loss": 0.7, "val_loss": 0.9}],
    }
    version = registry.register(reg, model.state_dict(), meta)
    out = tmp_path / "report"
    res = evaluate(arch, f"{reg}@{version}", str(out))
    assert res["summary"]["model_version"] == version
    assert res["lstm"]["threshold"] == pytest.approx(thr.value)
    # Same split as training: the checkpoint's val_fraction, not the default.
    assert res["split"]["counts"]["test"]["rows"] == int(splits.test_mask.sum())
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["summary"]["detectors"].keys() >= {"lstm", "isolation_forest", "ewma_zscore"}
    for name in ("report.html", "roc.png", "pr.png", "timelines.png", "loss.png"):
        assert (out / name).stat().st_size > 0, name
    html = (out / "report.html").read_text()
    assert "Where the LSTM loses" in html and version in html


# --------------------------------------------------------------------------- cs448b


def _cs448b_scores(alert_days: dict[str, list[str]]) -> pd.DataFrame:
    days = pd.date_range("2006-07-01", "2006-09-30", freq="D", tz="UTC")
    rows = []
    for h in map(str, range(10)):
        for d in days:
            alert = str(d.date()) in alert_days.get(h, [])
            rows.append({"entity": h, "ts": d, "score": 5.0 if alert else 1.0 + int(h) / 100, "threshold": 3.0})
    return pd.DataFrame(rows)


def test_cs448b_experiment_first_alerts_ranks_and_clean_alerts():
    scores = _cs448b_scores({
        "1": ["2006-08-21"], "5": ["2006-09-06"], "4": ["2006-09-10", "2006-09-11"],
        "0": ["2006-08-15"], "6": ["2006-07-10"],  # July is outside the window
    })
    res = cs448b_experiment(scores)
    lstm = res["lstm"]
    assert lstm["compromised"]["1"]["days_before_investigation"] == 3
    assert lstm["compromised"]["5"]["days_before_investigation"] == -2
    assert lstm["compromised"]["4"]["first_alert"] == "2006-09-10" and lstm["compromised"]["4"]["alert_days"] == 2
    assert lstm["compromised"]["6"]["first_alert"] is None
    assert lstm["clean_hosts_alerting"] == 1 and lstm["clean_alerting"] == {"0": 1}
    assert lstm["detected_before_investigation"] == 2
    assert set(lstm["ranking"][:4]) == {"1", "5", "4", "0"}
    assert 0.5 < lstm["host_roc_auc"] < 1.0
    json.dumps(res)


def test_cs448b_ewma_baseline_on_the_real_data(shared_data):
    """The baseline the LSTM must beat on the founding question."""
    from nadray.ingest import read_input

    flows = read_input(str(shared_data / "cs448b_ipasn" / "cs448b_ipasn.mo7903.csv"), "cs448b").flows
    ew = cs448b_daily_ewma(flows)
    res = cs448b_experiment(ew, {"compromised": {"1": "2006-08-24", "3": "2006-09-26", "4": "2006-09-18",
                                                 "5": "2006-09-04", "6": "2006-09-26"},
                                 "clean": ["0", "2", "7", "8", "9"]}, baseline_df=ew)
    assert res["ewma_zscore"]["host_roc_auc"] >= 0.8
    assert len(res["ewma_zscore"]["compromised"]) == 5


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_cs448b_lstm_end_to_end_quality_floor(ray_session, tmp_path):
    """The founding experiment as the demo runs it (bundled data, default seed 0): train on
    July, score August-September. Issue #3's criterion: every compromised host's highest
    Aug-Sep score above every clean host's (host ROC-AUC 1.0), and no more clean hosts
    alerting than under the z-score. Measured on seeds 0-2: ROC-AUC 1.0 with the lowest
    compromised maximum 1.5-1.9x the highest clean one; 2, 2, 3 clean hosts alerting
    against the z-score's 3. Fails at the 0.92-0.96 of a fixed 20-event prior on the
    per-host error scale, and at 0.84-0.88 without constant-feature prediction."""
    from nadray.nightly.demo import cs448b_experiment as demo_experiment

    res = demo_experiment(str(tmp_path))
    lstm, z = res["lstm"], res["ewma_zscore"]
    assert lstm["host_roc_auc"] == 1.0, lstm["ranking"]
    assert lstm["clean_hosts_alerting"] <= z["clean_hosts_alerting"], (lstm["clean_alerting"], z["clean_alerting"])


@pytest.mark.slow  # starts a SeaweedFS server (~20 s)
def test_report_to_s3(s3_bucket):
    """An s3:// report folder: written locally, then uploaded file by file."""
    from test_report import _frames, _results

    from nadray import storage
    from nadray.evaluate import publish_report

    frames = _frames()
    uri = publish_report(f"{s3_bucket}/reports/run1", _results(frames), frames, None)
    assert uri == f"{s3_bucket}/reports/run1/report.html"
    assert set(storage.ls(f"{s3_bucket}/reports/run1")) == {"metrics.json", "pr.png", "roc.png", "timelines.png", "report.html"}
    assert storage.read_bytes(f"{s3_bucket}/reports/run1/roc.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_text_names_skipped_detectors_and_the_outcome():
    from nadray.evaluate import summary_text

    s = {"model_version": "v1", "archive": "a", "test_rows": 1200, "test_labelled": 1000, "test_malicious": 12,
         "detectors": {"lstm": {"roc_auc": 0.91, "pr_auc": None, "n_alerts": 1234}},
         "skipped": {"supervised_hgb": "the training split holds no malicious flows"}}
    text = summary_text({"summary": s, "where_lstm_loses": []})
    lines = text.splitlines()
    assert lines[0] == "model v1 on a: test 1,200 flows, 1,000 labelled (12 malicious)"
    assert lines[2].split()[:3] == ["lstm", "0.910", "n/a"] and lines[2].split()[-1] == "1,234"
    assert "supervised_hgb: skipped (the training split holds no malicious flows)" in lines
    assert "where the LSTM loses" not in text and "beats the LSTM" not in text
    won = summary_text({"summary": {**s, "lstm_beats_every_baseline": True, "report": "r/report.html"}})
    assert won.splitlines()[-2:] == ["no baseline beats the LSTM on any compared metric",
                                    "report: r/report.html (metrics.json beside it)"]
    # Nothing defined on both sides (an unlabelled test split): no claim either way.
    none = summary_text({"summary": {**s, "test_labelled": 0, "lstm_beats_every_baseline": None}})
    assert none.splitlines()[-1] == "the LSTM was not compared with the baselines: the test split has no labelled flows"
    lost = summary_text({"summary": s, "where_lstm_loses": ["IsolationForest has the higher PR-AUC"]})
    assert lost.splitlines()[-2:] == ["where the LSTM loses (1):", "  IsolationForest has the higher PR-AUC"]
