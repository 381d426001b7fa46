"""Features: entities, orientation, vocabularies, scaler fitted on train only, bins, windows."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _iot23 import read_captures
from nadray import features
from nadray.config import Config, load_config
from nadray.errors import NadrayError
from nadray.features import (FeatureEncoder, _distinct_in_window, explode, group_starts, local_sides, make_windows,
                             window_source)
from nadray.schema import FLOW_SCHEMA


def flows_table(rows: list[dict]) -> pa.Table:
    base = {"proto": "tcp", "flows": 1, "source": "t", "src_port": 40000, "dst_port": 443, "duration": 1.0,
            "src_bytes": 100, "dst_bytes": 1000, "src_pkts": 2, "dst_pkts": 3}
    full = []
    for i, r in enumerate(rows):
        d = {**base, "source_row": i, **r}
        d["ts"] = pd.Timestamp(d["ts"], tz="UTC")
        full.append(d)
    return pa.Table.from_pylist(full, schema=FLOW_SCHEMA)


def test_entities_direction_and_orientation():
    t = flows_table([
        {"ts": "2024-01-01 00:00:00", "src_ip": "10.0.0.1", "dst_ip": "8.8.8.8"},        # outbound
        {"ts": "2024-01-01 00:00:01", "src_ip": "8.8.4.4", "dst_ip": "10.0.0.1"},        # inbound
        {"ts": "2024-01-01 00:00:02", "src_ip": "10.0.0.1", "dst_ip": "192.168.1.5"},    # internal: two events
        {"ts": "2024-01-01 00:00:03", "src_ip": "1.1.1.1", "dst_ip": "9.9.9.9"},         # unknown: two events
        {"ts": "2024-01-01 00:00:04", "src_ip": "3", "dst_ip": "AS15169"},               # cs448b host ids
        {"ts": "2024-01-01 00:00:05", "src_ip": "8.8.8.8", "dst_ip": "9.9.9.9", "local_orig": True},  # flag wins
    ])
    src, dst = local_sides(t, Config())
    assert src.tolist() == [True, False, True, False, True, True]
    assert dst.tolist() == [False, True, True, False, False, False]
    raw = explode(t, Config())
    per_flow = raw.groupby("flow_index").size()
    assert per_flow.tolist() == [1, 1, 2, 2, 1, 1]
    assert set(raw.loc[raw.flow_index == 2, "entity"]) == {"10.0.0.1", "192.168.1.5"}
    assert set(raw.loc[raw.flow_index == 4, "entity"]) == {"3"}
    inbound = raw[raw.flow_index == 1].iloc[0]
    assert inbound.direction == "inbound" and inbound.entity == "10.0.0.1"
    assert inbound.bytes_out == 1000 and inbound.bytes_in == 100  # oriented from the entity's side
    assert sorted(raw.direction.unique()) == ["inbound", "internal", "outbound", "unknown"]


@pytest.fixture(scope="module")
def iot(shared_data):
    return read_captures(shared_data, ["CTU-Honeypot-Capture-7-1", "CTU-Malware-Capture-44-1"])


def test_no_addresses_or_raw_ports_among_features(iot):
    enc = FeatureEncoder.fit(iot, Config())
    ip = re.compile(r"\d+\.\d+\.\d+\.\d+|[0-9a-f]*:[0-9a-f]*:")
    for name in enc.feature_names_:
        assert not ip.search(name), name
        assert not re.search(r"port\w*=\d", name), name
    ev = enc.transform(iot)
    assert ev.x.shape == (len(ev), enc.n_features) and ev.x.dtype == np.float32
    assert np.isfinite(ev.x).all()


def test_scaler_fit_on_train_only(iot):
    n = iot.num_rows
    train, rest = iot.slice(0, n // 2), iot.slice(n // 2)
    enc = FeatureEncoder.fit(train, Config())
    before = enc.to_dict()
    enc.transform(rest)
    enc.transform(iot)
    assert enc.to_dict() == before
    other = FeatureEncoder.fit(iot, Config())
    assert other.mean_ != enc.mean_
    # The continuous features of the training events are standardised (mean ~0).
    ev = enc.transform(train)
    k = len(enc.mean_)
    assert np.allclose(ev.x[:, :k].mean(axis=0), 0, atol=1e-3)
    # JSON round trip.
    import json

    again = FeatureEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert np.array_equal(again.transform(rest).x, enc.transform(rest).x)


def test_bin_mode_inserts_zero_activity_bins():
    cfg = load_config(None, ["data.granularity=bin", "data.bin_seconds=86400"])
    t = flows_table([
        {"ts": "2024-01-01", "src_ip": "3", "dst_ip": "AS1", "flows": 5},
        {"ts": "2024-01-01", "src_ip": "3", "dst_ip": "AS2", "flows": 2},
        {"ts": "2024-01-04", "src_ip": "3", "dst_ip": "AS1", "flows": 1},
        {"ts": "2024-01-02", "src_ip": "4", "dst_ip": "AS1", "flows": 1},
    ])
    enc = FeatureEncoder.fit(t, cfg)
    ev = enc.transform(t)
    assert list(ev.entity) == ["3", "3", "3", "3", "4"]
    assert ev.bin.tolist()[:4] == [19723, 19724, 19725, 19726]
    i = enc.feature_names_.index("log_flows")
    raw_flows = np.expm1(ev.x[:, i] * enc.std_[i] + enc.mean_[i])
    assert np.allclose(raw_flows, [7, 0, 0, 1, 1], atol=1e-4)
    j = enc.feature_names_.index("log_peers")
    assert np.allclose(np.expm1(ev.x[:, j] * enc.std_[j] + enc.mean_[j]), [2, 0, 0, 1, 1], atol=1e-4)
    fi, rows = ev.flow_map
    assert dict(zip(fi.tolist(), rows.tolist())) == {0: 0, 1: 0, 2: 3, 3: 4}


def test_windows_left_padded_with_mask():
    x = np.arange(12, dtype="float32").reshape(6, 2)
    gs = np.array([0, 0, 0, 3, 3, 3])
    w = make_windows(x, gs, np.array([1, 5]), 3)
    assert w.shape == (2, 4, 3)
    assert w[0, :, 2].tolist() == [0, 0, 1, 1] and w[0, 2, :2].tolist() == [0, 1] and w[0, 3, :2].tolist() == [2, 3]
    assert w[1, :, 2].tolist() == [0, 1, 1, 1] and w[1, 0, :2].tolist() == [0, 0]


def test_windows_from_a_window_source_are_the_same():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)).astype("float32")
    gs = group_starts(np.sort(rng.integers(0, 7, 200)))
    idx = rng.choice(200, 50, replace=False)
    assert np.array_equal(make_windows(x, gs, idx, 9), make_windows(x, gs, idx, 9, window_source(x)))


def test_empty_training_split_is_an_error():
    with pytest.raises(NadrayError, match="training split"):
        FeatureEncoder.fit(pa.Table.from_pylist([], schema=FLOW_SCHEMA), Config())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-1, 5), min_size=1, max_size=60), st.lists(st.integers(0, 3), min_size=1, max_size=60),
       st.integers(1, 9), st.data())
def test_distinct_in_window_matches_brute_force(codes, group_sizes, window, data):
    """The vectorised count equals counting distinct non-negative codes in each row's own window."""
    codes = np.array(codes, dtype="int64")
    ent = np.repeat(np.arange(len(group_sizes)), group_sizes)[: len(codes)]
    ent = np.concatenate([ent, np.full(len(codes) - len(ent), len(group_sizes))])
    gs = group_starts(ent)
    want = np.array([len({c for c in codes[max(gs[i], i - window + 1): i + 1] if c >= 0}) for i in range(len(codes))])
    rows = np.array(sorted(data.draw(st.sets(st.integers(0, len(codes) - 1)))), dtype="int64")
    default = features._DISTINCT_2D_MAX
    try:
        for limit in (default, 0):  # the one-pass (few rows) and the interval-sum (many rows) branches
            features._DISTINCT_2D_MAX = limit
            assert np.array_equal(_distinct_in_window(codes, gs, window), want)
            assert np.array_equal(_distinct_in_window(codes, gs, window, rows), want[rows])
    finally:
        features._DISTINCT_2D_MAX = default


def test_category_normalisation_per_distinct_value_equals_per_row():
    """``_norm_cat`` normalises each distinct value once and maps back: the same as every row alone."""
    from nadray.features import _norm_cat, _norm_each

    vals = np.array([None, np.nan, "", "TCP", "tcp", "Ünïcödé", "İ", "ß", " x ", "-", pd.NA, "None", "(empty)", 5,
                     "TCP", None], dtype=object)
    got = _norm_cat(vals)
    assert got.dtype == object and len(got) == len(vals)
    assert got.tolist() == [_norm_each(np.array([v], dtype=object))[0] for v in vals]
    assert got.tolist()[:5] == ["none", "none", "none", "tcp", "tcp"]
    assert _norm_cat(np.array([], dtype=object)).tolist() == []


def test_vocabulary_codes_per_distinct_value_equal_per_row_lookup():
    """One-hot codes are looked up per distinct value: the same as normalising and looking up each row."""
    from nadray.features import _norm_each, _vocab_codes

    vals = np.array([None, np.nan, "", "TCP", "tcp", "Ünïcödé", "ß", " x ", pd.NA, "None", 5, "udp", None], dtype=object)
    vocab = ["tcp", "none", "udp", "ß"]
    want = [vocab.index(k) if k in vocab else len(vocab) for k in (_norm_each(np.array([v], dtype=object))[0] for v in vals)]
    assert _vocab_codes(vals, vocab).tolist() == want
    assert _vocab_codes(np.array(["inbound", "x", None], dtype=object), features.DIRECTIONS, False).tolist() == [1, 4, 4]


HOSTS = ["10.0.0.1", "10.0.0.2", "192.168.1.5", "8.8.8.8", "1.1.1.1", "3", "AS15169", "fd00::1", "2001:db8::1"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(HOSTS), st.sampled_from(HOSTS), st.integers(0, 3), st.sampled_from(["b", "a"]),
                          st.sampled_from([None, "tcp", "UDP"]), st.one_of(st.none(), st.integers(0, 10**6)),
                          st.sampled_from([None, True, False])), min_size=0, max_size=25))
def test_explode_equals_a_per_row_reference(rows):
    """Every flow oriented from each local endpoint, in (entity, ts, source, source_row, side) order:
    explode's vectorised sort against plain Python, ties in time included."""
    t = flows_table([{"ts": f"2024-01-01 00:00:0{ts}", "src_ip": s, "dst_ip": d, "source": src, "proto": proto,
                      "src_bytes": b, "local_orig": flag} for s, d, ts, src, proto, b, flag in rows])
    src_local, dst_local = local_sides(t, Config())
    want = []
    for i, (s, d, ts, src, proto, b, _) in enumerate(rows):
        sl, dl = bool(src_local[i]), bool(dst_local[i])
        direction = "internal" if sl and dl else "outbound" if sl else "inbound" if dl else "unknown"
        for side, ent, peer, out_b, in_b in ((0, s, d, b, 1000), (1, d, s, 1000, b)):
            if (sl if side == 0 else dl) or sl == dl:
                want.append((ent, ts, src, i, side, peer, direction, proto,
                             np.nan if out_b is None else float(out_b), np.nan if in_b is None else float(in_b)))
    want.sort(key=lambda r: r[:5])
    raw = explode(t, Config())
    got = list(zip(raw.entity, raw.ts // 1_000_000 - 1704067200, raw.source, raw.flow_index, raw.side, raw.peer,
                   raw.direction, raw.proto, raw.bytes_out, raw.bytes_in))
    assert list(raw.columns) == features.RAW_COLUMNS
    assert [r[:8] for r in got] == [r[:8] for r in want]
    assert np.array_equal(np.array([r[8:] for r in got], "float64").reshape(-1, 2),
                          np.array([r[8:] for r in want], "float64").reshape(-1, 2), equal_nan=True)


def test_explode_reads_non_canonical_columns_as_the_canonical_ones():
    """Numbers held as text and dictionary-encoded text (a table not cast to FLOW_SCHEMA)
    give the same raw events; text that is not a number becomes NaN, as pandas coerces it."""
    rows = [{"ts": "2024-01-01 00:00:00", "src_ip": "10.0.0.1", "dst_ip": "8.8.8.8", "src_bytes": 100},
            {"ts": "2024-01-01 00:00:01", "src_ip": "10.0.0.2", "dst_ip": "10.0.0.1", "src_bytes": None}]
    t = flows_table(rows)
    odd = t.set_column(t.schema.get_field_index("src_bytes"), "src_bytes", pa.array(["100", "lots"]))
    for c in ("src_ip", "dst_ip", "source"):
        odd = odd.set_column(odd.schema.get_field_index(c), c, t.column(c).dictionary_encode())
    want, got = explode(t, Config()), explode(odd, Config())
    pd.testing.assert_frame_equal(got, want)
    assert got.bytes_out.isna().sum() == 1 and (got.bytes_out == 100).sum() == 1
