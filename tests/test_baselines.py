"""Baselines: the detector contract, quality floors on synthetic and real (IoT-23) data, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from nadray.baselines import (
    EwmaZScoreBaseline,
    HistGradientBoostingBaseline,
    IsolationForestBaseline,
    ewma_measures,
    per_flow_max,
    unsupervised_rows,
)
from nadray.errors import ConfigError, InputError, ModelError

# Three small IoT-23 captures: 237 + 4,426 + 130 flows, 32 malicious (C&C, FileDownload).
SMALL_CAPTURES = ["CTU-Malware-Capture-44-1", "CTU-Malware-Capture-42-1", "CTU-Honeypot-Capture-7-1"]


def iot23(shared_data: Path, names: list[str] = SMALL_CAPTURES) -> pa.Table:
    """IoT-23 captures (shared/data) as one canonical flow table in time order."""
    from nadray.ingest import read_input
    from nadray.schema import TIME_ORDER

    tables = [read_input(str(Path(shared_data) / "iot23_small_scenarios" / f"{n}-labeled.csv"), "zeek").flows
              for n in names]
    t = pa.concat_tables(tables)
    return t.sort_by([(c, "ascending") for c in TIME_ORDER])


def blobs(n: int = 400, n_out: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    y = np.zeros(n)
    out = rng.choice(n, n_out, replace=False)
    X[out] += rng.choice([-1, 1], size=(n_out, 5)) * rng.uniform(4, 6, size=(n_out, 5))
    y[out] = 1
    return X, y


# --------------------------------------------------------------------------- IsolationForest


def test_isolation_forest_ranks_injected_anomaly_first():
    X, _ = blobs(n_out=0)
    X[123] = 9.0
    det = IsolationForestBaseline(n_estimators=50).fit(X)
    assert int(np.argmax(det.score(X))) == 123
    assert det.n_features_in_ == 5 and det.n_train_rows_ == len(X)


def test_isolation_forest_roc_floor_and_leaves_known_malicious_out():
    X, y = blobs()
    det = IsolationForestBaseline().fit(X, y)
    assert det.n_train_rows_ == int((y == 0).sum())  # known-malicious rows are not "normal"
    assert roc_auc_score(y, det.score(X)) >= 0.95


def test_unsupervised_rows_keep_benign_and_unlabelled():
    assert unsupervised_rows([0, 1, np.nan, 1, 0], 5).tolist() == [True, False, True, False, True]


def test_isolation_forest_errors_name_the_problem():
    with pytest.raises(ModelError, match="before fit"):
        IsolationForestBaseline().score(np.zeros((3, 2)))
    with pytest.raises(ConfigError, match="n_estimators must be an integer >= 1, got 0"):
        IsolationForestBaseline(n_estimators=0).fit(np.zeros((5, 2)))
    det = IsolationForestBaseline(n_estimators=5).fit(np.random.default_rng(0).normal(size=(20, 3)))
    with pytest.raises(InputError, match="X has 2 features, but the detector was fitted on 3"):
        det.score(np.zeros((4, 2)))
    with pytest.raises(InputError, match="row 1"):
        IsolationForestBaseline().fit(np.array([[0.0, 1.0], [np.nan, 1.0], [2.0, 2.0]]))


# --------------------------------------------------------------------------- HGB


def test_hgb_roc_floor():
    X, y = blobs(seed=1)
    Xt, yt = blobs(seed=2)
    det = HistGradientBoostingBaseline(max_iter=50).fit(X, y)
    assert roc_auc_score(yt, det.score(Xt)) >= 0.9
    assert det.classes_.tolist() == [0, 1]


def test_hgb_single_class_says_so():
    X, _ = blobs()
    with pytest.raises(InputError, match=r"both labels 0 \(benign\) and 1 \(malicious\).*got only \[0\]"):
        HistGradientBoostingBaseline().fit(X, np.zeros(len(X)))
    with pytest.raises(InputError, match="got only \\[\\]"):
        HistGradientBoostingBaseline().fit(X, np.full(len(X), np.nan))
    with pytest.raises(InputError, match="y: labels must be 0, 1 or NaN"):
        HistGradientBoostingBaseline().fit(X, np.full(len(X), 2.0))
    with pytest.raises(ConfigError, match="learning_rate must be in \\(0, 1\\], got 2"):
        HistGradientBoostingBaseline(learning_rate=2).fit(X, np.r_[np.zeros(200), np.ones(200)])


# --------------------------------------------------------------------------- EWMA z-score


def _ewma_reference(M, ent, alpha, mean, var, floor_frac):
    out = np.zeros(len(M))
    for e in dict.fromkeys(ent):
        m, v = mean.copy(), var.copy()
        for i in np.flatnonzero(ent == e):
            d = M[i] - m
            out[i] = np.abs(d / np.sqrt(np.maximum(v, floor_frac**2 * var))).max()
            m = m + alpha * d
            v = (1 - alpha) * (v + alpha * d**2)
    return out


def test_ewma_matches_the_recursion_and_is_causal():
    rng = np.random.default_rng(0)
    M = rng.normal(size=(300, 3))
    ent = rng.choice(np.array(["a", "b", "c"], dtype=object), 300)
    det = EwmaZScoreBaseline(alpha=0.1).fit(M)
    s = det.score(M, ent)
    np.testing.assert_allclose(s, _ewma_reference(M, ent, 0.1, det.mean_, det.var_, 0.1), rtol=1e-9)
    # Changing the future changes nothing before it.
    M2 = M.copy()
    M2[200:] += 50
    np.testing.assert_array_equal(det.score(M2, ent)[:200], s[:200])
    # Entities are independent: a spike on "a" leaves "b" untouched.
    M3 = M.copy()
    M3[np.flatnonzero(ent == "a")[10]] += 50
    np.testing.assert_array_equal(det.score(M3, ent)[ent == "b"], s[ent == "b"])


def test_ewma_flags_a_spike_against_the_entity_own_past():
    rng = np.random.default_rng(3)
    # Host "big" is always busy, host "small" quiet; a busy event from "small" is the anomaly.
    big = rng.normal(10, 0.3, size=(100, 1))
    small = rng.normal(1, 0.3, size=(100, 1))
    small[80] = 10.0
    M = np.vstack([big, small])
    ent = np.array(["big"] * 100 + ["small"] * 100, dtype=object)
    s = EwmaZScoreBaseline(alpha=0.1).fit(M).score(M, ent)
    assert int(np.argmax(s[20:])) + 20 == 180


def test_ewma_errors():
    with pytest.raises(ConfigError, match="alpha must be in \\(0, 1\\], got 0"):
        EwmaZScoreBaseline(alpha=0).fit(np.zeros((4, 1)))
    det = EwmaZScoreBaseline().fit(np.random.default_rng(0).normal(size=(10, 2)))
    with pytest.raises(InputError, match="entity: expected shape \\(10,\\)"):
        det.score(np.zeros((10, 2)), ["a"] * 3)
    with pytest.raises(ModelError, match="before fit"):
        EwmaZScoreBaseline().score(np.zeros((2, 1)), ["a", "a"])


def test_ewma_measures_by_feature_name():
    x = np.arange(12, dtype="float32").reshape(3, 4)
    M, names = ewma_measures(x, ["log_dt", "log_flows", "proto=tcp", "peers_ratio"])
    assert names == ["log_flows", "peers_ratio"] and M.tolist() == [[1, 3], [5, 7], [9, 11]]
    with pytest.raises(InputError, match="none of"):
        ewma_measures(x, ["a", "b", "c", "d"])


def test_per_flow_max_takes_the_highest_entity():
    s, e = per_flow_max([0, 0, 1, 2, 2], [0.1, 0.5, 0.3, 0.9, 0.2], 4, ["x", "y", "x", "z", "x"])
    assert s[:3].tolist() == [0.5, 0.3, 0.9] and np.isnan(s[3])
    assert e.tolist() == ["y", "x", "z", None]
    with pytest.raises(InputError, match="flow_index must be in \\[0, 2\\)"):
        per_flow_max([0, 5], [1.0, 2.0], 2)


# --------------------------------------------------------------------------- real data


def test_baselines_on_iot23_events_with_quality_floor(shared_data):
    """Fit on the training events the LSTM gets, score the rest: ROC floors on real captures."""
    from nadray.config import Config
    from nadray.features import FeatureEncoder

    flows = iot23(shared_data)
    n = flows.num_rows
    cut = int(n * 0.6)
    cfg = Config()
    enc = FeatureEncoder.fit(flows.slice(0, cut), cfg)
    ev = enc.transform(flows)
    train = ev.flow_index < cut
    test = ~train & ~np.isnan(ev.label)
    y = ev.label[test]
    assert 0 < y.sum() < len(y)
    iso = IsolationForestBaseline().fit(ev.x[train], ev.label[train])
    assert roc_auc_score(y, iso.score(ev.x)[test]) >= 0.7
    M, names = ewma_measures(ev.x, ev.feature_names)
    ew = EwmaZScoreBaseline().fit(M[train], ev.label[train])
    assert "log_bytes_out" in names
    assert roc_auc_score(y, ew.score(M, ev.entity)[test]) >= 0.6
