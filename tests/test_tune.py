"""nadray.tune: search-space parsing (no Ray), the search runner with a cheap function
trainable (grid, random, resume after an interruption), and end-to-end Train-inside-Tune
on a small real IoT-23 slice."""

from __future__ import annotations

import os
import signal

import numpy as np
import pandas as pd
import pytest

from nadray import tune as nt
from nadray.config import Config, load_config
from nadray.errors import ConfigError

# --------------------------------------------------------------------------- parsing, no Ray


def test_parse_space_lists_and_distributions():
    space = {
        "model.hidden_size": [16, 32],
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "model.dropout": {"uniform": [0.0, 0.5]},
        "data.sequence_length": {"randint": [4, 17]},
        "model.objective": ["unsupervised", "hybrid"],
    }
    params = {p.key: p for p in nt.parse_space(space, "random")}
    assert params["model.hidden_size"].kind == "values"
    assert params["model.hidden_size"].values == (16, 32)
    assert params["train.lr"].kind == "loguniform" and params["train.lr"].log_scale
    assert (params["data.sequence_length"].lo, params["data.sequence_length"].hi) == (4, 17)
    assert params["model.objective"].values == ("unsupervised", "hybrid")


def test_default_space_parses_for_random_and_names_the_distribution_for_grid():
    cfg = Config()
    assert len(nt.parse_space(cfg.tune.space, "random", cfg)) == len(cfg.tune.space)
    with pytest.raises(ConfigError, match=r"train\.lr.*grid search needs a list"):
        nt.parse_space(cfg.tune.space, "grid", cfg)


@pytest.mark.parametrize(
    "space, match",
    [
        ({"model.hiden_size": [8]}, r"model\.hiden_size"),
        ({"modle.hidden_size": [8]}, r"modle\.hidden_size"),
        ({"model.hidden_size": [8, 0]}, r"model\.hidden_size.*value 0.*\[1, 4096\]"),
        ({"model.hidden_size": ["big"]}, r"model\.hidden_size.*expected an integer"),
        ({"model.hidden_size": []}, r"model\.hidden_size.*empty"),
        ({"model.hidden_size": 64}, r"model\.hidden_size.*expected a list of values"),
        ({"train.lr": {"normal": [0, 1]}}, r"train\.lr.*expected a list of values"),
        ({"train.lr": {"loguniform": [0.0, 0.1]}}, r"train\.lr.*lo > 0"),
        ({"train.lr": {"loguniform": [0.1, 0.01]}}, r"train\.lr.*lo < hi"),
        ({"train.lr": {"uniform": [0.001]}}, r"train\.lr.*\[lo, hi\]"),
        ({"train.lr": {"uniform": [0.001, 2.0]}}, r"train\.lr.*upper bound.*\(0, 1\)"),
        ({"model.hidden_size": {"uniform": [8, 64]}}, r"model\.hidden_size.*expected an integer"),
        ({"model.hidden_size": {"randint": [8.0, 64.5]}}, r"model\.hidden_size.*integer bounds"),
        ({"model.num_layers": {"randint": [1, 10]}}, r"model\.num_layers.*largest value 9"),
        ({"tune.num_samples": [1, 2]}, r"tune\.num_samples.*cannot be searched"),
        ({}, r"tune\.space.*non-empty"),
    ],
)
def test_parse_space_errors_name_the_key(space, match):
    with pytest.raises(ConfigError, match=match):
        nt.parse_space(space, "random")


def test_parse_space_rejects_unknown_search():
    with pytest.raises(ConfigError, match="tune.search"):
        nt.parse_space({"model.hidden_size": [8]}, "bayes")


def test_grid_size_and_trial_config():
    params = nt.parse_space({"model.hidden_size": [8, 16], "model.num_layers": [1], "train.lr": [0.01, 0.02]}, "grid")
    assert nt.grid_size(params) == 4
    base = load_config(overrides=["train.max_epochs=2"])
    cfg = nt.trial_config(base, {"model.hidden_size": np.int64(16), "train.lr": np.float64(0.02)})
    assert cfg.model.hidden_size == 16 and isinstance(cfg.model.hidden_size, int)
    assert cfg.train.lr == 0.02 and cfg.train.max_epochs == 2
    assert base.model.hidden_size == 64  # the base is not modified
    with pytest.raises(ConfigError, match=r"model\.dropout.*sampled value 1\.5"):
        nt.trial_config(base, {"model.dropout": 1.5})


def test_param_space_domains():
    from ray import tune as rtune
    from ray.tune.search.sample import Categorical, Float, Integer

    params = nt.parse_space({"model.hidden_size": [8, 16], "train.lr": {"loguniform": [1e-3, 1e-2]},
                             "model.num_layers": {"randint": [1, 3]}}, "random")
    space = nt.param_space(params, "random")
    assert isinstance(space["model.hidden_size"], Categorical)
    assert isinstance(space["train.lr"], Float) and isinstance(space["model.num_layers"], Integer)
    grid = nt.param_space(nt.parse_space({"model.hidden_size": [8, 16]}, "grid"), "grid")
    assert grid["model.hidden_size"] == rtune.grid_search([8, 16])


@pytest.mark.parametrize("cpus, workers, per_worker, expected",
                         [(2, 1, 1.0, 1), (1, 1, 1.0, 1), (8, 1, 1.0, 4), (16, 2, 1.0, 5), (8, 1, 0.5, 5)])
def test_max_concurrent_trials(cpus, workers, per_worker, expected):
    cfg = load_config(overrides=[f"train.num_workers={workers}", f"train.cpus_per_worker={per_worker}"])
    assert nt.max_concurrent_trials(cpus, cfg) == expected


def test_choose_metric_falls_back_without_both_labels(caplog):
    cfg = Config()
    assert nt.choose_metric(cfg, [0, 1, np.nan, 0]) == ("val_pr_auc", "max")
    with caplog.at_level("WARNING", logger="nadray.tune"):
        assert nt.choose_metric(cfg, [0, 0, np.nan]) == ("val_loss", "min")
    assert "val_pr_auc is undefined" in caplog.text
    assert nt.choose_metric(cfg, []) == ("val_loss", "min")
    cfg.tune.metric, cfg.tune.mode = "val_loss", "min"
    assert nt.choose_metric(cfg, [0, 0]) == ("val_loss", "min")
    cfg.tune.metric = "accuracy"
    with pytest.raises(ConfigError, match="tune.metric.*accuracy"):
        nt.choose_metric(cfg, [0, 1])


def test_experiment_name_is_stable_and_ignores_the_time_budget(tmp_path):
    a, r = str(tmp_path / "a"), str(tmp_path / "r")
    cfg = Config()
    name = nt.experiment_name(a, r, cfg)
    assert name.startswith("tune-random-")
    assert nt.experiment_name(a + "/", r, Config()) == name or nt.experiment_name(a, r, Config()) == name
    cfg.tune.time_budget_s = 60
    assert nt.experiment_name(a, r, cfg) == name
    cfg.model.hidden_size = 16
    assert nt.experiment_name(a, r, cfg) != name
    assert nt.experiment_name(a, str(tmp_path / "other"), Config()) != name


def test_plot_metric_writes_png(tmp_path):
    params = nt.parse_space({"model.hidden_size": [8, 16], "train.lr": {"loguniform": [1e-3, 1e-2]},
                             "model.objective": ["unsupervised", "hybrid"]}, "random")
    df = pd.DataFrame({"trial_id": ["a", "b", "c"], "model.hidden_size": [8, 16, 8],
                       "train.lr": [1e-3, 5e-3, 2e-3], "model.objective": ["hybrid", "unsupervised", "hybrid"],
                       "val_pr_auc": [0.5, 0.7, None]})
    nt.write_results(df, params, "val_pr_auc", str(tmp_path))
    assert (tmp_path / nt.METRIC_PLOT).read_bytes()[:4] == b"\x89PNG"
    assert len(pd.read_csv(tmp_path / nt.RESULTS_CSV)) == 3


# --------------------------------------------------------------------------- the search runner, cheap trials


def _cheap_trial():
    """Stands in for the Train-inside-Tune trial: two 'epochs', metric from the config.
    (Built in a function so cloudpickle ships it by value: workers cannot import tests.)"""

    def trial(config):
        from ray import tune as rtune

        h = float(config["model.hidden_size"])
        for epoch in range(1, 3):
            rtune.report({"val_pr_auc": h / 100 + epoch / 1000, "val_loss": 1 / h, "val_roc_auc": 0.5,
                          "train_loss": 1.0, "checkpoint_path": f"/ckpt/{h}/{epoch}"})

    return trial


def _search(tmp_path, space, search, cfg_over=(), callbacks=None):
    cfg = load_config(overrides=[f"tune.search={search}", "train.max_epochs=2", *cfg_over])
    params = nt.parse_space(space, search, cfg)
    results = nt.run_search(
        _cheap_trial(), nt.param_space(params, search), cfg, storage_path=str(tmp_path / "_tune"),
        name="exp", metric="val_pr_auc", mode="max", max_concurrent=1, callbacks=callbacks,
    )
    return params, results


@pytest.mark.slow
def test_grid_search_runs_every_combination(ray_session, tmp_path):
    params, results = _search(tmp_path, {"model.hidden_size": [8, 16], "model.num_layers": [1]}, "grid")
    df = nt.results_frame(results, params)
    assert sorted(df["model.hidden_size"]) == [8, 16]
    assert (df["status"] == "TERMINATED").all() and (df["training_iteration"] == 2).all()


@pytest.mark.slow
def test_random_search_resumes_after_interrupt(ray_session, tmp_path):
    from ray.tune import Callback

    class InterruptAfterFirst(Callback):
        """Ctrl+C once the first trial has finished (Tune saves state and stops)."""

        def __init__(self):
            self.done = []

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done.append((trial.trial_id, trial.last_result["timestamp"]))
            if len(self.done) == 1:
                os.kill(os.getpid(), signal.SIGINT)

    space = {"model.hidden_size": [8, 16, 32, 64], "train.lr": {"loguniform": [1e-3, 1e-2]}}
    first = InterruptAfterFirst()
    with pytest.raises(nt.TuneInterrupted, match="rerun the same command"):
        _search(tmp_path, space, "random", ["tune.num_samples=4"], callbacks=[first])
    assert len(first.done) == 1
    done_id, done_ts = first.done[0]

    second = InterruptAfterFirst.__new__(InterruptAfterFirst)  # records, never interrupts
    second.done = [None]
    params, results = _search(tmp_path, space, "random", ["tune.num_samples=4"], callbacks=[second])
    df = nt.results_frame(results, params)
    assert len(df) == 4 and (df["status"] == "TERMINATED").all()
    rerun = [tid for tid, _ in second.done[1:]]
    assert done_id not in rerun, "the trial finished before the interrupt ran again"
    assert len(rerun) == 3
    row = df[df["trial_id"] == done_id].iloc[0]
    assert row["training_iteration"] == 2
    last = {r.metrics["trial_id"]: r.metrics["timestamp"] for r in results}
    assert last[done_id] == done_ts


# --------------------------------------------------------------------------- Train inside Tune, end to end

IOT23 = ["CTU-Honeypot-Capture-4-1", "CTU-Malware-Capture-44-1"]
TINY = ["train.max_epochs=2", "train.batch_size=64", "train.max_windows=2000", "tune.grace_period=1"]


@pytest.fixture(scope="module")
def tune_archive(shared_data, tmp_path_factory, ray_session):
    """A small real slice: an IoT-23 honeypot capture and a small labelled malware capture."""
    from nadray.ingest import ingest

    root = tmp_path_factory.mktemp("tune")
    d = shared_data / "iot23_small_scenarios"
    report = ingest([str(d / f"{n}-labeled.csv") for n in IOT23], str(root / "archive"))
    assert report.ok and report.archived > 600
    return root


@pytest.mark.slow
def test_tune_random_registers_best_trial(tune_archive):
    from nadray import registry as reg
    from nadray.scorer import Scorer

    root = tune_archive
    cfg = load_config(overrides=[*TINY, "tune.search=random", "tune.num_samples=3",
                                 'tune.space={"model.hidden_size": [8, 16], "train.lr": {"loguniform": [0.001, 0.01]},'
                                 ' "data.sequence_length": [4, 8]}'])
    registry = str(root / "registry")
    result = nt.tune(str(root / "archive"), registry, cfg)
    assert "registered" in result.summary()
    vdir = reg.version_uri(registry, result.version)
    df = pd.read_csv(os.path.join(vdir, nt.RESULTS_CSV))
    assert len(df) == 3 and set(df["status"]) <= {"TERMINATED"}
    assert {"model.hidden_size", "train.lr", "data.sequence_length", "val_loss", "training_iteration",
            "time_total_s", "status"} <= set(df.columns)
    assert df["training_iteration"].between(1, 2).all()
    assert open(os.path.join(vdir, nt.METRIC_PLOT), "rb").read(4) == b"\x89PNG"
    # The same self-describing checkpoint `nadray train` writes, with the best trial's config.
    scorer = Scorer.from_ref(f"{registry}@{result.version}")
    meta = scorer.meta
    assert meta["tune"]["trial_id"] == result.best_trial
    for k, v in result.best_params.items():
        got = meta["config"][k.split(".")[0]][k.split(".")[1]]
        assert got == pytest.approx(v)
    assert "test" in meta["metrics"] and "threshold" in meta and np.isfinite(scorer.threshold.value)
    assert result.promoted and reg.champion(registry)["version"] == result.version
    # Trials train side by side into one log: each trial's epoch lines name it.
    import pathlib

    import ray

    logs = pathlib.Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*"))
    assert f"trial {result.best_trial}: epoch 1/" in text
    # Rerunning the finished search reports the same version, registering nothing new.
    again = nt.tune(str(root / "archive"), registry, cfg)
    assert again.version == result.version and again.resumed_registration
    assert reg.list_versions(registry) == [result.version]


@pytest.mark.slow
def test_tune_grid_runs_every_combination_and_resumes(tune_archive):
    from ray.tune import Callback

    from nadray import registry as reg

    class InterruptAfterFirst(Callback):
        def __init__(self, interrupt: bool):
            self.interrupt, self.done = interrupt, []

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done.append((trial.trial_id, trial.last_result.get("timestamp")))
            if self.interrupt and len(self.done) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C: Tune saves its state and stops

    root = tune_archive
    registry = str(root / "registry-grid")
    cfg = load_config(overrides=[*TINY, "tune.search=grid",
                                 'tune.space={"model.hidden_size": [8, 16], "model.num_layers": [1]}'])
    first = InterruptAfterFirst(True)
    with pytest.raises(nt.TuneInterrupted):
        nt.tune(str(root / "archive"), registry, cfg, callbacks=[first])
    assert len(first.done) == 1 and reg.list_versions(registry) == []
    second = InterruptAfterFirst(False)
    result = nt.tune(str(root / "archive"), registry, cfg, callbacks=[second])
    assert [t for t, _ in second.done] and first.done[0][0] not in [t for t, _ in second.done]
    df = result.results
    assert sorted(df["model.hidden_size"]) == [8, 16] and (df["status"] == "TERMINATED").all()
    done_row = df[df["trial_id"] == first.done[0][0]]
    assert len(done_row) == 1  # the trial finished before the interrupt is kept, not rerun
    assert reg.list_versions(registry) == [result.version]
