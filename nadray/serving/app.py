"""The Serve application: ``ServeArgs``, the deployments, ``build_app`` and ``run_serve``.

Ray-specific lines are the ``@serve.*`` decorators, ``.options``/``.bind``, the
DeploymentHandle calls (``.remote``) and ``serve.start``/``serve.run``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from nadray.errors import NadrayError
from nadray.serving import api, routing
from nadray.serving.shard import ShardCore, champion_version, event, load_scorer, split_ref

APP_NAME = "nadray"


class ServeArgs(BaseModel):
    """Typed arguments of ``build_app`` (also usable from a Serve config file's ``args``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="REGISTRY_URI, REGISTRY_URI@champion or REGISTRY_URI@VERSION")
    max_entities: int = Field(100_000, ge=1, description="entity contexts per shard (LRU)")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_flows: int = Field(10_000, ge=1)
    max_batch_size: int = Field(64, ge=1, description="requests per forward pass")
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    poll_champion_s: float = Field(10.0, ge=0, description="0: never poll (POST /admin/reload still works)")
    num_replicas: int = Field(1, ge=1, le=256, description="scorer shards; each entity lives on one")
    threshold: float | None = Field(None, description="override the checkpoint's threshold (user_config)")
    # CPU reserved per scorer shard; fractional so a 2-core machine holds several.
    replica_cpus: float = Field(0.5, ge=0)
    ingress_cpus: float = Field(0.25, ge=0)
    # SHA-256 of the API token, from the builder's NADRAY_API_TOKEN: the raw token
    # never enters the cluster's metadata. A replica's own NADRAY_API_TOKEN wins.
    api_token_sha256: str | None = None

    @classmethod
    def from_config(cls, model: str, serve_cfg: Any, replicas: int = 1) -> "ServeArgs":
        return cls(model=model, max_entities=serve_cfg.max_entities, max_body_bytes=serve_cfg.max_body_bytes,
                   max_flows=serve_cfg.max_flows, max_batch_size=serve_cfg.max_batch_size,
                   batch_wait_timeout_s=serve_cfg.batch_wait_timeout_s,
                   poll_champion_s=serve_cfg.poll_champion_s, num_replicas=replicas)

    def limits(self) -> api.Limits:
        return api.Limits(max_body_bytes=self.max_body_bytes, max_flows=self.max_flows)


def _metrics():
    from ray.serve import metrics

    return {
        "flows": metrics.Counter("nadray_flows_scored", description="flows scored"),
        "anomalies": metrics.Counter("nadray_anomalies_flagged", description="flows with score >= threshold"),
        "evictions": metrics.Counter("nadray_context_evictions", description="entity contexts evicted (LRU)"),
        "entities": metrics.Gauge("nadray_entities_held", description="entity contexts held by this shard"),
        "swaps": metrics.Counter("nadray_model_swaps", description="model versions activated"),
    }


def _set_torch_threads(n: int) -> None:
    try:
        import torch

        torch.set_num_threads(max(1, n))
    except ImportError:  # pragma: no cover
        pass


def _record(m: dict, core: ShardCore, tables: list[pa.Table]) -> None:
    """Metrics after one scored batch (a shard, or the ingress in single-shard mode)."""
    m["flows"].inc(sum(t.num_rows for t in tables))
    if core.new_anomalies:
        m["anomalies"].inc(core.new_anomalies)
    if core.new_evictions:
        m["evictions"].inc(core.new_evictions)
    m["entities"].set(len(core.context))


def _build_deployments():
    """Define the deployment classes lazily (no Ray import at module import)."""
    from ray import serve

    @serve.deployment(health_check_period_s=5)
    class ScorerShard:
        """Scores the flows of the entities it owns, batching callers into one forward pass."""

        async def __init__(self, model_ref: str, shard: int, num_shards: int, max_entities: int,
                           max_batch_size: int, batch_wait_timeout_s: float, torch_threads: int = 1):
            _set_torch_threads(torch_threads)
            registry_uri, _ = split_ref(model_ref)
            scorer = await asyncio.to_thread(load_scorer, model_ref)
            self.core = ShardCore(scorer, shard, num_shards, max_entities, registry_uri=registry_uri)
            self._score_batch.set_max_batch_size(max_batch_size)
            self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
            self.m = _metrics()
            event("shard_ready", shard=shard, shards=num_shards, version=self.core.version)

        def reconfigure(self, user_config: dict) -> None:
            self.core.set_threshold((user_config or {}).get("threshold"))

        async def score(self, flows: pa.Table) -> dict:
            return await self._score_batch(flows)

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
        async def _score_batch(self, tables: list[pa.Table]) -> list[dict]:
            answers = await self.core.score_many(tables)
            _record(self.m, self.core, tables)
            return answers

        async def info(self) -> dict:
            return self.core.info()

        async def prepare(self, version: str) -> str:
            return await self.core.prepare(version)

        async def activate(self, version: str) -> bool:
            swapped = await self.core.activate(version)
            if swapped:
                self.m["swaps"].inc()
            return swapped

        def check_health(self) -> None:
            if self.core.scorer is None:
                raise RuntimeError("no scorer loaded")

    @serve.deployment(health_check_period_s=5)
    @serve.ingress()
    class Ingress:
        """HTTP in, flows routed to the shards of their entities, results merged in order.

        With no shard handles (``num_replicas`` 1) the ingress holds the ``ShardCore``
        itself and scores in process: no second deployment hop.
        """

        async def __init__(self, shards: list, args: dict):
            self.args = ServeArgs(**args)
            self.shards = shards
            self.registry_uri, self.pinned = split_ref(self.args.model)
            self.digest = api.effective_digest(self.args.api_token_sha256)
            self.info_: dict | None = None
            self.reload_lock = asyncio.Lock()
            # Multi-shard swaps: requests pass the gate, and the swap closes it and waits
            # for the requests already past it, so no answer mixes two models.
            self.gate = asyncio.Event()
            self.gate.set()
            self.in_flight = 0
            self.drained = asyncio.Condition()
            self.resync: asyncio.Task | None = None
            self.core: ShardCore | None = None
            if not shards:  # single-shard mode
                _set_torch_threads(int(self.args.replica_cpus))
                scorer = await asyncio.to_thread(load_scorer, self.args.model)
                self.core = ShardCore(scorer, 0, 1, self.args.max_entities, registry_uri=self.registry_uri)
                self._score_local.set_max_batch_size(self.args.max_batch_size)
                self._score_local.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
                self.m = _metrics()
                event("shard_ready", shard=0, shards=1, version=self.core.version, in_ingress=True)
            self.poller = None
            if self.pinned is None and self.args.poll_champion_s > 0:
                self.poller = asyncio.get_running_loop().create_task(self._poll())
            event("ingress_ready", shards=max(1, len(shards)), auth=self.digest is not None,
                  poll_champion_s=self.args.poll_champion_s)

        def __serve_build_asgi_app__(self):
            return api.create_api(self, self.args.limits(), self.digest)

        def reconfigure(self, user_config: dict) -> None:
            # Single-shard mode only (the ingress then carries the threshold user_config).
            if self.core is not None:
                self.core.set_threshold((user_config or {}).get("threshold"))

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
        async def _score_local(self, tables: list[pa.Table]) -> list[dict]:
            answers = await self.core.score_many(tables)
            _record(self.m, self.core, tables)
            return answers

        # -- backend protocol (nadray.serving.api.Backend) -------------------------
        async def _info(self, refresh: bool = False) -> dict:
            if self.core is not None:
                return self.core.info()
            if self.info_ is None or refresh:
                self.info_ = await self.shards[0].info.remote()
            return self.info_

        async def score(self, flows: pa.Table) -> dict:
            n = flows.num_rows
            if self.core is not None:
                return await self._score_in_process(flows)
            info = await self._info()
            if n == 0:
                return {"model_version": info["version"], "threshold": info["threshold"], "results": []}
            await self.gate.wait()
            self.in_flight += 1
            try:
                answers, p = await self._score_shards(flows, info)
            finally:
                self.in_flight -= 1
                if self.in_flight == 0:
                    async with self.drained:
                        self.drained.notify_all()
            got = [a for a in answers if a is not None]
            entity, score = routing.merge(n, p, answers)
            versions = {a["model_version"] for a in got}
            if len(versions) > 1:
                # A shard restarted on a newer champion than its peers: never merge two
                # models' scores into one answer; the check below brings them in line.
                if self.resync is None or self.resync.done():
                    self.resync = asyncio.get_running_loop().create_task(
                        self._check_champion(reason="shards disagree", force=True))
                raise api.ApiError(503, f"shards answered with model versions {sorted(versions)}; "
                                        "they are being brought to one version: retry")
            version, threshold = got[0]["model_version"], got[0]["threshold"]
            if not np.all(np.isfinite(score)):
                raise RuntimeError("a flow was not scored by any shard")
            return {"model_version": version, "threshold": threshold,
                    "results": [{"entity": e, "score": float(s), "is_anomaly": bool(s >= threshold)}
                                for e, s in zip(entity, score.tolist())]}

        async def _score_shards(self, flows: pa.Table, info: dict) -> tuple[list, Any]:
            p = routing.plan(flows, len(self.shards), info["local_networks"])
            parts = p.take(flows)
            try:
                calls = [self.shards[i].score.remote(t) if t is not None else None for i, t in enumerate(parts)]
                return [await c if c is not None else None for c in calls], p
            except NadrayError as e:  # the scorer's own one-line verdict on a record
                raise api.ApiError(422, str(e)) from None

        async def _score_in_process(self, flows: pa.Table) -> dict:
            core = self.core
            if flows.num_rows == 0:
                return {"model_version": core.version, "threshold": core.threshold, "results": []}
            try:
                ans = await self._score_local(flows)
            except NadrayError as e:  # the scorer's own one-line verdict on a record
                raise api.ApiError(422, str(e)) from None
            threshold = ans["threshold"]
            return {"model_version": ans["model_version"], "threshold": threshold,
                    "results": [{"entity": e, "score": s, "is_anomaly": s >= threshold}
                                for e, s in zip(ans["entity"], ans["score"].tolist())]}

        async def model_info(self) -> dict:
            info = await self._info(refresh=True)
            meta = info.get("meta") or {}
            return {"version": info["version"], "threshold": info["threshold"], "model": self.args.model,
                    "shards": max(1, len(self.shards)),
                    "trained_on": meta.get("data_range") or meta.get("trained_on") or meta.get("data"),
                    "metrics": meta.get("metrics"), "created_at": meta.get("created_at")}

        async def healthy(self) -> dict:
            info = await self._info()
            return {"status": "ok", "version": info["version"]}

        async def reload(self) -> dict:
            return await self._check_champion(reason="admin")

        # -- model updates ----------------------------------------------------------------
        async def _check_champion(self, reason: str, force: bool = False) -> dict:
            """Swap to the registry's champion if it changed; ``force``: send every shard to it
            even if the first shard already serves it (a restarted shard may not)."""
            async with self.reload_lock:
                current = (await self._info())["version"]
                if self.pinned is not None:
                    return {"version": current, "changed": False, "reason": "model pinned to a version"}
                latest = await asyncio.to_thread(champion_version, self.registry_uri)
                if latest is None or (latest == current and not (force and self.shards)):
                    return {"version": current, "changed": False}
                if self.core is not None:  # in process: load while serving, swap between batches
                    await self.core.prepare(latest)
                    if await self.core.activate(latest):
                        self.m["swaps"].inc()
                    event("champion_changed", old=current, new=latest, reason=reason)
                    return {"version": latest, "changed": True, "previous": current}
                # Two phases: every shard loads in the background while serving; then the
                # gate holds new requests, the ones in flight finish, and all shards switch,
                # so no answer mixes two versions (requests wait one RPC, none fails).
                await asyncio.gather(*(s.prepare.remote(latest) for s in self.shards))
                self.gate.clear()
                try:
                    async with self.drained:
                        await self.drained.wait_for(lambda: self.in_flight == 0)
                    await asyncio.gather(*(s.activate.remote(latest) for s in self.shards))
                    await self._info(refresh=True)
                finally:
                    self.gate.set()
                event("champion_changed", old=current, new=latest, reason=reason)
                return {"version": latest, "changed": latest != current, "previous": current}

        async def _poll(self) -> None:
            while True:
                await asyncio.sleep(self.args.poll_champion_s)
                try:
                    await self._check_champion(reason="poll")
                except Exception as e:  # a registry hiccup must not stop polling or serving
                    event("champion_poll_failed", error=f"{type(e).__name__}: {str(e)[:200]}")

        def check_health(self) -> None:
            if self.core is not None and self.core.scorer is None:
                raise RuntimeError("no scorer loaded")

    @serve.deployment
    @serve.ingress()
    class NoopIngress:
        """Baseline for benchmarks: the same HTTP path (proxy, replica, FastAPI, token, body
        read and parse) with no model: every flow scores 0."""

        async def __init__(self, args: dict):
            self.args = ServeArgs(**args)

        def __serve_build_asgi_app__(self):
            return api.create_api(self, self.args.limits(), api.effective_digest(self.args.api_token_sha256),
                                  title="nadray-noop")

        async def score(self, flows: pa.Table) -> dict:
            return {"model_version": "noop", "threshold": 1.0,
                    "results": [{"entity": None, "score": 0.0, "is_anomaly": False}] * flows.num_rows}

        async def model_info(self) -> dict:
            return {"version": "noop", "threshold": 1.0}

        async def healthy(self) -> dict:
            return {"status": "ok", "version": "noop"}

        async def reload(self) -> dict:
            return {"version": "noop", "changed": False}

    return ScorerShard, Ingress, NoopIngress


def _as_args(args: ServeArgs | dict) -> ServeArgs:
    args = args if isinstance(args, ServeArgs) else ServeArgs(**args)
    if args.api_token_sha256 is None and os.environ.get(api.TOKEN_ENV):
        args = args.model_copy(update={"api_token_sha256": api.token_digest(os.environ[api.TOKEN_ENV])})
    return args


def build_app(args: ServeArgs | dict):
    """The nadray Serve application: one ingress and ``num_replicas`` scorer shards.

    With ``num_replicas`` 1 (the default) there is no shard deployment: the ingress
    scores in process (one hop fewer: ~20 ms of p50 on a loaded 2-core machine).
    """
    args = _as_args(args)
    ScorerShard, Ingress, _ = _build_deployments()
    logging_config = {"enable_access_log": False, "log_level": "WARNING"}
    ongoing = max(2 * args.max_batch_size, 32)  # RAY.md: above max_batch_size or batches never fill
    if args.num_replicas == 1:
        return Ingress.options(
            name="ingress", num_replicas=1, max_ongoing_requests=max(ongoing, 256),
            ray_actor_options={"num_cpus": args.ingress_cpus + args.replica_cpus},
            user_config={"threshold": args.threshold}, logging_config=logging_config,
        ).bind([], args.model_dump())
    shards = [
        ScorerShard.options(
            name=f"scorer-{i}", num_replicas=1, max_ongoing_requests=ongoing,
            ray_actor_options={"num_cpus": args.replica_cpus},
            user_config={"threshold": args.threshold}, logging_config=logging_config,
        ).bind(args.model, i, args.num_replicas, args.max_entities, args.max_batch_size,
               args.batch_wait_timeout_s, max(1, int(args.replica_cpus)))
        for i in range(args.num_replicas)
    ]
    return Ingress.options(
        name="ingress", num_replicas=1, max_ongoing_requests=max(ongoing, 256),
        ray_actor_options={"num_cpus": args.ingress_cpus}, logging_config=logging_config,
    ).bind(shards, args.model_dump())


def noop_app(args: ServeArgs | dict | None = None):
    """A no-op application on the same ingress path, the baseline a benchmark measures against."""
    args = _as_args(args if args is not None else ServeArgs(model="noop"))
    _, _, NoopIngress = _build_deployments()
    return NoopIngress.options(
        name="noop", max_ongoing_requests=256, ray_actor_options={"num_cpus": args.ingress_cpus},
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    ).bind(args.model_dump())


def run_serve(model_ref: str, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, cfg=None,
              app=None) -> None:
    """``nadray serve``: start or join Ray, deploy, print the URL, serve until SIGINT/SIGTERM."""
    from ray import serve

    from nadray.config import Config
    from nadray.runtime import ensure_ray

    cfg = cfg or Config()
    args = ServeArgs.from_config(model_ref, cfg.serve, replicas)
    stop = threading.Event()
    previous: dict = {}
    try:
        ensure_ray()
        # After ray.init, which installs its own SIGTERM handler in the driver.
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        serve.start(http_options={"host": host, "port": port})
        t0 = time.time()
        serve.run(app if app is not None else build_app(args), name=APP_NAME, route_prefix="/",
                  logging_config={"enable_access_log": False, "log_level": "WARNING"})
        auth = "on" if os.environ.get(api.TOKEN_ENV) else "off"
        print(f"nadray serve: {model_ref} on http://{host}:{port}/ ({replicas} shard(s), token auth {auth}, "
              f"ready in {time.time() - t0:.1f}s); docs at /docs; Ctrl-C or SIGTERM stops", flush=True)
        while not stop.wait(0.5):
            pass
        print("nadray serve: stopping", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
