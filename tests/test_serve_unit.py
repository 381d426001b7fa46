"""Serve logic without Ray: validation, auth, routing, the shard core (real Scorer), the HTTP app."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import requests
from _iot23 import read_capture, read_captures
from test_serve_support import REPLAY_CAPTURE, TRAIN_CAPTURES, free_port, records, register_model

from nadray import registry
from nadray.schema import TIME_ORDER
from nadray.serving import api, routing
from nadray.serving.app import ServeArgs
from nadray.serving.shard import ShardCore, split_ref

LIMITS = api.Limits(max_body_bytes=4096, max_flows=5)


@pytest.fixture(scope="module")
def model(shared_data, tmp_path_factory):
    reg = str(tmp_path_factory.mktemp("registry"))
    train = read_captures(shared_data, TRAIN_CAPTURES)
    v1, v2 = register_model(reg, train, seed=0), register_model(reg, train, seed=1)
    registry.promote(reg, v1, "test")
    flows = read_capture(shared_data, REPLAY_CAPTURE).sort_by([(c, "ascending") for c in TIME_ORDER]).slice(0, 200)
    return {"registry": reg, "v1": v1, "v2": v2, "flows": flows}


def _body(flows) -> bytes:
    return json.dumps({"flows": flows}).encode()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("value, expected", [
    ("2018-09-21T09:40:22.965530Z", 1537522822965530),
    ("2018-09-21T11:40:22.965530+02:00", 1537522822965530),
    ("2018-09-21T09:40:22.965530", 1537522822965530),
    (1537522822.96553, 1537522822965530),
    ("1537522822.96553", 1537522822965530),
    (0, 0),
])
def test_ts_accepts_iso_and_epoch_seconds(value, expected):
    assert api.parse_ts_us(value) == expected


@pytest.mark.parametrize("value", [True, None, "soon", float("nan"), float("inf"), -1, 5e9, [1], {"a": 1}])
def test_ts_rejects_other_values(value):
    with pytest.raises(ValueError):
        api.parse_ts_us(value)


def test_body_errors_name_the_field_and_never_echo_input():
    ok = {"ts": 1.5, "src_ip": "10.0.0.1", "dst_ip": "8.8.8.8", "proto": "TCP", "uid": "ignored"}
    recs = api.parse_score_body(_body([ok]), LIMITS)
    assert recs[0].proto == "tcp" and recs[0].ts == 1_500_000
    with pytest.raises(api.ApiError) as e:
        api.parse_score_body(_body([ok, ok, ok, {**ok, "src_bytes": -5, "src_ip": ""}]), LIMITS)
    assert e.value.status == 422 and e.value.detail.startswith("flows[3].src_ip:") and "flows[3].src_bytes" in e.value.detail
    cases = [
        (b"\xff", 400), (b"{", 400), (b"[" * 3000, 400), (b"[]", 422), (b"{}", 422),
        (b'{"flows": {}}', 422), (_body([ok] * 6), 413), (b" " * 5000, 413),
    ]
    for body, status in cases:
        with pytest.raises(api.ApiError) as e:
            api.parse_score_body(body, LIMITS)
        assert e.value.status == status, (body[:20], e.value.detail)
    with pytest.raises(api.ApiError) as e:
        api.parse_score_body(_body([{**ok, "label_detail": "PAYLOAD-123", "label": 7}]), LIMITS)
    assert "flows[0].label" in e.value.detail and "PAYLOAD-123" not in e.value.detail


def test_records_to_table_defaults_source_and_numbers_rows():
    recs = api.parse_score_body(_body([
        {"ts": 1, "src_ip": "a", "dst_ip": "b", "proto": "udp"},
        {"ts": 2, "src_ip": "a", "dst_ip": "b", "proto": "udp", "source": "s", "source_row": 9},
        {"ts": 3, "src_ip": "a", "dst_ip": "b", "proto": "udp", "local_orig": True},
    ]), LIMITS)
    t = api.records_to_table(recs, first_row=100)
    assert t.column("source").to_pylist() == ["http", "s", "http"]
    assert t.column("source_row").to_pylist() == [100, 9, 101]
    assert t.column("flows").to_pylist() == [1, 1, 1] and t.column("local_orig").to_pylist() == [None, None, True]
    assert t.schema.field("ts").type == pa.timestamp("us", tz="UTC")


def test_token_check():
    d = api.token_digest("tok")
    assert api.authorized("Bearer tok", d)
    assert not api.authorized("Bearer tok2", d) and not api.authorized(None, d) and not api.authorized("tok", d)
    assert api.authorized(None, None)


def test_serve_args_from_config_and_refs():
    from nadray.config import Config

    args = ServeArgs.from_config("/r@v", Config().serve, replicas=3)
    assert args.num_replicas == 3 and args.max_batch_size == 64
    with pytest.raises(Exception):
        ServeArgs(model="/r", unknown=1)
    assert split_ref("s3://b/reg") == ("s3://b/reg", None)
    assert split_ref("s3://b/reg@champion") == ("s3://b/reg", None)
    assert split_ref("/x/reg@20261126T181500Z-3fa9c1") == ("/x/reg", "20261126T181500Z-3fa9c1")


def test_apps_build_without_a_cluster():
    from nadray.serve import build_app, noop_app

    app = build_app(ServeArgs(model="/reg", num_replicas=2))
    assert type(app).__name__ == "Application"
    assert type(noop_app()).__name__ == "Application"


# --------------------------------------------------------------------------- routing


def test_routing_sends_two_entity_flows_to_both_owners():
    t = pa.table({"src_ip": ["10.0.0.1", "10.0.0.1", "8.8.8.8", "0.0.0.0"],
                  "dst_ip": ["10.0.0.2", "8.8.8.8", "10.0.0.2", "255.255.255.255"]})
    nets = ["10.0.0.0/8"]
    p = routing.plan(t, 4, nets)
    owners = {e: routing.shard_of(e, 4) for e in ["10.0.0.1", "10.0.0.2", "0.0.0.0", "255.255.255.255"]}
    for row, ents in enumerate([["10.0.0.1", "10.0.0.2"], ["10.0.0.1"], ["10.0.0.2"], ["0.0.0.0", "255.255.255.255"]]):
        got = {s for s in range(4) if row in p.rows[s]}
        assert got == {owners[e] for e in ents}
    # Merge: the highest score per flow wins, with its entity.
    p = routing.Plan([np.array([0, 1]), np.array([0, 2])])
    ents, s = routing.merge(3, p, [{"entity": ["a", "b"], "score": [1.0, 2.0]}, {"entity": ["c", "d"], "score": [3.0, 0.5]}])
    assert ents == ["c", "b", "d"] and s.tolist() == [3.0, 2.0, 0.5]


# --------------------------------------------------------------------------- shard core


def _replay(cores, flows, chunk=20):
    nets = cores[0].info()["local_networks"]
    scores, ents = [], []

    async def run():
        for lo in range(0, flows.num_rows, chunk):
            t = flows.slice(lo, chunk)
            p = routing.plan(t, len(cores), nets)
            ans = [(await c.score_many([x]))[0] if x is not None else None for c, x in zip(cores, p.take(t))]
            e, s = routing.merge(t.num_rows, p, ans)
            ents.extend(e)
            scores.extend(s.tolist())

    asyncio.run(run())
    return ents, np.asarray(scores)


def test_shards_give_batch_scores(model):
    from nadray.scorer import Scorer

    batch = Scorer.from_ref(model["registry"]).score_table(model["flows"])
    for k in (1, 3):
        cores = [ShardCore(Scorer.from_ref(model["registry"]), i, k, 10_000) for i in range(k)]
        ents, scores = _replay(cores, model["flows"])
        np.testing.assert_allclose(scores, batch["score"].to_numpy(), atol=1e-4, rtol=0)
        assert ents == batch["entity"].tolist()
        held = [set(c.context.entities()) for c in cores]
        assert sum(len(h) for h in held) == len(set().union(*held))  # each entity lives on one shard


def test_callers_in_one_batch_equal_sequential_calls(model):
    from nadray.scorer import Scorer

    flows = model["flows"]
    a, b = ShardCore(Scorer.from_ref(model["registry"])), ShardCore(Scorer.from_ref(model["registry"]))
    one = asyncio.run(a.score_many([flows.slice(0, 30), flows.slice(30, 30)]))
    seq = [asyncio.run(b.score_many([flows.slice(0, 30)]))[0], asyncio.run(b.score_many([flows.slice(30, 30)]))[0]]
    for x, y in zip(one, seq):
        np.testing.assert_allclose(x["score"], y["score"], atol=1e-9)


def test_lru_evictions_counted(model):
    from nadray.scorer import Scorer

    core = ShardCore(Scorer.from_ref(model["registry"]), max_entities=2)
    asyncio.run(core.score_many([model["flows"]]))
    assert len(core.context) == 2 and core.context.evictions > 0 and core.new_evictions == core.context.evictions


def test_swap_and_threshold_override(model):
    from nadray.scorer import Scorer

    core = ShardCore(Scorer.from_ref(model["registry"]), registry_uri=model["registry"])
    base = core.threshold
    core.set_threshold(123.0)
    asyncio.run(core.score_many([model["flows"].slice(0, 10)]))
    assert len(core.context) > 0
    assert asyncio.run(core.activate(model["v2"])) is True
    assert core.version == model["v2"] and core.threshold == 123.0 and len(core.context) == 0
    assert asyncio.run(core.activate(model["v2"])) is False
    core.set_threshold(None)
    assert core.threshold == core.base_threshold and core.base_threshold != base


# --------------------------------------------------------------------------- the HTTP app (uvicorn, no Ray)


class FakeBackend:
    def __init__(self):
        self.tables = []

    async def score(self, flows):
        self.tables.append(flows)
        return {"model_version": "v", "threshold": 1.0,
                "results": [{"entity": s, "score": 0.5, "is_anomaly": False} for s in flows.column("src_ip").to_pylist()]}

    async def model_info(self):
        return {"version": "v", "threshold": 1.0}

    async def reload(self):
        return {"version": "v", "changed": False}

    async def healthy(self):
        return {"status": "ok", "version": "v"}


@pytest.fixture(scope="module")
def http_app():
    import uvicorn

    backend = FakeBackend()
    app = api.create_api(backend, api.Limits(max_body_bytes=2048, max_flows=3), api.token_digest("tok"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(url + "/healthz", timeout=1)
            break
        except requests.RequestException:
            time.sleep(0.05)
    yield url, backend
    server.should_exit = True
    t.join(5)


def test_http_app_contract(http_app):
    url, backend = http_app
    auth = {"Authorization": "Bearer tok"}
    rec = {"ts": "2020-01-01T00:00:00Z", "src_ip": "10.0.0.1", "dst_ip": "1.1.1.1", "proto": "tcp"}
    assert requests.post(url + "/score", json={"flows": [rec]}, timeout=5).status_code == 401
    r = requests.post(url + "/score", json={"flows": [rec, rec]}, headers=auth, timeout=5)
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    assert backend.tables[-1].column("source_row").to_pylist() == [0, 1]
    zeek = {"ts": 1577836800.5, "uid": "C1", "id.orig_h": "10.0.0.2", "id.orig_p": 5353, "id.resp_h": "1.1.1.1",
            "id.resp_p": 53, "proto": "udp", "orig_bytes": 40, "resp_bytes": 0, "conn_state": "S0"}
    r = requests.post(url + "/score", json={"flows": [zeek]}, headers=auth, timeout=5)
    assert r.status_code == 200 and len(r.json()["results"]) == 1
    sent = backend.tables[-1].to_pylist()[0]
    assert (sent["src_ip"], sent["dst_port"], sent["src_bytes"], sent["conn_state"]) == ("10.0.0.2", 53, 40, "S0")
    r = requests.post(url + "/score", json={"flows": [rec, {**rec, "proto": ""}]}, headers=auth, timeout=5)
    assert r.status_code == 422 and r.json()["detail"].startswith("flows[1].proto:")
    assert requests.post(url + "/score", json={"flows": [rec] * 4}, headers=auth, timeout=5).status_code == 413
    r = requests.post(url + "/score", data=b"x" * 10, headers={**auth, "Content-Length": "999999"}, timeout=5)
    assert r.status_code in (413, 400)
    assert requests.post(url + "/score", data=b"x" * 3000, headers=auth, timeout=5).status_code == 413
    spec = requests.get(url + "/openapi.json", headers=auth, timeout=5).json()
    ref = spec["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.rsplit("/", 1)[-1] in spec["components"]["schemas"] and "FlowRecord" in spec["components"]["schemas"]


def test_zeek_conn_json_records_are_read_as_ingest_reads_them(shared_data):
    """A client can forward Zeek's conn.log JSON as it is: the request holds exactly the flows
    ingest makes of the same records (so online scores equal batch scores for them too)."""
    from nadray.ingest import read_input

    path = shared_data / "stratosphere_slips_testdata" / "test9-mixed-zeek-dir" / "conn.log"  # Zeek JSON
    lines = [ln for ln in path.read_bytes().splitlines() if ln.strip()]
    got = api.records_to_table(api.parse_score_body(b'{"flows": [' + b",".join(lines) + b"]}",
                                                    api.Limits(max_flows=len(lines))), first_row=0)
    want = read_input(str(path)).flows
    assert got.num_rows == want.num_rows == 576
    assert got.drop_columns(["source"]).equals(want.drop_columns(["source"]))
    assert want["service"].null_count > 0  # "service": "" among them, unset as ingest has it
    with pytest.raises(api.ApiError, match=r"flows\[0\]\.src_ip: Field required"):
        api.parse_score_body(_body([{"ts": 1, "id.resp_h": "b", "proto": "tcp"}]), LIMITS)
