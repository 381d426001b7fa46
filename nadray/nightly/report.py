"""The night's report: ``night.json`` and ``report.html`` (with PNG plots) under
``<registry>/<name>/nights/<date>/``.

Written into a local temporary folder first and then copied file by file (atomic
writes), so the same code serves a local registry and an ``s3://`` one.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from nadray import storage

NIGHT_JSON = "night.json"
REPORT_HTML = "report.html"


def nights_uri(registry: str, name: str) -> str:
    from nadray.registry import model_root

    return storage.join(model_root(registry, name), "nights")


def night_uri(registry: str, name: str, date: str) -> str:
    return storage.join(nights_uri(registry, name), date)


def read_night(registry: str, name: str, date: str) -> dict[str, Any] | None:
    uri = storage.join(night_uri(registry, name, date), NIGHT_JSON)
    if not storage.exists(uri):
        return None
    try:
        return storage.read_json(uri)
    except ValueError:
        return None


def _plot_score_hist(frames: dict[str, Any], train_scores: dict[str, np.ndarray], path: str) -> str:
    """Score distributions per model: training part of the window vs the comparison window."""
    from nadray.report import _pyplot

    plt = _pyplot()
    names = [n for n in ("challenger", "champion") if n in frames]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(5.5 * max(1, len(names)), 3.6), squeeze=False)
    for ax, n in zip(axes[0], names):
        new = np.asarray(frames[n]["score"], dtype="float64")
        old = np.asarray(train_scores.get(n, np.zeros(0)), dtype="float64")
        both = np.concatenate([old[np.isfinite(old)], new[np.isfinite(new)]])
        if both.size:
            lo, hi = np.quantile(both, [0.0, 0.995])
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
            ax.hist(np.clip(old, lo, hi), bins=bins, density=True, alpha=0.5, label="training part")
            ax.hist(np.clip(new, lo, hi), bins=bins, density=True, alpha=0.5, label="comparison window")
            ax.axvline(float(frames[n]["threshold"].iloc[0]) if len(frames[n]) else 0, color="red", ls="--",
                       lw=1, label="threshold")
        ax.set(title=f"{n} scores", xlabel="score (clipped at p99.5)", ylabel="density")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _metrics_rows(night: dict[str, Any]) -> list[dict[str, Any]]:
    cmp = night.get("comparison") or {}
    rows = []
    for name, m in (cmp.get("detectors") or {}).items():
        st = (cmp.get("stability") or {}).get(name) or {}
        rows.append({
            "detector": name, "version": m.get("version"), "ROC-AUC": m.get("roc_auc"), "PR-AUC": m.get("pr_auc"),
            "precision": m.get("precision"), "recall": m.get("recall"), "F1": m.get("f1"), "FPR": m.get("fpr"),
            "false alarms / entity-day": m.get("false_alarms_per_entity_day"), "alerts": m.get("n_alerts"),
            "threshold": m.get("threshold"), "score KS (train vs window)": st.get("ks"),
            "false-alarm rate": st.get("false_alarm_rate"),
        })
    return rows


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def render(night: dict[str, Any], images: dict[str, str]) -> str:
    from nadray.report import Code, Image, Table, render_html

    dec = night.get("decision") or {}
    status = night.get("status")
    head = [f"Status: {status}."]
    if night.get("error"):
        head.append(f"Error: {night['error']}")
    if dec:
        verdict = "PROMOTED" if dec.get("promote") else "NOT promoted"
        head.append(f"Challenger {night.get('challenger_version')}: {verdict} (basis: {dec.get('basis')}). "
                    f"Champion before: {night.get('champion_before')}; after: {night.get('champion_after')}.")
    sections: list[Any] = [("Decision", head + [dec.get("reasons") or []])]
    if night.get("split"):
        sp = night["split"]
        sections.append(("Window and split", [
            sp.get("how", ""),
            Table([{"split": k, "flows": v} for k, v in (sp.get("counts") or {}).items()]),
            {"window": f"{night.get('window', {}).get('start')} .. {night.get('window', {}).get('end')}",
             **{k: v for k, v in (sp.get("boundaries") or {}).items()}},
        ]))
    rows = _metrics_rows(night)
    if rows:
        cols = list(rows[0].keys())
        sections.append(("Metrics on the comparison window", [
            Table(rows, cols),
            "Challenger and champion are scored on the same stream; metrics count only the comparison window's "
            "flows. Baselines (fitted on the challenger's training part, thresholds on its validation part) "
            "stand beside them. The score KS compares each model's scores on the training part with the window.",
        ]))
    plots = []
    for key, alt in (("roc", "ROC curves"), ("pr", "precision-recall curves")):
        if key in images:
            plots.append(Image(images[key], alt))
    if plots:
        sections.append(("Curves (comparison window)", plots))
    tl = [Image(images[k], k) for k in ("timelines_challenger", "timelines_champion") if k in images]
    if tl:
        sections.append(("Scores over time (comparison window)", tl))
    drift = night.get("drift")
    if drift:
        feats = drift.get("features") or []
        block: list[Any] = [
            ("Drift FLAGGED: " if drift.get("flagged") else "No drift flag: ")
            + f"max PSI {_num(drift.get('max_psi'))} (limit {drift.get('psi_limit')}), "
            + f"score KS {_num((drift.get('score_shift') or {}).get('ks'))} "
            + f"(limit {drift.get('score_shift_limit')}), {drift.get('n_new_entities')} new entities.",
        ]
        if drift.get("reasons"):
            block.append(list(drift["reasons"]))
        if drift.get("undefined"):
            block.append(list(drift["undefined"].values()))
        block.append(Table(sorted(feats, key=lambda r: -(r.get("psi") or 0)), ["feature", "psi", "over_limit"],
                           {(i, "psi") for i, r in enumerate(sorted(feats, key=lambda r: -(r.get("psi") or 0)))
                            if r.get("over_limit")}))
        if "scores" in images:
            block.append(Image(images["scores"], "score distributions"))
        ents = drift.get("new_entities") or []
        block.append(f"New entities ({len(ents)}): " + (", ".join(ents[:40]) + (" ..." if len(ents) > 40 else "")
                                                        if ents else "none"))
        sections.append(("Drift: comparison window vs training part", block))
    ing = night.get("ingest") or {}
    if ing:
        files = night.get("landing") or []
        sections.append(("Ingest", [ing.get("counts") or {}, Table(files, ["uri", "status", "sha256", "size", "age_s"])
                                    if files else "no landing files",
                                    [f"refused whole: {r['reason']}" for r in ing.get("refused", [])]
                                    + [f"skipped: {r['source']}: {r['reason']}" for r in ing.get("other_logs", [])]]))
    steps = night.get("steps") or []
    if steps:
        sections.append(("Steps", Table([{"step": s["name"], "seconds": s.get("seconds"),
                                          "counts": s.get("counts")} for s in steps])))
    if night.get("notify"):
        sections.append(("Serve notification", night["notify"]))
    sections.append(("night.json", Code(json.dumps(night, indent=2, default=str), "full record")))
    return render_html(f"nadray night {night.get('date')}", sections,
                       f"key {str(night.get('key', ''))[:16]} · status {status}")


def write(registry: str, name: str, date: str, night: dict[str, Any], frames: dict[str, Any] | None = None,
          train_scores: dict[str, np.ndarray] | None = None) -> str:
    """Write plots, ``report.html`` and (last) ``night.json``; return the report's URI.

    ``night.json`` is strict JSON: a NaN or +-inf in ``night`` is written as null
    (``storage.jsonable``), never as the ``NaN`` / ``Infinity`` tokens that jq,
    JavaScript and Go refuse; ``allow_nan=False`` turns any that slips through into
    an error here rather than in the reader.
    """
    from nadray.report import plot_curves, plot_timelines
    from nadray.storage import jsonable

    dest = night_uri(registry, name, date)
    with tempfile.TemporaryDirectory(prefix="nadray-night-") as tmp:
        images: dict[str, str] = {}
        if frames:
            try:
                plot_curves(frames, os.path.join(tmp, "roc.png"), os.path.join(tmp, "pr.png"))
                images.update(roc="roc.png", pr="pr.png")
                for n in ("challenger", "champion"):
                    if n in frames and len(frames[n]):
                        plot_timelines(frames[n], os.path.join(tmp, f"timelines_{n}.png"), 6,
                                       title=f"{n} scores per entity, comparison window")
                        images[f"timelines_{n}"] = f"timelines_{n}.png"
                _plot_score_hist(frames, train_scores or {}, os.path.join(tmp, "scores.png"))
                images["scores"] = "scores.png"
            except Exception as e:  # plots are a convenience; the record must still be written
                night.setdefault("warnings", []).append(f"plots failed: {type(e).__name__}: {e}")
        clean = jsonable(night)
        text = json.dumps(clean, indent=2, sort_keys=True, allow_nan=False)
        with open(os.path.join(tmp, REPORT_HTML), "w", encoding="utf-8") as f:
            f.write(render(clean, images))
        for fname in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, fname), "rb") as f:
                storage.write_bytes_atomic(storage.join(dest, fname), f.read())
    storage.write_bytes_atomic(storage.join(dest, NIGHT_JSON), text.encode("utf-8"))
    return storage.join(dest, REPORT_HTML)
