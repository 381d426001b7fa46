"""Ray Tune over the LSTM: grid and random search on the same training loop.

``nadray tune`` (and ``jobs/tune.py``) call :func:`tune`, which

1. prepares the data once in the driver (archive -> time split -> encoder) and
   shares it with every trial through the object store (``tune.with_parameters``);
2. runs one Ray Train fit of ``nadray.train.train_loop_per_worker`` per trial,
   built by ``nadray.train.build_trainer`` on the trial's config (the base config
   plus the sampled values), reporting to Tune through ``TuneReportCallback``
   (Train V2: a function trainable that fits a ``TorchTrainer`` itself);
3. stops weak trials early with ASHA on the validation metric;
4. registers the best trial's checkpoint as a new version, in the same
   self-describing format ``nadray train`` registers, promotes it only if it
   beats the champion on the same validation data, and writes
   ``tune_results.csv`` (one row per trial) and ``tune_metric.png`` beside it.

A search runs under ``<registry>/_tune/<name>``, with a name derived from the
archive, the registry and the config: rerunning an interrupted search resumes
it (finished trials are kept, unfinished and errored ones continue).

The search space is ``cfg.tune.space``: config keys mapped to a list of values
(``grid_search`` for grid, ``choice`` for random) or to one distribution,
``{"loguniform": [lo, hi]}``, ``{"uniform": [lo, hi]}`` or ``{"randint": [lo, hi]}``
(``hi`` exclusive; random search only).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from nadray import storage
from nadray.config import Config, config_from_dict, set_key, validate
from nadray.errors import ConfigError, NadrayError

log = logging.getLogger("nadray.tune")

DISTRIBUTIONS = ("loguniform", "uniform", "randint")
# What train_loop_per_worker reports each epoch; tune.metric must be one of them.
REPORTED_METRICS = ("val_pr_auc", "val_roc_auc", "val_loss", "train_loss")
FALLBACK_METRIC = ("val_loss", "min")
RESULTS_CSV = "tune_results.csv"
METRIC_PLOT = "tune_metric.png"
# Written in the experiment folder once the best trial is registered, so a rerun
# of a finished search reports that version instead of registering it twice.
REGISTERED_MARKER = "nadray_registered.json"


class TuneInterrupted(NadrayError):
    """The search stopped before every trial finished; rerunning resumes it."""


# --------------------------------------------------------------------------- space


@dataclass(frozen=True)
class Param:
    """One searched config key: a list of ``values`` or a distribution over ``[lo, hi]``."""

    key: str
    kind: str  # "values" or one of DISTRIBUTIONS
    values: tuple[Any, ...] = ()
    lo: float = 0.0
    hi: float = 0.0

    def domain(self, search: str) -> Any:
        """The Ray Tune domain for this parameter under ``search``."""
        from ray import tune as rtune

        if self.kind == "values":
            values = list(self.values)
            return rtune.grid_search(values) if search == "grid" else rtune.choice(values)
        if self.kind == "loguniform":
            return rtune.loguniform(self.lo, self.hi)
        if self.kind == "uniform":
            return rtune.uniform(self.lo, self.hi)
        return rtune.randint(int(self.lo), int(self.hi))

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"


def _check_value(base: Config, key: str, value: Any, what: str) -> Any:
    """Validate ``value`` for ``key`` with the config's own rules; return it as stored."""
    probe = copy.deepcopy(base)
    try:
        set_key(probe, key, value)
    except ConfigError as e:
        raise ConfigError(f"tune.space[{key!r}]: {what}: {e}") from None
    return probe.get(key)


def parse_space(space: dict[str, Any], search: str, base: Config | None = None) -> list[Param]:
    """Check ``cfg.tune.space`` and return its parameters, without Ray.

    Every key must be a config key (``section.name``, not ``tune.*``); every listed
    value and both bounds of a distribution must pass that key's type and rule.
    Grid search takes lists only. Raises ``ConfigError`` naming the key.
    """
    base = base or Config()
    if search not in ("grid", "random"):
        raise ConfigError(f"config key 'tune.search': must be one of ['grid', 'random'], got {search!r}")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"config key 'tune.space': expected a non-empty mapping of config keys, got {space!r}")
    params = []
    for key, spec in space.items():
        if not isinstance(key, str):
            raise ConfigError(f"tune.space: key {key!r} must be a config key like 'model.hidden_size'")
        base.get(key)  # unknown key -> ConfigError naming it
        if key.startswith("tune."):
            raise ConfigError(f"tune.space[{key!r}]: the search's own settings cannot be searched")
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise ConfigError(f"tune.space[{key!r}]: the list of values is empty")
            values = tuple(_check_value(base, key, v, f"value {v!r}") for v in spec)
            params.append(Param(key, "values", values=values))
            continue
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise ConfigError(
                f"tune.space[{key!r}]: expected a list of values or one of "
                f"{{loguniform|uniform|randint: [lo, hi]}}, got {spec!r}"
            )
        kind, bounds = next(iter(spec.items()))
        if search == "grid":
            raise ConfigError(
                f"tune.space[{key!r}]: grid search needs a list of values, got the distribution {spec!r} "
                "(use --search random, or list the values)"
            )
        if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
            raise ConfigError(f"tune.space[{key!r}]: {kind} needs [lo, hi] as two numbers, got {bounds!r}")
        lo, hi = bounds
        if not lo < hi:
            raise ConfigError(f"tune.space[{key!r}]: {kind} needs lo < hi, got [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"tune.space[{key!r}]: loguniform needs lo > 0, got {lo}")
        if kind == "randint":
            if not (isinstance(lo, int) and isinstance(hi, int)):
                raise ConfigError(f"tune.space[{key!r}]: randint needs integer bounds, got [{lo}, {hi}]")
            # hi is exclusive: the largest value sampled is hi - 1.
            _check_value(base, key, lo, f"randint lower bound {lo}")
            _check_value(base, key, hi - 1, f"randint largest value {hi - 1}")
        else:
            # Sampled values are floats: check the key takes floats at both ends.
            _check_value(base, key, float(lo), f"{kind} lower bound {lo}")
            _check_value(base, key, float(hi) - 1e-12 * abs(hi), f"{kind} upper bound {hi}")
        params.append(Param(key, kind, lo=float(lo), hi=float(hi)))
    return params


def param_space(params: list[Param], search: str) -> dict[str, Any]:
    """The Ray Tune ``param_space``: one flat entry per config key."""
    return {p.key: p.domain(search) for p in params}


def grid_size(params: list[Param]) -> int:
    return math.prod(len(p.values) for p in params if p.kind == "values")


def trial_config(base: Config, sampled: dict[str, Any]) -> Config:
    """The base config with ``sampled`` values set (each checked), then validated."""
    cfg = copy.deepcopy(base)
    for key, value in sampled.items():
        if hasattr(value, "item"):  # numpy scalars from Tune's samplers
            value = value.item()
        try:
            set_key(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"tune.space[{key!r}]: sampled value {value!r}: {e}") from None
    return validate(cfg)


# --------------------------------------------------------------------------- plan


def max_concurrent_trials(cpus: float, cfg: Config) -> int:
    """Trials that fit the cluster at once: each needs its Train workers plus one CPU
    of headroom for the Train controller and data tasks."""
    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker + 1
    return max(1, int(math.floor(cpus / per_trial)))


def choose_metric(cfg: Config, val_labels: Any) -> tuple[str, str]:
    """``(metric, mode)`` to optimise: ``cfg.tune.metric`` unless it ranks by labels and
    the validation split lacks labels of both kinds, then ``val_loss`` / min."""
    import numpy as np

    metric, mode = cfg.tune.metric, cfg.tune.mode
    if metric not in REPORTED_METRICS:
        raise ConfigError(f"config key 'tune.metric': must be one of {list(REPORTED_METRICS)}, got {metric!r}")
    if metric in ("val_pr_auc", "val_roc_auc"):
        y = np.asarray(val_labels, dtype="float64")
        y = y[~np.isnan(y)]
        if len(y) == 0 or y.min() == y.max():
            kinds = sorted({int(v) for v in y}) if len(y) else []
            log.warning(
                "tune: validation split has labels %s, not both 0 and 1, so %s is undefined; "
                "optimising %s (%s) instead", kinds or "none", metric, *FALLBACK_METRIC,
            )
            return FALLBACK_METRIC
    return metric, mode


def experiment_name(archive: str, registry: str, cfg: Config) -> str:
    """A stable name for the search: the same archive, registry and config (the time
    budget aside) name the same experiment, so a rerun resumes it."""

    def norm(uri: str) -> str:
        return uri.rstrip("/") if storage.is_s3(uri) else os.path.abspath(uri)

    d = cfg.to_dict()
    d["tune"] = {k: v for k, v in d["tune"].items() if k != "time_budget_s"}
    blob = json.dumps({"archive": norm(archive), "registry": norm(registry), "config": d},
                      sort_keys=True, default=str)
    return f"tune-{cfg.tune.search}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def tune_root(registry: str) -> str:
    return storage.join(registry, "_tune")


# --------------------------------------------------------------------------- search


def run_search(
    trainable: Callable,
    space: dict[str, Any],
    cfg: Config,
    *,
    storage_path: str,
    name: str,
    metric: str,
    mode: str,
    max_concurrent: int,
    callbacks: list | None = None,
):
    """Run (or resume) the Tune experiment ``storage_path/name``; return its ResultGrid.

    ``trainable`` is any function trainable (the Train-inside-Tune one in
    production, a cheap function in tests). Raises ``TuneInterrupted`` when the
    run stopped (Ctrl+C) before every trial ended.
    """
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # The trial only starts and watches its Train run: the CPUs go to Train's workers.
    trainable = rtune.with_resources(trainable, {"cpu": 0.01})
    exp_path = storage.join(storage_path, name)
    if rtune.Tuner.can_restore(exp_path):
        log.info("tune: resuming the interrupted search at %s", exp_path)
        tuner = rtune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
        # The restored RunConfig carries the first run's (pickled) callbacks: this
        # run's callbacks replace them. Ray keeps the Tuner's state in _local_tuner
        # (None only under Ray Client, which nadray does not use).
        local = getattr(tuner, "_local_tuner", None)
        if local is not None:
            local.get_run_config().callbacks = list(callbacks or [])
    else:
        grid = cfg.tune.search == "grid"
        time_budget = cfg.tune.time_budget_s or None
        tune_config = rtune.TuneConfig(
            metric=metric,
            mode=mode,
            # grid: every combination once; random: num_samples draws.
            num_samples=1 if grid else cfg.tune.num_samples,
            time_budget_s=time_budget,
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=cfg.train.max_epochs,
                grace_period=max(1, min(cfg.tune.grace_period, cfg.train.max_epochs)),
            ),
            # Seeded sampling: the same config draws the same trials. The generator
            # also caps concurrency (TuneConfig.max_concurrent_trials needs a Searcher).
            search_alg=BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=max_concurrent),
        )
        tuner = rtune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune_config,
            run_config=rtune.RunConfig(
                name=name,
                storage_path=storage_path,
                callbacks=list(callbacks or []),
                verbose=0,
                failure_config=rtune.FailureConfig(max_failures=0),
            ),
        )
    start = time.monotonic()
    results = tuner.fit()
    trials = _trials(results)
    ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
    # An interrupt leaves trials running or pending, or trials never created (the
    # generator makes them one at a time); a time budget ends the search on purpose.
    budget = cfg.tune.time_budget_s
    out_of_time = bool(budget) and time.monotonic() - start >= 0.95 * budget
    expected = expected_trials(space, cfg)
    if len(ended) < len(trials) or (len(trials) < expected and not out_of_time):
        raise TuneInterrupted(
            f"tune: search {name} stopped after {len(ended)} of {expected} trials; "
            f"rerun the same command to resume it from {exp_path}"
        )
    return results


def expected_trials(space: dict[str, Any], cfg: Config) -> int:
    """Trials a complete search runs: every grid combination once, or num_samples draws."""
    if cfg.tune.search == "grid":
        return math.prod(len(v["grid_search"]) for v in space.values()
                         if isinstance(v, dict) and "grid_search" in v)
    return cfg.tune.num_samples


def _trials(results) -> list:
    """The Tune Trial objects behind a ResultGrid (status, id, config)."""
    return list(results._experiment_analysis.trials)


# --------------------------------------------------------------------------- results


def results_frame(results, params: list[Param], metric: str):
    """One row per trial: id, status, hyperparameters, last validation metrics,
    epochs run (training_iteration), wall time, the metric's best value, error."""
    import pandas as pd

    rows = []
    for t in _trials(results):
        last = dict(t.last_result or {})
        row: dict[str, Any] = {"trial_id": t.trial_id, "status": t.status}
        for p in params:
            v = t.config.get(p.key)
            row[p.key] = v.item() if hasattr(v, "item") else v
        for m in REPORTED_METRICS:
            row[m] = last.get(m)
        row["training_iteration"] = last.get("training_iteration", 0)
        row["time_total_s"] = last.get("time_total_s")
        row["checkpoint_path"] = last.get("checkpoint_path")
        row["error"] = "" if t.status != "ERROR" else _error_line(t)
        rows.append(row)
    cols = ["trial_id", "status", *[p.key for p in params], *REPORTED_METRICS,
            "training_iteration", "time_total_s", "checkpoint_path", "error"]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values("trial_id", kind="stable").reset_index(drop=True)


def _error_line(trial) -> str:
    err = getattr(trial, "error_file", None) or ""
    return f"see {err}" if err else "error"


def plot_metric(df, params: list[Param], metric: str, path: str) -> None:
    """``metric`` against each searched hyperparameter (one panel each), PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(params))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    ok = df[df[metric].notna()] if metric in df else df.iloc[0:0]
    for ax, p in zip(axes.flat, params):
        if p.kind == "values" and not all(isinstance(v, (int, float)) for v in p.values):
            labels = [str(v) for v in p.values]
            x = [labels.index(str(v)) for v in ok[p.key]]
            ax.set_xticks(range(len(labels)), labels)
        else:
            x = list(ok[p.key])
            if p.log_scale:
                ax.set_xscale("log")
        ax.scatter(x, list(ok[metric]), alpha=0.8)
        ax.set_xlabel(p.key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    fig.suptitle(f"{metric} per trial ({len(ok)} with results)")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes_atomic(path, buf.getvalue())


def write_results(df, params: list[Param], metric: str, folder: str) -> None:
    """``tune_results.csv`` and ``tune_metric.png`` into ``folder`` (local or s3://)."""
    storage.write_bytes_atomic(storage.join(folder, RESULTS_CSV), df.to_csv(index=False).encode("utf-8"))
    plot_metric(df, params, metric, storage.join(folder, METRIC_PLOT))
