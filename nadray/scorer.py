"""``Scorer``: one class, built from a checkpoint, for batch scoring and Ray Serve.

Made-With-ML's ``TorchPredictor`` idea: ``from_ref`` loads a registry version,
``score_table`` scores a flow table (each record with its entity's earlier
records in that table as context), ``__call__`` adapts it to Ray Data
``map_batches``, and ``score_online`` + ``new_context`` give the Serve
deployment the same scores one small batch at a time.

Example
-------
>>> scorer = Scorer.from_ref("s3://models/nadray")          # doctest: +SKIP
>>> out = scorer.score_table(flows)                          # doctest: +SKIP
>>> out[["entity", "score", "is_anomaly"]].head()            # doctest: +SKIP
"""

from __future__ import annotations

import math

from collections import OrderedDict
from typing import Callable, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from nadray.errors import NadrayError
from nadray.features import (Events, FeatureEncoder, history_events, make_windows, per_distinct, sort_raw,
                             window_source)
from nadray.model import ModelArgs, combine_scores
from nadray.online_features import OnlineFlowEncoder, raw_from_frame, raw_to_frame
from nadray.schema import FLOW_SCHEMA
from nadray.threshold import Threshold

OUTPUT_COLUMNS = ["source", "source_row", "ts", "entity", "score", "is_anomaly", "threshold", "model_version",
                  "label", "label_detail"]
# Windows per forward pass. Scoring runs on the CPU, where the LSTM is fastest when one
# step's gate activations (B x 4 x hidden floats) stay in the core's L2 cache. Bare
# torch, default model, 2-core EPYC: 25 us a window at B = 128-768, 32 at 1024, 42 at
# 8192 (1 thread); 16 against 25 (2 threads). BENCHMARKS.md has the command.
SCORE_BATCH = 512


class RawHistory:
    """One entity's last raw events in flow mode: one small ``online_features.RAW_DTYPE`` array.

    About 130 bytes per event (strings shared), instead of a DataFrame's ~300 plus
    its fixed overhead; ``to_frame`` gives the DataFrame the pandas path uses.
    """

    __slots__ = ("events",)

    def __init__(self, events: np.ndarray):
        self.events = events

    def __len__(self) -> int:
        return len(self.events)

    def to_frame(self, entity: str) -> pd.DataFrame:
        return raw_to_frame(entity, self.events)

    def nbytes(self) -> int:
        """The array, this wrapper, and each distinct string object it references (shared
        strings are counted for every entity holding them: an upper bound)."""
        import sys

        objs = {id(o): o for f in ("source", "proto", "conn_state", "service", "peer")
                for o in self.events[f].tolist() if o is not None}
        return sys.getsizeof(self) + self.events.nbytes + sum(sys.getsizeof(o) for o in objs.values())

    def memory_usage(self, deep: bool = True, index: bool = True) -> np.ndarray:
        """DataFrame-like accounting for memory reports (``bench.stages.context_bytes_per_entity``)."""
        return np.array([self.nbytes()])


class EntityContext:
    """Per-entity recent raw events for online scoring (an LRU over entities).

    Each entity keeps its last ``keep`` raw events (flow mode, as a ``RawHistory``) or
    the events of its last ``keep`` bins (bin mode, a DataFrame): exactly what the
    features and windows of its next event need, so online scores equal batch scores.
    """

    def __init__(self, max_entities: int, keep: int):
        if max_entities < 1:
            raise NadrayError(f"max_entities must be >= 1, got {max_entities}")
        self.max_entities = int(max_entities)
        self.keep = int(keep)
        self.evictions = 0
        self._data: OrderedDict[str, Any] = OrderedDict()
        self._first_bin: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, entity: str) -> bool:
        return entity in self._data

    def get(self, entity: str) -> Any:
        return self._data.get(entity)

    def put(self, entity: str, events: Any) -> None:
        self._data[entity] = events
        self._data.move_to_end(entity)
        while len(self._data) > self.max_entities:
            old, _ = self._data.popitem(last=False)
            self._first_bin.pop(old, None)
            self.evictions += 1

    def entities(self) -> list[str]:
        return list(self._data)


def _positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


class Scorer:
    """Scores flows with a trained LSTM; thresholds with a ``Threshold``."""

    def __init__(self, model: Any, encoder: FeatureEncoder, threshold: Threshold, meta: dict[str, Any],
                 err_norm: np.ndarray | None = None, z: dict[str, float] | None = None, version: str | None = None):
        import torch

        self.model = model.eval()
        self.args: ModelArgs = model.args
        self.encoder = encoder
        self.threshold = threshold
        self.meta = meta
        self.err_norm = None if err_norm is None else np.asarray(err_norm, dtype="float64")
        self.z = dict(z or {})
        # {"global": g, "k": credibility k, "prior_events": weight used, "entities": {entity: typical error}}
        # (calibrate.entity_scales); None = off.
        self.entity_scale: dict[str, Any] | None = None
        # Features that never varied in training ({index: value}): predicted as that value,
        # so only a real departure from it counts, not the network's wobble around it.
        self.constant_features: dict[int, float] = {}
        self.version = version or meta.get("version") or "unregistered"
        self._torch = torch
        self._online: OnlineFlowEncoder | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_ref(cls, ref: str, name: str | None = None) -> Scorer:
        """Load ``REGISTRY_URI[@champion|@VERSION]`` (validated: see ``registry.load``)."""
        import torch

        from nadray import registry
        from nadray.model import EventLSTM

        tensors, meta, where = registry.load(ref, name or registry.DEFAULT_NAME)
        args = ModelArgs.from_dict(meta["model_args"])
        model = EventLSTM(args)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})
        encoder = FeatureEncoder.from_dict(meta["encoder"])
        if encoder.n_features != args.n_features:
            raise NadrayError(f"model {ref}: encoder has {encoder.n_features} features, model expects {args.n_features}")
        err_norm = meta.get("err_norm")
        scorer = cls(model, encoder, Threshold.from_dict(meta["threshold"]), meta,
                     err_norm=None if err_norm is None else np.asarray(err_norm, "float64"),
                     z=meta.get("score_z"), version=where.version)
        scale = meta.get("entity_scale")
        if scale is not None:
            ok = isinstance(scale, dict) and isinstance(scale.get("entities"), dict) and all(
                _positive(v) for v in [scale.get("global"), *scale["entities"].values()])
            if not ok:  # e.g. null where a diverged training wrote NaN
                raise NadrayError(f"model {ref}: checkpoint field 'entity_scale' is malformed "
                                  "(expected positive finite numbers for 'global' and every entity)")
            scorer.entity_scale = scale
        const = meta.get("constant_features") or {}
        try:
            scorer.constant_features = {int(k): float(v) for k, v in const.items()}
        except (AttributeError, TypeError, ValueError):
            raise NadrayError(f"model {ref}: checkpoint field 'constant_features' is malformed") from None
        if any(not 0 <= k < args.n_features for k in scorer.constant_features):
            raise NadrayError(f"model {ref}: checkpoint field 'constant_features' names a feature out of range")
        return scorer

    def set_threshold(self, value: float) -> None:
        """Change the alert threshold without retraining (Serve's ``reconfigure``)."""
        value = float(value)
        if not np.isfinite(value):
            raise NadrayError(f"threshold must be finite, got {value!r}")
        self.threshold = Threshold(value, "manual", self.threshold.target_fpr, {"previous": self.threshold.to_dict()})

    # ------------------------------------------------------------------ core
    def event_outputs(self, events: Events, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature squared prediction errors (n, F) and logits (n,) for events ``idx`` (default: all)."""
        torch = self._torch
        from nadray.model import squared_errors

        idx = np.arange(len(events)) if idx is None else np.asarray(idx, dtype="int64")
        sq = np.zeros((len(idx), events.x.shape[1]), dtype="float32")
        lg = np.zeros(len(idx), dtype="float32")
        src = window_source(events.x)
        with torch.inference_mode():
            for lo in range(0, len(idx), SCORE_BATCH):
                w = torch.from_numpy(make_windows(events.x, events.group_start, idx[lo:lo + SCORE_BATCH],
                                                  self.args.sequence_length, src))
                pred, logit = self.model(w)
                sq[lo:lo + len(w)] = squared_errors(pred, w).numpy()
                lg[lo:lo + len(w)] = logit.numpy()
        return self.constant_errors(sq, events.x, idx), lg

    def constant_errors(self, sq: np.ndarray, x: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        """``sq`` (rows ``idx`` of ``x``, default all) with each constant feature's error taken
        against its training value."""
        if self.constant_features:
            js = np.fromiter(self.constant_features, dtype="int64")
            vals = np.array([self.constant_features[j] for j in js], dtype="float32")
            cols = x[:, js] if idx is None else x[np.ix_(idx, js)]
            sq[:, js] = (cols - vals) ** 2
        return sq

    def combine(self, sqerr: np.ndarray, logit: np.ndarray) -> np.ndarray:
        return combine_scores(sqerr, logit, self.args.objective, self.err_norm, self.z)

    def normalize(self, scores: np.ndarray, entity: np.ndarray) -> np.ndarray:
        """Divide each event's score by its entity's typical training error (unsupervised only)."""
        if not self.entity_scale or self.args.objective != "unsupervised" or len(scores) == 0:
            return scores
        table, g = self.entity_scale["entities"], float(self.entity_scale["global"])
        scale = per_distinct(entity, lambda uniq: np.array([float(table.get(str(e), g)) for e in uniq], dtype="float64"))
        return scores / scale

    def event_scores(self, events: Events, idx: np.ndarray | None = None) -> np.ndarray:
        idx = np.arange(len(events)) if idx is None else np.asarray(idx, dtype="int64")
        return self.normalize(self.combine(*self.event_outputs(events, idx)), events.entity[idx])

    @staticmethod
    def flow_scores(events: Events, scores: np.ndarray, n_flows: int,
                    scored: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per flow: the highest score among its entities' events, and that entity.

        ``scored``: a mask over events; only those count (a flow with none gets NaN).
        Ties go to the entity first in code point order, whatever the events' block.
        """
        fi, rows = events.flow_event_pairs()
        if scored is not None:
            keep = scored[rows]
            fi, rows = fi[keep], rows[keep]
        s, ent = scores[rows], events.entity[rows]
        order = np.lexsort((-s, fi))
        fi, s, ent = fi[order], s[order], ent[order]
        first = np.r_[True, fi[1:] != fi[:-1]] if len(fi) else np.zeros(0, bool)
        out_s = np.full(n_flows, np.nan)
        out_e = np.empty(n_flows, dtype=object)
        out_s[fi[first]] = s[first]
        out_e[fi[first]] = ent[first]
        return out_s, out_e

    def _output(self, flows: pa.Table, score: np.ndarray, entity: np.ndarray) -> pd.DataFrame:
        if np.isnan(score).any():
            raise NadrayError(f"internal: {int(np.isnan(score).sum())} flows got no score")
        cols = flows.column_names
        get = lambda c, default: flows.column(c).to_pandas() if c in cols else pd.Series([default] * flows.num_rows)  # noqa: E731
        thr = float(self.threshold.value)
        return pd.DataFrame({
            "source": get("source", None).astype(object).to_numpy(),
            "source_row": get("source_row", -1).to_numpy(dtype="int64"),
            "ts": pd.to_datetime(get("ts", None), utc=True).array,
            "entity": entity.astype(object),
            "score": score.astype("float64"),
            "is_anomaly": score >= thr,
            "threshold": np.full(len(score), thr),
            "model_version": self.version,
            "label": get("label", None).astype("Int8").array if "label" in cols else pd.array([pd.NA] * len(score), dtype="Int8"),
            "label_detail": get("label_detail", None).astype(object).to_numpy(),
        })

    # ------------------------------------------------------------------ batch
    def score_table(self, flows: pa.Table, entities: np.ndarray | None = None) -> pd.DataFrame:
        """One row per input flow (input order), each scored with its entity's earlier records in ``flows``.

        ``entities``: score only these entities' events, and each flow by the highest of
        them; every flow needs one. Features are per entity, so a block of batch scoring
        that holds every flow of its entities gives them the scores the whole input would
        (``score.entity_blocks``); the other endpoints' events cost encoding, not the LSTM.
        """
        if flows.num_rows == 0:
            return self._output(flows, np.zeros(0), np.empty(0, object))
        events = self.encoder.transform(flows)
        if entities is None:
            s, e = self.flow_scores(events, self.event_scores(events), flows.num_rows)
        else:
            mine = pd.Index(np.asarray(entities, dtype=object)).get_indexer(events.entity) >= 0
            scores = np.zeros(len(events))
            scores[mine] = self.event_scores(events, np.flatnonzero(mine))
            s, e = self.flow_scores(events, scores, flows.num_rows, mine)
        return self._output(flows, s, e)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data ``map_batches`` adapter: a batch of canonical columns -> score output columns.

        The batch must hold whole entity histories (score.py groups by entity first).
        """
        table = _to_flow_table(batch)
        out = self.score_table(table)
        return {c: out[c].to_numpy() for c in out.columns}

    # ------------------------------------------------------------------ online
    def new_context(self, max_entities: int) -> EntityContext:
        return EntityContext(max_entities, history_events(self.encoder, self.args.sequence_length))

    def score_online(self, flows: pa.Table, context: EntityContext,
                     entity_filter: Callable[[str], bool] | None = None) -> pd.DataFrame:
        """Score a small batch of new records with each entity's retained history; then update it.

        Replaying a stream in time order through this method gives the same scores as
        ``score_table`` on the whole stream. ``entity_filter`` keeps only the entities a
        Serve shard owns: features are per entity, so dropping the others' events leaves
        the owned entities' scores unchanged (flows with no owned entity score 0).
        """
        if flows.num_rows == 0:
            return self._output(flows, np.zeros(0), np.empty(0, object))
        s, e = self.score_online_arrays(flows, context, entity_filter)
        return self._output(flows, s, e)

    def score_online_arrays(self, flows: pa.Table, context: EntityContext,
                            entity_filter: Callable[[str], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``score_online`` as (score float64 (n,), entity object (n,)), without the output table.

        Flow mode takes a numpy fast path when the records are in time order after each
        entity's retained history (the usual stream); otherwise, and in bin mode, the
        pandas path that batch scoring uses. Both give the same scores.
        """
        n = flows.num_rows
        if n == 0:
            return np.zeros(0), np.empty(0, object)
        out = None
        if self.encoder.granularity == "flow":
            out = self._score_online_fast(flows, context, entity_filter)
        if out is None:
            out = self._score_online_general(flows, context, entity_filter)
        s, e = out
        if np.isnan(s).any():
            raise NadrayError(f"internal: {int(np.isnan(s).sum())} flows got no score")
        return s, e

    def _online_encoder(self) -> OnlineFlowEncoder:
        if self._online is None or self._online.enc is not self.encoder:
            self._online = OnlineFlowEncoder(self.encoder)
        return self._online

    def _score_online_fast(self, flows: pa.Table, context: EntityContext,
                           entity_filter: Callable[[str], bool] | None) -> tuple[np.ndarray, np.ndarray] | None:
        """Flow mode with numpy: None (nothing changed) when the general path must run instead."""
        enc = self._online_encoder()
        exploded = enc.explode(flows)
        if exploded is None or not enc.flows_in_order(flows):
            return None
        ent, ev, fi = exploded
        n = flows.num_rows
        if entity_filter is not None and len(ent):
            uniq, inv = np.unique(ent.astype(str), return_inverse=True)
            keep = np.array([bool(entity_filter(e)) for e in uniq], dtype=bool)[inv.reshape(-1)]
            ent, ev, fi = ent[keep], ev[keep], fi[keep]
        if not len(ent):
            return np.zeros(n), np.full(n, None, object)
        # sort_raw's order: entity, then (ts, source, source_row, side); records in time
        # order make the latter (flow, side).
        uniq, inv = np.unique(ent, return_inverse=True)
        inv = inv.reshape(-1)
        order = np.lexsort((ev["side"], fi, inv))
        ev, fi, inv = ev[order], fi[order], inv[order]
        bounds = np.r_[0, np.flatnonzero(inv[1:] != inv[:-1]) + 1, len(inv)]
        blocks, hist_len = [], []
        for k, e in enumerate(uniq.tolist()):
            new_e = ev[bounds[k]:bounds[k + 1]]
            h = context.get(e)
            if h is not None and len(h):
                last, first = h.events[-1], new_e[0]
                if (int(first["ts"]), first["source"], int(first["source_row"]), int(first["side"])) < \
                        (int(last["ts"]), last["source"], int(last["source_row"]), int(last["side"])):
                    return None  # a late record: the general path sorts it into the history
                blocks.append(np.concatenate([h.events, new_e]))
                hist_len.append(len(h))
            else:
                blocks.append(new_e)
                hist_len.append(0)
        sizes = np.array([len(b) for b in blocks], dtype="int64")
        starts = np.r_[0, np.cumsum(sizes)[:-1]].astype("int64")
        comb = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        gs = np.repeat(starts, sizes)
        L = int(self.args.sequence_length)
        new_rows = np.concatenate([np.arange(s0 + h, s0 + z) for s0, h, z in zip(starts, hist_len, sizes)])
        need = np.concatenate([np.arange(s0 + max(0, h - L), s0 + z) for s0, h, z in zip(starts, hist_len, sizes)])
        x = np.zeros((len(comb), self.encoder.n_features), dtype="float32")
        x[need] = enc.encode_rows(comb, gs, need)
        flow_index = np.full(len(comb), -1, dtype="int64")
        flow_index[new_rows] = fi
        events = Events(x=x, entity=np.repeat(uniq.astype(object), sizes), ts=comb["ts"].astype("int64"),
                        flow_index=flow_index, label=comb["label"].astype("float64"), group_start=gs,
                        feature_names=list(self.encoder.feature_names_))
        scores = np.zeros(len(comb))
        scores[new_rows] = self.event_scores(events, new_rows)
        s, e = self.flow_scores(events, scores, n)
        keep = context.keep
        for k, ent_k in enumerate(uniq.tolist()):  # entity order, as the general path's groupby
            context.put(ent_k, RawHistory(blocks[k][-keep:].copy()))
        return s, e

    def _score_online_general(self, flows: pa.Table, context: EntityContext,
                              entity_filter: Callable[[str], bool] | None) -> tuple[np.ndarray, np.ndarray]:
        """The pandas path (``explode`` / ``sort_raw`` / ``encode``): bin mode and out-of-order records."""
        flow_mode = self.encoder.granularity == "flow"
        new = self.encoder.explode(flows)
        if entity_filter is not None and len(new):
            uniq, inv = np.unique(new["entity"].to_numpy(dtype=object).astype(str), return_inverse=True)
            keep = np.array([bool(entity_filter(e)) for e in uniq], dtype=bool)[inv.reshape(-1)]
            new = new[keep].reset_index(drop=True)
            if not len(new):
                return np.zeros(flows.num_rows), np.full(flows.num_rows, None, object)
        ents = pd.unique(new["entity"])
        held = [e for e in ents if e in context]
        hist = [context.get(e).to_frame(e) if flow_mode else context.get(e) for e in held]
        combined = sort_raw(pd.concat(hist + [new], ignore_index=True)) if hist else new
        keep = context.keep
        start_bins = None
        if self.encoder.granularity == "bin":
            width = self.encoder.bin_seconds * 1_000_000
            start_bins = {}
            first_new = (new.groupby("entity")["ts"].min() // width).astype("int64")
            for e in ents:
                # Zero bins start at the entity's first bin ever, or at the retained horizon.
                fb = context._first_bin.setdefault(e, int(first_new[e]))
                start_bins[e] = max(fb, int(first_new[e]) - keep + 1)
        events = self.encoder.encode(combined, start_bins)
        rows = np.unique(events.flow_event_pairs()[1])
        scores = np.zeros(len(events))
        scores[rows] = self.event_scores(events, rows)
        s, e = self.flow_scores(events, scores, flows.num_rows)
        # Update the context: history rows carry flow_index -1 so they never map to output rows.
        combined = combined.assign(flow_index=-1)
        if self.encoder.granularity == "bin":
            width = self.encoder.bin_seconds * 1_000_000
            b = combined["ts"] // width
            last = b.groupby(combined["entity"]).transform("max")
            combined = combined[b > last - keep]
        else:
            combined = combined.groupby("entity", sort=False).tail(keep)
        for ent, part in combined.groupby("entity", sort=False):
            part = part.reset_index(drop=True)
            context.put(ent, RawHistory(raw_from_frame(part)) if flow_mode else part)
        return s, e


def _to_flow_table(batch: dict[str, np.ndarray] | pd.DataFrame | pa.Table) -> pa.Table:
    if isinstance(batch, pa.Table):
        t = batch
    else:
        df = batch if isinstance(batch, pd.DataFrame) else pd.DataFrame({k: list(v) if np.asarray(v).ndim > 1 else v
                                                                         for k, v in batch.items()})
        t = pa.Table.from_pandas(df, preserve_index=False)
    cols = {}
    for f in FLOW_SCHEMA:
        if f.name in t.column_names:
            cols[f.name] = t.column(f.name).cast(f.type)
        elif f.name == "flows":
            cols[f.name] = pa.array(np.ones(t.num_rows, "int64"))
        else:
            cols[f.name] = pa.nulls(t.num_rows, f.type)
    return pa.table(cols)
