"""Entities, per-event features, frozen vocabularies, the scaler and LSTM windows.

A flow becomes one *event* per entity (the local endpoint; DESIGN.md): outbound
and inbound flows give one event, internal (both local) and unknown (neither
local) flows give two. Features are computed in two pure, vectorised stages so
that batch scoring and the online endpoint run the same code:

1. ``explode(flows, cfg) -> raw events`` (a DataFrame): orient each flow from its
   entity's point of view (bytes out / in, the peer, the service port). Row-local.
2. ``FeatureEncoder.encode(raw)``: per-entity sequence features (time since the
   entity's previous event, distinct peers and ports over its last
   ``data.context_window`` events), one-hots from frozen vocabularies, and the
   standardisation fitted on the training split. Depends only on each entity's
   own earlier events, so the online endpoint, which keeps each entity's last
   ``history_events(cfg)`` raw events, reproduces batch features exactly (in flow
   mode with ``nadray.online_features``, the same features in numpy for a few rows).

In ``data.granularity == "bin"`` mode stage 1 is followed by ``bin_events``:
one event per (entity, time bin), zero-activity bins included between an
entity's first and last bin (a host going silent is a signal).

Never used as features: IP addresses and raw port numbers (they do not
generalise across networks); ports enter only as a class.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from nadray.config import Config
from nadray.errors import NadrayError

FORMAT_VERSION = 1

# Vocabulary sizes: the K most frequent training values, the rest map to "other".
# Enough for Zeek's protocols, its 13 conn_states and the common services.
VOCAB_SIZES = {"proto": 6, "conn_state": 12, "service": 10}
DIRECTIONS = ["outbound", "inbound", "internal", "unknown"]
PORT_CLASSES = ["well_known", "registered", "dynamic", "none"]

# Continuous per-event features (before standardisation).
FLOW_CONTINUOUS = [
    "log_bytes_out", "log_bytes_in", "log_pkts_out", "log_pkts_in", "log_duration", "log_flows",
    "log_dt", "peers_ratio", "ports_ratio",
]
BIN_CONTINUOUS = [
    "log_bytes_out", "log_bytes_in", "log_pkts_out", "log_pkts_in", "log_duration", "log_flows",
    "log_peers", "log_ports",
    # How far this bin departs from the entity's own recent bins (mean over its previous
    # context_window bins): hosts differ by orders of magnitude in volume, so a 10x jump
    # on a quiet host must look as large as on a busy one.
    "flows_vs_recent", "peers_vs_recent",
]

# Raw event columns produced by stage 1 (and kept per entity by the online context).
RAW_COLUMNS = [
    "entity", "side", "flow_index", "ts", "source", "source_row", "direction", "proto", "conn_state",
    "service", "bytes_out", "bytes_in", "pkts_out", "pkts_in", "duration", "flows", "peer", "port", "label",
]


# --------------------------------------------------------------------------- entities


@lru_cache(maxsize=64)
def _networks(nets: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(n, strict=False) for n in nets)


def per_distinct(values: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` of each distinct value (an object array, null as None), mapped back to every row.

    Hashing (pd.factorize), not sorting: np.unique sorted every string, and columns of
    hosts, categories and entities repeat a few values over many rows."""
    codes, uniq = pd.factorize(pd.Series(values, dtype=object, copy=False), use_na_sentinel=True)
    return np.asarray(fn(np.append(np.asarray(uniq, dtype=object), None)))[codes]  # code -1 (null): the None


def _locality(hosts: np.ndarray, networks: tuple[str, ...], non_ip: bool) -> np.ndarray:
    """Per host string: in a local network? Each distinct host is parsed once.

    ``non_ip``: what a host that is not an IP address counts as (cs448b names local
    hosts "3" on the source side and remote ASNs "AS15169" on the destination side).
    """
    nets = _networks(networks)
    return per_distinct(hosts, lambda uniq: np.array([_is_local_host(str(h), nets, non_ip) for h in uniq], dtype=bool))


def _is_local_host(h: str, nets: tuple, non_ip: bool) -> bool:
    """One host string: in one of ``nets`` (parsed networks)? See ``_locality``."""
    try:
        addr = ipaddress.ip_address(h)
    except ValueError:
        return non_ip and not h.upper().startswith("AS")
    return any(addr in n for n in nets if n.version == addr.version)


def local_sides(flows: pa.Table, cfg: Config, hosts: tuple[np.ndarray, np.ndarray] | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """(src_is_local, dst_is_local) per flow: source flags first, then local_networks.

    ``hosts``: the src_ip and dst_ip columns as object arrays, when the caller has them."""
    nets = tuple(cfg.data.local_networks)
    src_ip, dst_ip = hosts or (flows.column(c).to_numpy(zero_copy_only=False) for c in ("src_ip", "dst_ip"))
    src = _locality(src_ip, nets, non_ip=True)
    dst = _locality(dst_ip, nets, non_ip=False)
    for col, arr in (("local_orig", src), ("local_resp", dst)):
        if col in flows.column_names:
            flag = flows.column(col).to_pandas()
            known = flag.notna().to_numpy()
            arr[known] = flag[known].astype(bool).to_numpy()
    return src, dst


# --------------------------------------------------------------------------- stage 1


def _numeric(flows: pa.Table, name: str) -> np.ndarray:
    """Column ``name`` as float64 with NaN for null, or all NaN when absent (non-numbers: NaN)."""
    if name not in flows.column_names:
        return np.full(flows.num_rows, np.nan)
    col = flows.column(name)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_null(col.type):
        # unsafe: an int64 above 2**53 rounds, as pandas' conversion does, instead of raising
        return col.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    return pd.to_numeric(col.to_pandas(), errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def _objects(flows: pa.Table, name: str, as_text: bool = False) -> np.ndarray:
    """Column ``name`` as an object array (None for null or when absent); ``as_text``: every value a str."""
    if name not in flows.column_names:
        vals = np.full(flows.num_rows, None, dtype=object)
    else:
        col = flows.column(name)
        vals = col.to_numpy(zero_copy_only=False).astype(object, copy=False)
        if as_text and (col.null_count or not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type))):
            vals = np.array([str(v) for v in vals.tolist()], dtype=object)
    return vals


def _sorted_codes(values: np.ndarray) -> np.ndarray:
    """Integer codes whose order is the values' order (strings: code point order, as sort_values)."""
    return pd.factorize(values, sort=True, use_na_sentinel=False)[0]


def event_sides(src_local: np.ndarray, dst_local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which endpoints of each flow are entities: the local ones, or both when neither or
    both are local (DESIGN.md). The one rule batch, online and Serve's routing share."""
    both_or_none = src_local == dst_local
    return src_local | both_or_none, dst_local | both_or_none


def direction_codes(src_local: np.ndarray, dst_local: np.ndarray) -> np.ndarray:
    """Per flow: its index into DIRECTIONS (outbound, inbound, internal, unknown)."""
    return np.where(src_local & dst_local, 2, np.where(src_local, 0, np.where(dst_local, 1, 3)))


def _events(flows: pa.Table, cfg: Config) -> tuple[np.ndarray, ...]:
    """(flow_index, side, entity) per event, then per flow its direction code (index into
    DIRECTIONS) and src_ip / dst_ip as str objects. A flow has an event for each local
    endpoint, or for both when neither or both are local. Events: the source side's in
    flow order, then the destination side's."""
    src_ip, dst_ip = _objects(flows, "src_ip", as_text=True), _objects(flows, "dst_ip", as_text=True)
    src_local, dst_local = local_sides(flows, cfg, (src_ip, dst_ip))
    src_event, dst_event = event_sides(src_local, dst_local)
    direction = direction_codes(src_local, dst_local)
    fi = np.concatenate([np.flatnonzero(src_event), np.flatnonzero(dst_event)]).astype("int64")
    side = (np.arange(len(fi)) >= int(src_event.sum())).astype("int8")
    return fi, side, np.where(side == 0, src_ip[fi], dst_ip[fi]), direction, src_ip, dst_ip


def flow_entities(flows: pa.Table, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(flow_index, entity) of every event ``explode`` makes, unsorted and without its features."""
    fi, _, entity, *_ = _events(flows, cfg)
    return fi, entity


def explode(flows: pa.Table, cfg: Config) -> pd.DataFrame:
    """One raw event per (flow, entity), oriented from the entity's side.

    Returns a DataFrame with ``RAW_COLUMNS``; ``flow_index`` is the row of ``flows``;
    ``ts`` is int64 microseconds; text columns are object arrays (None for null).
    Rows are in (entity, ts, source, source_row, side) order (``sort_raw``'s), sorted
    here on integer codes before the frame is built: building per-side frames and
    sorting strings was most of this function's time.
    """
    n = flows.num_rows
    fi, side, entity, direction, src_ip, dst_ip = _events(flows, cfg)
    ts = (pd.to_datetime(flows.column("ts").to_pandas(), utc=True).astype("datetime64[us, UTC]").array.asi8
          if n else np.zeros(0, "int64"))
    num = {c: _numeric(flows, c) for c in ("src_bytes", "dst_bytes", "src_pkts", "dst_pkts", "duration", "flows",
                                           "dst_port", "label")}
    source = _objects(flows, "source", as_text=True)
    source_row = flows.column("source_row").to_numpy(zero_copy_only=False).astype("int64")
    # A stable sort of _events' order by (entity, ts, source, source_row, side).
    order = np.lexsort((side, source_row[fi], _sorted_codes(source)[fi], ts[fi], _sorted_codes(entity)))
    fi, side, entity = fi[order], side[order], entity[order]
    mine = side == 0

    def swap(a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = num[a][fi], num[b][fi]
        return np.where(mine, x, y), np.where(mine, y, x)

    bytes_out, bytes_in = swap("src_bytes", "dst_bytes")
    pkts_out, pkts_in = swap("src_pkts", "dst_pkts")
    obj = lambda a: pd.Series(a, dtype=object, copy=False)  # noqa: E731 - object, not pandas' Arrow-backed str
    flows_n = num["flows"][fi]
    return pd.DataFrame({
        "entity": obj(entity), "side": side, "flow_index": fi, "ts": ts[fi], "source": obj(source[fi]),
        "source_row": source_row[fi], "direction": obj(np.array(DIRECTIONS, dtype=object)[direction[fi]]),
        "proto": obj(_objects(flows, "proto")[fi]), "conn_state": obj(_objects(flows, "conn_state")[fi]),
        "service": obj(_objects(flows, "service")[fi]),
        "bytes_out": bytes_out, "bytes_in": bytes_in, "pkts_out": pkts_out, "pkts_in": pkts_in,
        "duration": num["duration"][fi], "flows": np.where(np.isnan(flows_n), 1.0, flows_n),
        "peer": obj(np.where(mine, dst_ip[fi], src_ip[fi])),
        # The service (responder) port: the port that says what the conversation is,
        # for inbound and outbound flows alike; only its class becomes a feature.
        "port": num["dst_port"][fi], "label": num["label"][fi],
    })[RAW_COLUMNS]


def sort_raw(raw: pd.DataFrame) -> pd.DataFrame:
    """(entity, ts, source, source_row, side) order: every run orders events the same way."""
    return raw.sort_values(["entity", "ts", "source", "source_row", "side"], kind="stable").reset_index(drop=True)


def bin_events(raw: pd.DataFrame, cfg: Config, start_bins: dict[str, int] | None = None) -> pd.DataFrame:
    """Aggregate raw events to one event per (entity, time bin), zero bins included.

    ``start_bins``: per entity, the first bin to fill zeros from (the online context
    passes max(entity's first bin ever, retained horizon)); default: the entity's
    first bin in ``raw``. Columns: entity, bin, sums of flows / bytes / packets, the
    flow-weighted mean duration, distinct peers and ports (``n_peers``, ``n_ports``),
    per-protocol and per-direction flow counts, and the bin's worst label. Flows map
    to their bins through (entity, bin) (``Events.flow_map``).
    """
    width = int(cfg.data.bin_seconds) * 1_000_000
    raw = raw.assign(bin=raw["ts"].to_numpy() // width)
    g = raw.groupby(["entity", "bin"], sort=True)
    dur_w = raw["duration"].fillna(0.0) * raw["flows"]
    agg = pd.DataFrame({
        "flows": g["flows"].sum(),
        "bytes_out": g["bytes_out"].sum(min_count=1),
        "bytes_in": g["bytes_in"].sum(min_count=1),
        "pkts_out": g["pkts_out"].sum(min_count=1),
        "pkts_in": g["pkts_in"].sum(min_count=1),
        "duration": dur_w.groupby([raw["entity"], raw["bin"]]).sum() / g["flows"].sum().clip(lower=1),
        "n_peers": g["peer"].nunique(),
        "n_ports": g["port"].nunique(),
        "label": g["label"].max(),
    })
    # Protocol and direction mix of the bin, as counts (shares computed by the encoder).
    mix = pd.crosstab([raw["entity"], raw["bin"]], raw["proto"].fillna("none").astype(str), values=raw["flows"],
                      aggfunc="sum").fillna(0.0)
    mix.columns = [f"proto_count={c}" for c in mix.columns]
    dmix = pd.crosstab([raw["entity"], raw["bin"]], raw["direction"], values=raw["flows"], aggfunc="sum").fillna(0.0)
    dmix.columns = [f"dir_count={c}" for c in dmix.columns]
    agg = agg.join(mix).join(dmix).reset_index()
    # Zero-activity bins between each entity's first and last bin.
    first = agg.groupby("entity")["bin"].min()
    if start_bins:
        sb = pd.Series(start_bins, dtype="int64").reindex(first.index)
        first = sb.where(sb.notna(), first).astype("int64")
    last = agg.groupby("entity")["bin"].max()
    lengths = (last - first + 1).clip(lower=1).to_numpy()
    ents = np.repeat(first.index.to_numpy(dtype=object), lengths)
    offs = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    bins = np.repeat(first.to_numpy(), lengths) + offs
    full = pd.DataFrame({"entity": ents, "bin": bins})
    full = full.merge(agg, on=["entity", "bin"], how="left")
    count_cols = [c for c in full.columns if c.startswith(("proto_count=", "dir_count="))]
    full[["flows", "n_peers", "n_ports"] + count_cols] = full[["flows", "n_peers", "n_ports"] + count_cols].fillna(0.0)
    full["ts"] = full["bin"].to_numpy() * width
    full["side"] = 0
    full["source"] = ""
    full["source_row"] = 0
    return full.sort_values(["entity", "bin"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- helpers


def group_starts(entity: np.ndarray) -> np.ndarray:
    """For rows sorted by entity: the index of the first row of each row's entity."""
    n = len(entity)
    if n == 0:
        return np.zeros(0, dtype="int64")
    new = np.ones(n, dtype=bool)
    new[1:] = entity[1:] != entity[:-1]
    starts = np.flatnonzero(new)
    return starts[np.cumsum(new) - 1].astype("int64")


def _previous_same(codes: np.ndarray, gstart: np.ndarray) -> np.ndarray:
    """Per row: the previous row of the same entity with the same code, or -1 (also for codes < 0)."""
    n = len(codes)
    prev = np.full(n, -1, dtype="int64")
    if n < 2:
        return prev
    order = np.lexsort((np.arange(n), codes, gstart))
    g, c = gstart[order], codes[order]
    same = (g[1:] == g[:-1]) & (c[1:] == c[:-1]) & (c[1:] >= 0)
    prev[order[1:][same]] = order[:-1][same]
    return prev


# Above this many (row, offset) cells _distinct_in_window loops over offsets (bounded memory).
_DISTINCT_2D_MAX = 1 << 16


def _distinct_in_window(codes: np.ndarray, gstart: np.ndarray, window: int,
                        rows_of_interest: np.ndarray | None = None) -> np.ndarray:
    """Distinct non-negative codes among rows [max(gstart, i-window+1), i], per row i.

    ``rows_of_interest``: compute only for these rows (the result is aligned with them);
    each value is the same as for the whole array.

    A row j in row i's window adds a new code exactly when the code's previous
    occurrence in the entity (``_previous_same``) lies before the window, so the
    count is (valid codes in the window) - (repeats: rows whose previous occurrence
    is inside it). Row j with previous occurrence p is a repeat for exactly the rows
    i in [j, p + window - 1] of its entity, so all rows' repeats are one cumulative
    sum over those intervals: O(n) whatever the window (BENCHMARKS.md has the
    command timing it against the earlier pass per window offset).
    """
    codes = np.asarray(codes, dtype="int64")
    todo = np.arange(len(codes)) if rows_of_interest is None else np.asarray(rows_of_interest, dtype="int64")
    if len(todo) == 0:
        return np.zeros(0, dtype="float64")
    prev = _previous_same(codes, gstart)
    lo = np.maximum(gstart[todo], todo - window + 1)
    valid = np.concatenate([[0], np.cumsum(codes >= 0)])
    span = int((todo - lo).max()) + 1
    if len(todo) * span <= _DISTINCT_2D_MAX:
        # Few rows (the online endpoint's new events): one (rows, span) pass instead of
        # ``span`` passes whose fixed numpy cost dominated a one-flow request (~0.3 ms each call).
        j = todo[:, None] - np.arange(span)[None, :]
        repeats = ((j >= lo[:, None]) & (prev[np.maximum(j, 0)] >= lo[:, None])).sum(axis=1)
        return (valid[todo + 1] - valid[lo] - repeats).astype("float64")
    n = len(codes)
    # Each row's entity ends where the next entity starts (rows are in entity order).
    starts = np.flatnonzero(np.r_[True, gstart[1:] != gstart[:-1]])
    group_end = np.repeat(np.r_[starts[1:], n], np.diff(np.r_[starts, n]))
    j = np.flatnonzero((prev >= 0) & (prev + window > np.arange(n)))  # previous occurrence within reach
    stop = np.minimum(prev[j] + window, group_end[j])  # exclusive, > j
    repeats = np.cumsum(np.bincount(j, minlength=n + 1) - np.bincount(stop, minlength=n + 1))[:n]
    return (valid[todo + 1] - valid[lo] - repeats[todo]).astype("float64")


def _previous_mean(v: np.ndarray, gstart: np.ndarray, window: int) -> np.ndarray:
    """Mean of each entity's previous ``window`` values (0 for its first), vectorised.

    v : (n,) values in (entity, time) order; gstart : (n,) index of each row's group start.
    """
    n = len(v)
    if n == 0:
        return np.zeros(0)
    cs = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(n)
    lo = np.maximum(gstart, i - window)
    count = i - lo
    total = cs[i] - cs[lo]
    return np.divide(total, count, out=np.zeros(n), where=count > 0)


def _port_class(port: np.ndarray) -> np.ndarray:
    """Index into PORT_CLASSES per port (NaN: "none")."""
    p = np.asarray(port, dtype="float64")
    return np.where(np.isnan(p), 3, np.where(p < 1024, 0, np.where(p < 49152, 1, 2))).astype("int64")


def _norm_cat(values: pd.Series | np.ndarray) -> np.ndarray:
    """Category text as the vocabulary keys it: nulls and "" -> "none", lower case.

    Normalises each distinct value once; the same per-value result as normalising every row."""
    return per_distinct(values, _norm_each)


def _norm_each(values: np.ndarray) -> np.ndarray:
    s = pd.Series(values, dtype=object)
    s = s.where(s.notna() & (s.astype(str) != ""), "none")
    return s.astype(str).str.lower().to_numpy(dtype=object)


def _vocab_codes(values: np.ndarray, vocab: list[str], normalise: bool = True) -> np.ndarray:
    """Per row: the index of its value in ``vocab``, or len(vocab) ("other").

    ``normalise``: match the value as ``_norm_cat`` writes it (the category columns).
    Looks up each distinct value once."""
    index = {v: i for i, v in enumerate(vocab)}

    def lookup(uniq: np.ndarray) -> np.ndarray:
        keys = _norm_each(uniq) if normalise else uniq
        return np.array([index.get(k, len(vocab)) for k in keys.tolist()], dtype="int64")

    return per_distinct(values, lookup)


def _one_hot(codes: np.ndarray, width: int) -> np.ndarray:
    """Rows of the (width x width) identity picked by ``codes`` (each in [0, width))."""
    return np.eye(width, dtype="float32")[codes]


@dataclass
class Events:
    """Encoded events, one row per (flow, entity) (or per entity-bin), entity then time order.

    x : float32 (n, F); entity : object (n,); ts : int64 microseconds (n,);
    flow_index : int64 (n,) row of the input table (-1 for a zero-activity bin);
    label : float (n,) NaN unknown; group_start : int64 (n,) first row of the entity;
    bin : int64 (n,) or None; feature_names : list[str].
    """

    x: np.ndarray
    entity: np.ndarray
    ts: np.ndarray
    flow_index: np.ndarray
    label: np.ndarray
    group_start: np.ndarray
    feature_names: list[str]
    bin: np.ndarray | None = None
    # For bin mode: (flow_index, event row) pairs mapping each flow to its entity-bins.
    flow_map: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.x)

    def flow_event_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(flow row, event row) for every event a flow belongs to: in flow mode one per
        (flow, entity); in bin mode the entity-bins the flow fell in. Zero-activity bins
        belong to no flow. A flow's score is the highest over its events."""
        if self.flow_map is not None:
            fi, rows = (np.asarray(a, dtype="int64") for a in self.flow_map)
            ok = (fi >= 0) & (rows >= 0)
            return fi[ok], rows[ok]
        fi = np.asarray(self.flow_index, dtype="int64")
        rows = np.flatnonzero(fi >= 0)
        return fi[rows], rows


@dataclass
class FeatureEncoder:
    """Vocabularies and scaler, fitted on the training split only; JSON-safe.

    Example
    -------
    >>> enc = FeatureEncoder.fit(train_flows, cfg)          # doctest: +SKIP
    >>> events = enc.transform(all_flows)                   # doctest: +SKIP
    >>> events.x.shape == (len(events), len(enc.feature_names_))  # doctest: +SKIP
    """

    granularity: str = "flow"
    bin_seconds: int = 60
    context_window: int = 64
    local_networks: list[str] = field(default_factory=list)
    vocab_: dict[str, list[str]] = field(default_factory=dict)
    mean_: list[float] = field(default_factory=list)
    std_: list[float] = field(default_factory=list)
    feature_names_: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ fit / transform
    @classmethod
    def fit(cls, train_flows: pa.Table, cfg: Config) -> FeatureEncoder:
        if train_flows.num_rows == 0:
            raise NadrayError("training split has no flows: widen data.train_fraction or data.train_end")
        enc = cls(
            granularity=cfg.data.granularity, bin_seconds=int(cfg.data.bin_seconds),
            context_window=int(cfg.data.context_window), local_networks=list(cfg.data.local_networks),
        )
        raw = explode(train_flows, cfg)
        for col, k in VOCAB_SIZES.items():
            vals = pd.Series(_norm_cat(raw[col].to_numpy()))
            counts = vals.value_counts()
            enc.vocab_[col] = sorted(counts.index[:k].tolist(), key=lambda v: (-counts[v], v))
        cont, names = enc._continuous(enc._units(raw))
        mean = cont.mean(axis=0) if len(cont) else np.zeros(cont.shape[1])
        std = cont.std(axis=0) if len(cont) else np.ones(cont.shape[1])
        enc.mean_ = [float(v) for v in mean]
        enc.std_ = [float(v) if v > 1e-6 else 1.0 for v in std]
        enc.feature_names_ = names + enc._categorical_names()
        return enc

    def _cfg(self) -> Config:
        cfg = Config()
        cfg.data.granularity = self.granularity  # type: ignore[assignment]
        cfg.data.bin_seconds = self.bin_seconds
        cfg.data.context_window = self.context_window
        cfg.data.local_networks = list(self.local_networks)
        return cfg

    def explode(self, flows: pa.Table) -> pd.DataFrame:
        return explode(flows, self._cfg())

    def flow_entities(self, flows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        return flow_entities(flows, self._cfg())

    def _units(self, raw: pd.DataFrame, start_bins: dict[str, int] | None = None) -> pd.DataFrame:
        """The modelled units: raw events (flow mode) or entity-bins (bin mode)."""
        if self.granularity == "bin":
            return bin_events(raw, self._cfg(), start_bins)
        return raw

    def _continuous(self, units: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
        ent = units["entity"].to_numpy()
        gs = group_starts(ent)
        l1p = lambda c: np.log1p(np.clip(units[c].to_numpy(dtype="float64", na_value=np.nan), 0, None))  # noqa: E731
        cols = [l1p("bytes_out"), l1p("bytes_in"), l1p("pkts_out"), l1p("pkts_in"), l1p("duration"), l1p("flows")]
        if self.granularity == "bin":
            log_peers = np.log1p(units["n_peers"].to_numpy(dtype="float64"))
            cols += [log_peers, np.log1p(units["n_ports"].to_numpy(dtype="float64"))]
            for v in (cols[5], log_peers):
                v = np.nan_to_num(v, nan=0.0)
                cols.append(v - _previous_mean(v, gs, self.context_window))
            names = list(BIN_CONTINUOUS)
        else:
            ts = units["ts"].to_numpy(dtype="int64")
            dt = np.zeros(len(ts))
            if len(ts) > 1:
                dt[1:] = (ts[1:] - ts[:-1]) / 1e6
            dt[np.arange(len(ts)) == gs] = 0.0
            pos = np.arange(len(ts)) - gs
            wlen = np.minimum(pos + 1, self.context_window).astype("float64")
            peers = pd.factorize(units["peer"])[0]
            ports = units["port"].to_numpy(dtype="float64", na_value=np.nan)
            pcodes = np.where(np.isnan(ports), -1, np.nan_to_num(ports, nan=-1)).astype("int64")
            cols += [
                np.log1p(np.clip(dt, 0, None)),
                _distinct_in_window(peers.astype("int64"), gs, self.context_window) / wlen,
                _distinct_in_window(pcodes, gs, self.context_window) / wlen,
            ]
            names = list(FLOW_CONTINUOUS)
        cont = np.nan_to_num(np.column_stack(cols), nan=0.0, posinf=0.0, neginf=0.0) if len(units) else np.zeros((0, len(names)))
        return cont, names

    def _categorical_names(self) -> list[str]:
        names = []
        if self.granularity == "bin":
            names += [f"dir_share={d}" for d in DIRECTIONS]
            names += [f"proto_share={v}" for v in self.vocab_["proto"]] + ["proto_share=other"]
            return names
        names += [f"direction={d}" for d in DIRECTIONS]
        for col in VOCAB_SIZES:
            names += [f"{col}={v}" for v in self.vocab_[col]] + [f"{col}=other"]
        names += [f"port_class={c}" for c in PORT_CLASSES]
        return names

    def _categorical(self, units: pd.DataFrame) -> np.ndarray:
        n = len(units)
        if self.granularity == "bin":
            total = units["flows"].to_numpy(dtype="float64")
            denom = np.where(total > 0, total, 1.0)
            dirs = np.column_stack([units.get(f"dir_count={d}", pd.Series(0.0, index=units.index)).to_numpy(dtype="float64")
                                    for d in DIRECTIONS]) / denom[:, None]
            pcols = [c for c in units.columns if c.startswith("proto_count=")]
            vocab = self.vocab_["proto"]
            shares = np.zeros((n, len(vocab) + 1))
            for c in pcols:
                name = c.split("=", 1)[1].lower()
                k = vocab.index(name) if name in vocab else len(vocab)
                shares[:, k] += units[c].to_numpy(dtype="float64")
            return np.column_stack([dirs, shares / denom[:, None]]).astype("float32")
        # A direction outside DIRECTIONS (never from explode) is a row of zeros.
        blocks = [_one_hot(_vocab_codes(units["direction"].to_numpy(dtype=object), DIRECTIONS, False),
                           len(DIRECTIONS) + 1)[:, :-1]]
        for col in VOCAB_SIZES:
            blocks.append(_one_hot(_vocab_codes(units[col].to_numpy(dtype=object), self.vocab_[col]),
                                   len(self.vocab_[col]) + 1))
        blocks.append(_one_hot(_port_class(units["port"].to_numpy(dtype="float64", na_value=np.nan)), len(PORT_CLASSES)))
        return np.concatenate(blocks, axis=1)

    def encode(self, raw: pd.DataFrame, start_bins: dict[str, int] | None = None) -> Events:
        """Stage 2: features of raw events already in (entity, time) order."""
        if not self.feature_names_:
            raise NadrayError("FeatureEncoder is not fitted: call FeatureEncoder.fit(train_flows, cfg) first")
        units = self._units(raw, start_bins)
        cont, _ = self._continuous(units)
        cont = (cont - np.asarray(self.mean_)) / np.asarray(self.std_)
        x = np.concatenate([cont.astype("float32"), self._categorical(units)], axis=1) if len(units) else \
            np.zeros((0, len(self.feature_names_)), dtype="float32")
        ent = units["entity"].to_numpy(dtype=object)
        ev = Events(
            x=np.ascontiguousarray(x, dtype="float32"), entity=ent, ts=units["ts"].to_numpy(dtype="int64"),
            flow_index=units["flow_index"].to_numpy(dtype="int64") if "flow_index" in units else np.full(len(units), -1),
            label=units["label"].to_numpy(dtype="float64", na_value=np.nan), group_start=group_starts(ent),
            feature_names=list(self.feature_names_),
        )
        if self.granularity == "bin":
            ev.bin = units["bin"].to_numpy(dtype="int64")
            width = self.bin_seconds * 1_000_000
            key = pd.MultiIndex.from_arrays([ent, ev.bin])
            rk = pd.MultiIndex.from_arrays([raw["entity"].to_numpy(dtype=object), raw["ts"].to_numpy() // width])
            rows = key.get_indexer(rk)
            ev.flow_map = (raw["flow_index"].to_numpy(dtype="int64"), rows.astype("int64"))
        return ev

    def transform(self, flows: pa.Table) -> Events:
        """Stages 1 and 2 for a flow table (its rows in any order; time order is imposed)."""
        return self.encode(self.explode(flows))

    # ------------------------------------------------------------------ persistence
    @property
    def n_features(self) -> int:
        return len(self.feature_names_)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "granularity": self.granularity, "bin_seconds": self.bin_seconds,
            "context_window": self.context_window, "local_networks": list(self.local_networks),
            "vocab": self.vocab_, "mean": self.mean_, "std": self.std_, "feature_names": self.feature_names_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureEncoder:
        try:
            enc = cls(
                granularity=str(d["granularity"]), bin_seconds=int(d["bin_seconds"]),
                context_window=int(d["context_window"]), local_networks=[str(n) for n in d["local_networks"]],
                vocab_={str(k): [str(v) for v in vs] for k, vs in d["vocab"].items()},
                mean_=[float(v) for v in d["mean"]], std_=[float(v) for v in d["std"]],
                feature_names_=[str(v) for v in d["feature_names"]],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise NadrayError(f"feature encoder: malformed ({e.__class__.__name__}: {e})") from None
        if enc.granularity not in ("flow", "bin") or len(enc.mean_) != len(enc.std_):
            raise NadrayError(f"feature encoder: malformed (granularity {enc.granularity!r}, "
                              f"{len(enc.mean_)} means vs {len(enc.std_)} stds)")
        return enc


def history_events(cfg_or_enc: Config | FeatureEncoder, sequence_length: int | None = None) -> int:
    """Raw events (flow mode) or bins (bin mode) per entity that reproduce batch features online."""
    if isinstance(cfg_or_enc, Config):
        return cfg_or_enc.data.sequence_length + cfg_or_enc.data.context_window + 1
    assert sequence_length is not None
    return sequence_length + cfg_or_enc.context_window + 1


# --------------------------------------------------------------------------- windows


def window_source(x: np.ndarray) -> np.ndarray:
    """``x`` (n, F) with the padding-mask channel (1) and one all-zero row appended: (n+1, F+1).

    ``make_windows`` gathers every window from it in one pass (a padding step is the
    zero row), instead of gathering, masking and concatenating: 5-8x faster on
    windows of 33 steps. Build it once per event array, not once per batch. Training
    does without it: a worker's ``x`` can be the largest array it holds, and its
    windows are a few percent of a step's time.
    """
    n, f = x.shape
    src = np.zeros((n + 1, f + 1), dtype="float32")
    src[:n, :f] = x
    src[:n, f] = 1.0
    return src


def make_windows(x: np.ndarray, group_start: np.ndarray, idx: np.ndarray, sequence_length: int,
                 source: np.ndarray | None = None) -> np.ndarray:
    """Windows ending at events ``idx``: (len(idx), L+1, F+1) float32.

    Row k holds events [i-L, ..., i] of i = idx[k]'s entity, left-padded with zeros
    where the entity has less history; the last channel is 1 for a real event, 0 for
    padding. The LSTM reads steps 0..L-1 to predict event i and step L to classify it.
    ``source``: ``window_source(x)``, for a caller that makes many batches from one ``x``
    and can hold a copy of it (the scorer); without it the work is per window, not per ``x``.
    """
    L = int(sequence_length)
    idx = np.asarray(idx, dtype="int64")
    j = idx[:, None] + np.arange(-L, 1)[None, :]
    valid = j >= group_start[idx][:, None]
    if source is not None:
        return np.take(source, np.where(valid, j, len(source) - 1), axis=0)  # padding: the zero row
    w = x[np.where(valid, j, idx[:, None])]
    w *= valid[:, :, None]
    return np.concatenate([w, valid[:, :, None].astype("float32")], axis=2)
