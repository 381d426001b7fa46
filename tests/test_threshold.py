"""Threshold: target-FPR and best-F1 calibration, round trip, errors."""

from __future__ import annotations

import numpy as np
import pytest

from nadray.errors import NadrayError
from nadray.threshold import Threshold


def test_fpr_mode_on_benign_scores():
    rng = np.random.default_rng(0)
    s = rng.normal(size=10_000)
    y = np.zeros(10_000)
    t = Threshold.calibrate(s, y, method="fpr", target_fpr=0.01)
    assert t.method == "fpr"
    assert 0.005 <= np.mean(t(s)) <= 0.01
    # Unlabelled validation: the quantile of all scores.
    u = Threshold.calibrate(s, None, method="auto", target_fpr=0.05)
    assert u.method == "fpr" and u.stats["on"] == "all" and np.mean(u(s)) <= 0.05


def test_auto_uses_f1_with_both_labels():
    s = np.r_[np.linspace(0, 1, 90), np.linspace(2, 3, 10)]
    y = np.r_[np.zeros(90), np.ones(10)]
    t = Threshold.calibrate(s, y, method="auto")
    assert t.method == "f1" and t.value == 2.0 and t.stats["val_f1"] == 1.0
    assert t(np.array([1.99, 2.0])).tolist() == [False, True]


def test_round_trip_and_errors():
    t = Threshold.calibrate(np.arange(10.0), np.r_[np.zeros(8), np.ones(2)], method="f1")
    assert Threshold.from_dict(t.to_dict()) == t
    with pytest.raises(NadrayError, match="threshold.method"):
        Threshold.calibrate(np.arange(3.0), None, method="bogus")
    with pytest.raises(NadrayError, match="target_fpr must be in"):
        Threshold.calibrate(np.arange(3.0), None, target_fpr=0.7)
    with pytest.raises(NadrayError, match="both 0 and 1"):
        Threshold.calibrate(np.arange(3.0), np.zeros(3), method="f1")
