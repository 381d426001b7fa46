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
    v1 = register_model(reg, read_captures(shared_data, TRAIN_CAPTURES), seed=0)
    registry.promote(reg, v1, "test")
    flows = read_capture(shared_data, REPLAY_CAPTURE).sort_by([(c, "ascending") for c in TIME_ORDER]).slice(0, 400)
    s = Served(reg, tmp_path_factory.mktemp("serve"), replicas=2, overrides=["serve.poll_champion_s=0"])
    try:
        s.wait_ready()
        yield {"server": s, "v1": v1, "recs": records(flows)}
    finally:
        assert s.stop() in (0, -9), s.tail()


def _checked(r: requests.Response, n: int, version: str) -> None:
    """A 200 is never wrong: one result per flow, finite scores, the served version."""
    body = r.json()
    assert body["model_version"] == version, body["model_version"]
    assert len(body["results"]) == n
    thr = body["threshold"]
    for res in body["results"]:
        assert math.isfinite(res["score"]) and res["is_anomaly"] == (res["score"] >= thr)


def _loop(server: Served, recs: list, version: str, seconds: float, out: dict, chunk: int = 10) -> None:
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


def _new_out() -> dict:
    return {"n": 0, "status": {}, "lat": [], "ok_after": []}


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
