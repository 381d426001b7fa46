"""Helpers for the Serve tests (no tests here): a registered model, a served process, fakes.

The model is a real, registered checkpoint built through the public seams
(FeatureEncoder.fit, EventLSTM, Threshold, registry.register/promote) with
seeded random weights: Serve tests check plumbing and equality with batch
scoring, not detection quality, and this takes a second instead of a Ray Train fit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import requests

REPO = Path(__file__).resolve().parents[1]
NADRAY = str(Path(sys.executable).parent / "nadray")
TRAIN_CAPTURES = ["CTU-Honeypot-Capture-4-1", "CTU-Honeypot-Capture-7-1", "CTU-Malware-Capture-44-1"]
REPLAY_CAPTURE = "CTU-Honeypot-Capture-5-1"  # internal and unknown flows: two entities per flow


def register_model(registry: str, train: pa.Table, seed: int, quantile: float = 0.95) -> str:
    """Register (not promote) a seeded LSTM with an encoder fitted on ``train``; returns the version."""
    import torch

    from nadray import registry as reg
    from nadray.config import Config
    from nadray.features import FeatureEncoder
    from nadray.model import EventLSTM, ModelArgs
    from nadray.scorer import Scorer
    from nadray.threshold import Threshold

    cfg = Config()
    cfg.data.sequence_length = 8
    cfg.model.hidden_size = 16
    enc = FeatureEncoder.fit(train, cfg)
    torch.manual_seed(seed)
    args = ModelArgs.from_config(cfg, enc.n_features)
    model = EventLSTM(args).eval()
    scorer = Scorer(model, enc, Threshold(0.0), {}, version="tmp")
    scores = scorer.score_table(train)["score"].to_numpy()
    ts = train.column("ts").to_pylist()
    meta = {
        "config": cfg.to_dict(), "model_args": args.to_dict(), "encoder": enc.to_dict(),
        "threshold": Threshold(float(np.quantile(scores, quantile)), "manual").to_dict(),
        "data_range": {"start": min(ts).isoformat(), "end": max(ts).isoformat(), "rows": train.num_rows},
        "metrics": {"test": {"note": "random weights (serve test fixture)"}},
    }
    return reg.register(registry, dict(model.state_dict()), meta)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``nadray serve`` as users start it: a subprocess with its own embedded Ray."""

    def __init__(self, model: str, workdir: Path, replicas: int = 1, token: str | None = None,
                 overrides: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "NADRAY_API_TOKEN")}
        env["RAY_AUTH_MODE"] = "disabled"
        if token:
            env["NADRAY_API_TOKEN"] = token
        cmd = [NADRAY, "serve", "--model", model, "--port", str(self.port), "--replicas", str(replicas)]
        for o in overrides or []:
            cmd += ["--set", o]
        self.log = workdir / f"serve-{self.port}.log"
        self.proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def wait_ready(self, timeout: float = 150) -> "Served":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nadray serve exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"nadray serve not healthy in {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as a service manager does; the process must exit by itself."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group only
                self.proc.wait(10)
                return -9
        return self.proc.returncode

    def post(self, path: str, body=None, data=None, headers=None, timeout: float = 30) -> requests.Response:
        h = {**self.headers(), **(headers or {})}
        if body is not None:
            data = json.dumps(body)
            h.setdefault("Content-Type", "application/json")
        return requests.post(self.url + path, data=data, headers=h, timeout=timeout)

    def get(self, path: str, headers=None, timeout: float = 10) -> requests.Response:
        return requests.get(self.url + path, headers={**self.headers(), **(headers or {})}, timeout=timeout)


def records(table: pa.Table) -> list[dict]:
    """Canonical rows as the JSON a client sends: ISO 8601 ts, nulls dropped."""
    out = []
    for row in table.to_pylist():
        rec = {k: v for k, v in row.items() if v is not None}
        rec["ts"] = row["ts"].isoformat()
        out.append(rec)
    return out


def replay(server: Served, table: pa.Table, chunk: int = 20) -> tuple[list, np.ndarray, set]:
    """Send ``table`` in time order, ``chunk`` flows per request; (entities, scores, versions)."""
    ents, scores, versions = [], [], set()
    recs = records(table)
    for lo in range(0, len(recs), chunk):
        r = server.post("/score", {"flows": recs[lo:lo + chunk]})
        assert r.status_code == 200, r.text
        body = r.json()
        versions.add(body["model_version"])
        assert len(body["results"]) == len(recs[lo:lo + chunk])
        for res in body["results"]:
            ents.append(res["entity"])
            scores.append(res["score"])
    return ents, np.asarray(scores, dtype="float64"), versions
