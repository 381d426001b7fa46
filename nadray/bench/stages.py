"""The benchmark stages. Each returns a dict of figures, each next to a same-run baseline.

- ``bench_ingest``: ``nadray.ingest.read_input`` (and full ``ingest`` into an archive)
  vs ``pyarrow.csv.read_csv`` of the same Zeek CSV, alternated.
- ``bench_ingest_large``: ``ingest`` of a file too large to parse whole, in pieces, vs the
  same file parsed whole: time and peak memory, each in a fresh process.
- ``bench_batch``: end-to-end ``nadray.score.score`` vs a bare torch forward of the
  same model over the same number of windows (measured before and after), and vs
  scikit-learn IsolationForest ``score_samples`` on the same flows' events (the rows
  the LSTM scores, with the same features).
- ``bench_serve``: the nadray Serve app vs a no-op Serve app on the same HTTP path,
  requests alternated; batched throughput vs ``Scorer.score_online_arrays`` in process.
- ``bench_train``: ``train_loop_per_worker`` in one Ray Train worker vs the same
  function run in process with the few ``ray.train`` calls stubbed.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa

from nadray.bench.data import RssSampler, json_records, replicate_flows, timed, write_zeek_csv


def _stage(fn):
    """Run a stage under the RSS sampler; add its peak memory to its figures."""
    def run(*args, **kwargs):
        gc.collect()
        with RssSampler() as mem:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
        out["peak_rss_mb"] = round(mem.peak_tree_mb, 1)
        out["peak_rss_driver_mb"] = round(mem.peak_driver_mb, 1)
        out["stage_wall_s"] = round(time.perf_counter() - t0, 2)
        return out
    run.__name__ = fn.__name__
    return run


# --------------------------------------------------------------------------- model


def register_model(flows: pa.Table, cfg, registry_dir: str) -> str:
    """A model of the configured size (untrained weights: speed does not depend on them) as champion."""
    import torch

    from nadray import registry
    from nadray.features import FeatureEncoder
    from nadray.model import EventLSTM, ModelArgs
    from nadray.threshold import Threshold

    enc = FeatureEncoder.fit(flows, cfg)
    args = ModelArgs.from_config(cfg, enc.n_features)
    torch.manual_seed(0)
    model = EventLSTM(args)
    meta = {"config": cfg.to_dict(), "model_args": args.to_dict(), "encoder": enc.to_dict(),
            "err_norm": [1.0] * enc.n_features, "score_z": {"err_mean": 0.0, "err_std": 1.0},
            "threshold": Threshold(1.0).to_dict(), "metrics": {}, "history": []}
    version = registry.register(registry_dir, model.state_dict(), meta)
    registry.promote(registry_dir, version, "benchmark model")
    return f"{registry_dir}@{version}"


def ray_worker_torch_threads() -> int:
    """torch's thread count inside a 1-CPU Ray task (what a scoring actor gets)."""
    import ray

    @ray.remote(num_cpus=1)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return int(ray.get(threads.remote()))


# --------------------------------------------------------------------------- ingest


@_stage
def bench_ingest(raw: pa.Table, n: int, tmp: str, reps: int = 3) -> dict[str, Any]:
    import pyarrow.csv as pacsv

    from nadray.ingest import ingest, read_input

    path = write_zeek_csv(raw, n, os.path.join(tmp, "ingest-conn.csv"))
    t_pa, t_nad = [], []
    for _ in range(reps):  # alternated: both see the same machine state
        t_pa.append(timed(pacsv.read_csv, path)[0])
        dt, res = timed(read_input, path, "zeek")
        t_nad.append(dt)
        assert res.flows.num_rows == n, (res.flows.num_rows, res.read, res.quarantined)
    t_full, report = timed(ingest, [path], os.path.join(tmp, "ingest-archive"))
    nad, base = statistics.median(t_nad), statistics.median(t_pa)
    return {"rows": n, "file_mb": round(os.path.getsize(path) / 2**20, 1),
            "ingest_rows_per_s": n / nad, "pyarrow_csv_rows_per_s": n / base, "ingest_vs_pyarrow_csv": base / nad,
            "ingest_archive_rows_per_s": n / t_full, "archived": int(report.archived)}


# One ingest in a fresh Python process: a process's peak RSS cannot be reset, and pyarrow's
# allocator keeps what one call freed for the next, so the two ways are measured apart.
# The peak is the process's own high-water mark (VmHWM): ru_maxrss would start at the
# benchmark driver's (Linux carries it across fork and exec), far above one ingest's.
_INGEST_IN_PROCESS = """
import json, resource, sys, time
from nadray.ingest import core, stream

def peak_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except OSError:  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

path, archive, piece, whole = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
stream.PIECE_BYTES, stream.WHOLE_BYTES = piece, whole
base = peak_mb()
t0 = time.perf_counter()
rep = core.ingest([path], archive)
print(json.dumps({"s": time.perf_counter() - t0, "archived": rep.archived, "rss_mb": peak_mb() - base}))
"""


def _ingest_fresh(path: str, tmp: str, piece: int, whole: int) -> dict[str, float]:
    import shutil
    import subprocess

    archive = tempfile.mkdtemp(dir=tmp)
    try:
        done = subprocess.run([sys.executable, "-c", _INGEST_IN_PROCESS, path, archive, str(piece), str(whole)],
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(archive, ignore_errors=True)


@_stage
def bench_ingest_large(raw: pa.Table, n: int, tmp: str, reps: int = 1, piece_bytes: int | None = None) -> dict[str, Any]:
    """``ingest`` of one file over ``stream.WHOLE_BYTES``, parsed in pieces, against the same
    file parsed whole (``WHOLE_BYTES`` raised past it), alternated, each in a fresh process."""
    from nadray.ingest import stream

    piece, whole = stream.sizes(piece_bytes, None if piece_bytes is None else 2 * piece_bytes)
    path = write_zeek_csv(raw, n, os.path.join(tmp, "ingest-large.csv"))
    size = os.path.getsize(path)
    assert size > whole, f"{path}: {size} bytes would be parsed whole (WHOLE_BYTES {whole})"
    pieces, wholes = [], []
    for _ in range(reps):
        wholes.append(_ingest_fresh(path, tmp, piece, 1 << 50))
        pieces.append(_ingest_fresh(path, tmp, piece, whole))
    assert all(r["archived"] == n for r in pieces + wholes)
    p_s, w_s = statistics.median(r["s"] for r in pieces), statistics.median(r["s"] for r in wholes)
    p_mb, w_mb = statistics.median(r["rss_mb"] for r in pieces), statistics.median(r["rss_mb"] for r in wholes)
    return {"rows": n, "file_mb": round(size / 2**20, 1), "piece_mb": round(piece / 2**20, 3), "reps": reps,
            "ingest_large_rows_per_s": n / p_s, "whole_rows_per_s": n / w_s, "ingest_large_vs_whole_speed": w_s / p_s,
            "ingest_large_peak_rss_mb": p_mb, "whole_peak_rss_mb": w_mb, "ingest_large_vs_whole_memory": p_mb / w_mb if w_mb > 0 else None}  # None: too small to register


# --------------------------------------------------------------------------- batch scoring


def torch_forward_s(model, n_windows: int, threads: int, batch: int) -> float:
    """Bare torch: the scorer's own model over ``n_windows`` ready (L+1, F+1) windows."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        L, F = model.args.sequence_length, model.args.n_features
        x = torch.randn(min(batch, n_windows), L + 1, F + 1)
        with torch.inference_mode():
            model(x[:8])
            t0 = time.perf_counter()
            for lo in range(0, n_windows, batch):
                model(x[: min(batch, n_windows - lo)])
            return time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)


def isolation_forest_s(x: np.ndarray, threads: int) -> float:
    from sklearn.ensemble import IsolationForest
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):
        model = IsolationForest(n_estimators=100, random_state=0).fit(x[: min(len(x), 8192)])
        t0 = time.perf_counter()
        model.score_samples(x)
        return time.perf_counter() - t0


def isolation_forest_end_to_end_s(path: str, encoder, fit_x: np.ndarray, threads: int) -> float:
    """IsolationForest doing the whole job nadray's scoring does, minus the LSTM: read the
    same file, encode the same features, score every event, keep each flow's highest
    score. Not a floor: it says how much of the gap is the model and how much the
    reading and encoding both must do. Fitted (untimed) on ``fit_x``, the caller's
    encoded rows of the same file."""
    from sklearn.ensemble import IsolationForest
    from threadpoolctl import threadpool_limits

    from nadray.ingest import read_input
    from nadray.scorer import Scorer

    with threadpool_limits(threads):
        model = IsolationForest(n_estimators=100, random_state=0).fit(fit_x[: min(len(fit_x), 8192)])
        t0 = time.perf_counter()
        flows = read_input(path, "zeek").flows
        events = encoder.transform(flows)
        scores = -model.score_samples(events.x)
        Scorer.flow_scores(events, scores, flows.num_rows)
        return time.perf_counter() - t0


@_stage
def bench_batch(ref: str, raw: pa.Table, sizes: list[int], tmp: str, threads: int) -> dict[str, Any]:
    """``threads``: torch threads of a 1-CPU Ray worker (what a Ray Data scoring actor runs with).

    Small inputs are scored in this process (``nadray.score.DRIVER_SCORE_ROWS``): the
    stage pins the driver's torch to the same ``threads``, so nadray (either path) and
    the bare-torch baseline always run with the same ``torch.get_num_threads()``.
    """
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _bench_batch(ref, raw, sizes, tmp, threads)
    finally:
        torch.set_num_threads(old_threads)


def _bench_batch(ref: str, raw: pa.Table, sizes: list[int], tmp: str, threads: int) -> dict[str, Any]:
    from nadray.ingest import read_input
    from nadray.score import runs_in_driver, score
    from nadray.scorer import SCORE_BATCH, Scorer

    scorer = Scorer.from_ref(ref)
    rows = []
    for n in sizes:
        path = write_zeek_csv(raw, n, os.path.join(tmp, f"score-{n}.csv"))
        flows = read_input(path, "zeek").flows
        events = scorer.encoder.transform(flows)
        n_win = len(events)
        where, n_threads = ("driver" if runs_in_driver(n) else "ray-data"), threads
        # Bare torch with the thread count nadray's scoring runs with, before and after it.
        t_torch = [torch_forward_s(scorer.model, n_win, n_threads, SCORE_BATCH)]
        out = os.path.join(tmp, f"scores-{n}")
        t_nad, rep = timed(score, ref, [path], out, "zeek")
        where = rep.path or where
        if rep.rows_scored != n:
            raise RuntimeError(f"nadray scored {rep.rows_scored} of {n} flows")
        t_torch.append(torch_forward_s(scorer.model, n_win, n_threads, SCORE_BATCH))
        # IsolationForest with the same threads on the same flows: every one of their events,
        # the rows the LSTM scores (the first n events, as until 2026-11-27, cover fewer flows).
        t_if = isolation_forest_s(np.ascontiguousarray(events.x), n_threads)
        t_if_e2e = isolation_forest_end_to_end_s(path, scorer.encoder, events.x, n_threads)
        tt = statistics.mean(t_torch)
        rows.append({"flows": n, "windows": n_win, "path": where, "torch_threads": n_threads, "seconds": t_nad,
                     "flows_per_s": n / t_nad, "torch_flows_per_s": n / tt,
                     "torch_steps_per_s": n_win * (scorer.args.sequence_length + 1) / tt,
                     "isolation_forest_flows_per_s": n / t_if, "vs_torch": tt / t_nad, "vs_isolation_forest": t_if / t_nad,
                     "isolation_forest_end_to_end_flows_per_s": n / t_if_e2e,
                     "vs_isolation_forest_end_to_end": t_if_e2e / t_nad})
        del flows, events
        gc.collect()
    big = rows[-1]
    # The Ray Data path at the largest size where the default was the driver (a one-actor
    # pool on <= 2 CPUs): what it costs here, beside the default path. Not a floor.
    n = big["flows"]
    t_rd = big["seconds"]
    if big["path"] != "ray-data":
        path = os.path.join(tmp, f"score-{n}.csv")
        t_rd, rep = timed(score, ref, [path], os.path.join(tmp, f"scores-{n}-ray-data"), "zeek", 0)
        if rep.rows_scored != n or rep.path != "ray-data":
            raise RuntimeError(f"forced Ray Data run: path {rep.path}, scored {rep.rows_scored} of {n} flows")
    ray_data = {"flows": n, "seconds": t_rd, "flows_per_s": n / t_rd, "vs_torch": (n / t_rd) / big["torch_flows_per_s"]}
    # The floors hold at every size: the headline ratios are the worst size's, not the largest's.
    return {"path": "nadray.score.score", "torch_threads": threads, "sizes": rows, "batch_score_flows_per_s": big["flows_per_s"],
            "batch_score_vs_torch": min(r["vs_torch"] for r in rows),
            "batch_score_vs_isolation_forest": min(r["vs_isolation_forest"] for r in rows),
            "batch_score_vs_isolation_forest_end_to_end": min(r["vs_isolation_forest_end_to_end"] for r in rows),
            "batch_score_vs_torch_largest": big["vs_torch"],
            "batch_score_vs_isolation_forest_largest": big["vs_isolation_forest"],
            "scaling_flows_per_s_largest_over_smallest": big["flows_per_s"] / rows[0]["flows_per_s"],
            "ray_data_largest": ray_data}


# --------------------------------------------------------------------------- serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_port(default: int) -> int:
    try:
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)
    except Exception:
        return default


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def context_bytes_per_entity(scorer, base: pa.Table, n_entities: int) -> dict[str, float]:
    """Bytes held by an ``EntityContext`` per entity (pandas deep memory + keys), after full histories."""
    per = max(200, base.num_rows // 50)
    flows = replicate_flows(base.slice(0, per), per * n_entities)
    ctx = scorer.new_context(10 * n_entities + 100)
    for lo in range(0, flows.num_rows, 2000):
        scorer.score_online(flows.slice(lo, 2000), ctx)
    held = [ctx.get(e) for e in ctx.entities()]
    total = sys.getsizeof(ctx._data) + sum(sys.getsizeof(e) for e in ctx.entities())
    total += sum(int(df.memory_usage(deep=True, index=True).sum()) for df in held)
    return {"entities": len(held), "events_per_entity": float(np.mean([len(d) for d in held])),
            "bytes_per_entity": total / max(1, len(held))}


@_stage
def bench_serve(ref: str, base: pa.Table, n_seq: int, n_batches: int, batch_flows: int, clients: int,
                n_entities: int) -> dict[str, Any]:
    import requests
    import torch
    from ray import serve

    from nadray.scorer import Scorer
    from nadray.serve import ServeArgs, build_app, noop_app

    flows = replicate_flows(base, n_seq + n_batches * batch_flows + 20)
    recs = json_records(flows)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    port = _serve_port(port)
    log = {"enable_access_log": False, "log_level": "WARNING"}
    t0 = time.perf_counter()
    serve.run(build_app(ServeArgs(model=ref, poll_champion_s=0)), name="nadray-bench", route_prefix="/bench-nadray",
              logging_config=log)
    serve.run(noop_app(), name="nadray-bench-noop", route_prefix="/bench-noop", logging_config=log)
    ready_s = time.perf_counter() - t0
    url = {k: f"http://127.0.0.1:{port}/bench-{k}/score" for k in ("nadray", "noop")}
    hdr = {"Content-Type": "application/json"}
    if os.environ.get("NADRAY_API_TOKEN"):
        hdr["Authorization"] = f"Bearer {os.environ['NADRAY_API_TOKEN']}"
    try:
        sess = {k: requests.Session() for k in url}

        def post(kind: str, body: bytes, s=None) -> float:
            t = time.perf_counter()
            r = (s or sess[kind]).post(url[kind], data=body, headers=hdr, timeout=60)
            dt = time.perf_counter() - t
            if r.status_code != 200:
                raise RuntimeError(f"POST {url[kind]}: {r.status_code} {r.text[:200]}")
            return dt

        # Sequential one-flow requests, the two apps alternated; the first 20 warm up.
        lat: dict[str, list[float]] = {"nadray": [], "noop": []}
        for i in range(n_seq + 20):
            body = json.dumps({"flows": [recs[i]]}).encode()
            for kind in (("noop", "nadray") if i % 2 else ("nadray", "noop")):
                dt = post(kind, body)
                if i >= 20:
                    lat[kind].append(dt * 1e3)
        # Batched requests from concurrent clients.
        start = n_seq + 20
        bodies = [json.dumps({"flows": recs[start + b * batch_flows: start + (b + 1) * batch_flows]}).encode()
                  for b in range(n_batches)]

        def throughput(kind: str) -> float:
            nxt = iter(range(len(bodies)))
            lock = threading.Lock()
            errors: list[BaseException] = []

            def client():
                s = requests.Session()
                while True:
                    with lock:
                        b = next(nxt, None)
                    if b is None:
                        return
                    try:
                        post(kind, bodies[b], s)
                    except BaseException as e:  # noqa: BLE001 - reported below
                        errors.append(e)
                        return

            ts = [threading.Thread(target=client) for _ in range(clients)]
            t = time.perf_counter()
            for th in ts:
                th.start()
            for th in ts:
                th.join()
            if errors:
                raise errors[0]
            return n_batches * batch_flows / (time.perf_counter() - t)

        serve_fps = throughput("nadray")
        noop_fps = throughput("noop")
    finally:
        for app in ("nadray-bench", "nadray-bench-noop"):
            try:
                serve.delete(app)
            except Exception:
                pass
    # In process: the same batches through score_online_arrays (what a Serve replica calls:
    # entity and score, no output DataFrame), one torch thread like a scorer replica.
    scorer = Scorer.from_ref(ref)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch_tables = [flows.slice(start + b * batch_flows, batch_flows) for b in range(n_batches)]
        ctx = scorer.new_context(100_000)
        t = time.perf_counter()
        for tb in batch_tables:
            scorer.score_online_arrays(tb, ctx)
        inproc_fps = n_batches * batch_flows / (time.perf_counter() - t)
        # The one-flow requests' own scoring cost, to split the added latency (BENCHMARKS.md).
        ctx1, one = scorer.new_context(100_000), []
        for i in range(min(n_seq + 20, 220)):
            t = time.perf_counter()
            scorer.score_online_arrays(flows.slice(i, 1), ctx1)
            one.append((time.perf_counter() - t) * 1e3)
        mem = context_bytes_per_entity(scorer, base, n_entities)
    finally:
        torch.set_num_threads(old)
    p50, p50_noop = _pct(lat["nadray"], 50), _pct(lat["noop"], 50)
    return {"ready_s": ready_s, "requests_each": n_seq, "serve_p50_ms": p50, "serve_p99_ms": _pct(lat["nadray"], 99),
            "noop_p50_ms": p50_noop, "noop_p99_ms": _pct(lat["noop"], 99), "serve_added_p50_ms": p50 - p50_noop,
            "batch_flows": batch_flows, "clients": clients, "serve_flows_per_s": serve_fps,
            "noop_flows_per_s": noop_fps, "inprocess_one_flow_p50_ms": _pct(one[20:] or one, 50), "inprocess_flows_per_s": inproc_fps, "serve_vs_inprocess": serve_fps / inproc_fps,
            "context_entities": mem["entities"], "context_events_per_entity": mem["events_per_entity"],
            "serve_bytes_per_entity": mem["bytes_per_entity"]}


# --------------------------------------------------------------------------- train


def timed_loop(config: dict) -> None:
    """``train_loop_per_worker`` with each ``ray.train.report`` time-stamped into the metrics:
    when it was called, how long the previous call took (with its checkpoint), the
    training thread's CPU time, which says whether a slow epoch waited or computed, and
    the worker's ``MALLOC_ARENA_MAX``."""
    import ray.train

    from nadray.train import train_loop_per_worker

    real = ray.train.report
    stamps: list[float] = []
    report_s: list[float] = []
    thread_cpu: list[float] = []

    def report(metrics, checkpoint=None, **kw):
        stamps.append(time.perf_counter())
        thread_cpu.append(time.thread_time())
        out = real({**metrics, "bench_report_times": list(stamps), "bench_report_s": list(report_s),
                    "bench_thread_cpu": list(thread_cpu),
                    "bench_malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX")}, checkpoint=checkpoint, **kw)
        report_s.append(time.perf_counter() - stamps[-1])
        return out

    ray.train.report = report
    try:
        train_loop_per_worker(config)
    finally:
        ray.train.report = real


class _Ctx:
    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def get_local_rank(self) -> int:
        return 0


def plain_loop(config: dict, use_gpu: bool = False) -> list[float]:
    """The same ``train_loop_per_worker`` in this process: only the ``ray.train`` calls are stand-ins."""
    import ray.train
    import ray.train.torch
    import torch

    from nadray.train import train_loop_per_worker

    device = torch.device("cuda:0" if use_gpu else "cpu")
    stamps: list[float] = []
    mod = ray.train.torch
    saved = (ray.train.report, ray.train.get_context, ray.train.get_checkpoint, mod.prepare_model, mod.get_device)
    ray.train.report = lambda metrics, checkpoint=None, **kw: stamps.append(time.perf_counter())
    ray.train.get_context = lambda: _Ctx()
    ray.train.get_checkpoint = lambda: None
    mod.prepare_model = lambda model, **kw: model.to(device)
    mod.get_device = lambda: device
    old = torch.get_num_threads()
    try:
        train_loop_per_worker(config)
    finally:
        ray.train.report, ray.train.get_context, ray.train.get_checkpoint, mod.prepare_model, mod.get_device = saved
        torch.set_num_threads(old)
    return stamps


def _steady(stamps: list[float], steps_per_epoch: int) -> float:
    """Steps/s between the first and the last epoch report (startup and epoch 1 excluded)."""
    if len(stamps) < 2:
        return float("nan")
    return steps_per_epoch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


@_stage
def bench_train(base: pa.Table, n_flows: int, windows: int, epochs: int, tmp: str,
                use_gpu: bool = False) -> dict[str, Any]:
    from ray.train.torch import TorchTrainer

    from nadray.config import Config
    from nadray.placement import releasing_leaked_placement_groups
    from nadray.train import build_trainer, prepare_training_data

    cfg = Config()
    cfg.train.max_epochs, cfg.train.patience, cfg.train.max_windows = epochs, epochs + 1, windows
    cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.use_gpu = 1, 1.0, use_gpu
    cfg.data.train_fraction, cfg.data.val_fraction = 0.8, 0.05  # validation runs every epoch: keep it small
    flows = replicate_flows(base, n_flows)
    t_prep, data = timed(prepare_training_data, flows, cfg)
    steps = max(1, -(-min(len(data.train_idx), windows) // cfg.train.batch_size))
    trainer = build_trainer(data, cfg, {"storage_path": os.path.join(tmp, "train-runs"), "name": "bench-train"})
    loop_cfg = trainer.train_loop_config
    # Plain torch first, then Ray Train, then plain torch again: the baseline brackets the Ray run.
    t_a, plain_a = timed(plain_loop, loop_cfg, use_gpu)
    ray_trainer = TorchTrainer(timed_loop, train_loop_config=loop_cfg, scaling_config=trainer.scaling_config,
                               run_config=trainer.run_config)
    with releasing_leaked_placement_groups():  # Ray Train 2.60 leaks them without a dashboard
        t_ray, result = timed(ray_trainer.fit)
    if result.error:
        raise RuntimeError(f"Ray Train run failed: {result.error}")
    ray_stamps = result.metrics["bench_report_times"]
    t_b, plain_b = timed(plain_loop, loop_cfg, use_gpu)
    ray_rate = _steady(ray_stamps, steps)
    plain_rate = statistics.mean([_steady(plain_a, steps), _steady(plain_b, steps)])
    # Where the Ray worker's time goes: an epoch's wall time against its training thread's
    # CPU time (equal: it computed, not waited) and the report calls (checkpoint included).
    cpu = result.metrics["bench_thread_cpu"]
    diag = {"ray_epoch_s": _diffs(ray_stamps), "ray_epoch_thread_cpu_s": _diffs(cpu),
            "ray_report_s": [round(v, 4) for v in result.metrics["bench_report_s"]],
            "plain_epoch_s": _diffs(plain_a) + _diffs(plain_b),
            # what the worker saw of nadray.train.WORKER_ENV_VARS (None: the setting did not reach it)
            "worker_malloc_arena_max": result.metrics.get("bench_malloc_arena_max")}
    return {"flows": n_flows, "events": len(data.events), "train_windows_per_epoch": min(len(data.train_idx), windows),
            "steps_per_epoch": steps, "epochs": len(ray_stamps), "batch_size": cfg.train.batch_size, "use_gpu": use_gpu,
            "prepare_s": t_prep, "train_steps_per_s": ray_rate, "plain_torch_steps_per_s": plain_rate,
            "train_ray_vs_plain_torch": ray_rate / plain_rate, "ray_fit_wall_s": t_ray,
            "plain_wall_s": (t_a + t_b) / 2, "ray_wall_vs_plain_wall": ((t_a + t_b) / 2) / t_ray, **diag}


def _diffs(stamps: list[float]) -> list[float]:
    return [round(b - a, 3) for a, b in zip(stamps, stamps[1:])]


def tmpdir() -> str:
    return tempfile.mkdtemp(prefix="nadray-bench-")
