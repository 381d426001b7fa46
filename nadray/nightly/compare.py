"""Challenger vs champion on the same most recent window: split, train, score, decide, drift.

- :func:`plan_split`: the newest ``nightly.eval_days`` days holding flows are the
  comparison window (the test split); the days before it are divided by time into
  train and validation in the ratio ``data.train_fraction : data.val_fraction``.
- :func:`train_challenger`: Ray Train fit on that split (warm-started from the
  champion when the features and model args match), threshold on validation,
  LSTM and baselines on the comparison window (``evaluate.score_split``).
- :func:`score_champion`: the champion's Scorer on the very same rows.
- :func:`decide`: promote when not worse on ``nightly.metric`` (labelled window),
  or, without both labels, on false-alarm rate and score stability.
- :func:`drift_step`: PSI per feature, score shift and new entities, training
  part of the window against the comparison window (on the events and scores
  the evaluation already computed).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from nadray.config import Config
from nadray.errors import NadrayError

log = logging.getLogger("nadray.nightly")

# Metrics where lower is better; every other detection metric is higher-is-better.
LOWER_IS_BETTER = {"fpr", "false_alarms_per_entity_day", "n_alerts"}


# --------------------------------------------------------------------------- the split


def data_days(flows: pa.Table) -> list[str]:
    """The distinct UTC days (``YYYY-MM-DD``) holding flows, sorted."""
    import pyarrow.compute as pc

    if flows.num_rows == 0:
        return []
    return sorted(pc.unique(pc.strftime(flows["ts"], format="%Y-%m-%d")).to_pylist())


def _iso_us(us: int) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(us / 1e6, tz=_dt.timezone.utc).isoformat()


def plan_split(flows: pa.Table, cfg: Config) -> tuple[Any, Config, dict[str, Any]]:
    """(Splits, the config with the split's bounds, a description) for one night.

    With more than ``eval_days`` days of flows, test = the last ``eval_days`` of them
    and train / validation divide the earlier flows by time. With fewer (a young
    archive), the plain fractions of ``time_split`` apply to the whole window.
    """
    from nadray.data import sort_flows, time_split

    flows = sort_flows(flows)
    days = data_days(flows)
    c = copy.deepcopy(cfg)
    c.data.start = c.data.end = None
    c.data.holdout_sources = []
    k = cfg.nightly.eval_days
    if len(days) > k:
        eval_start = f"{days[-k]}T00:00:00+00:00"
        ts = flows.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False)
        cut = int(np.datetime64(eval_start.replace("+00:00", ""), "us").astype("int64"))
        before = ts[ts < cut]
        frac = cfg.data.train_fraction / (cfg.data.train_fraction + cfg.data.val_fraction)
        t1 = int(before[min(len(before) - 1, int(len(before) * frac))])
        c.data.train_end, c.data.val_end = _iso_us(t1), eval_start
        how = f"comparison window: the last {k} day(s) with flows ({', '.join(days[-k:])})"
    else:
        c.data.train_end = c.data.val_end = None
        how = (f"only {len(days)} day(s) with flows (nightly.eval_days={k}): time fractions "
               f"{cfg.data.train_fraction}/{cfg.data.val_fraction}/rest over the whole window")
    splits = time_split(flows, c)
    info = {"how": how, "days": days, "eval_days": days[-k:] if len(days) > k else [],
            "boundaries": splits.boundaries, "counts": splits.counts()}
    return splits, c, info


# --------------------------------------------------------------------------- scoring helpers


@dataclass
class Scored:
    """One model's scores on the night's stream and what the comparison needs."""

    name: str
    version: str | None
    scores: np.ndarray  # (n,) per flow
    entity: np.ndarray
    threshold: float
    metrics: dict[str, Any]  # detection_metrics on the comparison window
    stability: dict[str, Any] = field(default_factory=dict)

    def frame(self, flows_df: Any, mask: np.ndarray):
        """Per-flow frame of the ``mask`` rows (``evaluate.score_frame``), for the plots."""
        from nadray.evaluate import score_frame

        return score_frame(flows_df, mask, self.scores, self.entity, self.threshold)


def _stability(scores: np.ndarray, threshold: float, labels: np.ndarray, splits: Any) -> dict[str, Any]:
    """Score KS (training part vs comparison window) and the false-alarm rate at the threshold.

    The false-alarm rate is the alert share among benign records of the window when
    it has any, else among all of its records (unlabelled traffic is assumed benign).
    """
    from nadray.drift import score_shift

    test = splits.test_mask
    shift = score_shift(scores[splits.train_mask], scores[test])
    benign = test & (labels == 0)
    ref = benign if benign.any() else test
    far = float(np.mean(scores[ref] >= threshold)) if ref.any() else None
    out = {"ks": shift["ks"], "false_alarm_rate": far, "false_alarm_basis": "benign" if benign.any() else "all",
           "alerts": int(np.sum(scores[test] >= threshold)), "window_rows": int(test.sum())}
    if shift["ks"] is None:
        out["undefined"] = {"ks": shift["undefined"]}
    return out


@dataclass
class Challenger:
    version: str | None
    scorer: Any
    data: Any  # train.TrainingData
    cfg: Config
    fitted_history: list[dict[str, Any]]
    eval_results: dict[str, Any]  # evaluate.summarize: lstm + baselines on the window
    eval_data: Any  # evaluate.EvalData (for plots)
    scored: Scored
    warm_start: dict[str, Any]
    meta: dict[str, Any]
    # (len(data.events),) the scorer's scores of data.events, from ``calibrate.finalize``:
    # the LSTM runs over the window once, for threshold, evaluation and drift alike.
    event_scores: np.ndarray | None = None


def warm_start_weights(registry: str, champion_version: str | None, encoder: Any, cfg: Config,
                       name: str) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """The champion's weights when its features and model args match the challenger's, else None."""
    from nadray import registry as reg
    from nadray.model import ModelArgs

    if champion_version is None:
        return None, {"used": False, "reason": "no champion"}
    try:
        tensors, meta, _ = reg.load(f"{registry}@{champion_version}", name)
    except Exception as e:  # an unreadable champion only costs the warm start
        return None, {"used": False, "reason": f"champion unreadable: {e}"}
    theirs = meta.get("encoder", {}).get("feature_names")
    if theirs != list(encoder.feature_names_):
        diff = sorted(set(theirs or []) ^ set(encoder.feature_names_))[:6]
        return None, {"used": False, "reason": f"feature names differ (e.g. {diff})"}
    ours = ModelArgs.from_config(cfg, encoder.n_features).to_dict()
    if meta.get("model_args") != ours:
        return None, {"used": False, "reason": f"model args differ: {meta.get('model_args')} vs {ours}"}
    return tensors, {"used": True, "from": champion_version}


def train_challenger(flows: pa.Table, splits: Any, cfg: Config, registry: str, champion_version: str | None,
                     run_name: str, warm_start: bool = True) -> Challenger:
    """Fit the challenger on the split's train part and evaluate it with the baselines on its test part."""
    from nadray import storage
    from nadray.calibrate import finalize
    from nadray.train import fit, prepare_training_data

    data = prepare_training_data(splits.flows, cfg, splits)
    log.info("challenger data: %d events (train windows %d, val %d, comparison %d), %d features",
             len(data.events), len(data.train_idx), len(data.val_idx), len(data.test_idx), data.encoder.n_features)
    weights, warm = (warm_start_weights(registry, champion_version, data.encoder, cfg, cfg.registry.name)
                     if warm_start else (None, {"used": False, "reason": "disabled"}))
    log.info("warm start: %s", warm)
    fitted = fit(data, cfg, storage_path=storage.join(registry, "_runs"), name=run_name, init_weights=weights)
    scorer, _, train_metrics, event_scores = finalize(data, fitted.model, cfg, fitted.history)
    return Challenger(None, scorer, data, cfg, fitted.history, {}, None, None, warm, {"train_metrics": train_metrics},
                      event_scores=event_scores)


def evaluate_challenger(ch: Challenger, splits: Any) -> None:
    """The challenger and the baselines on the split (``evaluate.score_split``); fills ``ch``.

    The stream is the one training encoded (``ch.data.events``, same encoder, same
    flows), with the scores ``calibrate.finalize`` gave it (``ch.event_scores``): neither
    is computed again.
    """
    from nadray.evaluate import flow_metrics, model_meta, score_split, summarize

    cfg, scorer = ch.cfg, ch.scorer
    ev = score_split(scorer, splits.flows, splits, cfg, events=ch.data.events, event_scores=ch.event_scores)
    results = summarize(ev, model_meta(scorer))
    lstm = ev.detectors["lstm"]
    labels = ev.flows["label"].to_numpy()
    scored = Scored("challenger", None, lstm.scores, lstm.entity, lstm.threshold,
                    flow_metrics(ev.flows, splits.test_mask, lstm.scores, lstm.threshold, lstm.entity))
    scored.stability = _stability(lstm.scores, lstm.threshold, labels, splits)
    ch.eval_results, ch.eval_data, ch.scored = results, ev, scored


def register_challenger(registry: str, ch: Challenger, night: dict[str, Any]) -> str:
    """Register the challenger as a version (never the champion), tagged with the night."""
    from nadray import registry as reg
    from nadray.data import data_range
    from nadray.calibrate import scoring_meta

    sp, scorer = ch.data.splits, ch.scorer
    meta = {
        "config": ch.cfg.to_dict(),
        "model_args": scorer.model.args.to_dict(),
        "encoder": ch.data.encoder.to_dict(),
        **scoring_meta(scorer),
        "data_range": {
            "all": data_range(sp.flows),
            **{s: data_range(sp.flows, getattr(sp, f"{s}_mask")) for s in ("train", "val", "test")},
            "boundaries": sp.boundaries,
        },
        "metrics": {**ch.meta["train_metrics"], "evaluate": ch.eval_results},
        "history": ch.fitted_history,
        "night": night,
        "warm_start": ch.warm_start,
    }
    version = reg.register(registry, scorer.model.state_dict(), meta, name=ch.cfg.registry.name)
    ch.version = ch.scored.version = version
    scorer.version = version
    return version


def score_champion(registry: str, version: str, splits: Any, cfg: Config, flows_df: Any) -> Scored:
    """The champion's scores and metrics on the same stream and window as the challenger."""
    from nadray.evaluate import flow_metrics
    from nadray.scorer import Scorer

    scorer = Scorer.from_ref(f"{registry}@{version}", cfg.registry.name)
    df = scorer.score_table(splits.flows)
    scores = df["score"].to_numpy(dtype="float64")
    entity = df["entity"].to_numpy(dtype=object)
    thr = float(scorer.threshold.value)
    labels = flows_df["label"].to_numpy()
    s = Scored("champion", version, scores, entity, thr, flow_metrics(flows_df, splits.test_mask, scores, thr, entity))
    s.stability = _stability(scores, thr, labels, splits)
    return s


# --------------------------------------------------------------------------- the decision


@dataclass
class Decision:
    promote: bool
    basis: str  # "no champion", "labelled", "unlabelled", "champion unusable"
    reasons: list[str]
    numbers: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "basis": self.basis, "reasons": self.reasons, "numbers": self.numbers}


def _f(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.4f}"


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None, cfg: Config,
           champion_error: str | None = None) -> Decision:
    """Promote the challenger only if it is not worse than the champion on the same window.

    ``challenger`` / ``champion``: ``{"metrics": detection_metrics, "stability":
    {"ks", "false_alarm_rate"}}``. Labelled window (``nightly.metric`` defined for
    both): promote iff challenger >= champion - ``nightly.tolerance`` (<= champion +
    tolerance for lower-is-better metrics). Otherwise (no malicious or no labels in
    the window): promote iff the challenger's false-alarm rate is at most the
    champion's + tolerance and its score KS (training part vs window) is at most
    ``max(champion's KS, nightly.score_shift_limit)``.
    """
    n = cfg.nightly
    if champion is None:
        if champion_error:
            return Decision(True, "champion unusable", [f"The champion could not be scored ({champion_error}); "
                                                        "the challenger replaces it."], {})
        return Decision(True, "no champion", ["No champion yet: the challenger becomes the first champion."], {})
    key, tol = n.metric, n.tolerance
    a, b = challenger["metrics"].get(key), champion["metrics"].get(key)
    nums: dict[str, Any] = {"metric": key, "tolerance": tol, "challenger": a, "champion": b}
    if a is not None and b is not None:
        lower = key in LOWER_IS_BETTER
        bar = b + tol if lower else b - tol
        ok = a <= bar if lower else a >= bar
        op = "<=" if lower else ">="
        sign = "+" if lower else "-"
        verdict = "not worse: promoted" if ok else "worse: not promoted"
        reasons = [f"challenger {key} {_f(a)} {op if ok else ('>' if lower else '<')} champion {key} {_f(b)} "
                   f"{sign} tolerance {_f(tol)} = {_f(bar)}: {verdict}."]
        nums["bar"] = bar
        fa = (challenger.get("stability") or {}).get("false_alarm_rate")
        fb = (champion.get("stability") or {}).get("false_alarm_rate")
        if fa is not None or fb is not None:
            # Not part of the rule, but what an analyst lives with: shown beside it.
            reasons.append(f"for information: false-alarm rate at the threshold, challenger {_f(fa)} vs champion {_f(fb)}.")
            nums.update(challenger_false_alarm_rate=fa, champion_false_alarm_rate=fb)
        return Decision(bool(ok), "labelled", reasons, nums)
    # No labels with both classes in the window: false alarms and score stability.
    cs, ks = challenger["stability"], champion["stability"]
    fa, fb = cs.get("false_alarm_rate"), ks.get("false_alarm_rate")
    ka, kb = cs.get("ks"), ks.get("ks")
    nums.update(challenger_false_alarm_rate=fa, champion_false_alarm_rate=fb, challenger_ks=ka, champion_ks=kb,
                score_shift_limit=n.score_shift_limit)
    reasons = [f"{key} is undefined on the comparison window (it needs malicious and benign records): "
               "compared on false alarms and score stability instead."]
    ok_fa = fa is not None and (fb is None or fa <= fb + tol)
    reasons.append(f"false-alarm rate at the threshold: challenger {_f(fa)} vs champion {_f(fb)} + tolerance "
                   f"{_f(tol)}: {'ok' if ok_fa else 'worse'}.")
    ks_bar = max(kb if kb is not None and not math.isnan(kb) else 0.0, n.score_shift_limit)
    ok_ks = ka is None or math.isnan(ka) or ka <= ks_bar
    reasons.append(f"score stability (KS, training part vs window): challenger {_f(ka)} vs bar "
                   f"max(champion {_f(kb)}, limit {_f(n.score_shift_limit)}) = {_f(ks_bar)}: {'ok' if ok_ks else 'worse'}.")
    ok = ok_fa and ok_ks
    reasons.append("promoted." if ok else "not promoted.")
    return Decision(bool(ok), "unlabelled", reasons, nums)


# --------------------------------------------------------------------------- drift


def _event_mask(events: Any, flow_mask: np.ndarray) -> np.ndarray:
    """Events belonging to the flows of ``flow_mask`` (bin mode: the bins those flows fell in)."""
    out = np.zeros(len(events), dtype=bool)
    fi, rows = events.flow_event_pairs()
    out[rows[flow_mask[fi]]] = True
    return out


def drift_step(events: Any, train_mask: np.ndarray, new_mask: np.ndarray, cfg: Config,
               scores: np.ndarray | None = None) -> dict[str, Any]:
    """``drift.drift_report`` of the ``new_mask`` flows against the ``train_mask`` flows.

    ``events`` is the whole stream encoded once with the model's encoder (so every
    event keeps its entity's earlier records as context); the flow masks (n_flows,)
    split it. ``scores`` (n_events,), the model's scores of those events, feed the
    score-shift check when given.
    """
    from nadray.drift import drift_report

    tr, nw = _event_mask(events, np.asarray(train_mask, bool)), _event_mask(events, np.asarray(new_mask, bool))
    if not tr.any() or not nw.any():
        raise NadrayError(f"drift: needs events on both sides, got {int(tr.sum())} training and {int(nw.sum())} new")
    rep = drift_report(
        events.x[tr], events.x[nw], events.feature_names,
        None if scores is None else scores[tr], None if scores is None else scores[nw],
        events.entity[tr], events.entity[nw], cfg.nightly.psi_limit, cfg.nightly.score_shift_limit,
    )
    rep["n_train_events"], rep["n_new_events"] = int(tr.sum()), int(nw.sum())
    return rep
