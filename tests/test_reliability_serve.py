"""Reliability: ``nadray serve`` (a real subprocess, as tests/test_serve.py runs it) under load and
with its replicas killed while a client loop scores.

One server for the module; replicas are found among the server's own descendant
processes (Ray names them ``ray::ServeReplica:nadray:<deployment>``) and SIGKILLed
by pid. Latencies are printed, not asserted.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import numpy as np
import pytest
import requests
from _iot23 import read_capture, read_captures
from test_serve_support import REPLAY_CAPTURE, TRAIN_CAPTURES, Served, records, register_model

from nadray import registry
from nadray.schema import TIME_ORDER

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def served(shared_data, tmp_path_factory):
    reg = str(tmp_path_factory.mktemp("registry"))
    train = read_captures(shared_data, TRAIN_CAPTURES)
    v1 = register_model(reg, train, seed=0)
    v2 = register_model(reg, train, seed=1)
    registry.promote(reg, v1, "test")
    flows = read_capture(shared_data, REPLAY_CAPTURE).sort_by([(c, "ascending") for c in TIME_ORDER]).slice(0, 400)
    s = Served(reg, tmp_path_factory.mktemp("serve"), replicas=2, overrides=["serve.poll_champion_s=0"])
    try:
        s.wait_ready()
        yield {"server": s, "registry": reg, "v1": v1, "v2": v2, "recs": records(flows)}
    finally:
        assert s.stop() in (0, -9), s.tail()


def _checked(r: requests.Response, n: int, version: str | None) -> None:
    """A 200 is never wrong: one result per flow, finite scores, the served version (None: any)."""
    body = r.json()
    assert version is None or body["model_version"] == version, body["model_version"]
    assert len(body["results"]) == n
    thr = body["threshold"]
    for res in body["results"]:
        assert math.isfinite(res["score"]) and res["is_anomaly"] == (res["score"] >= thr)


def _loop(server: Served, recs: list, version: str | None, seconds: float, out: dict, chunk: int = 10) -> None:
    """One client: POST ``chunk`` flows at a time for ``seconds``; status counts and latencies in ``out``."""
    deadline = time.time() + seconds
    i = 0
    while time.time() < deadline and out["n"] < 5000:
        batch = recs[(i * chunk) % len(recs):(i * chunk) % len(recs) + chunk] or recs[:chunk]
        i += 1
        t0 = time.perf_counter()
        try:
            r = server.post("/score", {"flows": batch}, timeout=20)
            status = r.status_code
        except requests.RequestException:
            status = "conn"
        out["lat"].append(time.perf_counter() - t0)
        out["n"] += 1
        out["status"][status] = out["status"].get(status, 0) + 1
        if status == 200:
            _checked(r, len(batch), version)
            out["ok_after"].append(time.time())
            out["versions"].append(r.json()["model_version"])
        elif status == 503:
            out["detail_503"].append(r.json().get("detail", ""))


def _new_out() -> dict:
    return {"n": 0, "status": {}, "lat": [], "ok_after": [], "versions": [], "detail_503": []}


def test_concurrent_clients_no_5xx(served):
    """8 client threads for 10 s: every answer a correct 200; latency percentiles printed."""
    outs = [_new_out() for _ in range(8)]
    threads = [threading.Thread(target=_loop, args=(served["server"], served["recs"][k * 40:], served["v1"], 10.0, o))
               for k, o in enumerate(outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses: dict = {}
    for o in outs:
        for k, v in o["status"].items():
            statuses[k] = statuses.get(k, 0) + v
    lat = np.array([x for o in outs for x in o["lat"]]) * 1000
    n = int(sum(statuses.values()))
    print(f"\nload: 8 clients x 10 s, {n} requests ({n / 10:.0f}/s, 10 flows each), statuses {statuses}; "
          f"latency ms p50 {np.percentile(lat, 50):.1f} p95 {np.percentile(lat, 95):.1f} "
          f"p99 {np.percentile(lat, 99):.1f}")
    assert n > 0 and statuses == {200: n}, statuses


def _replica_pids(server: Served, deployment: str) -> list[int]:
    import psutil

    out = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if f"ServeReplica:nadray:{deployment}" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


@pytest.mark.parametrize("deployment", ["scorer-0", "ingress"])
def test_killed_replica_recovers_failures_bounded(served, deployment):
    server, version = served["server"], served["v1"]
    pids = _replica_pids(server, deployment)
    assert len(pids) == 1, f"replica of {deployment} not found among the server's processes: {pids}"
    out = _new_out()
    t = threading.Thread(target=_loop, args=(server, served["recs"], version, 20.0, out))
    t.start()
    time.sleep(2.0)
    killed_at = time.time()
    os.kill(pids[0], signal.SIGKILL)  # a descendant of the server this test started
    t.join(90)
    assert not t.is_alive()
    n, ok = out["n"], out["status"].get(200, 0)
    failed = n - ok
    after = [x for x in out["ok_after"] if x > killed_at]
    recovered = (min(after) - killed_at) if after else None
    print(f"\nkill {deployment}: {n} requests, statuses {out['status']}, recovered in "
          f"{recovered if recovered is None else round(recovered, 1)} s")
    assert after, f"no successful request after killing {deployment}:\n{server.tail()}"
    assert failed <= 0.2 * n, out["status"]
    # Only client-visible errors that say the server had a problem; never a 4xx for a good request.
    assert set(out["status"]) <= {200, 500, 502, 503, 504, "conn"}, out["status"]
    new = _replica_pids(server, deployment)
    assert len(new) == 1 and new != pids, (pids, new)
    assert requests.get(server.url + "/healthz", timeout=10).json()["version"] == version


def _across_shards(recs: list, num_shards: int = 2) -> list:
    """Each record twice, interleaved: as it is, and with its local host renamed to one that
    lives on another shard, so that every request needs every shard's answer."""
    from nadray.serving.routing import shard_of

    host = recs[0]["src_ip"]
    other = next(h for h in (f"192.168.250.{i}" for i in range(1, 255))
                 if shard_of(h, num_shards) != shard_of(host, num_shards))
    out = []
    for r in recs:
        out.append(r)
        out.append({**r, **{k: other for k in ("src_ip", "dst_ip") if r.get(k) == host},
                    "source": r["source"] + "-copy"})
    return out


def _run(server: Served, recs: list, seconds: float, during) -> dict:
    out = _new_out()
    t = threading.Thread(target=_loop, args=(server, recs, None, seconds, out))
    t.start()
    try:
        time.sleep(2.0)
        during()
    finally:
        t.join(seconds + 60)
    assert not t.is_alive()
    return out


def test_swaps_and_a_restarted_shard_never_mix_two_models(served):
    """Runs last on this server. Every request needs both shards' answers.

    1. The champion changes and ``/admin/reload`` swaps both shards under load: every
       request answers 200, and versions go v1 -> v2 once, never back.
    2. The champion is rolled back to v1 without telling Serve, and shard 1 is killed:
       it restarts on v1 while shard 0 still serves v2. No 200 may merge the two
       (503 instead), and the ingress brings both shards to v1 by itself.
    """
    server, reg, v1, v2 = served["server"], served["registry"], served["v1"], served["v2"]
    recs = _across_shards(served["recs"][:100])
    r = server.post("/score", {"flows": recs[:2]})
    assert r.status_code == 200 and len({x["entity"] for x in r.json()["results"]}) == 2, r.text

    def promote_and_reload():
        registry.promote(reg, v2, "test: swap under load")
        ans = server.post("/admin/reload").json()
        assert ans["changed"] and ans["version"] == v2, ans

    out = _run(server, recs, 6.0, promote_and_reload)
    print(f"\nswap under load: {out['n']} requests, statuses {out['status']}")
    assert out["n"] > 0 and out["status"] == {200: out["n"]}, out["status"]
    vs = out["versions"]
    assert vs[0] == v1 and vs[-1] == v2 and set(vs[vs.index(v2):]) == {v2}, "versions went back"

    pids = _replica_pids(server, "scorer-1")
    assert len(pids) == 1, pids

    def rollback_and_kill():
        registry.promote(reg, v1, "test: rollback that Serve is not told of")
        os.kill(pids[0], signal.SIGKILL)  # a descendant of the server this test started

    out = _run(server, recs, 25.0, rollback_and_kill)
    print(f"restarted shard on another champion: {out['n']} requests, statuses {out['status']}, "
          f"503s: {out['detail_503'][:1]}")
    assert set(out["status"]) <= {200, 500, 502, 503, 504, "conn"}, out["status"]
    vs = out["versions"]
    assert vs and vs[-1] == v1, f"the shards were not brought back to one version: {vs[-5:]}"
    assert v2 not in vs[vs.index(v1):], "a v2 answer after v1 answers"
    assert server.get("/model").json()["version"] == v1
