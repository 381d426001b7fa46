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
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from nadray import placement, storage
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
    callbacks = list(callbacks or [])
    callbacks.append(_ReleaseStoppedTrainRuns())
    if rtune.Tuner.can_restore(exp_path):
        log.info("tune: resuming the interrupted search at %s", exp_path)
        tuner = rtune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
        # The restored RunConfig carries the first run's (pickled) callbacks: this
        # run's callbacks replace them. Ray keeps the Tuner's state in _local_tuner
        # (None only under Ray Client, which nadray does not use).
        local = getattr(tuner, "_local_tuner", None)
        if local is not None:
            local.get_run_config().callbacks = callbacks
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
                # One past the last epoch: a trial that trains to the end returns by
                # itself instead of being stopped by Tune while its Train run shuts down.
                max_t=cfg.train.max_epochs + 1,
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
                callbacks=callbacks,
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


def _ReleaseStoppedTrainRuns():  # noqa: N802 (a factory: Tune's Callback base is imported lazily)
    from ray.tune import Callback

    class ReleaseStoppedTrainRuns(Callback):
        """Give back the CPUs of Train runs whose trial was stopped.

        When ASHA stops a trial, Tune kills the trial actor and, with it, the Train
        controller, whose worker group then keeps its CPUs (``nadray.placement``):
        the next trial would wait for ever on a small cluster. Groups whose
        controller has died are found from the GCS at most every 2 seconds; a
        group is never released while its controller lives (releasing it then
        reads as a worker failure, and the controller builds a new one).
        """

        def __init__(self):
            self._next_sweep = 0.0

        def on_step_begin(self, iteration, trials, **info):
            now = time.monotonic()
            if now >= self._next_sweep:
                self._next_sweep = now + 2.0
                placement.release_orphaned_placement_groups()

    return ReleaseStoppedTrainRuns()


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


def results_frame(results, params: list[Param]):
    """One row per trial: id, status, hyperparameters, last validation metrics,
    epochs run (training_iteration), wall time, error."""
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


# --------------------------------------------------------------------------- Train inside Tune

# Keys whose values change the prepared features that every trial shares; only the
# window length is cut per batch inside the training loop, so only it may vary.
_SEARCHABLE_SECTIONS = ("model", "train", "threshold")
_SEARCHABLE_DATA_KEYS = ("data.sequence_length",)


def check_searchable(params: list[Param]) -> None:
    """Trials share one prepared dataset: refuse keys that would need another."""
    for p in params:
        section = p.key.split(".", 1)[0]
        if section not in _SEARCHABLE_SECTIONS and p.key not in _SEARCHABLE_DATA_KEYS:
            raise ConfigError(
                f"tune.space[{p.key!r}]: cannot be searched; trials share the features prepared once, so only "
                f"{', '.join(_SEARCHABLE_DATA_KEYS)} and {', '.join(s + '.*' for s in _SEARCHABLE_SECTIONS)} may vary"
            )


def _train_trial(config: dict[str, Any], shared: dict[str, Any] | None = None) -> None:
    """One trial: the trial's Config, then a Ray Train fit of ``train_loop_per_worker``
    reporting every epoch to Tune (Train V2: the trial builds and fits the trainer)."""
    import ray
    from ray import tune as rtune
    from ray.tune.integration.ray_train import TuneReportCallback

    from nadray import train as core

    assert shared is not None
    cfg = trial_config(config_from_dict(shared["base"]), {k: config[k] for k in shared["keys"]})
    arrays = dict(shared["arrays"])
    # build_trainer reads the feature count from x's shape, so x arrives as an array.
    arrays["x"] = ray.get(arrays["x"])
    train_idx, pos_weight = shared["by_objective"][cfg.model.objective]
    arrays["train_idx"], arrays["pos_weight"] = train_idx, pos_weight
    trial_id = rtune.get_context().get_trial_id()
    trainer = core.build_trainer(arrays, cfg, {
        # A stable run folder per trial: a resumed trial continues its own Train run.
        "name": trial_id,
        "storage_path": shared["train_storage"],
        "callbacks": [TuneReportCallback()],  # Ray: each epoch's report becomes a Tune result
    }, label=f"trial {trial_id}")
    # Not the snapshot-based cleanup of train.fit: the next trial may start at any
    # moment. A run that ends normally removes its own group; the group of a stopped
    # one is released by the search's ReleaseStoppedTrainRuns callback.
    trainer.fit()


def _objective_indices(data: Any, objectives: list[str]) -> dict[str, tuple[np.ndarray, float]]:
    """Training events and class weight for each objective (the same rules as
    ``prepare_training_data``); objectives the training split cannot support are left out."""
    from nadray import train as core

    tr = core._event_split_masks(data.events, data.splits)[0]
    y = data.events.label
    known = ~np.isnan(y)
    n_pos = int(np.sum(tr & known & (y == 1)))
    n_neg = int(np.sum(tr & known & (y == 0)))
    out = {}
    for obj in objectives:
        if obj in ("supervised", "hybrid") and (n_pos == 0 or n_neg == 0):
            log.warning("tune: model.objective=%s left out of the search: it needs training events labelled "
                        "both 0 and 1, got %d benign and %d malicious", obj, n_neg, n_pos)
            continue
        use = tr & (data.pred_mask if obj == "unsupervised" else data.cls_mask if obj == "supervised"
                    else (data.pred_mask | data.cls_mask))
        out[obj] = (np.flatnonzero(use), float(n_neg / n_pos) if n_pos else 1.0)
    return out


@dataclass
class TuneResult:
    """What ``nadray tune`` prints: the registered version and the search's table."""

    version: str
    registry: str
    experiment: str
    metric: str
    mode: str
    best_trial: str
    best_params: dict[str, Any]
    best_value: float | None
    val_metrics: dict[str, Any]
    test_metrics: dict[str, Any]
    promoted: bool
    promotion_reason: str
    results: Any = None  # pandas DataFrame, one row per trial
    resumed_registration: bool = False

    def summary(self) -> str:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        df = self.results
        n = 0 if df is None else len(df)
        status = "" if df is None else ", ".join(f"{k} {v}" for k, v in df["status"].value_counts().items())
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.best_params.items())
        t = self.test_metrics or {}
        return "\n".join([
            f"search {self.experiment}: {n} trials ({status}), optimising {self.metric} ({self.mode})",
            f"best trial {self.best_trial}: {self.metric} {fmt(self.best_value)}; {params}",
            f"registered {self.registry}@{self.version}" + (" (champion)" if self.promoted else "")
            + f": {self.promotion_reason}" + (" [registered by an earlier run]" if self.resumed_registration else ""),
            f"validation: PR-AUC {fmt(self.val_metrics.get('pr_auc'))}, ROC-AUC {fmt(self.val_metrics.get('roc_auc'))}; "
            f"test: PR-AUC {fmt(t.get('pr_auc'))}, ROC-AUC {fmt(t.get('roc_auc'))}, F1 {fmt(t.get('f1'))}",
            f"per-trial results: {RESULTS_CSV} and {METRIC_PLOT} in the version folder",
        ])


def tune(archive: str, registry: str, cfg: Config, name: str | None = None,
         callbacks: list | None = None) -> TuneResult:
    """Search ``cfg.tune.space`` with Ray Tune over the training loop; register the best trial.

    ``name``: the experiment under ``<registry>/_tune/`` (default: derived from the
    archive, registry and config, so rerunning the same command resumes an
    interrupted search). ``callbacks``: extra Ray Tune callbacks (progress, tests).
    """
    import ray
    from ray import tune as rtune

    from nadray import train as core
    from nadray.data import load_flows, time_split
    from nadray.runtime import cluster_cpus, ensure_ray

    # 1. The space, checked before anything starts.
    params = parse_space(cfg.tune.space, cfg.tune.search, cfg)
    check_searchable(params)
    name = name or experiment_name(archive, registry, cfg)
    storage_path = tune_root(registry)
    exp_path = storage.join(storage_path, name)
    done = storage.join(exp_path, REGISTERED_MARKER)
    if storage.exists(done):
        return _earlier_result(registry, cfg, storage.read_json(done))

    # 2. The data, once, in the driver; trials share it through the object store.
    ensure_ray()
    core.check_gpus(cfg)
    flows = load_flows(archive, cfg)
    splits = time_split(flows, cfg)
    data = core.prepare_training_data(splits.flows, cfg, splits)
    obj_param = next((p for p in params if p.key == "model.objective"), None)
    objectives = list(obj_param.values) if obj_param else [cfg.model.objective]
    by_objective = _objective_indices(data, objectives)
    if not by_objective:
        raise ConfigError(f"tune.space['model.objective']: none of {objectives} can train on this training split")
    if obj_param and len(by_objective) < len(objectives):
        params = [Param(p.key, "values", values=tuple(v for v in p.values if v in by_objective))
                  if p is obj_param else p for p in params]
    val_labels = splits.flows.column("label").to_pandas().astype("Float64").to_numpy("float64", na_value=np.nan)
    metric, mode = choose_metric(cfg, val_labels[splits.val_mask])
    arrays = data.arrays()
    shared = {
        "base": cfg.to_dict(),
        "keys": [p.key for p in params],
        "arrays": {k: ray.put(v) for k, v in arrays.items() if k != "train_idx"},
        "by_objective": {o: (ray.put(idx), w) for o, (idx, w) in by_objective.items()},
        "train_storage": storage.join(exp_path, "train_runs"),
    }
    concurrent = max_concurrent_trials(cluster_cpus(), cfg)
    log.info("tune: %s search %s on %d events (%d features): %s", cfg.tune.search, name, len(data.events),
             data.encoder.n_features, ", ".join(p.key for p in params))

    # 3. The search (or its continuation).
    results = run_search(
        rtune.with_parameters(_train_trial, shared=shared), param_space(params, cfg.tune.search), cfg,
        storage_path=storage_path, name=name, metric=metric, mode=mode, max_concurrent=concurrent,
        callbacks=callbacks,
    )
    df = results_frame(results, params)

    # 4. The best trial, registered like `nadray train` registers a run.
    ok = df[(df["status"] == "TERMINATED") & df[metric].notna() & df["checkpoint_path"].notna()]
    if ok.empty:
        write_results(df, params, metric, exp_path)
        raise NadrayError(f"tune: no trial of {name} finished with a {metric} and a checkpoint; "
                          f"see {storage.join(exp_path, RESULTS_CSV)}")
    best = ok.sort_values(metric, ascending=(mode == "min"), kind="stable").iloc[0]
    sampled = {p.key: best[p.key] for p in params}
    best_cfg = trial_config(cfg, sampled)
    idx, weight = by_objective[best_cfg.model.objective]
    best_data = dataclasses.replace(data, train_idx=idx, pos_weight=weight)
    tune_meta = {"experiment": exp_path, "search": cfg.tune.search, "metric": metric, "mode": mode,
                 "trial_id": best["trial_id"], "params": sampled, "value": _num(best[metric]),
                 "trials": int(len(df))}
    version, metrics = _register_checkpoint(archive, registry, best_data, best_cfg, best["checkpoint_path"],
                                            tune_meta)
    write_results(df, params, metric, _version_dir(registry, cfg, version))
    promoted, reason = _maybe_promote(registry, cfg, version, metric, metrics, splits, val_labels)
    record = {"version": version, "promoted": promoted, "reason": reason, **tune_meta,
              "val": metrics.get("val", {}), "test": metrics.get("test", {})}
    storage.write_json_atomic(done, record)
    return TuneResult(version, registry, name, metric, mode, best["trial_id"], sampled, _num(best[metric]),
                      metrics.get("val", {}), metrics.get("test", {}), promoted, reason, df)


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _version_dir(registry: str, cfg: Config, version: str) -> str:
    from nadray import registry as reg

    return reg.version_uri(registry, version, cfg.registry.name)


def _register_checkpoint(archive: str, registry: str, data: Any, cfg: Config, checkpoint_path: str,
                         tune_meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The trial's best-validation weights -> threshold, test metrics -> a registry version,
    through the same ``load_fitted`` / ``register_fitted`` as ``nadray train``."""
    from nadray import train as core

    fitted = core.load_fitted(checkpoint_path, data, cfg)
    result = core.register_fitted(archive, registry, cfg, data, fitted, promote_if_first=False,
                                  extra_meta={"tune": tune_meta})
    return result.version, result.metrics


def _maybe_promote(registry: str, cfg: Config, version: str, metric: str, metrics: dict[str, Any],
                   splits: Any, val_labels: np.ndarray) -> tuple[bool, str]:
    """Promote when there is no champion, or when the new version beats it on the same
    validation flows (flow-level PR-AUC or ROC-AUC, scored by each model's Scorer)."""
    from nadray import registry as reg
    from nadray.metrics import ranking_metrics
    from nadray.scorer import Scorer

    name = cfg.registry.name
    champ = reg.champion(registry, name)
    if champ is None:
        reason = "first version in this registry (tuned)"
        reg.promote(registry, version, reason, name=name)
        return True, reason
    key = {"val_pr_auc": "pr_auc", "val_roc_auc": "roc_auc"}.get(metric)
    if key is None:
        return False, (f"not promoted: validation has no labels of both kinds, so it cannot be compared with "
                       f"champion {champ['version']}")
    new = (metrics.get("val") or {}).get(key)
    try:
        old_scores = Scorer.from_ref(f"{registry}@{champ['version']}", name).score_table(splits.flows)["score"]
        old = ranking_metrics(val_labels[splits.val_mask], old_scores.to_numpy("float64")[splits.val_mask])[key]
    except NadrayError as e:
        return False, f"not promoted: champion {champ['version']} could not score the validation flows ({e})"
    if new is None or old is None:
        return False, f"not promoted: validation {key} undefined (new {new}, champion {old})"
    if not new > old:  # both are AUCs: higher is better
        return False, f"not promoted: validation {key} {new:.4f} <= champion {champ['version']} {old:.4f}"
    reason = f"tuned: validation {key} {new:.4f} > champion {champ['version']} {old:.4f}"
    reg.promote(registry, version, reason, name=name, extra={"previous": champ["version"]})
    return True, reason


def _earlier_result(registry: str, cfg: Config, rec: dict[str, Any]) -> TuneResult:
    """The search already finished and registered its best trial: report that version."""
    import pandas as pd

    log.info("tune: search %s already finished and registered %s", rec.get("experiment"), rec["version"])
    csv = storage.join(_version_dir(registry, cfg, rec["version"]), RESULTS_CSV)
    df = pd.read_csv(storage.get_fs(csv)[0].open(storage.get_fs(csv)[1])) if storage.exists(csv) else None
    return TuneResult(rec["version"], registry, os.path.basename(str(rec["experiment"]).rstrip("/")),
                      rec["metric"], rec["mode"], rec["trial_id"], rec["params"], rec.get("value"),
                      rec.get("val", {}), rec.get("test", {}), rec["promoted"], rec["reason"], df,
                      resumed_registration=True)
