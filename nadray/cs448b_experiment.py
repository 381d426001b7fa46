"""The founding experiment on cs448b: would the detector have flagged the compromised hosts, and when?

The Stanford CS448B ``ipasn`` data (10 hosts, one row per host, remote ASN and day)
has its ground truth per host: the day each compromised host was investigated
(``nadray.datasets.cs448b_ground_truth()``). ``cs448b_experiment`` ranks hosts by
their highest score over August-September 2006, after a July of normal traffic,
and reports each compromised host's first alert against its investigation date;
``cs448b_daily_ewma`` is the per-host daily z-score baseline it is compared with.
The nightly demo runs it (``nadray.nightly.demo``); README "The founding experiment"
has the figures.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nadray.errors import InputError
from nadray.storage import jsonable

# The window the question is asked over: after a July of normal traffic.
CS448B_WINDOW = ("2006-08-01", "2006-10-01")


def _ground_truth(gt: Any) -> tuple[dict[str, Any], list[str]]:
    """``{"compromised": {host: date}, "clean": [hosts]}``, or a flat ``{host: date or None}``
    (default: the bundled data set's, ``datasets.cs448b_ground_truth()``)."""
    if gt is None:
        from nadray import datasets

        gt = datasets.cs448b_ground_truth()
    if "compromised" in gt:
        comp = {str(k): np.datetime64(str(v)[:10], "D") for k, v in dict(gt["compromised"]).items()}
        clean = [str(h) for h in gt.get("clean", [])]
    else:
        comp = {str(k): np.datetime64(str(v)[:10], "D") for k, v in gt.items() if v is not None}
        clean = [str(k) for k, v in gt.items() if v is None]
    if not comp or not clean:
        raise InputError(f"ground_truth: needs compromised and clean hosts, got {len(comp)} compromised, {len(clean)} clean")
    return comp, clean


def _daily_host_scores(df: Any, window: tuple[str, str]):
    """Per (host, day) in the window: highest score and whether any record alerted."""
    import pandas as pd

    if not {"entity", "ts", "score"} <= set(df.columns):
        raise InputError(f"scores: needs columns entity, ts, score; got {list(df.columns)}")
    d = pd.DataFrame({
        "host": df["entity"].astype(str).to_numpy(),
        "day": pd.to_datetime(df["ts"], utc=True).dt.tz_localize(None).dt.floor("D").to_numpy(),
        "score": df["score"].to_numpy(dtype="float64"),
    })
    if "is_anomaly" in df.columns:
        d["alert"] = df["is_anomaly"].to_numpy(dtype=bool)
    elif "threshold" in df.columns:
        d["alert"] = d["score"].to_numpy() >= df["threshold"].to_numpy(dtype="float64")
    else:
        raise InputError("scores: needs an is_anomaly or a threshold column to find alerts")
    lo, hi = (np.datetime64(w, "D") for w in window)
    d = d[(d["day"] >= lo) & (d["day"] < hi)]
    return d.groupby(["host", "day"], sort=True).agg(score=("score", "max"), alert=("alert", "any")).reset_index()


def _host_analysis(df: Any, gt: Any, window: tuple[str, str]) -> dict[str, Any]:
    comp, clean = _ground_truth(gt)
    daily = _daily_host_scores(df, window)
    hosts = list(comp) + clean
    max_score = daily.groupby("host")["score"].max()
    maxes = {h: (float(max_score[h]) if h in max_score.index else None) for h in hosts}
    ranked = sorted((h for h in hosts if maxes[h] is not None), key=lambda h: -maxes[h])
    rank = {h: i + 1 for i, h in enumerate(ranked)}
    # Host-level ROC-AUC: the share of (compromised, clean) pairs ordered correctly; ties count half.
    pairs = [(maxes[c], maxes[k]) for c in comp for k in clean if maxes[c] is not None and maxes[k] is not None]
    host_auc = float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])) if pairs else None
    alerts = daily[daily["alert"]]
    first_alert = alerts.groupby("host")["day"].min()
    alert_days = alerts.groupby("host")["day"].nunique()
    per_host = {}
    for h, inv in comp.items():
        first = first_alert.get(h)
        first_d = np.datetime64(first, "D") if first is not None else None
        per_host[h] = {
            "investigation": str(inv),
            "max_score": maxes[h],
            "rank": rank.get(h),
            "first_alert": str(first_d) if first_d is not None else None,
            # Positive: the detector alerted that many days before the investigation.
            "days_before_investigation": int((inv - first_d).astype(int)) if first_d is not None else None,
            "alert_days": int(alert_days.get(h, 0)),
        }
    clean_alerting = sorted(h for h in clean if alert_days.get(h, 0) > 0)
    n_top = len(comp)
    return {
        "window": list(window),
        "max_score": maxes,
        "ranking": ranked,
        "compromised_ranks": sorted(rank[h] for h in comp if h in rank),
        "compromised_in_top": sum(1 for h in ranked[:n_top] if h in comp),
        "host_roc_auc": host_auc,
        "compromised": per_host,
        "detected_before_investigation": sum(
            1 for v in per_host.values() if v["days_before_investigation"] is not None and v["days_before_investigation"] >= 0
        ),
        "clean_hosts_alerting": len(clean_alerting),
        "clean_alerting": {h: int(alert_days.get(h, 0)) for h in clean_alerting},
    }


def cs448b_daily_ewma(flows: Any, window_start: str = CS448B_WINDOW[0], alpha: float = 0.1, z_threshold: float = 3.0):
    """The EWMA z-score baseline on cs448b's daily per-host activity.

    Measures per host and day: log total flows and log distinct remote ASNs (a
    host joining a botnet talks to more, or many fewer, networks). The population
    prior is fitted on days before ``window_start``; a day alerts at ``|z| >= z_threshold``
    (3, the classical control-chart rule). Returns a frame ``entity, ts, score,
    threshold, is_anomaly`` with one row per (host, day).
    """
    import pandas as pd

    from nadray.baselines import EwmaZScoreBaseline

    df = flows.to_pandas() if hasattr(flows, "to_pandas") and not isinstance(flows, pd.DataFrame) else pd.DataFrame(flows)
    df = pd.DataFrame({
        "host": df["src_ip"].astype(str),
        "peer": df["dst_ip"].astype(str),
        "day": pd.to_datetime(df["ts"], utc=True).dt.floor("D"),
        "flows": pd.to_numeric(df.get("flows", 1), errors="coerce").fillna(1),
    })
    daily = df.groupby(["host", "day"], sort=True).agg(flows=("flows", "sum"), peers=("peer", "nunique")).reset_index()
    M = np.column_stack([np.log1p(daily["flows"].to_numpy(dtype="float64")), np.log1p(daily["peers"].to_numpy(dtype="float64"))])
    before = (daily["day"] < pd.Timestamp(window_start, tz="UTC")).to_numpy()
    det = EwmaZScoreBaseline(alpha=alpha).fit(M[before] if before.sum() >= 2 else M)
    score = det.score(M, daily["host"].to_numpy(dtype=object))
    return pd.DataFrame({
        "entity": daily["host"], "ts": daily["day"], "score": score,
        "threshold": float(z_threshold), "is_anomaly": score >= z_threshold,
    })


def cs448b_experiment(
    scores_df: Any,
    ground_truth: Any = None,
    baseline_df: Any = None,
    flows: Any = None,
    window: tuple[str, str] = CS448B_WINDOW,
) -> dict[str, Any]:
    """The founding question on cs448b: would the detector have flagged the compromised hosts, and when?

    Parameters
    ----------
    scores_df : the LSTM's score output over the archive (``entity``, ``ts``, ``score``,
        and ``is_anomaly`` or ``threshold``): one row per (host, ASN, day) record.
    ground_truth : ``{"compromised": {host: investigation date}, "clean": [hosts]}``;
        default ``nadray.datasets.cs448b_ground_truth()`` (SOURCES.md).
    baseline_df : the EWMA z-score baseline's scores in the same columns; or
    flows : the cs448b flow table, to compute them with ``cs448b_daily_ewma``.
    window : ``[start, end)`` days over which hosts are compared (Aug-Sep 2006).

    Returns
    -------
    ``{"lstm": analysis, "ewma_zscore": analysis (when given baseline_df or flows), "ground_truth"}``,
    where an analysis holds per-host highest score in the window, the ranking, the
    ranks of the compromised hosts, a host-level ROC-AUC, per compromised host its
    first alert and how many days before (positive) or after its investigation
    that was, and how many clean hosts alert at all.
    """
    comp, clean = _ground_truth(ground_truth)
    out: dict[str, Any] = {
        "ground_truth": {"compromised": {h: str(d) for h, d in comp.items()}, "clean": clean},
        "lstm": _host_analysis(scores_df, ground_truth, window),
    }
    if baseline_df is None and flows is not None:
        baseline_df = cs448b_daily_ewma(flows, window[0])
    if baseline_df is not None:
        out["ewma_zscore"] = _host_analysis(baseline_df, ground_truth, window)
    return jsonable(out)
