"""Plots and a self-contained ``report.html`` for ``nadray evaluate`` and the nightly job.

- ``plot_curves``: ROC and PR curves of the LSTM with the baselines, one figure each.
- ``plot_timelines``: per-entity score over time (the top entities by their highest
  score, plus every entity with a true malicious label), with the threshold,
  the alerts and the true malicious records marked.
- ``plot_history``: training and validation loss per epoch.
- ``render_html(title, sections)``: a page of headed sections (paragraphs, tables,
  bullet lists, images by relative path); reusable by the nightly report.
- ``write_report(report_dir, results, score_frames, history)``: all of the above
  plus ``metrics.json`` into a local folder.

matplotlib is imported inside functions with the Agg backend: no display needed,
and importing this module changes nothing.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

# Colours per detector, stable across figures (the LSTM always the same blue).
_COLOURS = {"lstm": "#1f77b4", "isolation_forest": "#ff7f0e", "hgb": "#2ca02c", "ewma_zscore": "#9467bd"}
_LABELS = {
    "lstm": "LSTM",
    "isolation_forest": "IsolationForest",
    "hgb": "HistGradientBoosting (supervised)",
    "ewma_zscore": "EWMA z-score",
}

# Entities shown in the timelines: the top ones by highest score, plus every one
# with a malicious record, capped so the figure stays readable.
MAX_TIMELINES = 24


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _label(name: str) -> str:
    return _LABELS.get(name, name)


# --------------------------------------------------------------------------- plots


def plot_curves(score_frames: dict[str, Any], roc_path: str, pr_path: str) -> tuple[str, str]:
    """ROC and PR curves, one figure each, every detector whose test rows have both labels.

    ``score_frames`` maps detector name to a frame with ``score`` and ``label``
    (1, 0 or NaN; NaN rows are left out, as in the metrics).
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    plt = _pyplot()
    fig_roc, ax_roc = plt.subplots(figsize=(6, 5))
    fig_pr, ax_pr = plt.subplots(figsize=(6, 5))
    drawn = 0
    base_rate = None
    for name, df in score_frames.items():
        y = np.asarray(df["label"], dtype="float64")
        s = np.asarray(df["score"], dtype="float64")
        k = ~np.isnan(y) & np.isfinite(s)
        y, s = y[k].astype(int), s[k]
        if len(y) == 0 or y.min() == y.max():
            continue
        colour = _COLOURS.get(name)
        fpr, tpr, _ = roc_curve(y, s)
        ax_roc.plot(fpr, tpr, color=colour, lw=2 if name == "lstm" else 1.2,
                    label=f"{_label(name)} (AUC {roc_auc_score(y, s):.3f})")
        prec, rec, _ = precision_recall_curve(y, s)
        ax_pr.step(rec, prec, where="post", color=colour, lw=2 if name == "lstm" else 1.2,
                   label=f"{_label(name)} (AP {average_precision_score(y, s):.3f})")
        base_rate = float(y.mean())
        drawn += 1
    ax_roc.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test split", xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.set(xlabel="recall", ylabel="precision", title="Precision-recall, test split", xlim=(0, 1), ylim=(0, 1.02))
    if base_rate is not None:
        ax_pr.axhline(base_rate, color="grey", ls=":", lw=1, label=f"chance ({base_rate:.3f})")
    for ax in (ax_roc, ax_pr):
        if drawn:
            ax.legend(loc="lower right" if ax is ax_roc else "upper right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no labelled test records of both classes", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    for fig, path in ((fig_roc, roc_path), (fig_pr, pr_path)):
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return roc_path, pr_path


def timeline_entities(frame: Any, top_n: int = 6, limit: int = MAX_TIMELINES) -> list[str]:
    """Entities to plot: the ``top_n`` by highest score, then those with a malicious record (by highest score)."""
    import pandas as pd

    df = pd.DataFrame({"entity": frame["entity"].astype(str), "score": frame["score"], "label": frame["label"]})
    top = df.groupby("entity")["score"].max().sort_values(ascending=False, kind="stable")
    chosen = list(top.index[:top_n])
    malicious = set(df.loc[df["label"] == 1, "entity"])
    chosen += [e for e in top.index if e in malicious and e not in chosen]
    return chosen[:limit]


def plot_timelines(frame: Any, path: str, top_n: int = 6, title: str = "LSTM scores per entity, test split") -> str:
    """One panel per entity: score over time, threshold line, alerts (red) and true malicious records (black ticks).

    ``frame`` has ``ts``, ``entity``, ``score``, ``threshold``, ``label`` (and
    optionally ``is_anomaly``), one row per flow.
    """
    import pandas as pd

    plt = _pyplot()
    import matplotlib.dates as mdates

    df = pd.DataFrame(frame).copy()
    df["entity"] = df["entity"].astype(str)
    df["ts"] = pd.to_datetime(df["ts"], utc=True).dt.tz_localize(None)
    entities = timeline_entities(df, top_n) if len(df) else []
    n = max(len(entities), 1)
    # Each entity on its own time axis: captures of different hosts need not overlap.
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.1 * n + 0.6), squeeze=False)
    for ax, ent in zip(axes[:, 0], entities):
        d = df[df["entity"] == ent].sort_values("ts", kind="stable")
        thr = float(d["threshold"].iloc[0])
        alert = d["is_anomaly"].to_numpy(dtype=bool) if "is_anomaly" in d else d["score"].to_numpy() >= thr
        ax.plot(d["ts"], d["score"], color=_COLOURS["lstm"], lw=0.8, marker=".", ms=2)
        ax.axhline(thr, color="grey", ls="--", lw=1)
        ax.scatter(d["ts"][alert], d["score"][alert], color="red", s=12, zorder=3)
        mal = d["label"].to_numpy(dtype="float64") == 1
        if mal.any():
            # Ticks along the bottom edge: where the truth says malicious, whatever the score.
            ax.plot(d["ts"][mal], np.zeros(mal.sum()), "|", color="black", ms=10, transform=ax.get_xaxis_transform())
        tag = " (malicious records)" if mal.any() else ""
        ax.set_ylabel("score", fontsize=8)
        locator = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{ent}{tag}: {int(alert.sum())} alerts in {len(d)} flows", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    if not entities:
        axes[0, 0].text(0.5, 0.5, "no scored test records", ha="center", va="center", transform=axes[0, 0].transAxes)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=_COLOURS["lstm"], lw=1, label="score"),
        Line2D([], [], color="grey", ls="--", label="threshold"),
        Line2D([], [], color="red", marker="o", ls="", ms=4, label="alert"),
        Line2D([], [], color="black", marker="|", ls="", ms=8, label="true malicious"),
    ]
    fig.legend(handles=handles, loc="upper right", ncol=4, fontsize=8)
    fig.suptitle(title, x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def history_table(history: Any) -> list[dict[str, Any]]:
    """Per-epoch rows ``{epoch, train_loss, val_loss}`` from a list of dicts or a dict of lists."""
    if not history:
        return []
    if isinstance(history, dict):
        keys = [k for k, v in history.items() if isinstance(v, (list, tuple))]
        n = max((len(history[k]) for k in keys), default=0)
        rows = [{k: history[k][i] if i < len(history[k]) else None for k in keys} for i in range(n)]
    else:
        rows = [dict(r) for r in history if isinstance(r, dict)]
    for i, r in enumerate(rows):
        r.setdefault("epoch", i + 1)
    return rows


def plot_history(history: Any, path: str) -> str | None:
    """Training and validation loss per epoch; None when there is no history."""
    rows = history_table(history)
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in rows]
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        vals = [r.get(key) for r in rows]
        if any(v is not None for v in vals):
            ax.plot(epochs, [np.nan if v is None else float(v) for v in vals], style, ms=4, label=key.replace("_", " "))
    ax.set(xlabel="epoch", ylabel="loss", title="Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- HTML


@dataclass
class Raw:
    """HTML inserted as is (already escaped by the caller)."""

    html: str


@dataclass
class Image:
    """An image by path relative to the page."""

    src: str
    alt: str = ""
    width: int | None = None


@dataclass
class Table:
    """Rows of dicts; ``columns`` picks and orders them (default: keys of the first row)."""

    rows: list[dict[str, Any]]
    columns: list[str] | None = None
    bold: set[tuple[int, str]] = field(default_factory=set)  # (row, column) cells in bold


@dataclass
class Code:
    """Preformatted text (a config, a command), optionally folded."""

    text: str
    summary: str | None = None


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return f"{v:.4g}" if abs(v) >= 1000 or (v != 0 and abs(v) < 0.001) else f"{v:.3f}"
    if isinstance(v, (dict, list)):
        return html.escape(json.dumps(v, default=str))
    return html.escape(str(v))


def _render(block: Any) -> str:
    if block is None:
        return ""
    if isinstance(block, Raw):
        return block.html
    if isinstance(block, Image):
        w = f' width="{int(block.width)}"' if block.width else ""
        return f'<figure><img src="{html.escape(block.src)}" alt="{html.escape(block.alt)}"{w}></figure>'
    if isinstance(block, Code):
        pre = f"<pre>{html.escape(block.text)}</pre>"
        return f"<details><summary>{html.escape(block.summary)}</summary>{pre}</details>" if block.summary else pre
    if isinstance(block, Table):
        rows = block.rows
        cols = block.columns or (list(rows[0].keys()) if rows else [])
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = []
        for i, r in enumerate(rows):
            cells = []
            for c in cols:
                txt = _cell(r.get(c))
                cells.append(f"<td><b>{txt}</b></td>" if (i, c) in block.bold else f"<td>{txt}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        if not rows:
            return "<p><i>none</i></p>"
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    if isinstance(block, str):
        return f"<p>{html.escape(block)}</p>"
    if isinstance(block, dict):
        return _render(Table([{"key": k, "value": v} for k, v in block.items()], ["key", "value"]))
    if isinstance(block, (list, tuple)):
        if block and all(isinstance(b, str) for b in block):
            return "<ul>" + "".join(f"<li>{html.escape(b)}</li>" for b in block) + "</ul>"
        if block and all(isinstance(b, dict) for b in block):
            return _render(Table(list(block)))
        return "\n".join(_render(b) for b in block)
    return f"<p>{html.escape(str(block))}</p>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}td{font-variant-numeric:tabular-nums}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
figure{margin:.8em 0}img{max-width:100%;border:1px solid #eee}.meta{color:#666;font-size:.85em}
"""


def render_html(title: str, sections: Iterable[Any], subtitle: str | None = None) -> str:
    """A self-contained HTML page (inline CSS, images by relative path).

    ``sections`` is a sequence of ``(heading, content)`` pairs. ``content`` is a
    string (a paragraph), a list of strings (bullets), a list of dicts or a
    ``Table`` (a table), a dict (key / value table), an ``Image``, ``Code``, ``Raw``,
    or a list mixing these (rendered in order). Text is escaped.

    >>> page = render_html("Nightly", [("Promotion", "challenger promoted"), ("Drift", [{"feature": "log_dt", "psi": 0.31}])])
    >>> "<td>0.310</td>" in page and page.startswith("<!DOCTYPE html>")
    True
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f'<p class="meta">{html.escape(subtitle)}</p>')
    for sec in sections:
        heading, content = sec if isinstance(sec, (tuple, list)) and len(sec) == 2 else (None, sec)
        parts.append("<section>")
        if heading:
            parts.append(f"<h2>{html.escape(str(heading))}</h2>")
        parts.append(_render(content))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- the evaluation report

_METRIC_COLUMNS = [
    ("roc_auc", "ROC-AUC", True),
    ("pr_auc", "PR-AUC", True),
    ("precision", "precision", True),
    ("recall", "recall", True),
    ("f1", "F1", True),
    ("false_alarms_per_entity_day", "false alarms / entity-day", False),
]


def metrics_table(results: dict[str, Any]) -> Table:
    """Detectors as rows, the compared metrics as columns, the best of each column in bold."""
    names = [k for k, v in results.items() if isinstance(v, dict) and "n" in v and "threshold" in v]
    rows = []
    for name in names:
        m = results[name]
        row = {"detector": _label(name)}
        for key, head, _ in _METRIC_COLUMNS:
            row[head] = m.get(key)
        row["threshold"] = m.get("threshold")
        row["alerts"] = m.get("n_alerts")
        row["threshold from"] = m.get("threshold_source")
        rows.append(row)
    bold = set()
    for key, head, higher in _METRIC_COLUMNS:
        vals = [(i, r[head]) for i, r in enumerate(rows) if r[head] is not None]
        if vals:
            best = (max if higher else min)(v for _, v in vals)
            bold |= {(i, head) for i, v in vals if v == best}
    cols = ["detector"] + [h for _, h, _ in _METRIC_COLUMNS] + ["threshold", "alerts", "threshold from"]
    return Table(rows, cols, bold)


def _per_label_table(results: dict[str, Any]) -> Table:
    names = [k for k, v in results.items() if isinstance(v, dict) and "recall_per_label_detail" in v]
    details = sorted({d for n in names for d in results[n]["recall_per_label_detail"]})
    rows = []
    for d in details:
        row: dict[str, Any] = {"label_detail": d}
        for n in names:
            per = results[n]["recall_per_label_detail"].get(d) or {}
            row.setdefault("malicious records", per.get("n"))
            row[f"recall {_label(n)}"] = per.get("recall")
        rows.append(row)
    return Table(rows)


def _split_table(split: dict[str, Any]) -> Table:
    counts = split.get("counts", {})
    bounds = split.get("boundaries", {}) or {}
    rows = []
    for s in ("train", "val", "test"):
        c = counts.get(s, {})
        b = bounds.get(s)
        rows.append({
            "split": s,
            "from": b[0] if isinstance(b, (list, tuple)) and b else b,
            "to": b[1] if isinstance(b, (list, tuple)) and len(b) > 1 else None,
            "rows": c.get("rows"), "malicious": c.get("malicious"), "benign": c.get("benign"),
            "unlabelled": c.get("unlabelled"),
        })
    return Table(rows)


def write_report(
    report_dir: str, results: dict[str, Any], score_frames: dict[str, Any], history: Any = None, top_n: int = 6
) -> list[str]:
    """Write ``metrics.json``, ``roc.png``, ``pr.png``, ``timelines.png``, ``loss.png`` (with a
    history) and ``report.html`` into the local folder ``report_dir``; return their paths.

    ``score_frames`` maps detector name to its per-flow test frame (``ts``, ``entity``,
    ``score``, ``threshold``, ``is_anomaly``, ``label``); the timelines show ``lstm``,
    or the first detector when there is no LSTM.
    """
    os.makedirs(report_dir, exist_ok=True)
    paths = []
    metrics_path = os.path.join(report_dir, "metrics.json")
    with open(metrics_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True, default=str)
    paths.append(metrics_path)

    roc, pr = plot_curves(score_frames, os.path.join(report_dir, "roc.png"), os.path.join(report_dir, "pr.png"))
    paths += [roc, pr]
    main = "lstm" if "lstm" in score_frames else next(iter(score_frames), None)
    timelines = None
    if main is not None:
        timelines = plot_timelines(score_frames[main], os.path.join(report_dir, "timelines.png"), top_n,
                                   title=f"{_label(main)} scores per entity, test split")
        paths.append(timelines)
    loss = plot_history(history, os.path.join(report_dir, "loss.png"))
    if loss:
        paths.append(loss)

    summary = results.get("summary", {}) or {}
    model = summary.get("model") or {}
    losses = results.get("where_lstm_loses") or []
    sections: list[Any] = [("Metrics on the test split", [
        metrics_table(results),
        "Every detector was fitted on the training split, its threshold calibrated on validation "
        "(the LSTM's is the one stored in its checkpoint), and measured on the test split; "
        "a flow's score is the highest of its entities'. Best value per column in bold.",
    ])]
    if "lstm" in results:
        sections.append(("Where the LSTM loses", losses or ["No baseline beats the LSTM on ROC-AUC, PR-AUC, F1, "
                                                            "recall or false alarms per entity-day."]))
    if summary.get("skipped"):
        sections.append(("Baselines not run", [f"{k}: {v}" for k, v in summary["skipped"].items()]))
    sections.append(("Curves", [Image("roc.png", "ROC curves"), Image("pr.png", "precision-recall curves")]))
    if timelines:
        sections.append(("Scores over time", [
            f"The {top_n} entities with the highest scores, then every entity with a malicious record "
            f"(at most {MAX_TIMELINES}).",
            Image("timelines.png", "per-entity score timelines"),
        ]))
    per_label = _per_label_table(results)
    if per_label.rows:
        sections.append(("Recall per attack label", per_label))
    if results.get("split"):
        sections.append(("Split", _split_table(results["split"])))
    if loss:
        sections.append(("Training", [Image("loss.png", "loss per epoch"), history_table(history)]))
    if model:
        info = {k: v for k, v in model.items() if k not in ("config", "metrics")}
        block: list[Any] = [info]
        if model.get("config"):
            block.append(Code(json.dumps(model["config"], indent=2, default=str), "config"))
        sections.append(("Model", block))
    subtitle = " · ".join(
        s for s in (
            f"model {summary.get('model_version')}" if summary.get("model_version") else None,
            f"archive {summary.get('archive')}" if summary.get("archive") else None,
            f"{summary.get('test_rows')} test flows, {summary.get('test_malicious')} malicious"
            if summary.get("test_rows") is not None else None,
        ) if s
    )
    page = render_html("nadray evaluation", sections, subtitle or None)
    html_path = os.path.join(report_dir, "report.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(page)
    paths.append(html_path)
    return paths
