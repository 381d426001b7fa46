"""``jobs/nightly_retrain.py --demo --workdir DIR`` (``make demo``): the nightly pipeline on real data.

Everything runs locally (embedded Ray, folders under DIR):

- night 1 (2018-10-04): the earlier IoT-23 captures land (8-1, honeypot 5-1, 20-1,
  21-1); the challenger becomes the first champion;
- night 2 (2019-07-03, the newest labelled data): the later captures land
  (honeypot 4-1, 42-1, 44-1, honeypot 7-1) with a file that is not a flow log; the
  challenger (warm-started from the champion when the features match) and the
  champion are compared on the newest window, promotion is decided, drift reported;
- the founding cs448b experiment: daily bins per host, trained on July 2006,
  scored on August-September, compared with the investigation dates
  (``cs448b_experiment.cs448b_experiment``), with its own page DIR/cs448b/report.html.

Rerunning is idempotent: nights already complete are no-ops and the cs448b result
is reused (``--reset`` starts from an empty DIR).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

log = logging.getLogger("nadray.demo")

NIGHTS = [
    ("2018-10-04", ["CTU-Malware-Capture-8-1", "CTU-Honeypot-Capture-5-1", "CTU-Malware-Capture-20-1",
                    "CTU-Malware-Capture-21-1"]),
    ("2019-07-03", ["CTU-Honeypot-Capture-4-1", "CTU-Malware-Capture-42-1", "CTU-Malware-Capture-44-1",
                    "CTU-Honeypot-Capture-7-1"]),
]
# A small model and few epochs: the demo's point is the pipeline, on 2 cores in minutes.
# window_days spans the captures, which are months apart; eval_days counts days with flows.
# The demo lands each night's files just before the night runs: no minimum file age.
DEMO_OVERRIDES = [
    "nightly.window_days=400", "nightly.eval_days=2", "train.max_epochs=3", "train.patience=2",
    "train.max_windows=20000", "train.batch_size=256", "model.hidden_size=32", "data.sequence_length=16",
    "nightly.min_file_age_s=0",
]
CS448B_OVERRIDES = [
    "data.granularity=bin", "data.bin_seconds=86400", "data.sequence_length=14",
    "data.train_end=2006-07-25T00:00:00Z", "data.val_end=2006-08-01T00:00:00Z",
    "train.max_epochs=60", "train.patience=8", "train.batch_size=16", "model.hidden_size=32", "registry.name=cs448b",
]
UNREADABLE = ("sensor-notes.txt", b"rotated the span port on the core switch; no capture between 02:00 and 02:10\n")


def _land(landing: str, scenarios: list[str], extra: tuple[str, bytes] | None = None) -> None:
    from nadray import datasets

    os.makedirs(landing, exist_ok=True)
    for s in scenarios:
        src = datasets.path(f"iot23-{s}")
        dst = os.path.join(landing, src.name)
        if not os.path.exists(dst):
            shutil.copyfile(src, dst)
    if extra:
        with open(os.path.join(landing, extra[0]), "wb") as f:
            f.write(extra[1])


def cs448b_experiment(workdir: str) -> dict[str, Any]:
    """Ingest cs448b, train on July (daily bins), score Aug-Sep, compare with the ground truth; write a page."""
    from nadray import datasets
    from nadray.archive import read_flows
    from nadray.config import load_config
    from nadray.cs448b_experiment import cs448b_experiment as experiment
    from nadray.ingest import ingest
    from nadray.registry import champion
    from nadray.scorer import Scorer
    from nadray.train import train

    root = os.path.join(workdir, "cs448b")
    result_path = os.path.join(root, "result.json")
    if os.path.exists(result_path):
        log.info("cs448b experiment already done: %s", result_path)
        with open(result_path) as f:
            return json.load(f)
    archive, registry = os.path.join(root, "archive"), os.path.join(root, "registry")
    cfg = load_config(None, CS448B_OVERRIDES)
    t0 = time.perf_counter()
    rep = ingest([str(datasets.path("cs448b_ipasn"))], archive)
    log.info("cs448b: ingested %d rows", rep.archived)
    if champion(registry, cfg.registry.name) is None:
        train(archive, registry, cfg)
    flows = read_flows(archive)
    scorer = Scorer.from_ref(registry, cfg.registry.name)
    df = scorer.score_table(flows)
    res = experiment(df, flows=flows)
    res["model_version"] = scorer.version
    res["seconds"] = round(time.perf_counter() - t0, 1)
    _cs448b_page(root, res, df)
    with open(result_path, "w") as f:
        json.dump(res, f, indent=2, default=str)
    return res


def _cs448b_page(root: str, res: dict[str, Any], df: Any) -> None:
    import numpy as np
    import pandas as pd

    from nadray.report import Image, Table, plot_timelines, render_html

    frame = df.copy()
    frame["label"] = np.nan
    ts = pd.to_datetime(frame["ts"], utc=True)
    frame = frame[(ts >= pd.Timestamp("2006-08-01", tz="UTC")) & (ts < pd.Timestamp("2006-10-01", tz="UTC"))]
    plot_timelines(frame, os.path.join(root, "timelines.png"), top_n=10, title="LSTM daily scores per host, Aug-Sep 2006")
    sections: list[Any] = [("Question", "Trained on July 2006 (daily bins per host), scored on August and September: "
                            "would the detector have flagged the hosts later investigated, and before the investigation?")]
    for det in ("lstm", "ewma_zscore"):
        a = res.get(det)
        if not a:
            continue
        rows = [{"host": h, **v} for h, v in a["compromised"].items()]
        sections.append((f"{det}: compromised hosts", [
            f"host-level ROC-AUC {a['host_roc_auc']}, compromised hosts in the top {len(rows)}: "
            f"{a['compromised_in_top']}, flagged on or before the investigation: {a['detected_before_investigation']}, "
            f"clean hosts alerting: {a['clean_hosts_alerting']} {a['clean_alerting']}; ranking {a['ranking']}",
            Table(rows, ["host", "investigation", "rank", "max_score", "first_alert", "days_before_investigation",
                         "alert_days"]),
        ]))
    sections.append(("Scores over time", Image("timelines.png", "cs448b timelines")))
    with open(os.path.join(root, "report.html"), "w", encoding="utf-8") as f:
        f.write(render_html("nadray: the cs448b founding experiment", sections, f"model {res.get('model_version')}"))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def run_demo(workdir: str, reset: bool = False) -> int:
    from nadray.config import load_config
    from nadray.retrain import retrain

    t0 = time.perf_counter()
    if reset and os.path.exists(workdir):
        shutil.rmtree(workdir)
    landing, archive, registry = (os.path.join(workdir, d) for d in ("landing", "archive", "registry"))
    cfg = load_config(None, DEMO_OVERRIDES)
    reports = []
    for i, (date, scenarios) in enumerate(NIGHTS):
        _land(landing, scenarios, UNREADABLE if i == 1 else None)
        log.info("demo night %d (%s): landing %s", i + 1, date, ", ".join(scenarios))
        r = retrain(landing, archive, registry, date=date, cfg=cfg)
        print(r.summary(), flush=True)
        reports.append(r)
        if not r.ok:
            print(f"demo: night {date} failed: {r.error}")
            return 1
    cs = cs448b_experiment(workdir)

    rows = [["night", "status", "new files", "rows", "refused", "challenger", "metric", "challenger", "champion",
             "decision", "drift", "champion after"]]
    for r in reports:
        rec = r.record
        dec = rec.get("decision") or {}
        det = (rec.get("comparison") or {}).get("detectors") or {}
        key = (dec.get("numbers") or {}).get("metric", cfg.nightly.metric)
        cnt = (rec.get("ingest") or {}).get("counts") or {}
        rows.append([r.date, r.status, str(cnt.get("files", 0)), str(cnt.get("archived", 0)),
                     str(cnt.get("files_refused", 0)), str(rec.get("challenger_version")), key,
                     _num((det.get("challenger") or {}).get(key)), _num((det.get("champion") or {}).get(key)),
                     ("promoted" if dec.get("promote") else "kept champion") + f" ({dec.get('basis')})",
                     "FLAGGED" if (rec.get("drift") or {}).get("flagged") else "ok", str(rec.get("champion_after"))])
    print("\n" + _table(rows))
    for det in ("lstm", "ewma_zscore"):
        a = cs.get(det) or {}
        if a:
            print(f"cs448b {det}: host ROC-AUC {_num(a.get('host_roc_auc'))}, compromised ranks "
                  f"{a.get('compromised_ranks')}, flagged on/before investigation {a.get('detected_before_investigation')}"
                  f"/{len(a.get('compromised', {}))}, clean hosts alerting {a.get('clean_hosts_alerting')}")
    print(f"\nnight reports: {reports[-1].report}")
    for r in reports[:-1]:
        print(f"               {r.report}")
    print(f"cs448b report: {os.path.join(workdir, 'cs448b', 'report.html')}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s (rerun: nights already done are no-ops; --reset starts over)")
    return 0
