"""From a fitted model to a calibrated scorer: the statistics a score needs besides the weights.

Read top to bottom:

1. ``finalize``: run the fitted model over the whole event stream once, then fit,
   on the training split, each feature's error divisor (``err_norm``) and the
   features that never varied (``constant_features``); on benign validation events,
   the hybrid objective's z statistics; per host, the credibility-weighted error
   scale (``entity_scales``); on validation flows, the threshold. Validation and
   test metrics come out of the same pass.
2. ``scoring_meta``: all of that as the checkpoint stores it, so a loaded version
   scores exactly as it was evaluated.

Training (``nadray.train``) and the nightly challenger (``nadray.nightly.compare``)
both call ``finalize`` on what Ray Train fitted; nothing here touches Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from nadray.config import Config

if TYPE_CHECKING:
    from nadray.train import TrainingData


def finalize(data: TrainingData, model: Any, cfg: Config, history: list[dict[str, Any]] | None = None):
    """Error normaliser, hybrid z statistics, threshold and metrics for a fitted model.

    Returns (Scorer (unregistered), flow scores of the whole stream, metrics dict,
    event scores of ``data.events``: the scorer's own, so evaluation need not run the LSTM again).
    """
    from nadray.metrics import detection_metrics
    from nadray.model import combine_scores
    from nadray.scorer import Scorer
    from nadray.threshold import Threshold

    ev, sp = data.events, data.splits
    scorer = Scorer(model, data.encoder, Threshold(0.0), meta={}, version="unregistered")
    sq, lg = scorer.event_outputs(ev)
    fit_events = np.intersect1d(data.train_idx, np.flatnonzero(data.pred_mask))
    err_norm = sq[fit_events].mean(axis=0) if len(fit_events) else np.ones(sq.shape[1])
    # The divisor keeps the network's own error on a constant feature (tiny), so a real
    # departure from the constant stands out as much as before; the wobble itself goes.
    scorer.err_norm = np.maximum(err_norm.astype("float64"), 1e-8)
    scorer.constant_features = constant_features(ev.x[fit_events])
    sq = scorer.constant_errors(sq, ev.x)
    y = ev.label
    ref = data.val_idx[y[data.val_idx] == 0] if np.any(y[data.val_idx] == 0) else data.val_idx
    err = combine_scores(sq[ref], lg[ref], "unsupervised", scorer.err_norm)
    scorer.z = {"err_mean": float(err.mean()), "err_std": float(err.std() or 1.0),
                "logit_mean": float(lg[ref].mean()), "logit_std": float(lg[ref].std() or 1.0)}
    if cfg.model.entity_normalization and cfg.model.objective == "unsupervised" and len(fit_events):
        fit_err = combine_scores(sq[fit_events], lg[fit_events], "unsupervised", scorer.err_norm)
        scorer.entity_scale = entity_scales(ev.entity[fit_events], fit_err)
    scores = scorer.normalize(scorer.combine(sq, lg), ev.entity)
    flow_s, flow_e = Scorer.flow_scores(ev, scores, sp.flows.num_rows)
    labels = np.asarray(sp.flows.column("label").to_pandas().astype("Float64").to_numpy(dtype="float64", na_value=np.nan))
    thr = Threshold.calibrate(flow_s[sp.val_mask], labels[sp.val_mask], cfg.threshold.method, cfg.threshold.target_fpr)
    scorer.threshold = thr
    detail = np.asarray(sp.flows.column("label_detail").to_pandas().astype(object))
    ts = sp.flows.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False).astype("datetime64[us]")
    metrics: dict[str, Any] = {"threshold": thr.to_dict()}
    for name, m in (("val", sp.val_mask), ("test", sp.test_mask)):
        if m.any():
            metrics[name] = detection_metrics(labels[m], flow_s[m], thr.value, detail[m], flow_e[m], ts[m])
    if history:
        metrics["best_epoch"] = int(np.argmin([h["val_loss"] for h in history]))
    return scorer, flow_s, metrics, scores


def scoring_meta(scorer: Any) -> dict[str, Any]:
    """What ``finalize`` fitted besides the weights, as the checkpoint stores it: every
    registration writes all of it, so a loaded version scores exactly as it was evaluated."""
    return {
        "err_norm": [float(v) for v in scorer.err_norm],
        "score_z": scorer.z,
        "entity_scale": scorer.entity_scale,
        "constant_features": {str(k): v for k, v in scorer.constant_features.items()},
        "threshold": scorer.threshold.to_dict(),
    }


def constant_features(x: np.ndarray) -> dict[int, float]:
    """{feature index: value} of the features that take a single value on the training events."""
    if len(x) == 0:
        return {}
    same = np.all(x == x[0], axis=0)
    return {int(j): float(x[0, j]) for j in np.flatnonzero(same)}


# The population's weight never falls below this many pseudo-events (see entity_scales).
MIN_PRIOR_EVENTS = 1.0


def entity_scales(entity: np.ndarray, err: np.ndarray) -> dict[str, Any]:
    """Per-entity typical unsupervised error on the training split, credibility-weighted.

    entity : (n,) entity ids of the training events; err : (n,) their errors.
    Returns {"global": g, "k": k, "prior_events": max(k, MIN_PRIOR_EVENTS),
    "entities": {entity: z * mean_e + (1 - z) * g}} with
    z = n_e / (n_e + max(k, MIN_PRIOR_EVENTS)) (Bühlmann credibility). k = EPV / VHM is
    estimated from the data:
    the expected variance of an entity's errors (EPV) over the variance of the entities'
    true mean errors (VHM). Why: when hosts really differ, as cs448b's workstations do
    (k 1.4-1.8), a host with 24 training days is judged by its own error; when they differ
    only by noise (VHM ~ 0), every host is pulled to the population. A fixed prior of 20
    pseudo-events did the latter to everyone and let a volatile clean host outrank a
    compromised one (README, "The founding experiment").
    """
    x = np.asarray(err, dtype="float64")
    g = max(float(np.mean(x)) if len(x) else 1.0, 1e-12)
    df = pd.DataFrame({"e": np.asarray(entity, dtype=object).astype(str), "s": x})
    agg = df.groupby("e")["s"].agg(["mean", "var", "count"])
    k = credibility_k(agg["mean"].to_numpy(), agg["var"].to_numpy(), agg["count"].to_numpy())
    # At least MIN_PRIOR_EVENTS of population: k is measured on the hosts with many events,
    # and a host seen once must not take its single (possibly tiny) error as its divisor.
    kk = max(k, MIN_PRIOR_EVENTS)
    z = agg["count"] / (agg["count"] + kk) if np.isfinite(kk) else agg["count"] * 0.0
    scale = z * agg["mean"] + (1.0 - z) * g
    # "k" is the estimate, "prior_events" the population weight the scales used (None: all population).
    return {"global": g, "k": float(k) if np.isfinite(k) else None,
            "prior_events": float(kk) if np.isfinite(kk) else None,
            "entities": {str(e): max(float(v), 1e-12) for e, v in scale.items()}}


def credibility_k(means: np.ndarray, variances: np.ndarray, counts: np.ndarray) -> float:
    """Bühlmann's k = EPV / VHM from per-entity means, variances and counts.

    EPV: the within-entity variance averaged over entities with 2+ events (weighted by
    their degrees of freedom). VHM: the variance of the entity means less the part
    that sampling noise explains (EPV times the mean of 1/n). inf when the entities
    cannot be told apart (one entity, no entity with two events to measure noise on,
    or VHM <= 0), 0 when no entity's error varies at all.
    """
    counts = np.asarray(counts, dtype="float64")
    dof = counts - 1.0
    ok = dof > 0
    if len(means) < 2 or not ok.any():
        return float("inf")
    epv = float(np.sum(dof[ok] * np.asarray(variances, "float64")[ok]) / np.sum(dof[ok]))
    vhm = float(np.var(means, ddof=1)) - epv * float(np.mean(1.0 / counts))
    if vhm <= 0:
        return float("inf")
    return epv / vhm
