"""Detection metrics, computed the same way for the LSTM and every baseline.

Only records with a known label (0 or 1) count; unknown/background (null) labels
are excluded from every metric, and the counts say how many were excluded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def _known(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype="float64")
    return ~np.isnan(y)


def ranking_metrics(y: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    """ROC-AUC and PR-AUC (average precision) over labelled records; None when one class is absent."""
    y = np.asarray(y, dtype="float64")
    s = np.asarray(scores, dtype="float64")
    k = _known(y)
    y, s = y[k].astype(int), s[k]
    if len(y) == 0 or y.min() == y.max():
        return {"roc_auc": None, "pr_auc": None}
    return {"roc_auc": float(roc_auc_score(y, s)), "pr_auc": float(average_precision_score(y, s))}


def detection_metrics(
    y: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    label_detail: np.ndarray | None = None,
    entity: np.ndarray | None = None,
    ts: np.ndarray | None = None,
) -> dict[str, Any]:
    """Precision, recall, F1 at ``threshold``, ROC-AUC, PR-AUC, recall per label_detail,
    and false alarms per entity-day.

    Parameters
    ----------
    y : (n,) 1 malicious, 0 benign, NaN unknown.
    scores : (n,) higher is more anomalous.
    threshold : alert when ``score >= threshold``.
    label_detail, entity : (n,) strings, optional.
    ts : (n,) datetime64, optional; needed for false alarms per entity-day.
    """
    y = np.asarray(y, dtype="float64")
    s = np.asarray(scores, dtype="float64")
    alert = s >= threshold
    k = _known(y)
    yk, ak = y[k].astype(int), alert[k]
    tp = int(np.sum(ak & (yk == 1)))
    fp = int(np.sum(ak & (yk == 0)))
    fn = int(np.sum(~ak & (yk == 1)))
    tn = int(np.sum(~ak & (yk == 0)))
    # Undefined (None, with the reason in "undefined") rather than 0 where nothing could be
    # measured: a 0 recall on a window without one malicious record read as a miss, and two
    # detectors' equal 0s as a comparison ("the LSTM beats every baseline") that never happened.
    precision = tp / (tp + fp) if tp + fp else (0.0 if k.any() else None)
    recall = tp / (tp + fn) if tp + fn else None
    f1 = None if precision is None or recall is None else (
        2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    out: dict[str, Any] = {
        "n": int(len(y)),
        "n_labelled": int(k.sum()),
        "n_malicious": int(np.sum(yk == 1)),
        "n_benign": int(np.sum(yk == 0)),
        "n_alerts": int(alert.sum()),
        "threshold": float(threshold),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "fpr": fp / (fp + tn) if fp + tn else None,
    }
    out.update(ranking_metrics(y, s))
    if label_detail is not None:
        det = np.asarray(label_detail, dtype=object)
        per: dict[str, dict[str, Any]] = {}
        mal = k & (y == 1)
        for d in sorted({str(v) for v in det[mal]}):
            m = mal & (det.astype(str) == d)
            per[d] = {"n": int(m.sum()), "recall": float(alert[m].mean()) if m.any() else None}
        out["recall_per_label_detail"] = per
    if entity is not None and ts is not None:
        days = np.asarray(ts).astype("datetime64[D]")
        ent = np.asarray(entity, dtype=object)
        benign = k & (y == 0)
        pairs = {(e, d) for e, d in zip(ent[benign], days[benign])}
        out["false_alarms_per_entity_day"] = fp / len(pairs) if pairs else None
        out["entity_days"] = len(pairs)
    undefined = undefined_reasons(out)
    if undefined:
        out["undefined"] = undefined
    return out


def undefined_reasons(out: dict[str, Any]) -> dict[str, str]:
    """Why each metric of ``detection_metrics`` that is None could not be computed.

    Stored beside the nulls (checkpoint.json, metrics.json, night.json) so a reader
    knows a missing ROC-AUC means "one class in this split", not a failure.
    """
    why: dict[str, str] = {}
    if out.get("roc_auc") is None:
        reason = ("no labelled records" if not out["n_labelled"]
                  else f"one class ({out['n_malicious']} malicious, {out['n_benign']} benign)")
        why["roc_auc"] = why["pr_auc"] = f"undefined: {reason}"
    for key in ("fpr", "false_alarms_per_entity_day"):
        if key in out and out[key] is None:
            why[key] = "undefined: no benign records"
    if out.get("precision") is None and "precision" in out:
        why["precision"] = "undefined: no labelled records"
    for key in ("recall", "f1"):
        if key in out and out[key] is None:
            why[key] = "undefined: no labelled records" if not out["n_labelled"] else "undefined: no malicious records"
    return why
