"""The model registry: self-describing versions and an atomically written champion.

Layout (local folder or ``s3://``)::

    REGISTRY_URI/<name>/versions/<version>/model.safetensors   weights (no pickle)
    REGISTRY_URI/<name>/versions/<version>/checkpoint.json     everything else (see ``register``)
    REGISTRY_URI/<name>/champion.json                          {"version", "reason", "promoted_at"}

A version folder is complete once ``checkpoint.json`` exists (written after the
weights); ``champion.json`` is written last, atomically, and only by ``promote``,
so a failed or interrupted run never changes what is served.

References: ``REGISTRY_URI`` (its champion), ``REGISTRY_URI@champion``,
``REGISTRY_URI@VERSION``. ``REGISTRY_URI`` is the folder holding ``<name>/``; the
name is ``registry.name`` (default "nadray"). A URI that already ends in
``/<name>`` (has ``versions/`` inside) is accepted too.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from nadray import __version__, storage
from nadray.errors import ModelError

CHECKPOINT_FORMAT = 1
WEIGHTS = "model.safetensors"
META = "checkpoint.json"
CHAMPION = "champion.json"
WEIGHTS_SHA256 = "weights_sha256"
DEFAULT_NAME = "nadray"
_VERSION_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


def new_version(now: _dt.datetime | None = None) -> str:
    """Sortable version id: UTC time then 6 random hex digits, e.g. ``20261126T181500Z-3fa9c1``."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def model_root(registry: str, name: str = DEFAULT_NAME) -> str:
    """``REGISTRY_URI/<name>``, or ``registry`` itself when it already is a model root."""
    registry = str(registry).rstrip("/")
    if storage.exists(storage.join(registry, "versions")) and not storage.exists(storage.join(registry, name)):
        return registry
    return storage.join(registry, name)


def version_uri(registry: str, version: str, name: str = DEFAULT_NAME) -> str:
    return storage.join(model_root(registry, name), "versions", version)


def list_versions(registry: str, name: str = DEFAULT_NAME) -> list[str]:
    """Complete versions (checkpoint.json present), oldest first."""
    root = storage.join(model_root(registry, name), "versions")
    out = []
    for v in storage.ls(root):
        if _VERSION_RE.match(v) and storage.exists(storage.join(root, v, META)):
            out.append(v)
    return sorted(out)


def champion(registry: str, name: str = DEFAULT_NAME) -> dict[str, Any] | None:
    """The champion record ``{"version", "reason", "promoted_at"}``, or None."""
    uri = storage.join(model_root(registry, name), CHAMPION)
    if not storage.exists(uri):
        return None
    try:
        rec = storage.read_json(uri)
    except ValueError:
        raise ModelError(f"{uri}: not valid JSON") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("version"), str):
        raise ModelError(f"{uri}: expected {{'version': ...}}, got {rec!r}")
    return rec


def promote(registry: str, version: str, reason: str, name: str = DEFAULT_NAME,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make ``version`` the champion (one atomic write of champion.json)."""
    if version not in list_versions(registry, name):
        raise ModelError(f"cannot promote {registry}@{version}: no such complete version")
    rec = {"version": version, "reason": reason,
           "promoted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(), **(extra or {})}
    storage.write_json_atomic(storage.join(model_root(registry, name), CHAMPION), rec)
    return rec


def register(registry: str, tensors: dict[str, Any], meta: dict[str, Any], name: str = DEFAULT_NAME,
             version: str | None = None) -> str:
    """Write a new version: weights first, then checkpoint.json (which marks it complete).

    ``tensors``: parameter name -> torch tensor or numpy array; ``meta``: JSON-safe
    (config, model_args, encoder, err_norm, threshold, data_range, metrics, history...).
    """
    from safetensors.numpy import save as save_np

    version = version or new_version()
    vdir = version_uri(registry, version, name)
    arrays = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in tensors.items()}
    weights = save_np({k: np.ascontiguousarray(a) for k, a in arrays.items()})
    storage.write_bytes_atomic(storage.join(vdir, WEIGHTS), weights)
    full = {
        "format_version": CHECKPOINT_FORMAT, "version": version, "name": name,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(), "nadray_version": __version__,
        **meta,
        # Checked by load(): a flipped byte in the weights' data is otherwise a valid, different model.
        WEIGHTS_SHA256: hashlib.sha256(weights).hexdigest(),
    }
    storage.write_json_atomic(storage.join(vdir, META), full)
    return version


@dataclass
class Resolved:
    registry: str
    name: str
    version: str
    uri: str


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``URI[@champion|@VERSION]`` -> (URI, version or None for the champion)."""
    ref = str(ref)
    # '@' may appear in an s3 key only in odd setups; the last '@' separates the version.
    if "@" in ref.rsplit("/", 1)[-1]:
        base, _, v = ref.rpartition("@")
        return base, (None if v in ("", "champion") else v)
    return ref, None


def resolve(ref: str, name: str = DEFAULT_NAME) -> Resolved:
    """The version folder a model reference points at; ModelError naming the ref otherwise."""
    base, version = parse_ref(ref)
    try:
        if version is None:
            rec = champion(base, name)
            if rec is None:
                versions = list_versions(base, name)
                hint = f"; versions: {', '.join(versions[-3:])}" if versions else "; it has no versions"
                raise ModelError(f"model {ref}: registry has no champion{hint}")
            version = rec["version"]
        if not _VERSION_RE.match(version):
            raise ModelError(f"model {ref}: version {version!r} is not a version id like 20261126T181500Z-3fa9c1")
        uri = version_uri(base, version, name)
        if not storage.exists(storage.join(uri, META)):
            raise ModelError(f"model {ref}: version {version} not found (no {META} under {uri})")
    except ModelError:
        raise
    except (OSError, ValueError) as e:
        raise ModelError(f"model {ref}: cannot be read ({e.__class__.__name__}: {e})") from None
    return Resolved(base, name, version, uri)


def load(ref: str, name: str = DEFAULT_NAME) -> tuple[dict[str, np.ndarray], dict[str, Any], Resolved]:
    """Read and validate a version: (tensors as numpy, checkpoint.json, where).

    Only ``model.safetensors`` and ``checkpoint.json`` are read; any other file
    (``.pt``, ``.pkl``, notes) is ignored and never deserialised. The weights must
    match ``weights_sha256`` in checkpoint.json (versions registered before it
    existed have none and skip this check). Tensor names and
    shapes must match the model args in checkpoint.json, else ModelError.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_np

    from nadray.model import ModelArgs, expected_shapes

    where = resolve(ref, name)
    try:
        meta = storage.read_json(storage.join(where.uri, META))
    except ValueError as e:
        raise ModelError(f"model {ref}: {META} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != CHECKPOINT_FORMAT:
        got = meta.get("format_version") if isinstance(meta, dict) else type(meta).__name__
        raise ModelError(f"model {ref}: checkpoint format_version must be {CHECKPOINT_FORMAT}, got {got!r}")
    for key in ("model_args", "encoder", "threshold", "config"):
        if key not in meta:
            raise ModelError(f"model {ref}: {META} lacks {key!r}")
    args = ModelArgs.from_dict(meta["model_args"])
    try:
        raw = storage.read_bytes(storage.join(where.uri, WEIGHTS))
    except FileNotFoundError:
        raise ModelError(f"model {ref}: {WEIGHTS} missing in {where.uri}") from None
    try:
        tensors = load_np(raw)
    except (SafetensorError, ValueError, OSError) as e:
        raise ModelError(f"model {ref}: {WEIGHTS} is not a valid safetensors file ({e})") from None
    expected = expected_shapes(args)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise ModelError(f"model {ref}: weights do not match model args (missing {missing}, unexpected {extra}, "
                         f"wrong shape {wrong})")
    for k, v in tensors.items():
        if v.dtype != np.float32 or not np.all(np.isfinite(v)):
            raise ModelError(f"model {ref}: tensor {k} must be finite float32, got {v.dtype}")
    want = meta.get(WEIGHTS_SHA256)
    if want is not None and hashlib.sha256(raw).hexdigest() != want:
        raise ModelError(f"model {ref}: {WEIGHTS} does not match the sha256 recorded in {META} "
                         f"(corrupted or tampered)")
    return tensors, meta, where
