"""Which scorer shard owns which entity, and how a request's flows are split and merged.

An entity's context lives in exactly one shard, chosen by a stable hash of the
entity name (CRC-32, the same in every process; Python's ``hash`` is salted).
A flow goes to the shard of each of its entities (one for outbound and inbound
flows, up to two for internal or unknown ones, DESIGN.md "entity"); each shard
scores only the entities it owns, and the flow's score is the highest of the
shards' answers, exactly as batch scoring takes the highest of its entities.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


def shard_of(entity: str, num_shards: int) -> int:
    """The shard that holds ``entity``'s context: stable across processes and restarts."""
    if num_shards <= 1:
        return 0
    return zlib.crc32(str(entity).encode("utf-8", "surrogatepass")) % num_shards


def shards_of(entities: np.ndarray, num_shards: int) -> np.ndarray:
    """``shard_of`` for an array, hashing each distinct entity once."""
    uniq, inv = np.unique(np.asarray(entities).astype(str), return_inverse=True)
    return np.array([shard_of(e, num_shards) for e in uniq], dtype="int64")[inv.reshape(-1)] if len(uniq) \
        else np.zeros(0, dtype="int64")


class EntityFilter:
    """Picklable predicate: does shard ``shard`` of ``num_shards`` own this entity?"""

    def __init__(self, shard: int, num_shards: int):
        self.shard = shard
        self.num_shards = num_shards

    def __call__(self, entity: str) -> bool:
        return shard_of(entity, self.num_shards) == self.shard


def entity_sides(flows: pa.Table, local_networks: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(src_is_entity, dst_is_entity) per flow: ``features.event_sides``, as explode uses it."""
    from nadray.config import Config
    from nadray.features import event_sides, local_sides

    cfg = Config()
    cfg.data.local_networks = list(local_networks)
    return event_sides(*local_sides(flows, cfg))


@dataclass
class Plan:
    """Row indices of the request table that each shard receives (ascending: order kept)."""

    rows: list[np.ndarray]

    def take(self, flows: pa.Table) -> list[pa.Table | None]:
        return [flows.take(pa.array(r)) if len(r) else None for r in self.rows]


def plan(flows: pa.Table, num_shards: int, local_networks: list[str]) -> Plan:
    """Split ``flows`` over shards by the owners of each flow's entities."""
    n = flows.num_rows
    if num_shards <= 1:
        return Plan([np.arange(n, dtype="int64")])
    src_ev, dst_ev = entity_sides(flows, local_networks)
    member = np.zeros((num_shards, n), dtype=bool)
    rows = np.arange(n)
    for col, on in (("src_ip", src_ev), ("dst_ip", dst_ev)):
        owner = shards_of(flows.column(col).to_numpy(zero_copy_only=False), num_shards)
        member[owner[on], rows[on]] = True
    return Plan([np.flatnonzero(member[s]) for s in range(num_shards)])


def merge(n: int, plan_: Plan, answers: list[dict | None]) -> tuple[list, np.ndarray]:
    """Per-flow (entity, score): the highest score over the shards that scored the flow."""
    entity: list = [None] * n
    score = np.full(n, -np.inf)
    for rows, ans in zip(plan_.rows, answers):
        if ans is None or not len(rows):
            continue
        s = np.asarray(ans["score"], dtype="float64")
        ents = ans["entity"]
        better = s > score[rows]
        for j in np.flatnonzero(better):
            entity[rows[j]] = ents[j]
        score[rows] = np.where(better, s, score[rows])
    return entity, score
