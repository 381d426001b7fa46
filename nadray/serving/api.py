"""The HTTP layer: request models, limits, authentication and the FastAPI app.

Nothing here knows about Ray. ``create_api(backend, limits)`` builds the FastAPI
app around a *backend* (the Serve ingress deployment in production, a plain
object in unit tests) with four coroutines:

- ``score(flows: pa.Table) -> dict``: ``{"model_version", "threshold", "results"}``;
- ``model_info() -> dict``: the ``GET /model`` answer;
- ``reload() -> dict``: check the champion now (``POST /admin/reload``);
- ``healthy() -> dict``: the ``GET /healthz`` answer.

Order of checks on ``POST /score`` (each before the next, so a hostile body
costs little): token, ``Content-Length``, bytes actually read, UTF-8 and JSON,
flow count, then each record with pydantic. Every user error is a 4xx JSON
answer ``{"detail": "..."}`` naming the field; nothing a client sends reaches a
5xx, and payloads are never logged or echoed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa
from fastapi import Request  # module level: route annotations are resolved from these globals
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from nadray.schema import FLOW_SCHEMA, MAX_TS_US, MIN_TS_US

log = logging.getLogger("nadray.serve")

TOKEN_ENV = "NADRAY_API_TOKEN"
# Paths a load balancer probes without credentials: liveness says nothing secret.
OPEN_PATHS = frozenset({"/healthz"})
DEFAULT_SOURCE = "http"
_INT32 = 2**31 - 1
_INT64 = 2**63 - 1


# --------------------------------------------------------------------------- request / response models


def _or_zeek(name: str, zeek: str) -> AliasChoices:
    """The canonical key, or Zeek conn.log's name for it (the mapping ingest uses, docs/INGEST.md)."""
    return AliasChoices(name, zeek)


class FlowRecord(BaseModel):
    """One flow in the canonical schema (DESIGN.md "Canonical flow record"), as JSON.

    A Zeek conn.log JSON record is one too, as Zeek writes it: ``id.orig_h``, ``id.resp_h``,
    ``id.orig_p``, ``id.resp_p``, ``orig_bytes``, ``resp_bytes``, ``orig_pkts`` and
    ``resp_pkts`` are read as the canonical fields they are ingested as; the other conn
    fields already carry the canonical names.
    """

    # Unknown keys (a Zeek ``uid``, ``history``) are ignored, not errors: clients
    # forward whatever their sensor emits.
    model_config = ConfigDict(extra="ignore", str_max_length=1024)

    ts: Any = Field(description="flow start: ISO 8601 (UTC if no offset) or epoch seconds")
    src_ip: str = Field(min_length=1, validation_alias=_or_zeek("src_ip", "id.orig_h"),
                        description="originator address or host id (Zeek: id.orig_h)")
    dst_ip: str = Field(min_length=1, validation_alias=_or_zeek("dst_ip", "id.resp_h"),
                        description="responder address or host id (Zeek: id.resp_h)")
    proto: str = Field(min_length=1, description="tcp, udp, icmp, ... (lower-cased)")
    src_port: int | None = Field(None, ge=0, le=65535, validation_alias=_or_zeek("src_port", "id.orig_p"))
    dst_port: int | None = Field(None, ge=0, le=65535, validation_alias=_or_zeek("dst_port", "id.resp_p"))
    duration: float | None = Field(None, ge=0, allow_inf_nan=False, description="seconds")
    src_bytes: int | None = Field(None, ge=0, le=_INT64, validation_alias=_or_zeek("src_bytes", "orig_bytes"))
    dst_bytes: int | None = Field(None, ge=0, le=_INT64, validation_alias=_or_zeek("dst_bytes", "resp_bytes"))
    src_pkts: int | None = Field(None, ge=0, le=_INT64, validation_alias=_or_zeek("src_pkts", "orig_pkts"))
    dst_pkts: int | None = Field(None, ge=0, le=_INT64, validation_alias=_or_zeek("dst_pkts", "resp_pkts"))
    conn_state: str | None = None
    service: str | None = None
    flows: int = Field(1, ge=1, le=_INT64, description="flows this record summarises")
    label: int | None = Field(None, ge=0, le=1, description="1 malicious, 0 benign")
    label_detail: str | None = None
    source: str | None = Field(None, min_length=1, description=f'default "{DEFAULT_SOURCE}"')
    source_row: int | None = Field(None, ge=0, le=_INT64, description="default: a per-replica counter")
    local_orig: bool | None = None
    local_resp: bool | None = None

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, v: Any) -> int:
        return parse_ts_us(v)

    @field_validator("proto")
    @classmethod
    def _proto(cls, v: str) -> str:
        return v.lower()

    @field_validator("conn_state", "service")
    @classmethod
    def _unset(cls, v: str | None) -> str | None:
        """As ingest reads them: blank, ``-`` and ``(empty)`` (Zeek's unset and empty markers) are unset."""
        v = None if v is None else v.strip()
        return None if v in (None, "", "-", "(empty)") else v


class ScoreRequest(BaseModel):
    flows: list[FlowRecord] = Field(description="records in time order (ts, source, source_row)")


class FlowResult(BaseModel):
    entity: str | None = Field(description="the entity whose score is the flow's score")
    score: float = Field(description="higher is more anomalous")
    is_anomaly: bool = Field(description="score >= threshold")


class ScoreResponse(BaseModel):
    model_version: str
    threshold: float
    results: list[FlowResult]


_RECORDS = TypeAdapter(list[FlowRecord])


def parse_ts_us(v: Any) -> int:
    """ISO 8601 text or epoch seconds (number or numeric text) -> int microseconds UTC."""
    if isinstance(v, bool) or v is None:
        raise ValueError("expected ISO 8601 text or epoch seconds")
    if isinstance(v, str):
        text = v.strip()
        try:
            v = float(text)
        except ValueError:
            try:
                d = _dt.datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
            except ValueError:
                raise ValueError(f"expected ISO 8601 text or epoch seconds, got {v[:40]!r}") from None
            if d.tzinfo is None:
                d = d.replace(tzinfo=_dt.timezone.utc)
            us = (d - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)) // _dt.timedelta(microseconds=1)
            return _check_range(us, v)
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"expected a finite number of epoch seconds, got {v!r}")
        us = v * 1_000_000
        if isinstance(us, float) and not math.isfinite(us):  # e.g. 1e308 s: round() would raise OverflowError
            return _check_range(MAX_TS_US, v)
        return _check_range(round(us), v)
    raise ValueError(f"expected ISO 8601 text or epoch seconds, got a {type(v).__name__}")


def _check_range(us: int, original: Any) -> int:
    if not MIN_TS_US <= us < MAX_TS_US:
        raise ValueError(f"must be between 1970-01-01 and 2100-01-01, got {str(original)[:40]!r}")
    return us


# --------------------------------------------------------------------------- parsing


class ApiError(Exception):
    """A client error: HTTP status and a one-line message naming the field."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_flows: int = 10_000


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_message(err: ValidationError, prefix: str = "flows", limit: int = 3) -> str:
    """``flows[3].ts: <rule>``; at most ``limit`` errors, then how many more. Never the input."""
    errors = err.errors(include_url=False, include_input=False, include_context=False)
    parts = []
    for e in errors[:limit]:
        loc = _loc(tuple(e["loc"]))
        if prefix:
            loc = f"{prefix}{loc}" if loc.startswith("[") else f"{prefix}.{loc}" if loc else prefix
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    more = len(errors) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def parse_score_body(body: bytes, limits: Limits) -> list[FlowRecord]:
    """Bytes -> validated records, or ApiError (413 / 400 / 422)."""
    if len(body) > limits.max_body_bytes:
        raise ApiError(413, f"body: {len(body)} bytes is over the limit of {limits.max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"body: not valid UTF-8 at byte {e.start}") from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise ApiError(400, "body: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"body: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(doc, dict):
        raise ApiError(422, f'body: expected an object {{"flows": [...]}}, got {type(doc).__name__}')
    if "flows" not in doc:
        raise ApiError(422, "flows: field required")
    flows = doc["flows"]
    if not isinstance(flows, list):
        raise ApiError(422, f"flows: expected a list of records, got {type(flows).__name__}")
    if len(flows) > limits.max_flows:
        raise ApiError(413, f"flows: {len(flows)} records is over the limit of {limits.max_flows}")
    try:
        return _RECORDS.validate_python(flows)
    except ValidationError as e:
        raise ApiError(422, validation_message(e)) from None
    except RecursionError:
        raise ApiError(400, "body: JSON nested too deeply") from None


def records_to_table(records: list[FlowRecord], first_row: int) -> pa.Table:
    """Validated records -> FLOW_SCHEMA table; missing ``source_row`` numbered from ``first_row``."""
    cols: dict[str, list] = {name: [] for name in FLOW_SCHEMA.names}
    names = [n for n in FLOW_SCHEMA.names if n not in ("source", "source_row")]
    row = first_row
    for r in records:
        for n in names:
            cols[n].append(getattr(r, n))
        cols["source"].append(r.source if r.source is not None else DEFAULT_SOURCE)
        if r.source_row is None:
            cols["source_row"].append(row)
            row += 1
        else:
            cols["source_row"].append(r.source_row)
    return pa.table({n: pa.array(cols[n], type=FLOW_SCHEMA.field(n).type) for n in FLOW_SCHEMA.names},
                    schema=FLOW_SCHEMA)


async def read_body(receive_stream, content_length: str | None, limit: int) -> bytes:
    """Read at most ``limit`` bytes; 413 from the header or from the bytes actually read."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise ApiError(400, f"Content-Length: expected an integer, got {content_length[:20]!r}") from None
        if declared > limit:
            raise ApiError(413, f"body: Content-Length {declared} is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in receive_stream:
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body: over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- authentication


def token_digest(token: str | None) -> str | None:
    return hashlib.sha256(token.encode("utf-8")).hexdigest() if token else None


def authorized(header: str | None, digest: str | None) -> bool:
    """Constant-time check of ``Authorization: Bearer <token>`` against the token's SHA-256."""
    if digest is None:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    presented = hashlib.sha256(header[len("Bearer "):].strip().encode("utf-8", "replace")).hexdigest()
    return hmac.compare_digest(presented.encode(), digest.encode())


def effective_digest(passed: str | None) -> str | None:
    """The replica's own ``NADRAY_API_TOKEN`` (e.g. from a Kubernetes Secret) wins over the deployed digest."""
    return token_digest(os.environ.get(TOKEN_ENV)) or passed


class AuthMiddleware:
    """Pure ASGI: 401 unless the bearer token matches (every path but /healthz)."""

    def __init__(self, app, digest: str | None):
        self.app = app
        self.digest = digest

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.digest is None or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = None
        for k, v in scope.get("headers") or []:
            if k == b"authorization":
                header = v.decode("latin-1")
                break
        if authorized(header, self.digest):
            return await self.app(scope, receive, send)
        body = json.dumps({"detail": "Authorization: a valid 'Bearer <token>' is required"}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="nadray"')]})
        await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- the app


class Backend(Protocol):
    async def score(self, flows: pa.Table) -> dict: ...
    async def model_info(self) -> dict: ...
    async def reload(self) -> dict: ...
    async def healthy(self) -> dict: ...


class RowCounter:
    """Default ``source_row`` numbers for records without one: unique per replica."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> int:
        first, self.next = self.next, self.next + n
        return first


def _openapi_body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def create_api(backend: Backend, limits: Limits, digest: str | None = None, title: str = "nadray"):
    """The FastAPI app (routes, 4xx handling, token middleware) around ``backend``."""
    from fastapi import FastAPI
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import JSONResponse

    app = FastAPI(title=title, description="Online network anomaly scoring (DESIGN.md HTTP API).")
    counter = RowCounter()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.post("/score", response_model=ScoreResponse, openapi_extra=_openapi_body(ScoreRequest),
              summary="Score flows with each entity's recent context")
    async def score(request: Request):
        body = await read_body(request.stream(), request.headers.get("content-length"), limits.max_body_bytes)
        records = parse_score_body(body, limits)
        table = records_to_table(records, counter.take(len(records)))
        return await backend.score(table)

    @app.get("/healthz", summary="Liveness and the serving version")
    async def healthz():
        return await backend.healthy()

    @app.get("/model", summary="Version, threshold, trained-on range and metrics")
    async def model():
        return await backend.model_info()

    @app.post("/admin/reload", summary="Check champion.json now and swap to a new champion")
    async def reload(request: Request):
        await read_body(request.stream(), request.headers.get("content-length"), 4096)
        return await backend.reload()

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version="1", description=app.description, routes=app.routes)
            defs = ScoreRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.pop("$defs", {}))
            components["ScoreRequest"] = defs
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(AuthMiddleware, digest=digest)
    return app
