"""``nadray retrain`` / ``jobs/nightly_retrain.py``: the nightly pipeline.

    ingest (staging) -> retrain -> evaluate vs champion -> decide -> commit archive
    -> promote -> notify Serve -> report

Read top to bottom in :func:`retrain`; the pieces live in ``nadray.nightly``
(``staging``: landing, staging archive, commit; ``compare``: split, challenger,
champion, decision, drift; ``report``: night.json and report.html).

Safety: until the promotion decision is made, nothing is written to the main
archive (new data sit in ``<archive>/_staging/<date>/``) and ``champion.json`` is
untouched. Then staging is committed (parts, then manifest entries), and only then
``champion.json`` is written. A night that fails or is stopped before the commit
leaves both as they were (docs/NIGHTLY.md).

Idempotence: a night is keyed by its date and the content hashes of the inputs it
archived. When ``night.json`` for the date says ``complete`` and no landing file is
new to the archive, the run logs "already done" and returns without training.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from nadray.config import Config
from nadray.errors import NadrayError

log = logging.getLogger("nadray.retrain")


@dataclass
class NightReport:
    """The outcome of one night: ``ok`` is False only when the night failed."""

    date: str
    status: str  # "complete", "already done", "failed"
    report: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    @property
    def promoted(self) -> bool:
        return bool((self.record.get("decision") or {}).get("promote"))

    def summary(self) -> str:
        r = self.record
        lines = [f"night {self.date}: {self.status}"]
        if self.status == "already done":
            lines.append(f"  already done at {r.get('finished_at')} (key {str(r.get('key'))[:16]}); no new content, "
                         "nothing trained")
            lines.append(f"  champion: {r.get('champion_after')}")
            if self.report:
                lines.append(f"  report: {self.report}")
            return "\n".join(lines)
        ing = (r.get("ingest") or {}).get("counts")
        if ing:
            lines.append(f"  ingest: {ing.get('files', 0)} new files, {ing.get('archived', 0)} rows archived, "
                         f"{ing.get('quarantined_rows', 0)} rows quarantined, {ing.get('files_refused', 0)} files refused"
                         + (f", {ing['other_logs']} other logs skipped" if ing.get("other_logs") else ""))
        for ref in (r.get("ingest") or {}).get("refused", []):
            reason = str(ref["reason"])
            lines.append(f"  refused: {reason if reason.startswith(ref['source']) else ref['source'] + ': ' + reason}")
        for o in (r.get("ingest") or {}).get("other_logs", []):
            lines.append(f"  skipped: {o['source']}: {o['reason']}")
        for f in r.get("landing", []):
            if f.get("status") == "too recent":
                lines.append(f"  waiting: {f['uri']}: written {f.get('age_s')} s before the scan, under "
                             f"nightly.min_file_age_s={r.get('min_file_age_s')}: left for the next night")
        if r.get("challenger_version"):
            lines.append(f"  challenger {r['challenger_version']} (warm start: "
                         f"{(r.get('warm_start') or {}).get('used')})")
        dec = r.get("decision")
        if dec:
            lines.append(f"  decision: {'PROMOTED' if dec.get('promote') else 'not promoted'} ({dec.get('basis')})")
            lines += [f"    {x}" for x in dec.get("reasons", [])]
        if r.get("champion_after"):
            lines.append(f"  champion: {r['champion_after']}")
        drift = r.get("drift")
        if drift:
            ks, mp = (drift.get("score_shift") or {}).get("ks"), drift.get("max_psi")
            lines.append(f"  drift: {'FLAGGED' if drift.get('flagged') else 'not flagged'} (max PSI "
                         f"{mp if mp is None else round(mp, 3)}, score KS {ks if ks is None else round(ks, 3)}, "
                         f"{drift.get('n_new_entities')} new entities)")
        if r.get("notify"):
            lines.append(f"  serve: {r['notify'].get('status')}")
        for s in r.get("steps", []):
            lines.append(f"  step {s['name']}: {s['seconds']:.1f} s {json.dumps(s.get('counts') or {}, default=str)}")
        if self.error:
            lines.append(f"  FAILED: {self.error}")
        if self.report:
            lines.append(f"  report: {self.report}")
        return "\n".join(lines)


class _Steps:
    """Times and logs each step; the rows go into night.json."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[dict[str, Any]]:
        counts: dict[str, Any] = {}
        log.info("step %s: started", name)
        t0 = time.perf_counter()
        try:
            yield counts
        finally:
            dt = time.perf_counter() - t0
            self.rows.append({"name": name, "seconds": round(dt, 2), "counts": counts})
            log.info("step %s: %.1f s %s", name, dt, json.dumps(counts, default=str))


def _night_date(date: str | None) -> str:
    if date is None:
        return _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    try:
        return _dt.date.fromisoformat(str(date)).isoformat()
    except ValueError:
        raise NadrayError(f"--date: expected YYYY-MM-DD, got {date!r}") from None


def night_key(date: str, shas: list[str]) -> str:
    """The night's identity: its date and the set of input content hashes it archived."""
    return hashlib.sha256((date + "\n" + "\n".join(sorted(set(shas)))).encode()).hexdigest()


def notify_serve(serve_url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """``POST {serve_url}/admin/reload`` (bearer ``$NADRAY_API_TOKEN`` when set); never raises."""
    import urllib.error
    import urllib.request

    url = serve_url.rstrip("/") + "/admin/reload"
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("NADRAY_API_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=b"{}", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = resp.read(4096).decode("utf-8", "replace")
            try:
                answer = json.loads(body)
            except ValueError:
                answer = body
            return {"status": "ok", "url": url, "http_status": resp.status, "answer": answer}
    except urllib.error.HTTPError as e:
        out = {"status": "failed", "url": url, "http_status": e.code, "error": f"HTTP {e.code} {e.reason}"}
    except Exception as e:  # unreachable, timeout, DNS: Serve also polls champion.json
        out = {"status": "failed", "url": url, "error": f"{type(e).__name__}: {e}"}
    log.warning("could not notify Serve at %s: %s (Serve also polls champion.json)", url, out["error"])
    return out


def retrain(landing: str, archive: str, registry: str, date: str | None = None, cfg: Config | None = None,
            warm_start: bool = True) -> NightReport:
    """Run one night; see the module docstring. Returns a :class:`NightReport` (never raises for
    a failed step: the report says what failed, and nothing the night would change has changed)."""
    from nadray import registry as reg
    from nadray.nightly import compare, staging
    from nadray.nightly import report as night_report

    cfg = cfg or Config()
    date = _night_date(date)
    name = cfg.registry.name
    steps = _Steps()
    t_start = time.perf_counter()
    record: dict[str, Any] = {"date": date, "status": "running", "landing": [], "steps": steps.rows,
                              "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                              "config": {"nightly": cfg.to_dict()["nightly"]}}
    frames: dict[str, Any] = {}
    train_scores: dict[str, np.ndarray] = {}
    committed = False
    try:
        # 0. What is new? ------------------------------------------------------------
        with steps("scan") as c:
            files = staging.scan_landing(landing, archive, cfg.nightly.min_file_age_s)
            new = [f for f in files if f.status == "new"]
            c.update(files=len(files), new=len(new), archived=sum(f.status == "archived" for f in files),
                     quarantined=sum(f.status == "quarantined" for f in files),
                     other_logs=sum(f.status == "other log" for f in files),
                     too_recent=sum(f.status == "too recent" for f in files))
            record["min_file_age_s"] = cfg.nightly.min_file_age_s
            record["landing"] = staging.as_dicts(files)
        prev = night_report.read_night(registry, name, date)
        if prev and prev.get("status") == "complete" and not new:
            log.info("night %s already done (key %s) and no new content: nothing to do", date, prev.get("key"))
            return NightReport(date, "already done", storage_report(registry, name, date), prev)

        # 1. Ingest into staging ------------------------------------------------------
        with steps("ingest") as c:
            st = staging.stage(new, archive, date)
            c.update(st.counts())
            record["ingest"] = {"staging": st.staging, "counts": st.counts(), "refused": st.refused,
                                "other_logs": st.other_logs, "failed_inputs": list(st.ingest.failed_inputs)}
            ingested = [fr.source for fr in st.ingest.files if fr.status == "ingested"]
            by_uri = {f.uri: f.sha256 for f in new}
            shas = [by_uri[u] for u in ingested if u in by_uri] + [r["sha256"] for r in st.refused + st.other_logs]
            record["inputs"] = sorted(set(shas))
            record["key"] = night_key(date, shas)

        # 2. The window and its split ------------------------------------------------
        with steps("load") as c:
            end = _dt.datetime.fromisoformat(date).replace(tzinfo=_dt.timezone.utc) + _dt.timedelta(days=1)
            start = end - _dt.timedelta(days=cfg.nightly.window_days)
            flows = staging.load_window(archive, date, start, end)
            record["window"] = {"start": start.isoformat(), "end": end.isoformat(), "rows": flows.num_rows}
            c.update(rows=flows.num_rows, start=start.date().isoformat(), end=end.date().isoformat())
            if flows.num_rows == 0:
                held = staging.held_dates(archive, date)
                hint = (f"; they hold flows dated {held[0]} .. {held[1]}: pass --date within that range or "
                        "raise nightly.window_days" if held else "; they hold no flows")
                raise NadrayError(f"no flows in the window {start.date()} .. {end.date()} "
                                  f"(nightly.window_days={cfg.nightly.window_days}) of {archive} and its staging"
                                  + hint)
            splits, tcfg, split_info = compare.plan_split(flows, cfg)
            record["split"] = split_info
            c.update(split_info["counts"])

        # 3. Train the challenger ------------------------------------------------------
        champ = reg.champion(registry, name)
        champion_version = champ["version"] if champ else None
        record["champion_before"] = champion_version
        with steps("train") as c:
            from nadray.runtime import ensure_ray

            ensure_ray()  # joins RAY_ADDRESS (ray job submit) or starts an embedded Ray
            log.info("training challenger for night %s", date)
            ch = compare.train_challenger(flows, splits, tcfg, registry, champion_version,
                                          run_name=f"nightly-{date}-{reg.new_version()}", warm_start=warm_start)
            record["warm_start"] = ch.warm_start
            c.update(epochs=len(ch.fitted_history), warm_start=ch.warm_start.get("used"),
                     train_windows=int(len(ch.data.train_idx)))

        # 4. Evaluate challenger and champion on the same window ------------------------
        with steps("evaluate") as c:
            compare.evaluate_challenger(ch, splits)
            ev = ch.eval_data
            test = splits.test_mask
            frames["challenger"] = ch.scored.frame(ev.flows, test)
            train_scores["challenger"] = ch.scored.scores[splits.train_mask]
            for b in ev.detectors:
                if b != "lstm":
                    frames[b] = ev.frame(b)
            champion_scored, champion_error = None, None
            if champion_version:
                try:
                    champion_scored = compare.score_champion(registry, champion_version, splits, tcfg, ev.flows)
                    frames["champion"] = champion_scored.frame(ev.flows, test)
                    train_scores["champion"] = champion_scored.scores[splits.train_mask]
                except NadrayError as e:
                    champion_error = str(e)
                    log.warning("champion %s could not be scored: %s", champion_version, e)
            detectors = {"challenger": {**ch.scored.metrics, "version": "(this night)"}}
            stability = {"challenger": ch.scored.stability}
            if champion_scored:
                detectors["champion"] = {**champion_scored.metrics, "version": champion_version}
                stability["champion"] = champion_scored.stability
            for b, m in ch.eval_results.items():
                if b not in ("lstm", "split", "summary", "where_lstm_loses") and isinstance(m, dict):
                    detectors[b] = {**m, "version": "baseline"}
                    stability[b] = {}
            record["comparison"] = {"detectors": detectors, "stability": stability,
                                    "skipped_baselines": ch.eval_results.get("summary", {}).get("skipped"),
                                    "champion_error": champion_error}
            c.update(window_rows=int(test.sum()), window_malicious=int(np.sum(ev.flows["label"].to_numpy()[test] == 1)))

        with steps("drift") as c:
            drift = compare.drift_step(ch.data.events, splits.train_mask, splits.test_mask, tcfg,
                                       scores=ch.event_scores)
            record["drift"] = drift
            mp = drift["max_psi"]
            c.update(flagged=drift["flagged"], max_psi=None if mp is None else round(float(mp), 4),
                     new_entities=drift["n_new_entities"])

        # 5. Decide, register ---------------------------------------------------------
        with steps("decide") as c:
            decision = compare.decide(
                {"metrics": ch.scored.metrics, "stability": ch.scored.stability},
                {"metrics": champion_scored.metrics, "stability": champion_scored.stability} if champion_scored else None,
                cfg, champion_error)
            record["decision"] = decision.to_dict()
            night_tag = {"date": date, "key": record["key"], "decision": decision.to_dict()}
            version = compare.register_challenger(registry, ch, night_tag)
            record["challenger_version"] = version
            c.update(version=version, promote=decision.promote, basis=decision.basis)
            for r in decision.reasons:
                log.info("decision: %s", r)

        # 6. Commit the archive, then the champion ---------------------------------------
        with steps("commit") as c:
            c.update(staging.commit(archive, date))
            committed = True
        with steps("promote") as c:
            if decision.promote:
                reg.promote(registry, version, "; ".join(decision.reasons), name=name,
                            extra={"night": date, "basis": decision.basis})
            record["champion_after"] = (reg.champion(registry, name) or {}).get("version")
            c.update(promoted=decision.promote, champion=record["champion_after"])

        # 7. Tell Serve ---------------------------------------------------------------
        with steps("notify") as c:
            if not cfg.nightly.serve_url:
                record["notify"] = {"status": "skipped: nightly.serve_url not set"}
            elif not decision.promote:
                record["notify"] = {"status": "skipped: champion unchanged"}
            else:
                record["notify"] = notify_serve(cfg.nightly.serve_url)
            c.update(status=record["notify"]["status"])

        # 8. Report ----------------------------------------------------------------------
        record["status"] = "complete"
        record["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
        record["seconds"] = round(time.perf_counter() - t_start, 1)
        with steps("report"):
            uri = night_report.write(registry, name, date, record, frames, train_scores)
        return NightReport(date, "complete", uri, record)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}" if not isinstance(e, NadrayError) else str(e)
        log.error("night %s failed: %s", date, msg)
        log.debug("%s", traceback.format_exc())
        if not committed:
            staging.discard(archive, date)
        record.update(status="failed", error=msg, finished_at=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                      archive_committed=committed)
        uri = None
        try:
            uri = night_report.write(registry, name, date, record, None)
        except Exception as e2:  # the failure itself is what must be reported
            log.warning("could not write the failed night's report: %s", e2)
        return NightReport(date, "failed", uri, record, msg)
    except BaseException:
        # Stopped (SIGTERM via the job entry point, Ctrl-C): drop staging, leave the rest.
        if not committed:
            staging.discard(archive, date)
        raise


def storage_report(registry: str, name: str, date: str) -> str:
    from nadray import storage
    from nadray.nightly.report import REPORT_HTML, night_uri

    return storage.join(night_uri(registry, name, date), REPORT_HTML)
