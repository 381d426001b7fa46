"""Baseline detectors the LSTM has to beat, evaluated exactly like it.

Three detectors, each with the PyOD / scikit-learn contract: ``__init__`` only
stores parameters, ``fit`` sets attributes ending in ``_``, ``score`` returns one
float per row, higher is more anomalous. Thresholds are not part of a detector:
``nadray.evaluate`` calibrates one on validation with ``Threshold.calibrate``,
the same call the LSTM's threshold comes from.

- ``IsolationForestBaseline``: unsupervised, on the per-event feature matrix the
  LSTM gets (``Events.x`` from the ``FeatureEncoder``), fitted on training events
  that are benign or unlabelled, the same rows the LSTM's unsupervised objective
  learns from. It sees one event at a time: no sequence.
- ``HistGradientBoostingBaseline``: supervised, class-weighted, on the same
  matrix; only defined when training has both labels.
- ``EwmaZScoreBaseline``: per-entity exponentially weighted mean and variance of
  a few activity measures (``ewma_measures``: bytes, packets, flows, distinct
  peers, from the same features); the score is the largest
  ``|z|`` of an event against its entity's past only (causal).

All three score events (one row per flow and entity, as the LSTM does); a flow's
score is the highest of its entities' scores (``per_flow_max``), as DESIGN.md
fixes for the LSTM.

Example
-------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(500, 4)); X[7] = 8.0
>>> det = IsolationForestBaseline(n_estimators=50).fit(X)
>>> int(np.argmax(det.score(X)))
7
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nadray.errors import ConfigError, InputError, ModelError

__all__ = [
    "IsolationForestBaseline",
    "HistGradientBoostingBaseline",
    "EwmaZScoreBaseline",
    "EWMA_MEASURES",
    "ewma_measures",
    "per_flow_max",
    "unsupervised_rows",
]


def _as_matrix(X: Any, name: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype="float64")
    if X.ndim != 2:
        raise InputError(f"{name}: expected a 2-d array (n_events, n_features), got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        bad = int(np.argwhere(~np.isfinite(X))[0][0])
        raise InputError(f"{name}: every value must be finite, row {bad} is not: {X[bad].tolist()}")
    return X


def _as_labels(y: Any, n: int) -> np.ndarray:
    """Labels as float64: 1 malicious, 0 benign, NaN unknown."""
    if y is None:
        return np.full(n, np.nan)
    y = np.asarray(y, dtype="float64")
    if y.shape != (n,):
        raise InputError(f"y: expected shape ({n},) to match X, got {y.shape}")
    bad = ~np.isnan(y) & (y != 0) & (y != 1)
    if bad.any():
        raise InputError(f"y: labels must be 0, 1 or NaN (unknown), got {y[bad][0]!r}")
    return y


def unsupervised_rows(y: Any, n: int) -> np.ndarray:
    """Rows an unsupervised detector may learn from: benign or unlabelled (not known malicious).

    The same rule as the LSTM's unsupervised objective, so both learn "normal" from
    the same events.
    """
    return ~(_as_labels(y, n) == 1)


def _check_fitted(det: Any, attr: str) -> None:
    if not hasattr(det, attr):
        raise ModelError(f"{type(det).__name__}: score() called before fit()")


def _check_n_features(det: Any, X: np.ndarray) -> None:
    if X.shape[1] != det.n_features_in_:
        raise InputError(
            f"{type(det).__name__}: X has {X.shape[1]} features, but the detector was fitted on {det.n_features_in_}"
        )


class IsolationForestBaseline:
    """Isolation forest on per-event features, fitted on benign or unlabelled training events.

    Parameters
    ----------
    n_estimators : trees; 100 is scikit-learn's default and stable on a few thousand rows.
    max_samples : rows per tree ("auto" = min(256, n)): isolation works on small subsamples.
    max_train_rows : cap on fitted rows (uniform subsample) so a nightly fit stays bounded.
    random_state : seed, for reproducible evaluations.

    Attributes
    ----------
    model_ : the fitted ``sklearn.ensemble.IsolationForest``.
    n_features_in_ : feature count seen in ``fit``.
    n_train_rows_ : rows actually fitted (after the benign/unlabelled filter and the cap).
    """

    name = "isolation_forest"

    def __init__(
        self,
        n_estimators: int = 100,
        max_samples: int | str = "auto",
        max_train_rows: int = 100_000,
        random_state: int = 0,
    ):
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.max_train_rows = max_train_rows
        self.random_state = random_state

    def fit(self, X: Any, y: Any = None) -> "IsolationForestBaseline":
        """Fit on the rows of ``X`` (n, F) whose label ``y`` (n,) is 0 or NaN; known-malicious rows are left out."""
        from sklearn.ensemble import IsolationForest

        if not (isinstance(self.n_estimators, int) and self.n_estimators >= 1):
            raise ConfigError(f"n_estimators must be an integer >= 1, got {self.n_estimators!r}")
        if not (isinstance(self.max_train_rows, int) and self.max_train_rows >= 2):
            raise ConfigError(f"max_train_rows must be an integer >= 2, got {self.max_train_rows!r}")
        X = _as_matrix(X)
        keep = unsupervised_rows(y, len(X))
        Xf = X[keep]
        if len(Xf) < 2:
            raise InputError(
                f"{type(self).__name__}.fit: needs >= 2 benign or unlabelled rows, got {len(Xf)} (of {len(X)} rows)"
            )
        rng = np.random.default_rng(self.random_state)
        if len(Xf) > self.max_train_rows:
            Xf = Xf[np.sort(rng.choice(len(Xf), self.max_train_rows, replace=False))]
        self.model_ = IsolationForest(
            n_estimators=self.n_estimators,
            max_samples=self.max_samples,
            random_state=self.random_state,
            n_jobs=1,
        ).fit(Xf)
        self.n_features_in_ = X.shape[1]
        self.n_train_rows_ = len(Xf)
        return self

    def score(self, X: Any) -> np.ndarray:
        """Anomaly score per row of ``X`` (n, F): the negated scikit-learn ``score_samples``, higher is more anomalous."""
        _check_fitted(self, "model_")
        X = _as_matrix(X)
        _check_n_features(self, X)
        return -self.model_.score_samples(X)


def _one_thread():
    """OpenMP limited to one thread: on a shared or busy machine (Ray workers, CI) more
    threads than free cores make HistGradientBoosting many times slower, not faster."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="openmp")


class HistGradientBoostingBaseline:
    """Class-weighted gradient boosting on per-event features: the supervised upper reference.

    Only defined when training has both benign and malicious events; a real
    deployment rarely has labels for the attacks it will meet, so this baseline
    says how much labels would buy, not what to deploy.

    Parameters
    ----------
    max_iter : boosting rounds; early stopping on an internal split ends most fits sooner.
    learning_rate, max_leaf_nodes : scikit-learn's defaults.
    class_weight : "balanced" so a 0.2% malicious capture still counts.
    random_state : seed.

    Attributes
    ----------
    model_ : the fitted ``HistGradientBoostingClassifier``.
    n_features_in_, n_train_rows_, classes_ : as usual.
    """

    name = "hgb"

    def __init__(
        self,
        max_iter: int = 200,
        learning_rate: float = 0.1,
        max_leaf_nodes: int = 31,
        class_weight: str | dict | None = "balanced",
        random_state: int = 0,
    ):
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.class_weight = class_weight
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> "HistGradientBoostingBaseline":
        """Fit on the labelled rows of ``X`` (n, F); ``y`` (n,) is 1, 0 or NaN (NaN rows are left out)."""
        from sklearn.ensemble import HistGradientBoostingClassifier

        if not (0 < float(self.learning_rate) <= 1):
            raise ConfigError(f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ConfigError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        X = _as_matrix(X)
        if y is None:
            raise InputError(f"{type(self).__name__}.fit: y is required (supervised), got None")
        y = _as_labels(y, len(X))
        known = ~np.isnan(y)
        classes = sorted({int(v) for v in y[known]})
        if classes != [0, 1]:
            raise InputError(
                f"{type(self).__name__}.fit: y must contain both labels 0 (benign) and 1 (malicious) "
                f"among the labelled training rows, got only {classes} ({int(known.sum())} labelled of {len(y)} rows)"
            )
        n_small = int(min(np.sum(y[known] == 0), np.sum(y[known] == 1)))
        model = HistGradientBoostingClassifier(
            max_iter=self.max_iter,
            learning_rate=self.learning_rate,
            max_leaf_nodes=self.max_leaf_nodes,
            class_weight=self.class_weight,
            random_state=self.random_state,
            # An internal validation split needs a few rows of each class to stop early.
            early_stopping=bool(n_small >= 20 and known.sum() >= 1000),
        )
        with _one_thread():
            self.model_ = model.fit(X[known], y[known].astype(int))
        self.n_features_in_ = X.shape[1]
        self.n_train_rows_ = int(known.sum())
        self.classes_ = np.array(classes)
        return self

    def score(self, X: Any) -> np.ndarray:
        """Probability of "malicious" per row of ``X`` (n, F)."""
        _check_fitted(self, "model_")
        X = _as_matrix(X)
        _check_n_features(self, X)
        with _one_thread():
            return self.model_.predict_proba(X)[:, 1]


# Activity measures for the EWMA baseline, by FeatureEncoder feature name: bytes,
# packets, flows and distinct peers, each already log-scaled or a ratio (traffic is
# heavy-tailed; a z-score on raw bytes is dominated by the few largest transfers).
# The encoder standardises them, which a z-score ignores (it is affine invariant).
EWMA_MEASURES = [
    "log_bytes_out", "log_bytes_in", "log_pkts_out", "log_pkts_in", "log_flows",
    "log_peers", "peers_ratio",
]


def ewma_measures(x: Any, feature_names: list[str], measures: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """The columns of the event matrix ``x`` (n, F) the EWMA baseline tracks, and their names.

    ``measures`` defaults to ``EWMA_MEASURES``; those the encoder does not produce
    are skipped (flow mode has ``peers_ratio``, bin mode ``log_peers``).
    """
    wanted = EWMA_MEASURES if measures is None else list(measures)
    names = [m for m in wanted if m in feature_names]
    if not names:
        raise InputError(
            f"ewma measures: none of {wanted} is among the features {list(feature_names)}"
        )
    cols = [list(feature_names).index(m) for m in names]
    return np.asarray(x, dtype="float64")[:, cols], names


def _entity_groups(entity: np.ndarray) -> list[np.ndarray]:
    """Row indices per entity, each in the original (time) order."""
    codes, uniques = _factorize(entity)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    return np.split(order, bounds) if len(order) else []


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    codes, uniques = pd.factorize(pd.Series(np.asarray(values, dtype=object)), sort=False)
    return np.asarray(codes), np.asarray(uniques)


class EwmaZScoreBaseline:
    """Per-entity EWMA z-score: how far is this event from its entity's own recent past?

    For each entity and measure, the exponentially weighted mean ``m`` and variance
    ``v`` are updated after each event (``m += a (x - m)``, ``v = (1 - a)(v + a (x - m_prev)^2)``);
    an event is scored against the state *before* it, so only the entity's past counts.
    The score is the largest ``|z|`` over measures. A new entity starts from the
    training population's mean and variance, so its first events are judged
    against typical hosts, not against nothing.

    Parameters
    ----------
    alpha : weight of the newest event, in (0, 1]; 0.05 is a memory of about 20 events.
    min_std_fraction : floor on an entity's standard deviation, as a fraction of the
        population's, so a perfectly regular host does not give infinite z at its first change.

    Attributes
    ----------
    mean_, var_ : (k,) population mean and variance of the training measures (benign or unlabelled rows).
    n_features_in_ : k.
    """

    name = "ewma_zscore"

    def __init__(self, alpha: float = 0.05, min_std_fraction: float = 0.1):
        self.alpha = alpha
        self.min_std_fraction = min_std_fraction

    def _check_params(self) -> None:
        if not (0 < float(self.alpha) <= 1):
            raise ConfigError(f"alpha must be in (0, 1], got {self.alpha!r}")
        if not (0 < float(self.min_std_fraction) <= 1):
            raise ConfigError(f"min_std_fraction must be in (0, 1], got {self.min_std_fraction!r}")

    def fit(self, M: Any, y: Any = None) -> "EwmaZScoreBaseline":
        """Learn the population prior from training measures ``M`` (n, k) on benign or unlabelled rows."""
        self._check_params()
        M = _as_matrix(M, "M")
        keep = unsupervised_rows(y, len(M))
        if keep.sum() < 2:
            raise InputError(
                f"{type(self).__name__}.fit: needs >= 2 benign or unlabelled rows, got {int(keep.sum())}"
            )
        self.mean_ = M[keep].mean(axis=0)
        var = M[keep].var(axis=0)
        self.var_ = np.where(var > 0, var, 1.0)
        self.n_features_in_ = M.shape[1]
        return self

    def score(self, M: Any, entity: Any) -> np.ndarray:
        """``max |z|`` per event; ``M`` (n, k) measures, ``entity`` (n,), rows in time order within each entity."""
        from scipy.signal import lfilter

        _check_fitted(self, "mean_")
        self._check_params()
        M = _as_matrix(M, "M")
        _check_n_features(self, M)
        entity = np.asarray(entity, dtype=object)
        if entity.shape != (len(M),):
            raise InputError(f"entity: expected shape ({len(M)},) to match M, got {entity.shape}")
        a = float(self.alpha)
        floor = (self.min_std_fraction**2) * self.var_
        z = np.zeros_like(M)
        for rows in _entity_groups(entity):
            x = M[rows]  # (t, k), this entity's events in time order
            # Mean after each event, a linear filter along time (vectorised over
            # time and measures): m_t = (1 - a) m_{t-1} + a x_t, m_{-1} = population mean.
            m_after = lfilter([a], [1.0, -(1.0 - a)], x, axis=0, zi=((1.0 - a) * self.mean_)[None, :])[0]
            m_before = np.vstack([self.mean_[None, :], m_after[:-1]])
            d2 = (x - m_before) ** 2
            # v_t = (1 - a) v_{t-1} + (1 - a) a d_t, v_{-1} = population variance.
            v_after = lfilter(
                [(1.0 - a) * a], [1.0, -(1.0 - a)], d2, axis=0, zi=((1.0 - a) * self.var_)[None, :]
            )[0]
            v_before = np.vstack([self.var_[None, :], v_after[:-1]])
            z[rows] = (x - m_before) / np.sqrt(np.maximum(v_before, floor))
        return np.abs(z).max(axis=1) if M.shape[1] else np.zeros(len(M))


def per_flow_max(
    flow_index: Any, event_scores: Any, n_flows: int, entity: Any = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """A flow's score is the highest of its entities' scores (DESIGN.md).

    Returns ``(scores (n_flows,), entity (n_flows,) of that highest event or None)``;
    flows without any event get NaN and entity None.
    """
    idx = np.asarray(flow_index, dtype="int64")
    s = np.asarray(event_scores, dtype="float64")
    if idx.shape != s.shape:
        raise InputError(f"flow_index and event_scores must have the same shape, got {idx.shape} and {s.shape}")
    if len(idx) and (idx.min() < 0 or idx.max() >= n_flows):
        raise InputError(f"flow_index must be in [0, {n_flows}), got values in [{idx.min()}, {idx.max()}]")
    out = np.full(n_flows, np.nan)
    ent_out = np.full(n_flows, None, dtype=object) if entity is not None else None
    if not len(idx):
        return out, ent_out
    # Highest score first within each flow, then keep the first row per flow.
    order = np.lexsort((-s, idx))
    first = np.ones(len(order), dtype=bool)
    first[1:] = idx[order][1:] != idx[order][:-1]
    top = order[first]
    out[idx[top]] = s[top]
    if ent_out is not None:
        ent_out[idx[top]] = np.asarray(entity, dtype=object)[top]
    return out, ent_out
