"""Ray Serve end to end: ``nadray serve`` as a subprocess, real HTTP on loopback.

Two servers for the whole module (each starts its own embedded Ray): one shard
with a token and fast champion polling, and two shards without a token.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from _iot23 import read_capture, read_captures
from test_serve_support import REPLAY_CAPTURE, TRAIN_CAPTURES, Served, records, register_model, replay

from nadray import registry
from nadray.schema import TIME_ORDER

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def model(shared_data, tmp_path_factory):
    """A registry with two versions, the first promoted; the replay capture and its batch scores."""
    from nadray.scorer import Scorer

    reg = str(tmp_path_factory.mktemp("registry"))
    train = read_captures(shared_data, TRAIN_CAPTURES)
    v1 = register_model(reg, train, seed=0)
    v2 = register_model(reg, train, seed=1)
    registry.promote(reg, v1, "test: first")
    flows = read_capture(shared_data, REPLAY_CAPTURE).sort_by([(c, "ascending") for c in TIME_ORDER]).slice(0, 300)
    batch = Scorer.from_ref(f"{reg}@{v1}").score_table(flows)
    return {"registry": reg, "v1": v1, "v2": v2, "flows": flows, "batch": batch}


@pytest.fixture(scope="module")
def one_shard(model, tmp_path_factory):
    s = Served(model["registry"], tmp_path_factory.mktemp("serve1"), replicas=1, token=TOKEN,
               overrides=["serve.poll_champion_s=1", "serve.max_flows=500", "serve.max_body_bytes=65536"])
    try:
        yield s.wait_ready()
    finally:
        rc = s.stop()
        assert rc == 0, f"nadray serve exited {rc} on SIGTERM:\n{s.tail()}"


@pytest.fixture(scope="module")
def two_shards(model, tmp_path_factory):
    # Pinned to v1 (REF@VERSION): the swap test promotes v2 on the same registry.
    s = Served(f"{model['registry']}@{model['v1']}", tmp_path_factory.mktemp("serve2"), replicas=2,
               overrides=["serve.poll_champion_s=0"])
    try:
        yield s.wait_ready()
    finally:
        assert s.stop() == 0, s.tail()


def test_token_required_except_healthz(one_shard):
    url = one_shard.url
    import requests

    body = {"flows": []}
    assert requests.post(url + "/score", json=body, timeout=10).status_code == 401
    wrong = requests.post(url + "/score", json=body, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and "nope" not in wrong.text
    assert requests.get(url + "/model", timeout=10).status_code == 401
    assert requests.get(url + "/openapi.json", timeout=10).status_code == 401
    assert requests.post(url + "/admin/reload", timeout=10).status_code == 401
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    assert one_shard.post("/score", body).status_code == 200


def test_replay_equals_batch_scoring(one_shard, model):
    ents, scores, versions = replay(one_shard, model["flows"], chunk=20)
    batch = model["batch"]
    assert versions == {model["v1"]}
    np.testing.assert_allclose(scores, batch["score"].to_numpy(), atol=1e-4, rtol=0)
    assert ents == batch["entity"].tolist()


def test_malformed_record_names_the_field(one_shard, model):
    recs = records(model["flows"].slice(0, 5))
    recs[3]["ts"] = "yesterday-ish"
    r = one_shard.post("/score", {"flows": recs})
    assert r.status_code == 422 and r.json()["detail"].startswith("flows[3].ts:"), r.text
    del recs[3]["ts"]
    r = one_shard.post("/score", {"flows": recs})
    assert r.status_code == 422 and "flows[3].ts" in r.json()["detail"]
    recs = records(model["flows"].slice(0, 2))
    recs[1]["dst_port"] = 70000
    r = one_shard.post("/score", {"flows": recs})
    assert r.status_code == 422 and r.json()["detail"].startswith("flows[1].dst_port:"), r.text


@pytest.mark.parametrize("data, status", [
    (b"not json", 400), (b"\xff\xfe{", 400), (b"[" * 100_000 + b"]" * 100_000, 413), (b"[" * 20_000, 400),
    (b'{"flows": 3}', 422), (b"[]", 422), (b'{"flows": [[[[[[[[[[[[1]]]]]]]]]]]]}', 422),
])
def test_bad_bodies_are_4xx(one_shard, data, status):
    r = one_shard.post("/score", data=data, headers={"Content-Type": "application/json"})
    assert r.status_code == status, (data[:30], r.status_code, r.text[:200])


def test_oversized_body_and_too_many_flows_are_413(one_shard, model):
    rec = {"ts": 1, "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "proto": "tcp"}
    r = one_shard.post("/score", {"flows": [rec] * 501})
    assert r.status_code == 413 and "flows" in r.json()["detail"]
    big = b'{"flows": [' + b" " * 70_000 + b"]}"
    assert one_shard.post("/score", data=big).status_code == 413

    def chunks():  # no Content-Length: the bytes actually read are counted
        for _ in range(20):
            yield b" " * 8192

    assert one_shard.post("/score", data=chunks()).status_code == 413


def test_model_and_docs(one_shard, model):
    info = one_shard.get("/model").json()
    assert info["version"] == model["v1"] and np.isfinite(info["threshold"])
    assert info["trained_on"]["rows"] > 0 and "metrics" in info
    spec = one_shard.get("/openapi.json").json()
    assert "/score" in spec["paths"] and "FlowRecord" in spec["components"]["schemas"]
    assert one_shard.get("/docs").status_code == 200


def test_swap_to_new_champion_under_load_fails_no_request(one_shard, model):
    """Runs last on this server: promotes v2 while a client loop scores steadily."""
    recs = records(model["flows"].slice(0, 10))
    statuses, versions, stop = [], [], threading.Event()

    def loop():
        while not stop.is_set() and len(statuses) < 2000:
            r = one_shard.post("/score", {"flows": recs}, timeout=30)
            statuses.append(r.status_code)
            if r.status_code == 200:
                versions.append(r.json()["model_version"])

    t = threading.Thread(target=loop)
    t.start()
    try:
        time.sleep(1.0)
        registry.promote(model["registry"], model["v2"], "test: swap")
        deadline = time.time() + 30  # polled every 1 s; the load takes well under a second
        while time.time() < deadline and (not versions or versions[-1] != model["v2"]):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        t.join(60)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert versions[0] == model["v1"] and versions[-1] == model["v2"]
    # Versions never flip back: the swap is atomic between batches.
    first_v2 = versions.index(model["v2"])
    assert set(versions[first_v2:]) == {model["v2"]}
    assert one_shard.get("/model").json()["version"] == model["v2"]
    r = one_shard.post("/admin/reload")
    assert r.status_code == 200 and r.json() == {"version": model["v2"], "changed": False}


def test_two_shards_route_each_entity_to_one_context(two_shards, model):
    ents, scores, versions = replay(two_shards, model["flows"], chunk=20)
    batch = model["batch"]
    assert versions == {model["v1"]}
    np.testing.assert_allclose(scores, batch["score"].to_numpy(), atol=1e-4, rtol=0)
    assert ents == batch["entity"].tolist()
    assert two_shards.get("/model").json()["shards"] == 2
