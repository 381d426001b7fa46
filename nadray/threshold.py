"""The alert threshold as its own object (river's ``anomaly.threshold`` idea).

It is calibrated on validation scores, stored in the checkpoint, and can be
changed at serving time without retraining (``Scorer.set_threshold``).

Example
-------
>>> import numpy as np
>>> t = Threshold.calibrate(np.arange(100.0), np.r_[np.zeros(90), np.ones(10)], method="f1")
>>> t.value, t.method
(90.0, 'f1')
>>> t(np.array([10.0, 95.0])).tolist()
[False, True]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nadray.errors import NadrayError

METHODS = ("auto", "fpr", "f1", "manual")


@dataclass
class Threshold:
    value: float
    method: str = "manual"
    target_fpr: float | None = None
    # What calibration saw, for the checkpoint and GET /model.
    stats: dict[str, Any] = field(default_factory=dict)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """Alert when ``score >= value``: bool array of the scores' shape."""
        return np.asarray(scores, dtype="float64") >= self.value

    @classmethod
    def calibrate(cls, scores: np.ndarray, labels: np.ndarray | None = None, method: str = "auto",
                  target_fpr: float = 0.01) -> Threshold:
        """Pick the threshold on validation data.

        Parameters
        ----------
        scores : (n,) validation scores, higher is more anomalous.
        labels : (n,) 1 malicious, 0 benign, NaN unknown; or None.
        method : "auto" = best F1 when both labels are present, else "fpr";
            "f1" = the score cut with the highest F1 on labelled events;
            "fpr" = the (1 - target_fpr) quantile of benign scores (all scores when none is labelled).
        """
        if method not in ("auto", "fpr", "f1"):
            raise NadrayError(f"threshold.method must be one of auto, fpr, f1, got {method!r}")
        if not 0 < target_fpr < 0.5:
            raise NadrayError(f"threshold.target_fpr must be in (0, 0.5), got {target_fpr!r}")
        s = np.asarray(scores, dtype="float64")
        if len(s) == 0:
            raise NadrayError("threshold: the validation split has no scores to calibrate on")
        y = np.full(len(s), np.nan) if labels is None else np.asarray(labels, dtype="float64")
        known = ~np.isnan(y)
        has_both = bool(np.any(y[known] == 1)) and bool(np.any(y[known] == 0))
        if method == "f1" and not has_both:
            raise NadrayError("threshold.method=f1 needs validation events labelled both 0 and 1")
        if method == "f1" or (method == "auto" and has_both):
            value, f1 = _best_f1(s[known], y[known].astype(int))
            return cls(value, "f1", target_fpr, {"val_f1": f1, "n": int(known.sum())})
        benign = s[known & (y == 0)]
        pool = benign if len(benign) else s
        value = float(np.quantile(pool, 1.0 - target_fpr, method="higher"))
        # Scores equal to the quantile alert too; nudge past ties so the benign FPR stays <= target.
        if np.mean(pool >= value) > target_fpr:
            above = pool[pool > value]
            value = float(np.nextafter(value, np.inf)) if len(above) == 0 else float(above.min())
        return cls(value, "fpr", target_fpr, {"n": int(len(pool)), "on": "benign" if len(benign) else "all",
                                             "fpr": float(np.mean(pool >= value))})

    def to_dict(self) -> dict[str, Any]:
        return {"value": float(self.value), "method": self.method, "target_fpr": self.target_fpr, "stats": self.stats}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Threshold:
        try:
            value = float(d["value"])
        except (KeyError, TypeError, ValueError):
            raise NadrayError(f"threshold: expected a mapping with a numeric 'value', got {d!r}") from None
        if not np.isfinite(value):
            raise NadrayError(f"threshold: value must be finite, got {value!r}")
        return cls(value, str(d.get("method", "manual")), d.get("target_fpr"), dict(d.get("stats") or {}))


def _best_f1(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(1 - y_sorted)
    # Only cut between distinct scores (everything >= the cut alerts).
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp, fp, cuts = tp[last], fp[last], s_sorted[last]
    pos = y.sum()
    f1 = 2 * tp / (tp + fp + pos)
    k = int(np.argmax(f1))
    return float(cuts[k]), float(f1[k])
