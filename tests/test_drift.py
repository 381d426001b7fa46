"""nadray.drift: PSI, score shift, new entities, and the nightly drift report.

Real traffic from IoT-23 (shared data): two interleaved halves of one capture
are the same population (PSI near 0); a benign honeypot and a Mirai capture
are not (PSI far above the 0.25 "major shift" cut-off). Synthetic data only
for the edge cases (constant columns, NaN).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from _strictjson import strict_loads

from nadray.drift import drift_report, feature_psi, new_entities, psi, score_shift

# Zeek conn.log numeric fields that nadray's features are built from.
COLUMNS = ["orig_bytes", "resp_bytes", "duration", "orig_pkts", "resp_pkts", "id.resp_p"]
PSI_LIMIT = 0.25  # nightly.psi_limit default
KS_LIMIT = 0.2  # nightly.score_shift_limit default


def _capture(shared_data, name: str) -> pd.DataFrame:
    return pd.read_csv(shared_data / "iot23_small_scenarios" / f"{name}-labeled.csv")


def _x(df: pd.DataFrame) -> np.ndarray:
    # log1p like the feature encoder's heavy-tailed columns; NaN (Zeek "-") kept.
    return np.log1p(df[COLUMNS].to_numpy(dtype="float64"))


@pytest.fixture(scope="module")
def mirai(shared_data):
    return _capture(shared_data, "CTU-Malware-Capture-34-1")


@pytest.fixture(scope="module")
def honeypot(shared_data):
    return _capture(shared_data, "CTU-Honeypot-Capture-5-1")


def test_psi_near_zero_for_interleaved_halves_of_one_capture(mirai, honeypot):
    for df in (mirai, honeypot):
        bytes_ = df["orig_bytes"].to_numpy(dtype="float64")  # 22-77 % NaN: exercises the missing bin
        assert psi(bytes_[0::2], bytes_[1::2]) < 0.05
        for value in feature_psi(_x(df)[0::2], _x(df)[1::2], COLUMNS).values():
            assert value < 0.1


def test_psi_large_between_honeypot_and_mirai(mirai, honeypot):
    values = feature_psi(_x(honeypot), _x(mirai), COLUMNS)
    assert all(v > 1.0 for v in values.values()), values
    assert psi(honeypot["orig_bytes"].to_numpy(float), mirai["orig_bytes"].to_numpy(float)) > PSI_LIMIT


def test_psi_roughly_symmetric_and_monotone_in_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 20_000), rng.normal(0.3, 1, 20_000)
    ab, ba = psi(a, b), psi(b, a)
    assert ab > 0.05 and ba > 0.05
    assert abs(ab - ba) / max(ab, ba) < 0.25
    # Farther apart, larger index.
    assert psi(a, rng.normal(1.0, 1, 20_000)) > ab
    assert psi(a, a) == pytest.approx(0.0, abs=1e-12)


def test_psi_constant_columns():
    zeros = np.zeros(1000)
    assert psi(zeros, np.zeros(500)) == pytest.approx(0.0, abs=1e-12)
    # A constant training column: any move off the constant is drift, above or below.
    assert psi(zeros, np.ones(500)) > PSI_LIMIT
    assert psi(zeros, -np.ones(500)) > PSI_LIMIT
    # A constant new column against a spread-out training column.
    assert psi(np.arange(1000.0), np.full(500, 3.0)) > PSI_LIMIT


def test_psi_values_beyond_training_range_are_drift():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, 5000)
    assert psi(a, a + 10) > PSI_LIMIT  # all above the training maximum
    assert psi(a, a - 10) > PSI_LIMIT  # all below the training minimum


def test_psi_nan_is_its_own_bin():
    rng = np.random.default_rng(2)
    a = rng.normal(size=4000)
    with_nan = a.copy()
    with_nan[::2] = np.nan  # same values, half now missing
    assert math.isfinite(psi(a, with_nan))
    assert psi(a, with_nan) > PSI_LIMIT
    # Same missing share on both sides: stable.
    b = rng.normal(size=4000)
    b[1::2] = np.nan
    assert psi(with_nan, b) < 0.05
    # Infinities count as missing, never as NaN in the result.
    assert math.isfinite(psi(a, np.where(a > 0, np.inf, a)))
    # All-missing training column: finite, and a shift to present values is drift.
    assert psi(np.full(100, np.nan), np.ones(100)) > PSI_LIMIT


def test_psi_empty_and_bad_arguments():
    assert math.isnan(psi(np.array([]), np.ones(3)))
    assert math.isnan(psi(np.ones(3), np.array([])))
    with pytest.raises(ValueError, match="bins must be an integer >= 2, got 1"):
        psi(np.ones(3), np.ones(3), bins=1)
    with pytest.raises(ValueError, match="expected must be one-dimensional"):
        psi(np.ones((3, 2)), np.ones(3))
    with pytest.raises(ValueError, match=r"new_x must have shape \(rows, 2\)"):
        feature_psi(np.ones((5, 2)), np.ones((5, 3)), ["a", "b"])


def test_score_shift():
    rng = np.random.default_rng(3)
    base = rng.exponential(1.0, 5000)
    same = score_shift(base, rng.exponential(1.0, 5000))
    assert same["ks"] < 0.05 and same["p_value"] > 0.001
    moved = score_shift(base, rng.exponential(1.0, 5000) + 1.0)
    assert moved["ks"] > 0.5 and moved["p_value"] < 1e-6
    assert moved["mean_shift"] == pytest.approx(1.0, abs=0.1)
    assert moved["quantiles"]["p50"]["shift"] == pytest.approx(1.0, abs=0.1)
    assert set(moved["quantiles"]) == {"p50", "p90", "p99"}
    # Non-finite scores dropped; an empty side gives None statistics and says why, not an error.
    assert score_shift(np.array([1.0, np.nan, 2.0]), np.array([1.0, 2.0]))["n_train"] == 2
    empty = score_shift(base, np.array([np.nan]))
    assert empty["n_new"] == 0 and empty["ks"] is None and empty["quantiles"]["p50"]["shift"] is None
    assert empty["undefined"] == "undefined: no finite score on one side (5000 training, 0 new)"


def test_new_entities():
    train = ["10.0.0.1", "10.0.0.2", "10.0.0.1", None]
    new = np.array(["10.0.0.9", "10.0.0.2", "10.0.0.3", "10.0.0.9", np.nan], dtype=object)
    assert new_entities(train, new) == ["10.0.0.3", "10.0.0.9"]
    assert new_entities(train, []) == []


def test_drift_report_flags_a_different_capture(mirai, honeypot):
    half = _x(honeypot)
    rng = np.random.default_rng(4)
    train_scores = rng.exponential(1.0, 2000)

    stable = drift_report(
        half[0::2], half[1::2], COLUMNS,
        train_scores, rng.exponential(1.0, 2000),
        honeypot["id.orig_h"][0::2], honeypot["id.orig_h"][1::2],
        psi_limit=PSI_LIMIT, score_shift_limit=KS_LIMIT,
    )
    assert stable["flagged"] is False and stable["reasons"] == []
    assert [row["feature"] for row in stable["features"]] == COLUMNS
    assert stable["max_psi"] < PSI_LIMIT

    drifted = drift_report(
        half, _x(mirai), COLUMNS,
        train_scores, rng.exponential(1.0, 2000) + 2.0,
        honeypot["id.orig_h"], mirai["id.orig_h"],
        psi_limit=PSI_LIMIT, score_shift_limit=KS_LIMIT,
    )
    assert drifted["flagged"] is True
    assert all(row["over_limit"] for row in drifted["features"])
    # One plain sentence per drifted feature, naming it and its PSI, then the score shift.
    assert len(drifted["reasons"]) == len(COLUMNS) + 1
    first = drifted["features"][0]
    assert drifted["reasons"][0] == (
        f"Feature 'orig_bytes' drifted: PSI {first['psi']:.3g} is above the limit 0.25."
    )
    assert drifted["reasons"][-1].startswith("Score distribution shifted: KS statistic")
    assert "192.168.1.195" in drifted["new_entities"]  # the Mirai-infected device
    assert drifted["n_new_entities"] == len(drifted["new_entities"])


def test_drift_report_optional_parts_and_json_safe():
    import json

    x = np.random.default_rng(5).normal(size=(200, 2))
    report = drift_report(x, x, ["a", "b"], None, None, None, None, psi_limit=0.25, score_shift_limit=0.2)
    assert report["score_shift"] is None and report["new_entities"] is None
    assert report["flagged"] is False
    json.dumps(report)  # the nightly report writes it as JSON
    with pytest.raises(ValueError, match="psi_limit must be a number > 0, got 0"):
        drift_report(x, x, ["a", "b"], None, None, None, None, psi_limit=0, score_shift_limit=0.2)


def test_drift_report_is_strict_json_when_statistics_are_undefined():
    train = np.column_stack([np.random.default_rng(6).normal(size=300), np.full(300, 7.0)])  # b is constant
    # No new rows at all: every PSI and the score shift are undefined.
    empty = drift_report(train, np.empty((0, 2)), ["a", "b"], np.ones(300), np.array([]), ["h1"] * 300, [],
                         psi_limit=0.25, score_shift_limit=0.2)
    back = strict_loads(json.dumps(empty, allow_nan=False))
    assert [r["psi"] for r in back["features"]] == [None, None] and back["max_psi"] is None
    assert back["score_shift"]["ks"] is None and back["score_shift"]["p_value"] is None
    assert back["flagged"] is False
    assert back["undefined"]["psi"].startswith("undefined: PSI needs rows on both sides (300 training, 0 new)")
    assert back["undefined"]["score_shift"].startswith("undefined: no finite score on one side")
    # New rows whose scores are all NaN, and a constant feature that stays constant or goes missing.
    new = np.column_stack([np.random.default_rng(7).normal(size=50), np.r_[np.full(25, 7.0), np.full(25, np.nan)]])
    some = drift_report(train, new, ["a", "b"], np.ones(300), np.full(50, np.nan), None, None,
                        psi_limit=0.25, score_shift_limit=0.2)
    back = strict_loads(json.dumps(some, allow_nan=False))
    assert all(isinstance(r["psi"], float) for r in back["features"]) and back["features"][1]["over_limit"]
    assert back["score_shift"]["ks"] is None and set(back["undefined"]) == {"score_shift"}
