"""Ray Train end to end on real IoT-23 captures: fit, threshold, register, score; worker-kill resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nadray import registry
from nadray.config import load_config
from nadray.errors import NadrayError

CAPTURES = ["CTU-Honeypot-Capture-7-1", "CTU-Honeypot-Capture-4-1", "CTU-Malware-Capture-44-1"]
SMALL = ["data.sequence_length=8", "data.context_window=16", "model.hidden_size=16", "train.max_epochs=3",
         "train.batch_size=64"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory, shared_data):
    from nadray.ingest import ingest

    uri = str(tmp_path_factory.mktemp("archive"))
    paths = [str(shared_data / "iot23_small_scenarios" / f"{c}-labeled.csv") for c in CAPTURES]
    assert ingest(paths, uri).ok
    return uri


def test_train_registers_and_scores_consistently(ray_session, archive, tmp_path):
    from nadray.archive import read_flows
    from nadray.scorer import Scorer
    from nadray.train import train

    reg = str(tmp_path / "registry")
    # Train on one honeypot, validate on the other, test on the held-out malware capture.
    cfg = load_config(None, SMALL + ["data.holdout_sources=[Malware-Capture-44]", "data.train_end=2019-01-01",
                                     "data.val_end=2030-01-01"])
    result = train(archive, reg, cfg)
    assert result.promoted and registry.champion(reg)["version"] == result.version
    assert result.version in result.summary()
    test = result.metrics["test"]
    assert test["n_labelled"] == 237
    # Quality floor on a capture never seen in training (measured: ROC-AUC 0.98, PR-AUC 0.83
    # at a 11% base rate): low enough for seed noise, high enough to catch a broken model.
    assert test["roc_auc"] >= 0.8 and test["pr_auc"] >= 0.3
    scorer = Scorer.from_ref(reg)
    assert scorer.version == result.version
    meta = scorer.meta
    assert meta["data_range"]["test"]["rows"] == 237 and len(meta["history"]) >= 1
    assert {"train_loss", "val_loss"} <= set(meta["history"][0])
    assert meta["config"]["data"]["sequence_length"] == 8
    flows = read_flows(archive)
    batch = scorer.score_table(flows)
    assert len(batch) == flows.num_rows and np.isfinite(batch.score).all()
    assert batch.is_anomaly.equals(batch.score >= scorer.threshold.value)
    ctx = scorer.new_context(1000)
    online = pd.concat([scorer.score_online(flows.slice(i, 25), ctx) for i in range(0, flows.num_rows, 25)],
                       ignore_index=True)
    np.testing.assert_allclose(online.score, batch.score, rtol=1e-4, atol=1e-4)
    # The scores used for the test metrics are the registered scorer's.
    m = batch.source.str.contains("Malware-Capture-44").to_numpy()
    from nadray.metrics import ranking_metrics

    assert ranking_metrics(batch.label.to_numpy(dtype="float64", na_value=np.nan)[m],
                           batch.score.to_numpy()[m])["roc_auc"] == pytest.approx(test["roc_auc"], abs=1e-6)
    # A second run registers a version but leaves the champion alone.
    again = train(archive, reg, load_config(None, SMALL + ["train.max_epochs=1"]))
    assert not again.promoted and registry.champion(reg)["version"] == result.version
    assert registry.list_versions(reg) == sorted([result.version, again.version])


def test_errors_name_the_problem(ray_session, archive, tmp_path):
    from nadray.train import train

    with pytest.raises(NadrayError, match="has no flows between"):
        train(archive, str(tmp_path / "r"), load_config(None, ["data.start=2030-01-01", "data.end=2030-02-01"]))
    with pytest.raises(NadrayError, match="labelled both 0 and 1"):
        train(archive, str(tmp_path / "r"), load_config(None, ["model.objective=supervised", "data.holdout_sources=[Malware]"]))
    assert registry.list_versions(str(tmp_path / "r")) == []


def test_use_gpu_without_a_gpu_fails_fast_on_an_embedded_ray(ray_session, monkeypatch, caplog):
    """CI has no GPU: Ray Train would wait forever for one. On a cluster an autoscaler may add one."""
    from nadray.errors import ConfigError
    from nadray.train import check_gpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check_gpus(load_config(None, ["train.use_gpu=false"]))
    with pytest.raises(ConfigError, match=r"train.use_gpu=true needs one GPU per worker \(train.num_workers=2\), "
                                          r"but the Ray cluster has 0"):
        check_gpus(load_config(None, ["train.use_gpu=true", "train.num_workers=2"]))
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    check_gpus(load_config(None, ["train.use_gpu=true"]))
    assert "waiting for the autoscaler" in caplog.text


@pytest.mark.slow
def test_train_workers_run_with_one_malloc_arena(ray_session):
    # The loop runs in a thread of its own in each worker; with glibc's per-thread
    # arenas about half the runs paid 40% more per epoch in page faults (train.py).
    from nadray.train import WORKER_ENV_VARS, build_trainer

    data = {"x": np.zeros((4, 3), dtype="float32"), "pos_weight": 1.0}
    trainer = build_trainer(data, load_config(None, SMALL), {"worker_runtime_env": {"env_vars": {"EXTRA": "1"}}})
    assert trainer.run_config.worker_runtime_env["env_vars"] == {**WORKER_ENV_VARS, "EXTRA": "1"}
    assert WORKER_ENV_VARS == {"MALLOC_ARENA_MAX": "1"}


def test_worker_kill_resumes_from_checkpoint(ray_session, archive, tmp_path, monkeypatch):
    from nadray.train import train

    marker = tmp_path / "killed"
    monkeypatch.setenv("NADRAY_TEST_KILL_EPOCH", "2")
    monkeypatch.setenv("NADRAY_TEST_KILL_RANK", "1")
    monkeypatch.setenv("NADRAY_TEST_KILL_MARKER", str(marker))
    reg = str(tmp_path / "registry")
    cfg = load_config(None, SMALL + ["train.max_epochs=4", "train.patience=10", "train.num_workers=2",
                                     "train.cpus_per_worker=0.5", "train.max_failures=2"])
    result = train(archive, reg, cfg)
    assert marker.exists(), "rank 1 was never killed"
    epochs = [h["epoch"] for h in result.history]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 3  # resumed, finished, no duplicated epochs
    assert registry.list_versions(reg) == [result.version]


def test_entity_scales_weigh_each_host_by_how_much_hosts_really_differ():
    """Bühlmann credibility: own error when hosts differ, the population's when they differ by noise."""
    from nadray.calibrate import credibility_k, entity_scales

    rng = np.random.default_rng(0)
    # Hosts that really differ: 24 training events each, means 1 and 9, little noise.
    ent = np.array(["a"] * 24 + ["b"] * 24, dtype=object)
    err = np.concatenate([rng.normal(1.0, 0.1, 24), rng.normal(9.0, 0.1, 24)])
    s = entity_scales(ent, err)
    g = err.mean()
    assert s["k"] < 0.01 and s["global"] == pytest.approx(g)  # k estimated ~0, one pseudo-event used
    assert s["prior_events"] == 1.0
    assert s["entities"]["a"] == pytest.approx((24 * err[:24].mean() + g) / 25)
    assert s["entities"]["b"] == pytest.approx((24 * err[24:].mean() + g) / 25)

    # Steady, distinct busy hosts give k ~ 0; a host seen once must not take its one tiny
    # error as its divisor (it would then top every alert list).
    ent = np.array(["a"] * 1000 + ["b"] * 1000 + ["c"], dtype=object)
    err = np.concatenate([rng.normal(1.0, 0.05, 1000), rng.normal(3.0, 0.05, 1000), [0.02]])
    s = entity_scales(ent, err)
    assert s["entities"]["c"] == pytest.approx((0.02 + err.mean()) / 2)

    # Ten hosts drawn from one distribution: their differences are noise.
    ent = np.repeat(np.array([f"h{i}" for i in range(10)], dtype=object), 5)
    err = rng.exponential(2.0, 50)
    s = entity_scales(ent, err)
    spread = max(s["entities"].values()) - min(s["entities"].values())
    raw = pd.Series(err).groupby(ent).mean()
    assert spread < 0.6 * (raw.max() - raw.min())  # pulled toward the population mean

    # The estimator by hand: EPV = pooled within variance, VHM = var(means) - EPV * mean(1/n).
    means, var, n = np.array([1.0, 3.0, 8.0]), np.array([1.0, 4.0, 2.0]), np.array([3, 5, 2])
    epv = (2 * 1.0 + 4 * 4.0 + 1 * 2.0) / 7
    vhm = np.var(means, ddof=1) - epv * np.mean(1 / n)
    assert credibility_k(means, var, n) == pytest.approx(epv / vhm)
    assert credibility_k(np.array([2.0]), np.array([1.0]), np.array([4])) == np.inf  # one host: nothing to compare
    # One event per host: noise cannot be told from difference, so the population decides.
    assert credibility_k(np.array([1.0, 5.0]), np.array([np.nan, np.nan]), np.array([1, 1])) == np.inf
    one = entity_scales(np.array(["x"] * 4, dtype=object), np.array([1.0, 2.0, 3.0, 4.0]))
    assert one["k"] is None and one["prior_events"] is None and one["entities"]["x"] == pytest.approx(2.5)


@pytest.mark.timeout(300)
def test_default_lstm_at_least_isolation_forest_on_the_stratosphere_labelled_log(ray_session, shared_data, tmp_path):
    """The default config on the Stratosphere CTU-SME-11 labelled Zeek log (RemcosRAT
    exfiltration, 766 flows, time split 60/20/20). Measured on seeds 0-2: LSTM ROC-AUC
    0.996-0.997 and PR-AUC 1.0, IsolationForest 0.84-0.87 and 0.986-0.989. A score change that
    dampens the rare one-hot columns (a 1% variance floor on the error divisors, tried
    and rejected) dropped the LSTM to 0.87 / 0.97 on seed 0: this floor catches it."""
    from nadray.ingest import ingest
    from nadray.train import train

    log = shared_data / "stratosphere_slips_testdata" / "test18-malicious-ctu-sme-11-win" / "zeek-labeled" / \
        "conn.log.labeled"
    archive = str(tmp_path / "archive")
    assert ingest([str(log)], archive).archived == 766
    ev = train(archive, str(tmp_path / "registry"), load_config(None, [])).metrics["evaluate"]
    lstm, iso = ev["lstm"], ev["isolation_forest"]
    assert lstm["n_labelled"] == 154 and lstm["n_malicious"] == 146
    assert lstm["roc_auc"] >= max(0.95, iso["roc_auc"]), (lstm["roc_auc"], iso["roc_auc"])
    assert lstm["pr_auc"] >= iso["pr_auc"], (lstm["pr_auc"], iso["pr_auc"])


def test_epoch_line_is_short_and_says_why_training_stops():
    from nadray.train import epoch_line

    m = {"epoch": 3, "train_loss": 0.12794, "val_loss": 0.155, "best_val_loss": 0.1549, "val_roc_auc": 0.98184,
         "val_pr_auc": float("nan"), "stop": False}
    assert epoch_line(m, 40, 5) == ("epoch 4/40: train loss 0.1279, val loss 0.1550 (best 0.1549), "
                                    "val ROC-AUC 0.982, PR-AUC n/a")
    assert epoch_line({**m, "stop": True, "val_roc_auc": None}, 40, 5).endswith(
        "val ROC-AUC n/a, PR-AUC n/a; stopping: val loss has not improved for 5 epochs")
