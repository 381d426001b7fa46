"""``nadray evaluate``: the LSTM and the baselines on the same time-ordered split.

Every detector is judged the same way (TSB-AD's lesson: a sequence model has to
earn its place against simple ones):

1. fit on the training split (the LSTM already was, by ``nadray train``);
2. threshold from validation with ``Threshold.calibrate`` (the LSTM's is the one in
   its checkpoint, calibrated the same way on the same split);
3. metrics on the test split with ``nadray.metrics.detection_metrics``, one row per
   flow, a flow's score being the highest of its entities' scores.

The whole time-ordered stream is scored, so test records are scored with the
context of their entity's earlier records; only test rows are counted.

``evaluate_split`` returns a JSON-safe dict; ``evaluate`` is the command: it loads
the archive, splits it the way training did, and writes ``metrics.json``, the
PNG plots and ``report.html`` to a local folder or ``s3://`` prefix.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nadray.errors import InputError
from nadray.storage import jsonable

log = logging.getLogger("nadray.evaluate")

LSTM = "lstm"

# Metrics compared in "where the LSTM loses": (key, readable name, higher is better).
COMPARED_METRICS = [
    ("roc_auc", "ROC-AUC", True),
    ("pr_auc", "PR-AUC", True),
    ("f1", "F1", True),
    ("recall", "recall", True),
    ("false_alarms_per_entity_day", "false alarms per entity-day", False),
]

_FRAME_COLUMNS = ["source", "source_row", "ts", "entity", "score", "is_anomaly", "threshold", "label", "label_detail"]


@dataclass
class SplitMasks:
    """Which rows of the evaluated stream belong to each split; rows in none are context only."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    boundaries: dict[str, Any] = field(default_factory=dict)


@dataclass
class DetectorScores:
    """One detector's per-flow scores over the whole stream and its threshold."""

    scores: np.ndarray  # (n,) float64, higher is more anomalous
    entity: np.ndarray  # (n,) the entity whose score the flow took
    threshold: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalData:
    """Everything ``evaluate_split`` computes before summarising: kept for the plots."""

    flows: Any  # pd.DataFrame: ts, source, source_row, label, label_detail of every row
    masks: SplitMasks
    detectors: dict[str, DetectorScores]
    skipped: dict[str, str]
    model_version: str | None = None

    def frame(self, name: str, split: str = "test"):
        """Per-flow frame of one detector on one split, in the score-output columns."""
        det = self.detectors[name]
        return score_frame(self.flows, getattr(self.masks, split), det.scores, det.entity, det.threshold)


def score_frame(flows: Any, mask: np.ndarray, scores: np.ndarray, entity: np.ndarray, threshold: float):
    """Per-flow frame of the rows of ``mask`` in the score-output columns (for the plots).

    ``flows`` is the ``EvalData.flows`` frame; ``scores`` and ``entity`` are (n,) over all its rows.
    """
    import pandas as pd

    f = flows.loc[mask, ["source", "source_row", "ts", "label", "label_detail"]].copy()
    f["entity"] = entity[mask]
    f["score"] = scores[mask]
    f["threshold"] = threshold
    f["is_anomaly"] = f["score"].to_numpy() >= threshold
    return pd.DataFrame(f[_FRAME_COLUMNS]).reset_index(drop=True)


# --------------------------------------------------------------------------- splits


def _keys(table: Any):
    import pandas as pd

    if hasattr(table, "column"):  # pa.Table
        src = table.column("source").to_numpy(zero_copy_only=False)
        row = table.column("source_row").to_numpy(zero_copy_only=False)
    else:
        src, row = table["source"].to_numpy(), table["source_row"].to_numpy()
    return pd.MultiIndex.from_arrays([np.asarray(src, dtype=object), np.asarray(row, dtype="int64")])


def _ts_range(ts: np.ndarray) -> list[str] | None:
    ts = np.asarray(ts)
    if not len(ts):
        return None
    return [str(ts.min()), str(ts.max())]


def split_masks(flows_all: Any, split: Any, cfg: Any = None) -> SplitMasks:
    """Boolean masks over the rows of ``flows_all`` for train, val and test.

    ``split`` is a ``nadray.data.Splits`` (rows matched on ``(source, source_row)``),
    a ``SplitMasks``, a mapping ``{"train": mask, "val": mask, "test": mask}``, or a
    single boolean test mask: then the rows before the first test row are divided
    into train and validation in the ratio ``data.train_fraction : data.val_fraction``.
    """
    n = flows_all.num_rows if hasattr(flows_all, "num_rows") else len(flows_all)
    ts = _ts_array(flows_all)
    if isinstance(split, SplitMasks):
        masks = split
    elif hasattr(split, "train_mask") and getattr(split, "flows", None) is not None and (
        split.flows is flows_all or _keys(split.flows).equals(_keys(flows_all))
    ):
        # nadray.data.Splits over this very stream: its masks apply row for row.
        masks = SplitMasks(*(np.asarray(getattr(split, f"{s}_mask"), dtype=bool) for s in ("train", "val", "test")),
                           boundaries={"cuts": jsonable(getattr(split, "boundaries", {}) or {})})
    elif all(hasattr(split, s) for s in ("train", "val", "test")):
        keys = _keys(flows_all)
        masks = SplitMasks(
            *(np.asarray(keys.isin(_keys(getattr(split, s)))) for s in ("train", "val", "test")),
            boundaries={"cuts": jsonable(getattr(split, "boundaries", {}) or {})},
        )
        found = int(masks.train.sum() + masks.val.sum() + masks.test.sum())
        expected = sum(len(getattr(split, s)) for s in ("train", "val", "test"))
        if found != expected:
            raise InputError(
                f"split: {expected - found} of {expected} split rows are not in flows_all (matched on source, source_row)"
            )
    elif isinstance(split, dict):
        missing = {"train", "val", "test"} - set(split)
        if missing:
            raise InputError(f"split: mapping needs keys train, val, test; missing {sorted(missing)}")
        masks = SplitMasks(*(np.asarray(split[s], dtype=bool) for s in ("train", "val", "test")))
    else:
        test = np.asarray(split, dtype=bool)
        if test.shape != (n,):
            raise InputError(f"test_mask: expected a boolean array of shape ({n},), got {test.shape}")
        if not test.any():
            raise InputError("test_mask: selects no rows")
        from nadray.config import Config

        d = (cfg or Config()).data
        before = np.flatnonzero(~test & (np.arange(n) < np.flatnonzero(test)[0]))
        n_train = int(round(len(before) * d.train_fraction / (d.train_fraction + d.val_fraction)))
        train = np.zeros(n, dtype=bool)
        val = np.zeros(n, dtype=bool)
        train[before[:n_train]] = True
        val[before[n_train:]] = True
        masks = SplitMasks(train, val, test)
    for s in ("train", "val", "test"):
        m = getattr(masks, s)
        if m.shape != (n,):
            raise InputError(f"split mask {s!r}: expected shape ({n},), got {m.shape}")
    if (masks.train & masks.test).any() or (masks.val & masks.test).any() or (masks.train & masks.val).any():
        raise InputError("split: train, val and test overlap; each row belongs to at most one split")
    masks.boundaries = {**{s: _ts_range(ts[getattr(masks, s)]) for s in ("train", "val", "test")}, **masks.boundaries}
    return masks


def _ts_array(flows: Any) -> np.ndarray:
    if hasattr(flows, "column"):
        col = flows.column("ts")
        import pyarrow as pa
        import pyarrow.compute as pc

        if pa.types.is_timestamp(col.type) and col.type.tz is not None:
            col = pc.cast(col, pa.timestamp(col.type.unit))
        return col.to_numpy(zero_copy_only=False).astype("datetime64[us]")
    import pandas as pd

    ts = pd.to_datetime(flows["ts"], utc=True)
    return ts.dt.tz_localize(None).to_numpy().astype("datetime64[us]")


def flow_frame(flows_all: Any):
    """The columns evaluation needs, one row per flow, labels as float (NaN unknown)."""
    import pandas as pd

    cols = ["source", "source_row", "label", "label_detail"]
    if hasattr(flows_all, "select"):
        present = [c for c in cols if c in flows_all.column_names]
        df = flows_all.select(present).to_pandas()
    else:
        df = pd.DataFrame(flows_all[[c for c in cols if c in flows_all.columns]]).reset_index(drop=True)
    df["ts"] = _ts_array(flows_all)
    if "label" not in df:
        df["label"] = np.nan
    df["label"] = pd.to_numeric(df["label"], errors="coerce").astype("float64")
    if "label_detail" not in df:
        df["label_detail"] = None
    return df


# --------------------------------------------------------------------------- thresholds


def calibrate(scores: np.ndarray, labels: np.ndarray, cfg: Any):
    """The same call the LSTM's threshold came from, on validation flows."""
    from nadray.threshold import Threshold

    return Threshold.calibrate(
        np.asarray(scores, dtype="float64"),
        np.asarray(labels, dtype="float64"),
        method=cfg.threshold.method,
        target_fpr=cfg.threshold.target_fpr,
    )


def _threshold_value(t: Any) -> float:
    return float(t.value if hasattr(t, "value") else t)


# --------------------------------------------------------------------------- scoring


def _lstm_scores(scorer: Any, flows_all: Any, keys, events: Any = None, event_scores: Any = None) -> DetectorScores:
    """Score the whole time-ordered stream with the LSTM and align to the rows of ``flows_all``.

    With ``events`` (``flows_all`` already encoded with the scorer's encoder) the flow
    scores come from them, and from ``event_scores`` too when those are given; else
    ``scorer.score_table`` encodes and scores the stream itself. The results are the same.
    """
    import pandas as pd

    if events is not None:
        if event_scores is None:
            event_scores = scorer.event_scores(events)
        scores, entity = scorer.flow_scores(events, event_scores, len(keys))
        if np.isnan(scores).any():
            raise InputError(f"LSTM scorer: {int(np.isnan(scores).sum())} of {len(keys)} flows got no score")
        value = _threshold_value(scorer.threshold)
    else:
        df = scorer.score_table(flows_all)
        if len(df) != len(keys):
            raise InputError(f"LSTM scorer returned {len(df)} rows for {len(keys)} flows; expected one row per flow")
        pos = pd.MultiIndex.from_arrays(
            [df["source"].to_numpy(dtype=object), df["source_row"].to_numpy(dtype="int64")]
        )
        where = keys.get_indexer(pos) if keys.is_unique else np.arange(len(df))
        if (where < 0).any():
            raise InputError("LSTM scorer returned rows whose (source, source_row) are not in the evaluated flows")
        scores = np.full(len(keys), np.nan)
        entity = np.full(len(keys), None, dtype=object)
        scores[where] = df["score"].to_numpy(dtype="float64")
        entity[where] = df["entity"].to_numpy(dtype=object)
        thr = scorer.threshold
        value = _threshold_value(thr) if thr is not None else float(df["threshold"].iloc[0])
    info = {"threshold_source": "checkpoint", "model_version": getattr(scorer, "version", None)}
    return DetectorScores(scores, entity, value, info)


def _encoder_for(scorer: Any, train_flows: Any, cfg: Any):
    """The LSTM's own feature encoder when the scorer exposes it, else one fitted on the training split."""
    enc = getattr(scorer, "encoder", None) if scorer is not None else None
    if enc is not None and hasattr(enc, "transform"):
        return enc
    from nadray.features import FeatureEncoder

    return FeatureEncoder.fit(train_flows, cfg)


def _fill_missing(scores: np.ndarray) -> np.ndarray:
    """Flows without any event (should not happen) score as the least anomalous flow."""
    if np.isnan(scores).any():
        finite = scores[~np.isnan(scores)]
        scores = np.where(np.isnan(scores), finite.min() if len(finite) else 0.0, scores)
    return scores


def _event_masks(events: Any, masks: SplitMasks, pairs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Training events: those of a training flow; zero-activity bins by their time."""
    fi, rows = pairs
    train = np.zeros(len(events.x), dtype=bool)
    train[rows[masks.train[fi]]] = True
    no_flow = np.ones(len(events.x), dtype=bool)
    no_flow[rows] = False
    if no_flow.any():
        ts = np.asarray(events.ts)
        ts_us = ts.astype("datetime64[us]").astype("int64") if np.issubdtype(ts.dtype, np.datetime64) else ts.astype("int64")
        b = masks.boundaries.get("train") if isinstance(masks.boundaries, dict) else None
        if b and isinstance(b, (list, tuple)) and len(b) == 2 and b[0] and b[1]:
            lo, hi = (np.datetime64(str(v).replace("+00:00", "").replace("Z", ""), "us").astype("int64") for v in b)
            train |= no_flow & (ts_us >= lo) & (ts_us <= hi)
    return train


def baseline_scores(
    events: Any, masks: SplitMasks, labels: np.ndarray, cfg: Any, baselines: list[str] | None = None
) -> tuple[dict[str, DetectorScores], dict[str, str]]:
    """Fit each baseline on training events, calibrate on validation flows, score every flow.

    ``events`` is the ``FeatureEncoder`` output for the whole stream (the LSTM's own
    features); ``labels`` (n_flows,) are the flows' labels. Returns
    ``(detectors, skipped)``; ``skipped`` says why a baseline was not run (HGB needs
    both labels in training).
    """
    from nadray import baselines as B

    names = baselines or ["isolation_forest", "hgb", "ewma_zscore"]
    n = len(labels)
    pairs = events.flow_event_pairs()
    ent = np.asarray(events.entity, dtype=object)
    ev_label = np.asarray(events.label, dtype="float64")
    ev_train = _event_masks(events, masks, pairs)
    x = np.asarray(events.x)
    out: dict[str, DetectorScores] = {}
    skipped: dict[str, str] = {}
    for name in names:
        if name == "isolation_forest":
            det = B.IsolationForestBaseline(random_state=cfg.train.seed).fit(x[ev_train], ev_label[ev_train])
            ev_scores = det.score(x)
            info = {"fit_rows": det.n_train_rows_, "features": list(events.feature_names)}
        elif name == "hgb":
            known = ev_label[ev_train]
            classes = sorted({int(v) for v in known[~np.isnan(known)]})
            if classes != [0, 1]:
                skipped[name] = f"training split has labels {classes}; a supervised baseline needs both 0 and 1"
                continue
            det = B.HistGradientBoostingBaseline(random_state=cfg.train.seed).fit(x[ev_train], known)
            ev_scores = det.score(x)
            info = {"fit_rows": det.n_train_rows_}
        elif name == "ewma_zscore":
            M, measures = B.ewma_measures(x, list(events.feature_names))
            det = B.EwmaZScoreBaseline().fit(M[ev_train], ev_label[ev_train])
            ev_scores = det.score(M, ent)
            info = {"measures": measures, "alpha": det.alpha}
        else:
            raise InputError(f"baselines: unknown baseline {name!r}; known: isolation_forest, hgb, ewma_zscore")
        fi, rows = pairs
        flow_scores, flow_entity = B.per_flow_max(fi, ev_scores[rows], n, ent[rows])
        flow_scores = _fill_missing(flow_scores)
        thr = calibrate(flow_scores[masks.val], labels[masks.val], cfg)
        info.update({"threshold_source": "validation", "threshold_method": cfg.threshold.method})
        out[name] = DetectorScores(flow_scores, flow_entity, _threshold_value(thr), info)
    return out, skipped


def score_split(
    scorer: Any, flows_all: Any, split: Any, cfg: Any = None, baselines: list[str] | None = None, encoder: Any = None,
    events: Any = None, event_scores: np.ndarray | None = None,
) -> EvalData:
    """Score the whole stream with the LSTM (when ``scorer`` is given) and each baseline; see ``evaluate_split``.

    ``events``: ``flows_all`` already encoded with the scorer's encoder (as training
    did), so it is not encoded again; ``event_scores`` (n_events,): the scorer's
    scores of those events, so the LSTM does not run again. Both only save work.
    """
    from nadray.config import Config

    cfg = cfg or Config()
    flows = flow_frame(flows_all)
    masks = split_masks(flows_all, split, cfg)
    if not masks.train.any() or not masks.val.any() or not masks.test.any():
        counts = {s: int(getattr(masks, s).sum()) for s in ("train", "val", "test")}
        raise InputError(f"split: every split needs rows, got {counts}")
    keys = _keys(flows_all)
    if events is None and encoder is None and hasattr(scorer, "event_scores"):
        events = scorer.encoder.transform(flows_all)  # one encoding for the LSTM and the baselines
    detectors: dict[str, DetectorScores] = {}
    if scorer is not None:
        detectors[LSTM] = _lstm_scores(scorer, flows_all, keys, events, event_scores)
    if events is None:
        if encoder is None:
            encoder = _encoder_for(scorer, _take(flows_all, masks.train), cfg)
        events = encoder.transform(flows_all)
    labels = flows["label"].to_numpy()
    base, skipped = baseline_scores(events, masks, labels, cfg, baselines)
    detectors.update(base)
    return EvalData(flows, masks, detectors, skipped, getattr(scorer, "version", None))


def _take(table: Any, mask: np.ndarray):
    if hasattr(table, "filter"):
        import pyarrow as pa

        return table.filter(pa.array(mask))
    return table[mask].reset_index(drop=True)


# --------------------------------------------------------------------------- results


def _split_counts(flows, masks: SplitMasks) -> dict[str, dict[str, int]]:
    y = flows["label"].to_numpy()
    out = {}
    for s in ("train", "val", "test"):
        m = getattr(masks, s)
        out[s] = {
            "rows": int(m.sum()),
            "malicious": int(np.sum(m & (y == 1))),
            "benign": int(np.sum(m & (y == 0))),
            "unlabelled": int(np.sum(m & np.isnan(y))),
        }
    out["context_only"] = {"rows": int(np.sum(~(masks.train | masks.val | masks.test)))}
    return out


def flow_metrics(flows: Any, mask: np.ndarray, scores: np.ndarray, threshold: float, entity: np.ndarray) -> dict[str, Any]:
    """``metrics.detection_metrics`` of per-flow ``scores`` on the rows of ``mask``.

    ``flows`` is the ``EvalData.flows`` frame (label, label_detail, ts); ``scores`` and
    ``entity`` are (n,) over all its rows. A metric that cannot be computed is None,
    and ``undefined`` (present only then) says why (``metrics.undefined_reasons``).
    """
    from nadray.metrics import detection_metrics

    out = detection_metrics(
        flows["label"].to_numpy()[mask],
        scores[mask],
        threshold,
        label_detail=flows["label_detail"].to_numpy(dtype=object)[mask],
        entity=entity[mask],
        ts=flows["ts"].to_numpy()[mask],
    )
    return out


def detector_metrics(data: EvalData, name: str, split: str = "test") -> dict[str, Any]:
    det = data.detectors[name]
    out = flow_metrics(data.flows, getattr(data.masks, split), det.scores, det.threshold, det.entity)
    out.update(jsonable(det.info))
    return out


def _fmt(v: float) -> str:
    return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"


def where_lstm_loses(results: dict[str, Any], lstm: str = LSTM) -> list[str]:
    """Plain sentences, one per (baseline, metric) where a baseline beats the LSTM on the test split.

    ``results`` maps detector name to its ``detection_metrics``; metrics missing or
    None on either side (one class absent, no timestamps) are not compared. Ties
    are not losses.
    """
    sentences = []
    for name, label, higher_better, a, b in _comparisons(results, lstm):
        better = b > a if higher_better else b < a
        if not better or abs(a - b) < 1e-12:
            continue
        if higher_better:
            sentences.append(
                f"{name} has a higher {label} than the LSTM on the test split: {_fmt(b)} vs {_fmt(a)} (+{_fmt(b - a)})."
            )
        else:
            sentences.append(
                f"{name} has fewer {label} than the LSTM on the test split: {_fmt(b)} vs {_fmt(a)} (-{_fmt(a - b)})."
            )
    return sentences


def _comparisons(results: dict[str, Any], lstm: str = LSTM) -> list[tuple[str, str, bool, float, float]]:
    """(baseline, metric label, higher is better, LSTM value, baseline value) for every compared
    metric defined on both sides."""
    ours = results.get(lstm)
    if not isinstance(ours, dict):
        return []
    out = []
    for name, theirs in results.items():
        if name == lstm or not isinstance(theirs, dict) or "n" not in theirs:
            continue
        for key, label, higher_better in COMPARED_METRICS:
            a, b = ours.get(key), theirs.get(key)
            if a is not None and b is not None:
                out.append((name, label, higher_better, float(a), float(b)))
    return out


_SUMMARY_KEYS = ["roc_auc", "pr_auc", "precision", "recall", "f1", "false_alarms_per_entity_day", "threshold", "n_alerts"]


def summarize(data: EvalData, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``evaluate_split`` result: metrics per detector, the split, a summary and where the LSTM loses."""
    results: dict[str, Any] = {name: detector_metrics(data, name) for name in data.detectors}
    losses = where_lstm_loses(results)
    table = {name: {k: results[name].get(k) for k in _SUMMARY_KEYS} for name in data.detectors}
    ranked = [n for n in data.detectors if results[n].get("pr_auc") is not None]
    best = max(ranked, key=lambda n: results[n]["pr_auc"]) if ranked else None
    test_y = data.flows["label"].to_numpy()[data.masks.test]
    summary = {
        "model_version": data.model_version,
        "test_rows": int(data.masks.test.sum()),
        "test_labelled": int(np.sum(~np.isnan(test_y))),
        "test_malicious": int(np.sum(test_y == 1)),
        "detectors": table,
        "best_by_pr_auc": best,
        "lstm_loses_on": len(losses),
        "skipped": dict(data.skipped),
    }
    if LSTM in data.detectors:
        # None: no metric was defined on both sides (no labels in the test split), so nothing was won.
        summary["lstm_beats_every_baseline"] = (not losses) if _comparisons(results) else None
    if meta:
        summary["model"] = meta
    results["split"] = {"boundaries": jsonable(data.masks.boundaries), "counts": _split_counts(data.flows, data.masks)}
    results["summary"] = summary
    results["where_lstm_loses"] = losses
    return jsonable(results)


def evaluate_split(
    scorer: Any, flows_all: Any, split: Any, cfg: Any = None, baselines: list[str] | None = None,
    events: Any = None, event_scores: np.ndarray | None = None,
) -> dict[str, Any]:
    """The LSTM and every baseline on the same split, metrics on its test rows.

    Parameters
    ----------
    scorer : ``nadray.scorer.Scorer`` (``score_table``, ``threshold``, ``version``), or
        None to evaluate the baselines alone.
    flows_all : pa.Table in time order (canonical schema): the whole stream, so test
        records are scored with their entity's earlier records as context.
    split : ``nadray.data.Splits``, ``SplitMasks``, ``{"train","val","test"}`` masks, or a test mask.
    cfg : ``Config`` whose ``data``, ``threshold`` and ``train.seed`` sections apply.
    events, event_scores : see ``score_split`` (work already done by training, reused).

    Returns
    -------
    ``{"lstm": metrics, "isolation_forest": ..., "hgb": ... (absent without both labels
    in training), "ewma_zscore": ..., "split": {"boundaries", "counts"}, "summary": ...,
    "where_lstm_loses": [sentences]}``; JSON-safe.
    """
    data = score_split(scorer, flows_all, split, cfg, baselines, events=events, event_scores=event_scores)
    return summarize(data, model_meta(scorer))


def model_meta(scorer: Any) -> dict[str, Any] | None:
    """Version, training data range and config of the evaluated model, for the report."""
    if scorer is None:
        return None
    meta = dict(getattr(scorer, "meta", None) or {})
    keep = {k: meta[k] for k in meta if k in ("version", "data_range", "trained_on", "created_at", "metrics", "config")}
    keep["version"] = getattr(scorer, "version", None) or meta.get("version")
    for k, v in meta.items():
        if "range" in k and k not in keep:
            keep[k] = v
    return jsonable(keep)


# --------------------------------------------------------------------------- the command


def _merge_config(checkpoint_cfg: dict[str, Any] | None, cfg: Any):
    """The checkpoint's config with every key ``cfg`` changed from the defaults applied on top.

    ``nadray evaluate --set data.val_fraction=0.1`` thus changes that one key of the
    config the model was trained with, not every other key back to its default.
    """
    from nadray.config import Config, config_from_dict, set_key, validate

    base = config_from_dict(checkpoint_cfg) if checkpoint_cfg else Config()
    if cfg is None:
        return base
    default = Config().to_dict()
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            if value != default[section][key]:
                set_key(base, f"{section}.{key}", value)
    return validate(base)


def publish_report(report_dir: str, results: dict[str, Any], frames: dict[str, Any], history: Any = None) -> str:
    """``write_report`` into a local folder, or into a temporary one uploaded to an ``s3://`` prefix.

    Returns the URI of ``report.html``.
    """
    from nadray import storage
    from nadray.report import write_report

    if not storage.is_s3(report_dir):
        write_report(report_dir, results, frames, history)
        return os.path.join(report_dir, "report.html")
    with tempfile.TemporaryDirectory(prefix="nadray-report-") as tmp:
        for p in write_report(tmp, results, frames, history):
            rel = os.path.relpath(p, tmp)
            with open(p, "rb") as f:
                storage.write_bytes_atomic(storage.join(report_dir, *rel.split(os.sep)), f.read())
    return storage.join(report_dir, "report.html")


def summary_text(results: dict[str, Any]) -> str:
    """What ``nadray evaluate`` prints: the test split, one row per detector, where the LSTM
    loses and where the files are (``metrics.json`` holds everything, the checkpoint's
    metadata included, which is far too long for a terminal)."""
    s = results.get("summary", {})
    num = lambda v, f="{:.3f}": "n/a" if v is None else f.format(v)  # noqa: E731
    lines = [f"model {s.get('model_version')} on {s.get('archive', '?')}: test {s.get('test_rows', 0):,} flows, "
             f"{s.get('test_labelled', 0):,} labelled ({s.get('test_malicious', 0):,} malicious)",
             f"{'detector':<18} {'ROC-AUC':>7} {'PR-AUC':>7} {'precision':>9} {'recall':>7} {'F1':>6} "
             f"{'alarms/host-day':>15} {'alerts':>8}"]
    for name, m in (s.get("detectors") or {}).items():
        lines.append(f"{name:<18} {num(m.get('roc_auc')):>7} {num(m.get('pr_auc')):>7} {num(m.get('precision')):>9} "
                     f"{num(m.get('recall')):>7} {num(m.get('f1')):>6} "
                     f"{num(m.get('false_alarms_per_entity_day'), '{:.2f}'):>15} {num(m.get('n_alerts'), '{:,}'):>8}")
    for name, why in (s.get("skipped") or {}).items():
        lines.append(f"{name}: skipped ({why})")
    losses = results.get("where_lstm_loses") or []
    if losses:
        lines.append(f"where the LSTM loses ({len(losses)}):")
        lines += [f"  {sentence}" for sentence in losses]
    elif s.get("lstm_beats_every_baseline"):
        lines.append("no baseline beats the LSTM on any compared metric")
    elif "lstm_beats_every_baseline" in s:
        why = ("the test split has no labelled flows" if not s.get("test_labelled")
               else "each compared metric is undefined on the test split (metrics.json says why)")
        lines.append(f"the LSTM was not compared with the baselines: {why}")
    if s.get("report"):
        lines.append(f"report: {s['report']} (metrics.json beside it)")
    return "\n".join(lines)


def evaluate(archive: str, model_ref: str, report_dir: str, cfg: Any = None) -> dict[str, Any]:
    """``nadray evaluate``: metrics.json, PNG plots and report.html for ``model_ref`` on ``archive``.

    The split is the one training used: the checkpoint's config, with any key
    ``cfg`` sets (away from its default) on top. ``report_dir`` is a local folder
    or an ``s3://`` prefix.
    """
    from nadray.data import load_flows, time_split
    from nadray.scorer import Scorer

    scorer = Scorer.from_ref(model_ref)
    meta = getattr(scorer, "meta", None) or {}
    cfg = _merge_config(meta.get("config"), cfg)
    flows = load_flows(archive, cfg)
    if flows.num_rows == 0:
        raise InputError(f"archive {archive}: no flows in the configured range (data.start={cfg.data.start!r}, data.end={cfg.data.end!r})")
    splits = time_split(flows, cfg)
    flows = splits.flows  # time order, as the split was made
    data = score_split(scorer, flows, splits, cfg)
    results = summarize(data, model_meta(scorer))
    results["summary"]["archive"] = archive
    frames = {name: data.frame(name) for name in data.detectors}
    history = meta.get("history")

    results["summary"]["report"] = publish_report(report_dir, results, frames, history)
    return results
