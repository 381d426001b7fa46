"""Reliability: hostile input to the HTTP API, to ``read_input`` and in a checkpoint folder.

The HTTP app is the one Serve runs (``api.create_api``) around a backend that
does what the Serve ingress does with one shard (a real ``ShardCore`` with a real
Scorer), driven in-process through ASGI: no network, no Ray, many examples.
The text parsers are fuzzed in tests/test_ingest_fuzz.py; here ``read_input``
gets raw bytes with format auto-detection.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import os
import pickle
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nadray import registry
from nadray.errors import ModelError, NadrayError
from nadray.serving import api, routing

pytestmark = pytest.mark.timeout(180)

LIMITS = api.Limits(max_body_bytes=64 * 1024, max_flows=50)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


# --------------------------------------------------------------------------- the app, in-process


class ShardBackend:
    """``Ingress.score`` for one shard (nadray/serving/app.py), without Serve."""

    def __init__(self, core):
        self.core = core

    async def score(self, flows):
        from nadray.errors import NadrayError as _NE

        info = self.core.info()
        n = flows.num_rows
        if n == 0:
            return {"model_version": info["version"], "threshold": info["threshold"], "results": []}
        p = routing.plan(flows, 1, info["local_networks"])
        try:
            (ans,) = await self.core.score_many(p.take(flows))
        except _NE as e:
            raise api.ApiError(422, str(e)) from None
        entity, score = routing.merge(n, p, [ans])
        if not np.all(np.isfinite(score)):
            raise RuntimeError("a flow was not scored")
        thr = ans["threshold"]
        return {"model_version": ans["model_version"], "threshold": thr,
                "results": [{"entity": e, "score": float(s), "is_anomaly": bool(s >= thr)}
                            for e, s in zip(entity, score.tolist())]}

    async def model_info(self):
        return {"version": self.core.version}

    async def reload(self):
        return {"changed": False}

    async def healthy(self):
        return {"status": "ok"}


class Asgi:
    """A minimal ASGI client: one request, the status and the body; an escaped exception is a 500."""

    def __init__(self, app):
        self.app = app
        self.loop = asyncio.new_event_loop()

    def post(self, path: str, body: bytes, headers: list | None = None, content_length: bool = True):
        hdrs = [(b"content-type", b"application/json")] + (headers or [])
        if content_length:
            hdrs.append((b"content-length", str(len(body)).encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": hdrs, "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
        chunks = [body[i:i + 16384] for i in range(0, len(body), 16384)] or [b""]
        msgs = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        sent = []

        async def receive():
            return msgs.pop(0) if msgs else {"type": "http.disconnect"}

        async def send(m):
            sent.append(m)

        try:
            self.loop.run_until_complete(self.app(scope, receive, send))
        except Exception as e:  # what uvicorn would turn into a 500
            return 500, {"detail": f"unhandled {type(e).__name__}: {e}"}
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        try:
            return status, json.loads(data)
        except ValueError:
            return status, {"raw": data[:200]}


@pytest.fixture(scope="module")
def model(shared_data, tmp_path_factory):
    from _iot23 import read_captures
    from test_serve_support import TRAIN_CAPTURES, register_model

    reg = str(tmp_path_factory.mktemp("registry"))
    v1 = register_model(reg, read_captures(shared_data, TRAIN_CAPTURES[:2]), seed=0)
    registry.promote(reg, v1, "test")
    return {"registry": reg, "v1": v1}


@pytest.fixture(scope="module")
def client(model):
    from nadray.scorer import Scorer
    from nadray.serving.shard import ShardCore

    core = ShardCore(Scorer.from_ref(model["registry"]), max_entities=1000)
    c = Asgi(api.create_api(ShardBackend(core), LIMITS))
    yield c
    c.loop.close()


def _check_answer(status: int, doc: dict, n_flows: int | None, version: str) -> None:
    """Never 5xx; a 4xx says why in one line; a 200 has one finite result per flow."""
    assert status in (200, 400, 413, 422), (status, doc)
    if status == 200:
        assert doc["model_version"] == version and math.isfinite(doc["threshold"])
        if n_flows is not None:
            assert len(doc["results"]) == n_flows
        for r in doc["results"]:
            assert math.isfinite(r["score"]) and isinstance(r["is_anomaly"], bool)
    else:
        assert isinstance(doc.get("detail"), str) and "\n" not in doc["detail"], doc


GOOD = {"ts": "2018-10-25T12:00:00Z", "src_ip": "192.168.1.132", "dst_ip": "8.8.8.8", "proto": "udp",
        "src_port": 5353, "dst_port": 53, "duration": 0.1, "src_bytes": 40, "dst_bytes": 80,
        "src_pkts": 1, "dst_pkts": 1}

_HOSTILE = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, 4102444799.999, 4102444800.0]),
    st.text(max_size=40),
    st.sampled_from(["", " ", "NaN", "Infinity", "-1", "1e308", "1e400", "0x10", "\ud800", "\x00", "é" * 300,
                     "9999-12-31T23:59:59Z", "0001-01-01T00:00:00+14:00", "1969-12-31T23:59:59.999999Z",
                     "2099-12-31T23:59:59.999999-23:59", "2018-10-25T12:00:00+25:00", "::1", "10.0.0.1"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_FIELDS = ["ts", "src_ip", "dst_ip", "proto", "src_port", "dst_port", "duration", "src_bytes", "dst_bytes",
           "src_pkts", "dst_pkts", "conn_state", "service", "flows", "label", "label_detail", "source",
           "source_row", "local_orig", "local_resp"]


@st.composite
def _record(draw):
    rec = dict(GOOD)
    for name in draw(st.lists(st.sampled_from(_FIELDS), max_size=4, unique=True)):
        if draw(st.booleans()) and name in rec and name in ("ts", "src_ip", "dst_ip", "proto"):
            del rec[name]
        else:
            rec[name] = draw(_HOSTILE)
    return rec


@FUZZ
@given(recs=st.lists(_record(), min_size=0, max_size=8))
def test_fuzzed_records_never_5xx(client, model, recs):
    body = json.dumps({"flows": recs}, allow_nan=True).encode("utf-8", "surrogatepass")
    status, doc = client.post("/score", body)
    _check_answer(status, doc, len(recs), model["v1"])


@FUZZ
@given(doc=st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                        lambda kids: st.one_of(st.lists(kids, max_size=4),
                                               st.dictionaries(st.sampled_from(["flows", "ts", "x"] + _FIELDS),
                                                               kids, max_size=4)),
                        max_leaves=30))
def test_fuzzed_json_documents_never_5xx(client, model, doc):
    status, ans = client.post("/score", json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass"))
    _check_answer(status, ans, None, model["v1"])


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzzed_raw_bytes_never_5xx(client, model, data):
    status, ans = client.post("/score", data)
    _check_answer(status, ans, None, model["v1"])


def test_huge_nested_and_invalid_bodies(client, model):
    rec = json.dumps(GOOD).encode()
    cases = [
        (b'{"flows": [' + b",".join([rec] * 1000) + b"]}", 413, "body"),  # ~150 KB > 64 KiB
        (b'{"flows": [' + b",".join([rec] * 51) + b"]}", 413, "flows"),
        (b"[" * 60000 + b"]" * 2000, 400, "nested"),
        (b'{"flows": [{"ts": ' + b"[" * 30000 + b"]" * 30000 + b"}]}", 400, "nested"),
        (b'{"flows": [' + b"[" * 900 + b"]" * 900 + b"]}", 422, "flows[0]"),
        (b'{"flows": [{"src_ip": "\xff\xfe", "ts": 1}]}', 400, "UTF-8"),
        (b'{"flows": [{"src_ip": "\xed\xa0\x80", "ts": 1}]}', 400, "UTF-8"),  # an encoded surrogate
        (b"\xef\xbb\xbf" + b'{"flows": []}', 400, "JSON"),  # a BOM is not JSON
        (b"", 400, "JSON"),
    ]
    for body, status, needle in cases:
        got, doc = client.post("/score", body)
        assert got == status and needle in doc["detail"], (body[:40], got, doc)
    # Without Content-Length the bytes actually read are counted.
    got, doc = client.post("/score", b" " * (LIMITS.max_body_bytes + 1), content_length=False)
    assert got == 413
    got, doc = client.post("/score", b"{}", headers=[(b"content-length", b"99999999999999999999")])
    assert got == 413


@pytest.mark.parametrize("ts, ok", [
    (0, True), ("1970-01-01T00:00:00Z", True), (4102444799.999, True), ("2099-12-31T23:59:59Z", True),
    (-1, False), (-1e12, False), ("1969-12-31T23:59:59.999999Z", False), ("0001-01-01T00:00:00Z", False),
    ("0001-01-01T00:00:00+14:00", False), ("9999-12-31T23:59:59-23:59", False), (4102444800, False),
    (1e308, False), ("1e308", False), (-1e308, False), (2**70, False), (10**400, False), ("1e400", False),
    (5e-324, True),
])
def test_far_past_and_future_timestamps(client, model, ts, ok):
    body = json.dumps({"flows": [dict(GOOD, ts=ts)]}).encode()
    status, doc = client.post("/score", body)
    if ok:
        assert status == 200 and len(doc["results"]) == 1 and math.isfinite(doc["results"][0]["score"]), doc
    else:
        assert status == 422 and doc["detail"].startswith("flows[0].ts:"), (ts, status, doc)


@pytest.mark.parametrize("field", ["ts", "duration", "src_bytes", "src_port", "flows", "label", "source_row"])
@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_literals_name_the_field(client, model, field, literal):
    rec = json.dumps({k: v for k, v in GOOD.items() if k != field})[:-1].encode()
    body = b'{"flows": [' + rec + b', "' + field.encode() + b'": ' + literal + b"}]}"
    status, doc = client.post("/score", body)
    assert status == 422 and doc["detail"].startswith(f"flows[0].{field}:"), (status, doc)


def test_extreme_but_valid_values_score_finite(client, model):
    big = 2**63 - 1
    recs = [dict(GOOD, ts=0, duration=1e308, src_bytes=big, dst_bytes=big, src_pkts=big, dst_pkts=big,
                 flows=big, src_port=65535, dst_port=0, proto="x" * 1024, src_ip="é" * 1024),
            dict(GOOD, ts="2099-12-31T23:59:59.999999Z", duration=5e-324, src_bytes=0, label=1),
            dict(GOOD, ts=1540469303, src_ip="fe80::1", dst_ip="::ffff:10.0.0.1", proto="ICMP")]
    status, doc = client.post("/score", json.dumps({"flows": recs}).encode())
    _check_answer(status, doc, len(recs), model["v1"])
    assert status == 200, doc


# --------------------------------------------------------------------------- read_input on raw bytes


def _valid_zeek(shared_data) -> bytes:
    p = shared_data / "iot23_small_scenarios" / "CTU-Malware-Capture-44-1-labeled.csv"
    return b"\n".join(p.read_bytes().split(b"\n")[:40]) + b"\n"


def _read_or_refuse(tmp_path, data: bytes, name: str):
    """read_input never crashes: an InputError (one line, naming the file) or counts that add up."""
    from nadray.ingest import read_input

    path = tmp_path / name
    path.write_bytes(data)
    try:
        res = read_input(str(path))
    except NadrayError as e:
        msg = str(e)
        assert str(path) in msg and "\n" not in msg, msg
        return None
    assert res.read == res.flows.num_rows + res.quarantined, (res.read, res.flows.num_rows, res.quarantined)
    if res.flows.num_rows:
        assert res.flows.column("source").to_pylist() == [str(path)] * res.flows.num_rows
        rows = res.flows.column("source_row").to_pylist()
        assert len(set(rows)) == len(rows)
    return res


_PCAP_MAGIC = [b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d", b"\x0a\x0d\x0d\x0a"]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(kind=st.sampled_from(["garbage", "pcap", "gzip-cut", "gzip-garbage", "zeek-garbled"]),
       blob=st.binary(min_size=0, max_size=400), cut=st.floats(0, 1), magic=st.sampled_from(_PCAP_MAGIC))
def test_read_input_raw_bytes_auto_never_crashes(shared_data, tmp_path_factory, kind, blob, cut, magic):
    tmp = tmp_path_factory.mktemp("raw")
    zeek = _valid_zeek(shared_data)
    if kind == "garbage":
        data = blob
    elif kind == "pcap":  # a capture header, then random records
        data = magic + blob
    elif kind == "gzip-cut":
        z = gzip.compress(zeek)
        data = z[:max(2, min(len(z) - 1, int(len(z) * cut)))]  # cut=1.0 would keep it whole
    elif kind == "gzip-garbage":
        data = gzip.compress(blob)
    else:  # a valid file with a random slice overwritten
        i = int(len(zeek) * cut)
        data = zeek[:i] + blob + zeek[i + len(blob):]
    res = _read_or_refuse(tmp, data, "input.gz" if kind.startswith("gzip") else "input.bin")
    if kind == "gzip-cut" and res is not None:  # a truncated gzip is never read as if whole
        assert res.flows.num_rows < 39


def test_truncated_gzip_is_an_input_error(shared_data, tmp_path):
    z = gzip.compress(_valid_zeek(shared_data))
    for n in (2, 10, len(z) // 2, len(z) - 1):
        assert _read_or_refuse(tmp_path, z[:n], f"cut-{n}.csv.gz") is None


# --------------------------------------------------------------------------- tampered checkpoints


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_tampered_checkpoint_is_refused_and_never_unpickled(model, tmp_path):
    from safetensors.numpy import load as load_np
    from safetensors.numpy import save as save_np

    from nadray.scorer import Scorer

    src = registry.version_uri(model["registry"], model["v1"])
    marker = tmp_path / "unpickled-marker"

    def variant(name: str, mutate) -> str:
        reg = tmp_path / name
        vdir = reg / "nadray" / "versions" / model["v1"]
        shutil.copytree(src, vdir)
        mutate(vdir)
        return f"{reg}@{model['v1']}"

    raw = open(os.path.join(src, registry.WEIGHTS), "rb").read()
    header = int.from_bytes(raw[:8], "little") + 8
    rng = np.random.default_rng(0)
    refs = {}
    for pos in [0, 4, 9, header // 2, header - 1] + rng.integers(header, len(raw), 6).tolist() + [len(raw) - 1]:
        def flip(vdir, pos=pos):
            b = bytearray(raw)
            b[pos] ^= 0x01
            (vdir / registry.WEIGHTS).write_bytes(bytes(b))
        refs[f"flip-{pos}"] = variant(f"flip-{pos}", flip)

    def wrong_shape(vdir):
        t = load_np(raw)
        k = sorted(t)[0]
        t[k] = np.ascontiguousarray(t[k].reshape(-1)[:-1] if t[k].size > 1 else np.zeros(2, "float32"))
        (vdir / registry.WEIGHTS).write_bytes(save_np(t))
    refs["wrong-shape"] = variant("wrong-shape", wrong_shape)

    def truncated(vdir):
        (vdir / registry.WEIGHTS).write_bytes(raw[:len(raw) // 2])
    refs["truncated"] = variant("truncated", truncated)

    def pickled_weights(vdir):  # a pickle under the weights' name
        (vdir / registry.WEIGHTS).write_bytes(pickle.dumps(_Evil(str(marker))))
    refs["pickled-weights"] = variant("pickled-weights", pickled_weights)

    for name, ref in refs.items():
        with pytest.raises(ModelError) as e:
            Scorer.from_ref(ref)
        assert "\n" not in str(e.value), name

    # Extra pickles next to intact weights are ignored, never deserialised.
    def extra_pickles(vdir):
        import torch

        (vdir / "model.pt").write_bytes(pickle.dumps(_Evil(str(marker))))
        torch.save({"x": _Evil(str(marker))}, vdir / "state.pt")
        (vdir / "scaler.pkl").write_bytes(pickle.dumps(_Evil(str(marker))))
    s = Scorer.from_ref(variant("extra-pickles", extra_pickles))
    assert s.version == model["v1"]
    assert not marker.exists(), "a pickle in a checkpoint folder was executed"


@pytest.mark.parametrize("scale", [{"global": None, "entities": {}}, {"global": 1.0, "entities": {"h": None}},
                                   {"global": 1.0, "entities": {"h": -2.0}}, {"global": True, "entities": {}},
                                   ["not", "a", "dict"]])
def test_malformed_entity_scale_is_a_clear_model_error(model, tmp_path, scale):
    """checkpoint.json writes an undefined number as null (strict JSON): a diverged training's
    NaN scale must be refused when loading, not fail later as a TypeError while scoring."""
    from nadray.errors import NadrayError
    from nadray.scorer import Scorer

    vdir = tmp_path / "reg" / "nadray" / "versions" / model["v1"]
    shutil.copytree(registry.version_uri(model["registry"], model["v1"]), vdir)
    meta = json.loads((vdir / registry.META).read_text())
    meta["entity_scale"] = scale
    (vdir / registry.META).write_text(json.dumps(meta))
    with pytest.raises(NadrayError, match="'entity_scale' is malformed"):
        Scorer.from_ref(f"{tmp_path / 'reg'}@{model['v1']}")
