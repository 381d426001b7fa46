"""Drift between the data a model was trained on and the data it now sees.

The nightly job (``nadray.retrain``) calls :func:`drift_report` after scoring the
new day, and writes the result into its run report. Three signals:

* **Feature drift**: the population stability index (PSI) of each feature,
  new day against the training split. The usual reading (credit scoring):
  below 0.1 stable, 0.1 to 0.25 moderate, above 0.25 major.
* **Score shift**: the two-sample Kolmogorov-Smirnov statistic between the
  model's scores on its own training (or validation) data and on the new day,
  plus the mean and quantile shifts. A score distribution that moves while the
  features do not usually means new behaviour of known hosts.
* **New entities**: hosts the model has never seen; their first scores come
  with no history, so the report names them.

Pure numpy / pandas / scipy: no Ray, no torch, nothing at import time.

Example
-------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> a = rng.lognormal(5, 1, 5000)
>>> round(psi(a, rng.lognormal(5, 1, 5000)), 2) < 0.1, psi(a, a * 10) > 1
(True, True)
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

#: Floor for a bin's share before the log in PSI: an empty bin on one side
#: would make the index infinite; 1e-4 caps one bin's term near 9.2 (ln 1e4).
PSI_EPSILON = 1e-4

#: Score quantiles compared by :func:`score_shift`.
SHIFT_QUANTILES = (0.5, 0.9, 0.99)


def _as_float_1d(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype="float64")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _bin_edges(expected_finite: np.ndarray, bins: int) -> np.ndarray:
    """Quantile edges of ``expected``; the first edge is its minimum, the last sits just
    above its maximum, so values outside the training range fall in bins of their own.

    Ties collapse edges (``np.unique``): a feature that is 0 for half the flows gets
    one bin for the zeros, not five, and a constant feature gets the three bins
    "below", "equal" and "above" the constant.
    """
    if expected_finite.size == 0:
        return np.empty(0)
    qs = np.quantile(expected_finite, np.linspace(0.0, 1.0, bins + 1))
    upper = np.nextafter(qs[-1], np.inf)
    return np.unique(np.concatenate([qs[:-1], [upper]]))


def _shares(values: np.ndarray, edges: np.ndarray, with_missing: bool) -> np.ndarray:
    """Share of ``values`` in each bin: ``len(edges) + 1`` value bins (below the first
    edge, between edges, at or above the last), then one bin for missing values."""
    finite = np.isfinite(values)
    idx = np.searchsorted(edges, values[finite], side="right")
    counts = np.bincount(idx, minlength=len(edges) + 1).astype("float64")
    if with_missing:
        counts = np.append(counts, float((~finite).sum()))
    return counts / max(values.size, 1)


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``actual`` against ``expected``.

    ``PSI = sum_b (a_b - e_b) * ln(a_b / e_b)`` over bins ``b``, where ``e_b`` and
    ``a_b`` are the shares of ``expected`` and ``actual`` in bin ``b``. Bins are the
    quantiles of ``expected`` (so each holds about ``1 / bins`` of it), plus a bin
    below its minimum and one above its maximum; shares are floored at
    :data:`PSI_EPSILON` so an empty bin gives a large but finite index.

    Missing values (NaN, and also +-inf) are a bin of their own, added when
    either side has any: a feature that suddenly goes missing is drift too.

    Parameters
    ----------
    expected : array of shape (n,)
        The reference sample (the training split's values of one feature).
    actual : array of shape (m,)
        The new sample. ``n`` and ``m`` may differ.
    bins : int
        Quantile bins over ``expected``; at least 2. Ten is the usual choice:
        more bins make the index noisier on small samples.

    Returns
    -------
    float
        0 for identical distributions, growing with the difference; NaN when
        either side is empty. Not symmetric in its arguments (the bins come from
        ``expected``), but close to it for similar distributions.
    """
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    e = _as_float_1d(expected, "expected")
    a = _as_float_1d(actual, "actual")
    if e.size == 0 or a.size == 0:
        return math.nan
    edges = _bin_edges(e[np.isfinite(e)], int(bins))
    with_missing = bool((~np.isfinite(e)).any() or (~np.isfinite(a)).any())
    e_share = np.maximum(_shares(e, edges, with_missing), PSI_EPSILON)
    a_share = np.maximum(_shares(a, edges, with_missing), PSI_EPSILON)
    return float(np.sum((a_share - e_share) * np.log(a_share / e_share)))


def feature_psi(
    train_x: np.ndarray, new_x: np.ndarray, feature_names: Sequence[str], bins: int = 10
) -> dict[str, float]:
    """PSI of every feature column, new data against training data.

    Parameters
    ----------
    train_x : array of shape (n, F)
        Per-event features of the training split (``Events.x``).
    new_x : array of shape (m, F)
        The same features for the new data, encoded with the same encoder.
    feature_names : sequence of F str
        Column names, in column order (``Events.feature_names``).

    Returns
    -------
    dict
        ``{feature_name: psi}`` in column order.
    """
    train_x = np.asarray(train_x, dtype="float64")
    new_x = np.asarray(new_x, dtype="float64")
    names = list(feature_names)
    for label, arr in (("train_x", train_x), ("new_x", new_x)):
        if arr.ndim != 2 or arr.shape[1] != len(names):
            raise ValueError(
                f"{label} must have shape (rows, {len(names)}) to match feature_names, got {arr.shape}"
            )
    return {name: psi(train_x[:, j], new_x[:, j], bins=bins) for j, name in enumerate(names)}


def score_shift(train_scores: np.ndarray, new_scores: np.ndarray) -> dict[str, Any]:
    """How far the new scores moved from the training scores.

    Parameters
    ----------
    train_scores : array of shape (n,)
        Anomaly scores of the reference data (higher is more anomalous).
    new_scores : array of shape (m,)
        Scores of the new data from the same model. Non-finite scores are dropped.

    Returns
    -------
    dict
        ``ks`` (two-sample Kolmogorov-Smirnov statistic, 0 to 1), ``p_value``,
        ``n_train``, ``n_new``, ``mean_train``, ``mean_new``, ``mean_shift``
        (new minus train), and ``quantiles``: ``{"p50": {"train", "new", "shift"}, ...}``.
        When either side has no finite score the statistics are None (not NaN: the
        dict goes into JSON reports) and ``undefined`` says why.
    """
    t = _as_float_1d(train_scores, "train_scores")
    n = _as_float_1d(new_scores, "new_scores")
    t, n = t[np.isfinite(t)], n[np.isfinite(n)]
    out: dict[str, Any] = {"n_train": int(t.size), "n_new": int(n.size)}
    if t.size == 0 or n.size == 0:
        out.update(ks=None, p_value=None, mean_train=None, mean_new=None, mean_shift=None)
        out["quantiles"] = {f"p{round(q * 100)}": {"train": None, "new": None, "shift": None} for q in SHIFT_QUANTILES}
        out["undefined"] = f"undefined: no finite score on one side ({t.size} training, {n.size} new)"
        return out
    from scipy.stats import ks_2samp

    res = ks_2samp(t, n)
    out.update(
        ks=float(res.statistic),
        p_value=float(res.pvalue),
        mean_train=float(t.mean()),
        mean_new=float(n.mean()),
        mean_shift=float(n.mean() - t.mean()),
    )
    qt, qn = np.quantile(t, SHIFT_QUANTILES), np.quantile(n, SHIFT_QUANTILES)
    out["quantiles"] = {
        f"p{round(q * 100)}": {"train": float(a), "new": float(b), "shift": float(b - a)}
        for q, a, b in zip(SHIFT_QUANTILES, qt, qn)
    }
    return out


def _entity_set(values: Iterable[Any]) -> set[str]:
    out = set()
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        out.add(str(v))
    return out


def new_entities(train_entities: Iterable[Any], new_entities: Iterable[Any]) -> list[str]:
    """Entities in ``new_entities`` that never appear in ``train_entities``, sorted.

    Parameters
    ----------
    train_entities : iterable, shape (n,)
        Entity of each training event (``Events.entity``); repeats are fine.
    new_entities : iterable, shape (m,)
        Entity of each new event. None and NaN are ignored.
    """
    return _unseen(train_entities, new_entities)


def _unseen(train: Iterable[Any], new: Iterable[Any]) -> list[str]:
    # Separate from new_entities() because drift_report's parameter of that name shadows it.
    return sorted(_entity_set(new) - _entity_set(train))


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def drift_report(
    train_x: np.ndarray,
    new_x: np.ndarray,
    feature_names: Sequence[str],
    train_scores: np.ndarray | None,
    new_scores: np.ndarray | None,
    train_entities: Iterable[Any] | None,
    new_entities: Iterable[Any] | None,
    psi_limit: float,
    score_shift_limit: float,
    bins: int = 10,
) -> dict[str, Any]:
    """Feature PSI, score shift and new entities in one JSON-safe dict (no NaN or inf:
    an undefined statistic is None and ``undefined`` says why).

    Parameters
    ----------
    train_x, new_x : arrays of shape (n, F) and (m, F)
        Per-event features of the training split and of the new data.
    feature_names : sequence of F str
    train_scores, new_scores : arrays of shape (n',) and (m',), or None
        Scores of reference and new events; None skips the score check.
    train_entities, new_entities : iterables of shape (n,) and (m,), or None
        Entity per event; None skips the new-entity list.
    psi_limit : float
        A feature whose PSI exceeds this flags the report (``nightly.psi_limit``).
    score_shift_limit : float
        A KS statistic above this flags the report (``nightly.score_shift_limit``).

    Returns
    -------
    dict
        ``flagged`` (bool), ``reasons`` (one plain sentence per flag),
        ``features`` (a table: one ``{"feature", "psi", "over_limit"}`` row per
        feature, in column order; ``psi`` None when undefined), ``max_psi`` (None
        when no PSI is defined), ``score_shift`` (see :func:`score_shift`, or None),
        ``new_entities`` (list or None), ``n_new_entities``, ``psi_limit``,
        ``score_shift_limit``, and ``undefined``: ``{"psi" | "score_shift": why}``
        for each check that could not be computed (empty when all could).
    """
    for name, value in (("psi_limit", psi_limit), ("score_shift_limit", score_shift_limit)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    psis = feature_psi(train_x, new_x, feature_names, bins=bins)
    reasons: list[str] = []
    undefined: dict[str, str] = {}
    table = []
    for feat, value in psis.items():
        defined = math.isfinite(value)
        over = bool(defined and value > psi_limit)
        table.append({"feature": feat, "psi": value if defined else None, "over_limit": over})
        if over:
            reasons.append(f"Feature {feat!r} drifted: PSI {_fmt(value)} is above the limit {_fmt(psi_limit)}.")
    finite = [v for v in psis.values() if math.isfinite(v)]
    if len(finite) < len(psis):
        undefined["psi"] = (f"undefined: PSI needs rows on both sides ({len(train_x)} training, {len(new_x)} new); "
                            "such features have psi null")

    shift = None
    if train_scores is not None and new_scores is not None:
        shift = score_shift(train_scores, new_scores)
        if shift["ks"] is None:
            undefined["score_shift"] = shift["undefined"]
        elif shift["ks"] > score_shift_limit:
            p50 = shift["quantiles"]["p50"]
            reasons.append(
                f"Score distribution shifted: KS statistic {_fmt(shift['ks'])} is above the limit "
                f"{_fmt(score_shift_limit)} (p-value {_fmt(shift['p_value'])}; median score "
                f"{_fmt(p50['train'])} -> {_fmt(p50['new'])})."
            )

    unseen = None
    if train_entities is not None and new_entities is not None:
        unseen = _unseen(train_entities, new_entities)

    return {
        "flagged": bool(reasons),
        "reasons": reasons,
        "features": table,
        "max_psi": max(finite) if finite else None,
        "score_shift": shift,
        "new_entities": unseen,
        "n_new_entities": None if unseen is None else len(unseen),
        "psi_limit": float(psi_limit),
        "score_shift_limit": float(score_shift_limit),
        "undefined": undefined,
    }
