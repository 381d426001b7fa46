"""The online fast path (flow mode): the features of a few new events with numpy only.

The Serve endpoint scores a few flows per call. ``nadray.features`` is written
for tables of millions of rows and pays pandas' fixed per-call costs (tens of
DataFrame operations, ~15 ms for one flow). For flow mode, this module computes
the *same* features with numpy on a few hundred rows: explode straight from Arrow
columns, per-entity history kept as one small structured array (``RAW_DTYPE``),
one-hots from precomputed vocabulary dicts, and features only for the rows the
new events' windows read. Batch scoring never uses it;
tests/test_scorer_fastpath.py holds it equal to ``FeatureEncoder.encode``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from nadray.errors import NadrayError
from nadray.features import (DIRECTIONS, RAW_COLUMNS, VOCAB_SIZES, FeatureEncoder, _distinct_in_window, _is_local_host,
                             _networks, _norm_cat, direction_codes, event_sides)

# One raw event, as the online context keeps it (RAW_COLUMNS minus entity and
# flow_index, which the context knows; direction as an index into DIRECTIONS).
RAW_DTYPE = np.dtype([
    ("ts", "i8"), ("source_row", "i8"), ("side", "i1"), ("direction", "i1"),
    ("bytes_out", "f8"), ("bytes_in", "f8"), ("pkts_out", "f8"), ("pkts_in", "f8"), ("duration", "f8"),
    ("flows", "f8"), ("port", "f8"), ("label", "f8"),
    ("source", "O"), ("proto", "O"), ("conn_state", "O"), ("service", "O"), ("peer", "O"),
])
_NUMERIC_TYPES = (pa.types.is_integer, pa.types.is_floating)
_DIRECTIONS_OBJ = np.array(DIRECTIONS, dtype=object)
_DIRECTION_CODE = {d: i for i, d in enumerate(DIRECTIONS)}
_EYE4 = np.eye(4, dtype="float32")


def _intern_all(values: np.ndarray) -> np.ndarray:
    """Object array with equal strings shared (``sys.intern``): a host's history repeats its peers."""
    import sys

    return np.array([sys.intern(v) if type(v) is str else v for v in values.tolist()], dtype=object) \
        if len(values) else values.astype(object)


def raw_to_frame(entity: str, ev: np.ndarray) -> pd.DataFrame:
    """A ``RAW_DTYPE`` history as the raw-event DataFrame ``explode`` produces (flow_index -1)."""
    n = len(ev)
    cols: dict[str, Any] = {
        "entity": np.full(n, entity, dtype=object), "side": ev["side"].astype("int8"),
        "flow_index": np.full(n, -1, dtype="int64"), "ts": ev["ts"].astype("int64"),
        "source": ev["source"].astype(object), "source_row": ev["source_row"].astype("int64"),
        "direction": _DIRECTIONS_OBJ[ev["direction"].astype("int64")],
    }
    for c in ("proto", "conn_state", "service"):
        cols[c] = ev[c].astype(object)
    for c in ("bytes_out", "bytes_in", "pkts_out", "pkts_in", "duration", "flows"):
        cols[c] = ev[c].astype("float64")
    cols["peer"] = ev["peer"].astype(object)
    cols["port"] = ev["port"].astype("float64")
    cols["label"] = ev["label"].astype("float64")
    return pd.DataFrame(cols)[RAW_COLUMNS]


def raw_from_frame(df: pd.DataFrame) -> np.ndarray:
    """Inverse of ``raw_to_frame`` (entity and flow_index dropped)."""
    ev = np.empty(len(df), dtype=RAW_DTYPE)
    for c in ("ts", "source_row"):
        ev[c] = df[c].to_numpy(dtype="int64")
    ev["side"] = df["side"].to_numpy(dtype="int64")
    ev["direction"] = [_DIRECTION_CODE[d] for d in df["direction"].tolist()]
    for c in ("bytes_out", "bytes_in", "pkts_out", "pkts_in", "duration", "flows", "port", "label"):
        ev[c] = df[c].to_numpy(dtype="float64", na_value=np.nan)
    for c in ("source", "proto", "conn_state", "service", "peer"):
        vals = df[c].to_numpy(dtype=object)
        if c in ("proto", "conn_state", "service"):  # pandas' str columns hold NaN for a missing value
            vals = np.array([v if type(v) is str else None if pd.isna(v) else v for v in vals.tolist()], dtype=object)
        ev[c] = _intern_all(vals)
    return ev


class OnlineFlowEncoder:
    """Flow-mode features of a few new events with numpy only (see the section comment).

    ``explode(flows)`` -> (entity, events, flow_index), or None where the table is not
    the canonical schema this path handles (the caller then takes the pandas path);
    ``encode_rows(events, group_start, rows)`` -> the rows' feature vectors, equal to
    ``FeatureEncoder.encode`` of the same events.
    """

    MAX_CACHE = 200_000

    def __init__(self, enc: FeatureEncoder):
        if enc.granularity != "flow":
            raise NadrayError("OnlineFlowEncoder: flow granularity only")
        self.enc = enc
        self.nets = _networks(tuple(enc.local_networks))
        self.mean = np.asarray(enc.mean_, dtype="float64")
        self.std = np.asarray(enc.std_, dtype="float64")
        self.window = int(enc.context_window)
        self.vocab_index = {col: {v: i for i, v in enumerate(enc.vocab_[col])} for col in VOCAB_SIZES}
        self._cat_codes: dict[str, dict] = {col: {} for col in VOCAB_SIZES}
        self._local: tuple[dict, dict] = ({}, {})  # host -> is local; source side, destination side
        # One-hot rows per vocabulary, built once: np.eye per call was a fifth of encode_rows.
        self._eyes = {col: np.eye(len(self.vocab_index[col]) + 1, dtype="float32") for col in VOCAB_SIZES}
        # The last schema explode accepted: a stream's requests share one, and checking it
        # field by field was a quarter of explode's time for one flow.
        self._schema_ok: pa.Schema | None = None

    # ------------------------------------------------------------------ stage 1
    def _sides(self, hosts: list, which: int) -> np.ndarray:
        cache = self._local[which]
        if len(cache) > self.MAX_CACHE:
            cache.clear()
        out = np.empty(len(hosts), dtype=bool)
        for i, h in enumerate(hosts):
            v = cache.get(h)
            if v is None:
                v = cache[h] = _is_local_host(h, self.nets, non_ip=(which == 0))
            out[i] = v
        return out

    @staticmethod
    def _schema_handled(schema: pa.Schema) -> bool:
        """Is ``schema`` the canonical flow schema (up to optional columns) this path handles?"""
        names = set(schema.names)
        if not {"ts", "src_ip", "dst_ip", "source", "source_row"} <= names:
            return False
        ts_t = schema.field("ts").type
        if not (pa.types.is_timestamp(ts_t) and ts_t.unit == "us"):
            return False
        for c in ("src_ip", "dst_ip", "source"):
            if not pa.types.is_string(schema.field(c).type) and not pa.types.is_large_string(schema.field(c).type):
                return False
        if not pa.types.is_integer(schema.field("source_row").type):
            return False
        for c in ("src_bytes", "dst_bytes", "src_pkts", "dst_pkts", "duration", "flows", "dst_port", "label"):
            if c in names and not any(f(schema.field(c).type) for f in _NUMERIC_TYPES):
                return False
        for c in ("proto", "conn_state", "service"):
            if c in names and not (pa.types.is_string(schema.field(c).type) or pa.types.is_null(schema.field(c).type)):
                return False
        for c in ("local_orig", "local_resp"):
            if c in names and not (pa.types.is_boolean(schema.field(c).type) or pa.types.is_null(schema.field(c).type)):
                return False
        return True

    def explode(self, flows: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Stage 1 without pandas: events in (side, flow) order, NOT sorted (the caller groups them)."""
        schema = flows.schema
        names = set(schema.names)
        if not (self._schema_ok is not None and schema.equals(self._schema_ok)):
            if not self._schema_handled(schema):
                return None
            self._schema_ok = schema
        if any(flows.column(c).null_count for c in ("ts", "src_ip", "dst_ip", "source", "source_row")):
            return None
        n = flows.num_rows

        def col(name: str):
            return flows.column(name).to_numpy(zero_copy_only=False)

        def num(name: str) -> np.ndarray:
            if name not in names:
                return np.full(n, np.nan)
            return np.asarray(col(name), dtype="float64")

        src_ip, dst_ip = col("src_ip"), col("dst_ip")
        src_l = src_ip.tolist()
        dst_l = dst_ip.tolist()
        src_local, dst_local = self._sides(src_l, 0), self._sides(dst_l, 1)
        for cname, arr in (("local_orig", src_local), ("local_resp", dst_local)):
            if cname in names and flows.column(cname).null_count < n:
                for i, v in enumerate(flows.column(cname).to_pylist()):
                    if v is not None:
                        arr[i] = bool(v)
        src_event, dst_event = event_sides(src_local, dst_local)
        direction = direction_codes(src_local, dst_local)
        ts = col("ts").astype("datetime64[us]").astype("int64")
        flows_n = num("flows")
        common = np.empty(n, dtype=RAW_DTYPE)
        common["ts"] = ts
        common["source_row"] = np.asarray(col("source_row"), dtype="int64")
        common["direction"] = direction
        common["duration"] = num("duration")
        common["flows"] = np.where(np.isnan(flows_n), 1.0, flows_n)
        common["port"] = num("dst_port")
        common["label"] = num("label")
        common["source"] = _intern_all(col("source"))
        for c in ("proto", "conn_state", "service"):
            common[c] = _intern_all(col(c)) if c in names else np.full(n, None, dtype=object)
        b = {c: num(c) for c in ("src_bytes", "dst_bytes", "src_pkts", "dst_pkts")}
        src_obj = _intern_all(src_ip)
        dst_obj = _intern_all(dst_ip)
        # One gather for both sides' events (source side first), then the fields that swap.
        fi = np.concatenate([np.flatnonzero(src_event), np.flatnonzero(dst_event)])
        k = int(src_event.sum())
        ev = common[fi]
        src_side = np.arange(len(fi)) < k
        ev["side"] = ~src_side
        ev["peer"] = np.where(src_side, dst_obj[fi], src_obj[fi])
        for out_name, in_name, mine, theirs in (("bytes_out", "bytes_in", "src_bytes", "dst_bytes"),
                                                ("pkts_out", "pkts_in", "src_pkts", "dst_pkts")):
            a, z = b[mine][fi], b[theirs][fi]
            ev[out_name], ev[in_name] = np.where(src_side, a, z), np.where(src_side, z, a)
        return np.where(src_side, src_obj[fi], dst_obj[fi]), ev, fi

    @staticmethod
    def flows_in_order(flows: pa.Table) -> bool:
        """Are the records strictly increasing in (ts, source, source_row)? Then each entity's
        new events are already in ``sort_raw`` order and follow one another."""
        n = flows.num_rows
        if n < 2:
            return True
        ts = flows.column("ts").to_numpy(zero_copy_only=False).astype("datetime64[us]").astype("int64")
        dt = np.diff(ts)
        if (dt > 0).all():
            return True
        if (dt < 0).any():
            return False
        src = flows.column("source").to_numpy(zero_copy_only=False)
        row = np.asarray(flows.column("source_row").to_numpy(zero_copy_only=False), dtype="int64")
        s0, s1 = src[:-1], src[1:]
        tie = dt == 0
        later = (s1 > s0) | ((s1 == s0) & (row[1:] > row[:-1]))
        return bool(np.all(~tie | later))

    # ------------------------------------------------------------------ stage 2
    def _cat_code(self, col: str, values: np.ndarray) -> np.ndarray:
        cache, vocab = self._cat_codes[col], self.vocab_index[col]
        if len(cache) > self.MAX_CACHE:
            cache.clear()
        out = np.empty(len(values), dtype="int64")
        for i, v in enumerate(values.tolist()):
            cacheable = v is None or type(v) is str
            k = cache.get(v) if cacheable else None
            if k is None:
                # The batch path's own normalisation (nulls and "" -> "none", lower case), once per value.
                k = vocab.get(_norm_cat(np.array([v], dtype=object))[0], len(vocab))
                if cacheable:
                    cache[v] = k
            out[i] = k
        return out

    def encode_rows(self, ev: np.ndarray, group_start: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Features (len(rows), F) float32 of events ``rows`` of ``ev`` (RAW_DTYPE, entity then time order)."""
        rows = np.asarray(rows, dtype="int64")
        C = self.window
        sub = ev[rows]
        sizes = np.column_stack([sub[c] for c in ("bytes_out", "bytes_in", "pkts_out", "pkts_in", "duration", "flows")])
        ts = ev["ts"].astype("int64")
        gs_r = group_start[rows]
        first = rows == gs_r
        dt = (ts[rows] - ts[np.maximum(rows - 1, 0)]) / 1e6
        dt[first] = 0.0
        wlen = np.minimum(rows - gs_r + 1, C).astype("float64")
        codes: dict = {}
        peers = np.fromiter((codes.setdefault(p, len(codes)) for p in ev["peer"].tolist()), dtype="int64", count=len(ev))
        ports = ev["port"].astype("float64")
        # dst_port is an integer column or NaN, so this equals the batch path's nan_to_num form.
        pcodes = np.where(np.isnan(ports), -1.0, ports).astype("int64")
        # FLOW_CONTINUOUS order; the same operations as FeatureEncoder._continuous, on one block.
        logs = np.log1p(np.clip(np.column_stack([sizes, dt]), 0, None))
        cont = np.column_stack([logs, _distinct_in_window(peers, group_start, C, rows) / wlen,
                                _distinct_in_window(pcodes, group_start, C, rows) / wlen])
        cont = np.where(np.isfinite(cont), cont, 0.0)  # nan_to_num(nan=0, posinf=0, neginf=0)
        cont = (cont - self.mean) / self.std
        blocks = [cont.astype("float32"), _EYE4[sub["direction"].astype("int64")]]
        for col in VOCAB_SIZES:
            blocks.append(self._eyes[col][self._cat_code(col, sub[col])])
        p = sub["port"].astype("float64")
        pclass = np.where(np.isnan(p), 3, np.where(p < 1024, 0, np.where(p < 49152, 1, 2)))
        blocks.append(_EYE4[pclass])
        return np.concatenate(blocks, axis=1)
