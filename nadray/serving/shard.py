"""One scorer shard: a Scorer, its entity contexts, batching, hot swap. No Ray here.

``ShardCore`` is what the ``ScorerShard`` deployment wraps, so its logic is
tested without Serve. Swaps happen between batches under one lock: a batch in
flight finishes on the scorer it started with, the next one sees the new one.
Contexts are *reset* on a swap (a new model may use other vocabularies, scaler
and hidden size, so old per-entity state means nothing to it): after a swap
each host is scored with the history it builds from then on, as after a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from nadray.serving.routing import EntityFilter

log = logging.getLogger("nadray.serve")


def event(name: str, **fields: Any) -> None:
    """One-line JSON log record: an event name and small scalar fields, never payloads or secrets."""
    log.warning(json.dumps({"event": name, **fields}, default=str, sort_keys=True))


def split_ref(ref: str) -> tuple[str, str | None]:
    """``URI``, ``URI@champion`` or ``URI@VERSION`` -> (URI, VERSION or None for the champion)."""
    uri, sep, tag = ref.rpartition("@")
    if not sep or "/" in tag:
        return ref, None
    return uri, (None if tag == "champion" else tag)


def local_networks_of(scorer: Any) -> list[str]:
    """The local networks the scorer's features use (routing must use the same)."""
    enc = getattr(scorer, "encoder", None)
    nets = getattr(enc, "local_networks", None)
    if nets:
        return list(nets)
    meta = getattr(scorer, "meta", {}) or {}
    nets = ((meta.get("config") or {}).get("data") or {}).get("local_networks")
    if nets:
        return list(nets)
    from nadray.config import DataConfig

    return DataConfig().local_networks


def load_scorer(ref: str):
    from nadray.scorer import Scorer

    return Scorer.from_ref(ref)


def champion_version(registry_uri: str) -> str | None:
    from nadray import registry

    rec = registry.champion(registry_uri)
    return None if rec is None else str(rec["version"])


# Batches up to this many flows are scored on the event loop instead of in a worker
# thread: the numpy fast path plus a one-thread LSTM forward of a few windows takes
# ~1 ms for one flow, less than a thread hand-off and wake-up cost on a loaded 2-core
# machine; larger batches go to a thread so health checks and HTTP parsing go on.
INLINE_ROWS = 256


class ShardCore:
    """A scorer, the contexts of the entities this shard owns, and the swap protocol."""

    def __init__(self, scorer: Any, shard: int = 0, num_shards: int = 1, max_entities: int = 100_000,
                 loader: Callable[[str], Any] = load_scorer, registry_uri: str = "",
                 inline_rows: int = INLINE_ROWS):
        self.shard = shard
        self.inline_rows = int(inline_rows)
        self.num_shards = num_shards
        self.max_entities = max_entities
        self.loader = loader
        self.registry_uri = registry_uri
        self.threshold_override: float | None = None
        self.lock = asyncio.Lock()
        self.pending: dict[str, Any] = {}
        self.filter = EntityFilter(shard, num_shards) if num_shards > 1 else None
        self._install(scorer)
        self.new_anomalies = self.new_evictions = 0  # what the last batch added (_count)

    # -- model state ----------------------------------------------------------------
    def _install(self, scorer: Any) -> None:
        self.base_threshold = float(scorer.threshold.value)  # the checkpoint's calibrated one
        if self.threshold_override is not None:
            scorer.set_threshold(self.threshold_override)
        self.scorer = scorer
        self.context = scorer.new_context(self.max_entities)
        self.evictions_seen = 0

    @property
    def version(self) -> str:
        return str(self.scorer.version)

    @property
    def threshold(self) -> float:
        return float(self.scorer.threshold.value)

    def set_threshold(self, value: float | None) -> None:
        """From ``reconfigure(user_config)``: None goes back to the checkpoint's own threshold."""
        old = self.threshold
        self.threshold_override = None if value is None else float(value)
        self.scorer.set_threshold(self.base_threshold if value is None else float(value))
        if self.threshold != old:
                event("threshold", shard=self.shard, old=old, new=self.threshold, version=self.version)

    def info(self) -> dict:
        return {"version": self.version, "threshold": self.threshold, "shard": self.shard,
                "entities": len(self.context), "evictions": int(getattr(self.context, "evictions", 0)),
                "local_networks": local_networks_of(self.scorer),
                "meta": self.scorer.meta}

    # -- scoring ----------------------------------------------------------------------
    def _score_sync(self, flows: pa.Table) -> dict:
        # Arrays, not score_online's output DataFrame: the ingress needs entity and score only.
        score, entity = self.scorer.score_online_arrays(flows, self.context, entity_filter=self.filter)
        return {"entity": [None if e is None or e != e else e for e in entity.tolist()],
                "score": np.asarray(score, dtype="float64")}

    async def score_many(self, tables: list[pa.Table]) -> list[dict]:
        """Score the callers' tables as one batch, in order; one answer per table."""
        sizes = [t.num_rows for t in tables]
        async with self.lock:  # batches and swaps are strictly sequential
            scorer = self.scorer
            flows = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
            if flows.num_rows <= self.inline_rows:
                res = self._score_sync(flows)
            else:
                res = await asyncio.to_thread(self._score_sync, flows)
            version, threshold = str(scorer.version), float(scorer.threshold.value)
            self._count(res["score"], threshold)
        answers, start = [], 0
        for n in sizes:
            answers.append({"entity": res["entity"][start:start + n], "score": res["score"][start:start + n],
                            "model_version": version, "threshold": threshold})
            start += n
        return answers

    def _count(self, scores: np.ndarray, threshold: float) -> None:
        """What the batch just scored adds to the metrics (read by ``app._record``)."""
        self.new_anomalies = int((scores >= threshold).sum())
        ev = int(getattr(self.context, "evictions", 0))
        self.new_evictions, self.evictions_seen = ev - self.evictions_seen, ev

    # -- swap -----------------------------------------------------------------------------
    async def prepare(self, version: str) -> str:
        """Load ``version`` in a thread while batches go on; idempotent."""
        if version == self.version or version in self.pending:
            return version
        t0 = time.time()
        self.pending[version] = await asyncio.to_thread(self.loader, f"{self.registry_uri}@{version}")
        event("model_loaded", shard=self.shard, version=version, seconds=round(time.time() - t0, 3))
        return version

    async def activate(self, version: str) -> bool:
        """Swap to a prepared version between batches; False when it is already serving."""
        if version == self.version:
            self.pending.pop(version, None)
            return False
        if version not in self.pending:
            await self.prepare(version)
        async with self.lock:
            old = self.version
            self._install(self.pending.pop(version))
        event("model_swapped", shard=self.shard, old=old, new=version, contexts="reset")
        return True
