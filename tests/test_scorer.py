"""Scorer: one row per flow, online replay equals batch scoring, LRU context, map_batches adapter."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from _iot23 import read_captures
from nadray.config import load_config
from nadray.features import FeatureEncoder
from nadray.model import EventLSTM, ModelArgs
from nadray.scorer import OUTPUT_COLUMNS, Scorer
from nadray.threshold import Threshold


def make_scorer(flows: pa.Table, cfg, objective="unsupervised") -> Scorer:
    torch.manual_seed(0)
    enc = FeatureEncoder.fit(flows, cfg)
    args = ModelArgs.from_config(cfg, enc.n_features)
    args.objective = objective
    return Scorer(EventLSTM(args), enc, Threshold(1.0), meta={}, err_norm=np.ones(enc.n_features),
                  z={"err_mean": 0.5, "err_std": 2.0}, version="test")


def replay(scorer: Scorer, flows: pa.Table, batch: int, max_entities: int = 1000) -> pd.DataFrame:
    ctx = scorer.new_context(max_entities)
    parts = [scorer.score_online(flows.slice(i, batch), ctx) for i in range(0, flows.num_rows, batch)]
    return pd.concat(parts, ignore_index=True), ctx


@pytest.fixture(scope="module")
def iot(shared_data):
    return read_captures(shared_data, ["CTU-Honeypot-Capture-7-1", "CTU-Malware-Capture-44-1"])


@pytest.mark.parametrize("objective", ["unsupervised", "hybrid"])
def test_online_replay_equals_batch(iot, objective):
    cfg = load_config(None, ["data.sequence_length=6", "data.context_window=5", "model.hidden_size=8"])
    sc = make_scorer(iot, cfg, objective)
    batch = sc.score_table(iot)
    assert list(batch.columns) == OUTPUT_COLUMNS and len(batch) == iot.num_rows
    assert batch.score.dtype == np.float64 and np.isfinite(batch.score).all()
    assert (batch.source_row.to_numpy() == iot.column("source_row").to_numpy()).all()
    online, ctx = replay(sc, iot, batch=17)
    assert (online.entity == batch.entity).all()
    np.testing.assert_allclose(online.score, batch.score, rtol=1e-4, atol=1e-4)
    assert len(ctx) == batch.entity.nunique() or len(ctx) >= 2
    assert all(len(ctx.get(e)) <= ctx.keep for e in ctx.entities())


def test_bin_mode_online_equals_batch():
    cfg = load_config(None, ["data.granularity=bin", "data.bin_seconds=86400", "data.sequence_length=4",
                             "data.context_window=2", "model.hidden_size=8"])
    rng = np.random.default_rng(0)
    rows = []
    for day in range(20):
        for host in ("1", "2"):
            if host == "2" and 5 <= day < 9:
                continue  # silent days become zero-activity bins
            for asn in rng.choice(50, size=3, replace=False):
                rows.append({"ts": pd.Timestamp("2006-07-01", tz="UTC") + pd.Timedelta(days=day), "src_ip": host,
                             "dst_ip": f"AS{asn}", "proto": "unknown", "flows": int(rng.integers(1, 50)),
                             "source": "cs", "source_row": len(rows)})
    from nadray.schema import FLOW_SCHEMA

    t = pa.Table.from_pylist(rows, schema=FLOW_SCHEMA)
    sc = make_scorer(t, cfg)
    batch = sc.score_table(t)
    # Replay whole days (a bin is scored once it is complete).
    online = []
    ctx = sc.new_context(10)
    days = t.column("ts").to_pandas().dt.floor("D").to_numpy()
    for d in np.unique(days):
        online.append(sc.score_online(t.filter(pa.array(days == d)), ctx))
    online = pd.concat(online, ignore_index=True)
    np.testing.assert_allclose(online.score, batch.score, rtol=1e-4, atol=1e-4)


def test_lru_eviction_and_threshold_change(iot):
    cfg = load_config(None, ["data.sequence_length=4", "data.context_window=4", "model.hidden_size=8"])
    sc = make_scorer(iot, cfg)
    _, ctx = replay(sc, iot, batch=50, max_entities=2)
    assert len(ctx) == 2 and ctx.evictions > 0
    out = sc.score_table(iot)
    sc.set_threshold(float(out.score.median()))
    again = sc.score_table(iot)
    assert again.is_anomaly.mean() == pytest.approx(0.5, abs=0.1)
    assert (again.threshold == out.score.median()).all()


def test_map_batches_adapter(iot):
    cfg = load_config(None, ["data.sequence_length=4", "data.context_window=4", "model.hidden_size=8"])
    sc = make_scorer(iot, cfg)
    batch = {c: iot.column(c).to_numpy(zero_copy_only=False) for c in iot.column_names}
    out = sc(batch)
    assert set(OUTPUT_COLUMNS) <= set(out) and len(out["score"]) == iot.num_rows
    np.testing.assert_allclose(out["score"], sc.score_table(iot).score, rtol=1e-6)


def test_constant_features_count_departures_not_wobble(iot):
    """A feature that never varied in training is predicted as its value: the network's
    wobble around it adds nothing, a departure from it still counts in full."""
    from nadray.calibrate import constant_features

    cfg = load_config(None, ["data.sequence_length=4", "data.context_window=4", "model.hidden_size=8"])
    sc = make_scorer(iot, cfg)
    ev = sc.encoder.transform(iot)
    const = constant_features(ev.x)
    assert const, "expected some feature (an '=other' column) to be constant on these captures"
    j = next(iter(const))
    raw_sq, _ = sc.event_outputs(ev)
    assert raw_sq[:, j].max() > 0  # the untrained network does not predict it exactly
    sc.constant_features = const
    sq, _ = sc.event_outputs(ev)
    js = list(const)
    assert (sq[:, js] == 0).all()
    others = [k for k in range(sq.shape[1]) if k not in const]
    np.testing.assert_array_equal(sq[:, others], raw_sq[:, others])
    ev.x[5, j] = const[j] + 1.0  # the event departs from the constant
    sq2, _ = sc.event_outputs(ev, np.array([5]))
    assert sq2[0, j] == pytest.approx(1.0)
    # Online replay still equals batch scoring with the constants in place.
    batch = sc.score_table(iot)
    online, _ = replay(sc, iot, batch=37)
    np.testing.assert_allclose(online.score.to_numpy(), batch.score.to_numpy(), rtol=1e-5, atol=1e-6)


def test_entity_normalisation_divides_by_each_entity_scale_or_the_global_one():
    """Unsupervised scores are divided by the entity's typical training error; an entity
    training never saw takes the global one; other objectives are left as they are."""
    sc = Scorer.__new__(Scorer)
    sc.args = ModelArgs(n_features=3, objective="unsupervised")
    sc.entity_scale = {"global": 4.0, "k": 1.0, "entities": {"10.0.0.1": 2.0, "AS15169": 0.5}}
    ents = np.array(["10.0.0.1", "new", "AS15169", "10.0.0.1", "new"], dtype=object)
    got = sc.normalize(np.array([2.0, 8.0, 1.0, 6.0, 4.0]), ents)
    assert got.tolist() == [1.0, 2.0, 2.0, 3.0, 1.0]
    sc.args = ModelArgs(n_features=3, objective="hybrid")
    assert sc.normalize(np.array([2.0]), ents[:1]).tolist() == [2.0]
