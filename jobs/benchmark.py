"""Benchmarks against same-run baselines: ingest, batch scoring, Serve, Ray Train, memory.

    python jobs/benchmark.py [--quick | --smoke] [--json FILE] [--check-floors] [--only STAGE,...] [--gpu]
    ray job submit --working-dir . -- python jobs/benchmark.py --quick --json bench.json

Joins ``RAY_ADDRESS`` or starts an embedded Ray (``nadray.runtime.ensure_ray``).
Data: the eight real IoT-23 Zeek logs bundled in ``nadray/datasets`` (or the
``.csv``/``.csv.gz`` Zeek logs of ``--data DIR``), replicated to each size with shifted
timestamps and renamed local hosts (``nadray.bench.data``). Every figure has a
baseline measured in the same run, alternated or bracketing it where possible,
because the machine is shared and timings are noisy: read the ratios.

Floors (PASS/FAIL printed; the exit status reflects them only with ``--check-floors``):
batch scoring >= 0.5x bare torch and >= 0.5x IsolationForest at every size (the
worst size's ratio); Serve adds <= 5 ms at p50 over a no-op deployment; Ray Train
>= 0.7x plain torch; ingest >= 0.3x pyarrow.csv.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python jobs/benchmark.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

# Sizes per mode. Batch scoring needs three sizes to show scaling.
SIZES = {
    "full": dict(ingest=200_000, large=600_000, large_piece=None, score=[20_000, 80_000, 320_000], seq=300, batches=60, batch_flows=100, clients=4,
                 entities=200, train_flows=60_000, train_windows=16_384, epochs=4),
    "quick": dict(ingest=100_000, large=600_000, large_piece=None, score=[8_000, 24_000, 64_000], seq=120, batches=24, batch_flows=100, clients=4,
                  entities=50, train_flows=36_000, train_windows=16_384, epochs=3),
    "smoke": dict(ingest=5_000, large=40_000, large_piece=262_144, score=[300, 600, 1_200], seq=10, batches=4, batch_flows=20, clients=2,
                  entities=5, train_flows=3_000, train_windows=256, epochs=2),
}

# (key, floor, higher_is_better, what)
FLOORS = [
    ("batch_score_vs_torch", 0.5, True, "batch scoring >= 0.5x bare torch forward (worst size)"),
    ("batch_score_vs_isolation_forest", 0.5, True, "batch scoring >= 0.5x IsolationForest (worst size)"),
    ("serve_added_p50_ms", 5.0, False, "Serve adds <= 5 ms p50 over a no-op deployment"),
    ("train_ray_vs_plain_torch", 0.7, True, "Ray Train >= 0.7x plain torch"),
    ("ingest_vs_pyarrow_csv", 0.3, True, "ingest >= 0.3x pyarrow.csv.read_csv"),
]

REQUIRED_KEYS = [
    "ingest_rows_per_s", "ingest_vs_pyarrow_csv", "batch_score_flows_per_s", "batch_score_vs_torch",
    "batch_score_vs_isolation_forest", "batch_score_vs_isolation_forest_end_to_end", "serve_p50_ms", "serve_p99_ms",
    "serve_added_p50_ms", "serve_flows_per_s", "serve_vs_inprocess", "train_steps_per_s", "train_ray_vs_plain_torch", "serve_bytes_per_entity",
    "ingest_peak_rss_mb", "batch_score_peak_rss_mb", "serve_peak_rss_mb", "train_peak_rss_mb",
    "ingest_large_rows_per_s", "ingest_large_vs_whole_speed", "ingest_large_peak_rss_mb", "ingest_large_vs_whole_memory",
]
STAGES = ["ingest", "batch", "serve", "train"]


def _env() -> None:
    for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180",
                 "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(k, v)


def run(mode: str = "quick", stages: list[str] | None = None, command: str | None = None,
        data: str | None = None, gpu: bool = False) -> dict:
    """Run the stages of ``mode`` and return the result document (see BENCHMARKS.md)."""
    _env()
    from nadray.bench import data as bd
    from nadray.bench import stages as st
    from nadray.config import Config
    from nadray.runtime import ensure_ray

    stages = stages or STAGES
    sz = SIZES[mode]
    ensure_ray()
    files = bd.iot23_files(data)
    base = bd.load_base(files)
    raw = bd.read_zeek_csv_strings(files)
    tmp = st.tmpdir()
    out: dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(["python", *sys.argv]), "quick": mode != "full", "mode": mode,
        "machine": bd.machine(), "data": {"files": [os.path.basename(f) for f in files], "base_flows": base.num_rows},
        "stages": {},
    }
    try:
        cfg = Config()
        ref = st.register_model(base, cfg, os.path.join(tmp, "registry")) if {"batch", "serve"} & set(stages) else None
        if "ingest" in stages:
            r = out["stages"]["ingest"] = st.bench_ingest(raw, sz["ingest"], tmp, reps=3 if mode != "smoke" else 1)
            out.update(ingest_rows_per_s=r["ingest_rows_per_s"], ingest_vs_pyarrow_csv=r["ingest_vs_pyarrow_csv"],
                       ingest_peak_rss_mb=r["peak_rss_mb"])
            r = out["stages"]["ingest_large"] = st.bench_ingest_large(raw, sz["large"], tmp, reps=2 if mode == "full" else 1,
                                                                      piece_bytes=sz["large_piece"])
            out.update({k: r[k] for k in ("ingest_large_rows_per_s", "ingest_large_vs_whole_speed",
                                          "ingest_large_peak_rss_mb", "ingest_large_vs_whole_memory")})
        if "batch" in stages:
            threads = st.ray_worker_torch_threads()
            r = out["stages"]["batch"] = st.bench_batch(ref, raw, sz["score"], tmp, threads)
            out.update(batch_score_flows_per_s=r["batch_score_flows_per_s"], batch_score_vs_torch=r["batch_score_vs_torch"],
                       batch_score_vs_isolation_forest=r["batch_score_vs_isolation_forest"],
                       batch_score_vs_isolation_forest_end_to_end=r["batch_score_vs_isolation_forest_end_to_end"],
                       batch_score_peak_rss_mb=r["peak_rss_mb"])
        if "train" in stages:
            r = out["stages"]["train"] = st.bench_train(base, sz["train_flows"], sz["train_windows"], sz["epochs"], tmp, use_gpu=gpu)
            out.update(train_steps_per_s=r["train_steps_per_s"], train_ray_vs_plain_torch=r["train_ray_vs_plain_torch"],
                       train_peak_rss_mb=r["peak_rss_mb"])
        if "serve" in stages:
            r = out["stages"]["serve"] = st.bench_serve(ref, base, sz["seq"], sz["batches"], sz["batch_flows"],
                                                        sz["clients"], sz["entities"])
            out.update({k: r[k] for k in ("serve_p50_ms", "serve_p99_ms", "serve_added_p50_ms", "serve_flows_per_s",
                                          "serve_vs_inprocess", "serve_bytes_per_entity")}, serve_peak_rss_mb=r["peak_rss_mb"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["floors"] = check_floors(out)
    return out


def check_floors(out: dict) -> list[dict]:
    res = []
    for key, floor, higher, what in FLOORS:
        v = out.get(key)
        if v is None:
            res.append({"key": key, "floor": floor, "value": None, "pass": None, "what": what})
            continue
        ok = bool(v >= floor) if higher else bool(v <= floor)
        res.append({"key": key, "floor": floor, "value": v, "pass": ok, "what": what})
    return res


def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(out: dict) -> str:
    s = out["stages"]
    lines = [f"nadray benchmark ({out['mode']}) {out['date']} on {out['machine']['cpu']}, {out['machine']['cores']} cores, "
             f"GPU: {out['machine']['gpu']}", "",
             f"| {'figure':<38} | {'nadray':>12} | {'baseline (same run)':>30} | {'ratio':>7} |", f"|{'-' * 40}|{'-' * 14}|{'-' * 32}|{'-' * 9}|"]

    def row(name, v, base="", ratio=None):
        lines.append(f"| {name:<38} | {_f(v):>12} | {base:>30} | {_f(ratio, 2):>7} |")

    if "ingest" in s:
        r = s["ingest"]
        row(f"ingest rows/s ({r['rows']:,} rows)", r["ingest_rows_per_s"], f"pyarrow.csv {_f(r['pyarrow_csv_rows_per_s'])}",
            r["ingest_vs_pyarrow_csv"])
        row("ingest into archive rows/s", r["ingest_archive_rows_per_s"])
    if "ingest_large" in s:
        r = s["ingest_large"]
        row(f"large file ingest rows/s ({r['file_mb']:,} MB)", r["ingest_large_rows_per_s"],
            f"parsed whole {_f(r['whole_rows_per_s'])}", r["ingest_large_vs_whole_speed"])
        row("  its peak MB above start (pieces)", r["ingest_large_peak_rss_mb"], f"parsed whole {_f(r['whole_peak_rss_mb'])}",
            r["ingest_large_vs_whole_memory"])
    if "batch" in s:
        r = s["batch"]
        for z in r["sizes"]:
            row(f"batch score flows/s ({z['flows']:,} {z.get('path', '?')})", z["flows_per_s"],
                f"torch {z.get('torch_threads', r['torch_threads'])}t {_f(z['torch_flows_per_s'])}", z["vs_torch"])
            row("", None, f"IsolationForest {_f(z['isolation_forest_flows_per_s'])}", z["vs_isolation_forest"])
            row("", None, f"IF read+encode+score {_f(z['isolation_forest_end_to_end_flows_per_s'])}",
                z["vs_isolation_forest_end_to_end"])
        rd = r.get("ray_data_largest")
        if rd:
            row(f"  same, Ray Data forced ({rd['flows']:,})", rd["flows_per_s"], "torch 1t (above)", rd["vs_torch"])
    if "serve" in s:
        r = s["serve"]
        row("serve p50 ms (1 flow)", r["serve_p50_ms"], f"no-op Serve {_f(r['noop_p50_ms'])}", r["serve_p50_ms"] / r["noop_p50_ms"])
        row("serve p99 ms (1 flow)", r["serve_p99_ms"], f"no-op Serve {_f(r['noop_p99_ms'])}", r["serve_p99_ms"] / r["noop_p99_ms"])
        row("serve added p50 ms", r["serve_added_p50_ms"], f"score_online_arrays 1 flow {_f(r['inprocess_one_flow_p50_ms'])}")
        row(f"serve flows/s ({r['batch_flows']}/req, {r['clients']} clients)", r["serve_flows_per_s"],
            f"score_online_arrays {_f(r['inprocess_flows_per_s'])}", r["serve_vs_inprocess"])
        row("", None, f"no-op Serve {_f(r['noop_flows_per_s'])}", r["serve_flows_per_s"] / r["noop_flows_per_s"])
        row(f"serve bytes/entity ({r['context_entities']} ents)", r["serve_bytes_per_entity"])
    if "train" in s:
        r = s["train"]
        row(f"train steps/s (batch {r['batch_size']}{', GPU' if r.get('use_gpu') else ''})", r["train_steps_per_s"], f"plain torch {_f(r['plain_torch_steps_per_s'])}",
            r["train_ray_vs_plain_torch"])
        row("train wall s incl. Ray start", r["ray_fit_wall_s"], f"plain torch {_f(r['plain_wall_s'])}", r["ray_wall_vs_plain_wall"])
        if r.get("ray_epoch_s"):  # an epoch's wall time, its thread's CPU time, the report calls
            med = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
            row("train epoch s (median; Ray worker)", med(r["ray_epoch_s"]), f"plain torch {_f(med(r['plain_epoch_s']))}",
                med(r["plain_epoch_s"]) / med(r["ray_epoch_s"]))
            row("  its thread CPU s / report s", med(r["ray_epoch_thread_cpu_s"]), f"report {_f(med(r['ray_report_s']))}")
    for name, r in s.items():
        row(f"peak RSS MB: {name}", r["peak_rss_mb"], f"driver alone {_f(r['peak_rss_driver_mb'])}")
    lines.append("")
    for f in out["floors"]:
        verdict = "n/a " if f["pass"] is None else ("PASS" if f["pass"] else "FAIL")
        lines.append(f"{verdict}  {f['what']}: {_f(f['value'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smaller sizes, a few minutes on 2 cores")
    g.add_argument("--smoke", action="store_true", help="tiny sizes: checks the benchmark runs (tests)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--check-floors", action="store_true", help="exit 1 when a floor fails")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--gpu", action="store_true",
                   help="train stage on one GPU worker (train.use_gpu=true), plain torch on the same GPU")
    p.add_argument("--data", metavar="DIR", help="IoT-23-style Zeek CSVs to replicate (default: the bundled ones)")
    a = p.parse_args(argv)
    mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    stages = a.only.split(",") if a.only else None
    if stages and set(stages) - set(STAGES):
        p.error(f"--only: unknown stage(s) {sorted(set(stages) - set(STAGES))}")
    if a.gpu:
        import torch

        if not torch.cuda.is_available():
            p.error("--gpu: torch sees no CUDA device on this machine")
    t0 = time.perf_counter()
    out = run(mode, stages, command=" ".join(["python", "jobs/benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
              data=a.data, gpu=a.gpu)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(table(out), flush=True)
    print(f"\nwall {out['wall_s']} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=float) + "\n")
    failed = [f for f in out["floors"] if f["pass"] is False]
    return 1 if (a.check_floors and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
