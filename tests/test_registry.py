"""Registry: versions, champion written last and atomically, refs, tampering refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _strictjson import strict_loads

from nadray import registry, storage
from nadray.errors import ModelError
from nadray.model import EventLSTM, ModelArgs

ARGS = ModelArgs(n_features=3, sequence_length=2, hidden_size=4)


def _register(reg: str, **meta) -> str:
    torch.manual_seed(0)
    m = EventLSTM(ARGS)
    return registry.register(reg, m.state_dict(), {
        "config": {}, "model_args": ARGS.to_dict(), "encoder": {}, "threshold": {"value": 1.0}, **meta})


def _round_trip(reg: str) -> None:
    assert registry.list_versions(reg) == []
    with pytest.raises(ModelError, match="no champion"):
        registry.resolve(reg)
    v1 = _register(reg, metrics={"test": {"roc_auc": 0.9}})
    v2 = _register(reg)
    assert registry.list_versions(reg) == sorted([v1, v2])
    with pytest.raises(ModelError, match=r"no champion; versions"):
        registry.resolve(f"{reg}@champion")
    registry.promote(reg, v1, "first")
    assert registry.champion(reg)["version"] == v1
    assert registry.resolve(reg).version == v1
    assert registry.resolve(f"{reg}@champion").version == v1
    assert registry.resolve(f"{reg}@{v2}").version == v2
    tensors, meta, where = registry.load(f"{reg}@{v1}")
    assert meta["metrics"]["test"]["roc_auc"] == 0.9 and meta["version"] == v1
    assert set(tensors) == set(EventLSTM(ARGS).state_dict())
    with pytest.raises(ModelError, match="20990101T000000Z-abcdef"):
        registry.resolve(f"{reg}@20990101T000000Z-abcdef")
    with pytest.raises(ModelError, match="not a version id"):
        registry.resolve(f"{reg}@latest")
    with pytest.raises(ModelError, match="no such complete version"):
        registry.promote(reg, "20990101T000000Z-abcdef", "nope")
    assert registry.champion(reg)["version"] == v1


def test_round_trip_local(tmp_path):
    _round_trip(str(tmp_path / "reg"))


def test_round_trip_s3(s3_bucket):
    _round_trip(f"{s3_bucket}/models")


def test_version_ids_sort_by_time():
    import datetime as dt

    a = registry.new_version(dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc))
    b = registry.new_version(dt.datetime(2026, 1, 10, tzinfo=dt.timezone.utc))
    assert a < b and a.startswith("20260102T000000Z-")


def test_incomplete_version_is_invisible_and_champion_untouched(tmp_path):
    reg = str(tmp_path / "reg")
    v1 = _register(reg)
    registry.promote(reg, v1, "first")
    before = storage.read_bytes(os.path.join(reg, "nadray", "champion.json"))
    # A run that died after writing weights but before checkpoint.json.
    partial = os.path.join(reg, "nadray", "versions", "20990101T000000Z-000000")
    os.makedirs(partial)
    open(os.path.join(partial, "model.safetensors"), "wb").write(b"x")
    assert registry.list_versions(reg) == [v1]
    assert storage.read_bytes(os.path.join(reg, "nadray", "champion.json")) == before
    leftovers = [n for n in os.listdir(os.path.join(reg, "nadray")) if n.startswith(".tmp")]
    assert leftovers == []


def test_tampered_checkpoints_are_refused(tmp_path):
    reg = str(tmp_path / "reg")
    v = _register(reg)
    vdir = registry.version_uri(reg, v)
    # A pickle next to the weights is ignored, never loaded.
    marker = tmp_path / "pwned"
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    open(os.path.join(vdir, "model.pt"), "wb").write(pickle.dumps(Evil()))
    open(os.path.join(vdir, "extra.pkl"), "wb").write(pickle.dumps(Evil()))
    registry.load(f"{reg}@{v}")
    assert not marker.exists()
    # Wrong shapes.
    from safetensors.numpy import save

    good = open(os.path.join(vdir, "model.safetensors"), "rb").read()
    open(os.path.join(vdir, "model.safetensors"), "wb").write(save({"lstm.weight_ih_l0": np.zeros((2, 2), "float32")}))
    with pytest.raises(ModelError, match="do not match model args"):
        registry.load(f"{reg}@{v}")
    # Not safetensors at all (a pickle renamed).
    open(os.path.join(vdir, "model.safetensors"), "wb").write(pickle.dumps(Evil()))
    with pytest.raises(ModelError, match="not a valid safetensors"):
        registry.load(f"{reg}@{v}")
    assert not marker.exists()
    open(os.path.join(vdir, "model.safetensors"), "wb").write(good)
    meta_path = os.path.join(vdir, "checkpoint.json")
    meta = json.load(open(meta_path))
    meta["model_args"]["hidden_size"] = 5
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ModelError, match="do not match"):
        registry.load(f"{reg}@{v}")
    meta["format_version"] = 99
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ModelError, match="format_version"):
        registry.load(f"{reg}@{v}")


def test_checkpoint_json_is_strict_json_with_undefined_metrics_as_null(tmp_path):
    """A metric that is undefined on a split (ROC-AUC with one class) is NaN in Python;
    checkpoint.json must still parse in jq, JavaScript and Go, and numbers must stay numbers."""
    reg = str(tmp_path / "reg")
    v = _register(reg, metrics={"test": {"roc_auc": float("nan"), "f1": np.float32(0.5), "n": np.int64(3)},
                                "curve": np.array([1.0, np.inf])})
    text = storage.read_bytes(storage.join(registry.version_uri(reg, v), registry.META)).decode()
    meta = strict_loads(text)
    assert meta["metrics"] == {"test": {"roc_auc": None, "f1": 0.5, "n": 3}, "curve": [1.0, None]}
    assert registry.load(f"{reg}@{v}")[1]["metrics"]["test"]["f1"] == 0.5
