"""The online fast path (numpy, flow mode) equals the pandas path and batch scoring, on real IoT-23 traffic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from _iot23 import read_captures
from nadray.config import load_config
from nadray.features import FeatureEncoder, explode, group_starts
from nadray.online_features import OnlineFlowEncoder, raw_from_frame, raw_to_frame
from nadray.model import EventLSTM, ModelArgs
from nadray.scorer import RawHistory, Scorer
from nadray.threshold import Threshold

CAPTURES = ["CTU-Honeypot-Capture-5-1", "CTU-Honeypot-Capture-7-1", "CTU-Malware-Capture-44-1"]


def make_scorer(flows: pa.Table, cfg) -> Scorer:
    torch.manual_seed(0)
    enc = FeatureEncoder.fit(flows, cfg)
    args = ModelArgs.from_config(cfg, enc.n_features)
    return Scorer(EventLSTM(args), enc, Threshold(1.0), meta={}, err_norm=np.ones(enc.n_features),
                  z={"err_mean": 0.5, "err_std": 2.0}, version="test")


@pytest.fixture(scope="module")
def iot(shared_data):
    t = read_captures(shared_data, CAPTURES)
    return t.slice(0, 1500)


@pytest.fixture(scope="module")
def scorer(iot):
    # Short windows so that entities run far past the retained history (truncation exercised).
    cfg = load_config(None, ["data.sequence_length=6", "data.context_window=5", "model.hidden_size=8"])
    return make_scorer(iot, cfg)


def _count_general(monkeypatch, sc: Scorer) -> list:
    calls: list = []
    real = sc._score_online_general

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(sc, "_score_online_general", spy)
    return calls


def test_fast_features_equal_encode(iot, scorer):
    enc = scorer.encoder
    raw = enc.explode(iot)  # sorted (entity, time)
    ev = raw_from_frame(raw)
    gs = group_starts(raw["entity"].to_numpy(dtype=object))
    fast = OnlineFlowEncoder(enc).encode_rows(ev, gs, np.arange(len(ev)))
    ref = enc.encode(raw).x
    assert fast.shape == ref.shape and fast.dtype == np.float32
    np.testing.assert_allclose(fast, ref, atol=1e-6, rtol=0)
    # Any subset of rows gives the same rows.
    rows = np.arange(3, len(ev), 7)
    np.testing.assert_array_equal(OnlineFlowEncoder(enc).encode_rows(ev, gs, rows), fast[rows])


def test_fast_explode_and_frame_round_trip_equal_explode(iot, scorer):
    enc = scorer.encoder
    ent, ev, fi = OnlineFlowEncoder(enc).explode(iot)
    got = raw_to_frame("x", ev).assign(entity=ent, flow_index=fi)
    got = got.sort_values(["entity", "ts", "source", "source_row", "side"], kind="stable").reset_index(drop=True)
    ref = explode(iot, enc._cfg())
    assert len(got) == len(ref)
    for c in ref.columns:
        a, b = got[c].to_numpy(), ref[c].to_numpy()
        if a.dtype.kind == "f" or b.dtype.kind == "f":
            np.testing.assert_array_equal(a.astype("float64"), b.astype("float64"), err_msg=c)
        else:
            assert [None if pd.isna(v) else v for v in a] == [None if pd.isna(v) else v for v in b], c
    back = raw_from_frame(raw_to_frame("x", ev))
    for f in ev.dtype.names:
        assert np.array_equal(back[f], ev[f], equal_nan=ev.dtype[f].kind == "f"), f


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_fast_replay_equals_score_table(iot, scorer, chunk, monkeypatch):
    flows = iot.slice(0, 400) if chunk == 1 else iot
    batch = scorer.score_table(flows)
    calls = _count_general(monkeypatch, scorer)
    ctx = scorer.new_context(1000)
    online = pd.concat([scorer.score_online(flows.slice(i, chunk), ctx) for i in range(0, flows.num_rows, chunk)],
                       ignore_index=True)
    assert not calls, "records in time order must take the fast path"
    assert online.entity.tolist() == batch.entity.tolist()
    np.testing.assert_allclose(online.score, batch.score, atol=1e-6, rtol=0)
    assert all(isinstance(ctx.get(e), RawHistory) and len(ctx.get(e)) <= ctx.keep for e in ctx.entities())
    assert all(ctx.get(e).memory_usage(deep=True, index=True).sum() > 0 for e in ctx.entities())


def test_late_records_fall_back_and_match_the_pandas_path(iot, scorer, monkeypatch):
    """Chunks in reverse time order: every chunk after the first takes the pandas path; the
    result equals a context that never uses the fast path."""
    flows = iot.slice(0, 300)
    chunks = [flows.slice(i, 10) for i in range(0, flows.num_rows, 10)]
    chunks = [c.take(pa.array(np.arange(c.num_rows)[::-1])) if k % 3 == 1 else c for k, c in enumerate(chunks)]
    calls = _count_general(monkeypatch, scorer)
    ctx = scorer.new_context(1000)
    mixed = [scorer.score_online(c, ctx) for c in chunks]
    assert 0 < len(calls) < len(chunks)
    monkeypatch.setattr(scorer, "_score_online_fast", lambda *a, **kw: None)
    ctx2 = scorer.new_context(1000)
    general = [scorer.score_online(c, ctx2) for c in chunks]
    for a, b in zip(mixed, general):
        assert a.entity.tolist() == b.entity.tolist()
        np.testing.assert_allclose(a.score, b.score, atol=1e-6, rtol=0)


def test_entity_filter_shards_and_lru(iot, scorer):
    from nadray.serving import routing

    flows = iot.slice(0, 300)
    batch = scorer.score_table(flows)
    k = 2
    ctxs = [scorer.new_context(1000) for _ in range(k)]
    ents, scores = [], []
    for i in range(0, flows.num_rows, 25):
        t = flows.slice(i, 25)
        p = routing.plan(t, k, scorer.encoder.local_networks)
        answers = []
        for shard, part in enumerate(p.take(t)):
            if part is None:
                answers.append(None)
                continue
            s, e = scorer.score_online_arrays(part, ctxs[shard], entity_filter=routing.EntityFilter(shard, k))
            answers.append({"entity": e.tolist(), "score": s})
        e, s = routing.merge(t.num_rows, p, answers)
        ents += e
        scores += s.tolist()
    assert ents == batch.entity.tolist()
    np.testing.assert_allclose(scores, batch.score, atol=1e-6, rtol=0)
    held = [set(c.entities()) for c in ctxs]
    assert not held[0] & held[1]
    small = scorer.new_context(2)
    for i in range(0, flows.num_rows, 25):
        scorer.score_online(flows.slice(i, 25), small)
    assert len(small) <= 2 and small.evictions > 0
