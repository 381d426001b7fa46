"""``nadray train``: fit the LSTM with Ray Train, calibrate, evaluate, register.

Read top to bottom:

1. ``prepare_training_data``: split by time, fit the FeatureEncoder on the training
   split, featurise the whole stream (so validation and test events see their
   entity's earlier records), choose the events each objective trains on.
2. ``train_step`` / ``eval_step``: plain torch.
3. ``train_loop_per_worker``: the Ray Train body (also Ray Tune's trial body). The
   few Ray lines are marked ``# Ray:``.
4. ``build_trainer``: the ``TorchTrainer`` with scaling, storage, failure and
   checkpoint settings from the config.
5. ``train``: load -> split -> fit -> calibrate (``nadray.calibrate``: error
   normalisers, per-host scales, threshold on validation, test metrics) -> register
   (and promote when the registry has no champion yet).

Training data reach the workers as numpy arrays in the Ray object store (events
``x`` (n, F) plus index arrays), and each worker cuts its (L+1)-step windows per
batch with ``features.make_windows``. Materialising the windows instead (a Ray
Dataset of (L+1, F+1) tensors) would multiply the data by L+1 (~33x) for no
gain: the events of even a large archive fit in memory once, and every worker
gathers its own shard of windows from them in microseconds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from nadray import placement
from nadray.config import Config, config_from_dict
from nadray.errors import ConfigError, NadrayError
from nadray.features import Events, FeatureEncoder, make_windows

log = logging.getLogger("nadray.train")

# Environment variables that make rank N SIGKILL itself once at epoch E (tests of
# worker-failure recovery only); a marker file makes it happen once per run.
TEST_KILL_ENV = ("NADRAY_TEST_KILL_EPOCH", "NADRAY_TEST_KILL_RANK", "NADRAY_TEST_KILL_MARKER")


# --------------------------------------------------------------------------- 1. data


@dataclass
class TrainingData:
    """Everything a training run needs, computed once in the driver.

    x : float32 (n, F) encoded events of the whole stream (entity then time order);
    group_start : int64 (n,); label : float32 (n,) NaN unknown;
    train_idx / val_idx / test_idx : int64 event indices per split;
    pred_mask / cls_mask : bool (n,) whether an event counts in the prediction loss
    (benign or unlabelled) and in the classification loss (labelled).
    """

    encoder: FeatureEncoder
    events: Events
    splits: Any
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    pred_mask: np.ndarray
    cls_mask: np.ndarray
    pos_weight: float = 1.0

    def arrays(self) -> dict[str, np.ndarray]:
        ev = self.events
        return {
            "x": ev.x, "group_start": ev.group_start, "label": ev.label.astype("float32"),
            "train_idx": self.train_idx, "val_idx": self.val_idx,
            "pred_mask": self.pred_mask, "cls_mask": self.cls_mask,
        }


def _event_split_masks(events: Events, splits: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Event-level split masks from the flow-level ones (a bin event belongs to its bin's split)."""
    masks = (splits.train_mask, splits.val_mask, splits.test_mask)
    fi, rows = events.flow_event_pairs()
    out = []
    for m in masks:
        em = np.zeros(len(events), dtype=bool)
        em[rows[m[fi]]] = True
        out.append(em)
    # Zero-activity bins belong to the split of their time: the split whose flows surround them.
    empty = ~(out[0] | out[1] | out[2])
    if empty.any():
        t_end = int(np.datetime64(splits.boundaries["train_end"].replace("+00:00", ""), "us").astype("int64"))
        v_end = int(np.datetime64(splits.boundaries["val_end"].replace("+00:00", ""), "us").astype("int64"))
        out[0] |= empty & (events.ts < t_end)
        out[1] |= empty & (events.ts >= t_end) & (events.ts < v_end)
        out[2] |= empty & (events.ts >= v_end)
    # A bin mixing splits (train and val flows in one bin) counts where it ends.
    out[0] &= ~(out[1] | out[2])
    out[1] &= ~out[2]
    return out[0], out[1], out[2]


def prepare_training_data(flows: pa.Table, cfg: Config, splits: Any = None) -> TrainingData:
    """Split ``flows`` by time, fit the encoder on train, featurise the whole stream.

    Raises NadrayError when the training split has nothing the objective can learn from.
    """
    from nadray.data import time_split

    splits = splits or time_split(flows, cfg)
    encoder = FeatureEncoder.fit(splits.train, cfg)
    events = encoder.transform(splits.flows)
    tr, va, te = _event_split_masks(events, splits)
    y = events.label
    known = ~np.isnan(y)
    pred_mask = ~known | (y == 0)
    cls_mask = known
    obj = cfg.model.objective
    n_pos = int(np.sum(tr & known & (y == 1)))
    n_neg = int(np.sum(tr & known & (y == 0)))
    if obj in ("unsupervised", "hybrid") and not np.any(tr & pred_mask):
        raise NadrayError("training split has no events labelled benign or unlabelled (model.objective="
                          f"{obj} learns normal behaviour from them)")
    if obj in ("supervised", "hybrid") and (n_pos == 0 or n_neg == 0):
        raise NadrayError(f"model.objective={obj} needs training events labelled both 0 and 1, got "
                          f"{n_neg} benign and {n_pos} malicious")
    use = tr & (pred_mask if obj == "unsupervised" else cls_mask if obj == "supervised" else (pred_mask | cls_mask))
    return TrainingData(
        encoder=encoder, events=events, splits=splits,
        train_idx=np.flatnonzero(use), val_idx=np.flatnonzero(va), test_idx=np.flatnonzero(te),
        pred_mask=pred_mask, cls_mask=cls_mask, pos_weight=float(n_neg / n_pos) if n_pos else 1.0,
    )


# --------------------------------------------------------------------------- 2. steps


def _losses(model, windows, y, pred_m, cls_m, objective: str, pos_weight: float):
    """Loss of a batch and the per-feature squared errors (for the error normaliser)."""
    import torch
    import torch.nn.functional as F

    from nadray.model import squared_errors

    pred, logit = model(windows)
    sq = squared_errors(pred, windows)
    # Both heads always join the graph (with weight 0 when their objective is off), so
    # DDP sees a gradient for every parameter on every rank.
    loss = 0.0 * (pred.sum() + logit.sum())
    if objective in ("unsupervised", "hybrid") and pred_m.any():
        loss = loss + sq[pred_m].mean()
    if objective in ("supervised", "hybrid") and cls_m.any():
        loss = loss + F.binary_cross_entropy_with_logits(
            logit[cls_m], y[cls_m], pos_weight=torch.tensor(pos_weight, dtype=windows.dtype, device=windows.device))
    return loss, sq, logit


def train_step(model, optimizer, scheduler, batch, objective: str, pos_weight: float, grad_clip: float):
    """One optimisation step; returns (loss, per-feature squared errors of benign targets, on the CPU)."""
    import torch

    model.train()
    windows, y, pred_m, cls_m = batch
    loss, sq, _ = _losses(model, windows, y, pred_m, cls_m, objective, pos_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach()), sq.detach()[pred_m].cpu()


def eval_step(model, batch, objective: str, pos_weight: float):
    """Loss, squared errors and logits of a batch (on the CPU), without gradients."""
    import torch

    model.eval()
    windows, y, pred_m, cls_m = batch
    with torch.no_grad():
        loss, sq, logit = _losses(model, windows, y, pred_m, cls_m, objective, pos_weight)
    return float(loss), sq.cpu(), logit.cpu()


def _batch(arrays: dict[str, np.ndarray], idx: np.ndarray, L: int, device: Any = "cpu"):
    import torch

    w = make_windows(arrays["x"], arrays["group_start"], idx, L)
    parts = (w, np.nan_to_num(arrays["label"][idx], nan=0.0), arrays["pred_mask"][idx], arrays["cls_mask"][idx])
    return tuple(torch.from_numpy(a).to(device) for a in parts)


def _val_metrics(arrays, sq: np.ndarray, logit: np.ndarray, objective: str, err_norm: np.ndarray) -> dict[str, Any]:
    from nadray.metrics import ranking_metrics
    from nadray.model import combine_scores

    y = arrays["label"][arrays["val_idx"]].astype("float64")
    z = None
    if objective == "hybrid":
        err = combine_scores(sq, logit, "unsupervised", err_norm)
        ref = (y == 0) if np.any(y == 0) else np.ones(len(y), bool)
        z = {"err_mean": float(err[ref].mean()), "err_std": float(err[ref].std()),
             "logit_mean": float(logit[ref].mean()), "logit_std": float(logit[ref].std())}
    s = combine_scores(sq, logit, objective, err_norm, z)
    m = ranking_metrics(y, s)
    return {"val_roc_auc": m["roc_auc"], "val_pr_auc": m["pr_auc"]}


def epoch_line(metrics: dict[str, Any], max_epochs: int, patience: int) -> str:
    """One line of progress per epoch, e.g. ``epoch 4/40: train loss 0.1279, val loss
    0.1550 (best 0.1550), val ROC-AUC 0.982, PR-AUC 0.193``."""
    def num(x: Any, fmt: str) -> str:
        return "n/a" if x is None or not np.isfinite(x) else format(x, fmt)

    line = (f"epoch {metrics['epoch'] + 1}/{max_epochs}: train loss {num(metrics['train_loss'], '.4f')}, "
            f"val loss {num(metrics['val_loss'], '.4f')} (best {num(metrics['best_val_loss'], '.4f')}), "
            f"val ROC-AUC {num(metrics.get('val_roc_auc'), '.3f')}, PR-AUC {num(metrics.get('val_pr_auc'), '.3f')}")
    if metrics.get("stop"):
        line += f"; stopping: val loss has not improved for {patience} epochs"
    return line


# --------------------------------------------------------------------------- checkpoints (no pickle)


def save_state(directory: str, model, optimizer, scheduler, state: dict[str, Any], best: dict | None) -> None:
    """Weights, best weights and optimizer tensors as safetensors; everything else as JSON."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              os.path.join(directory, "model.safetensors"))
    if best is not None:
        save_file(best, os.path.join(directory, "best.safetensors"))
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                tensors[f"{pid}.{k}"] = v.detach().cpu().reshape(-1).contiguous()
                scalars[f"{pid}.{k}"] = {"shape": list(v.shape)}
            else:
                scalars[f"{pid}.{k}"] = {"value": v}
    save_file(tensors, os.path.join(directory, "optimizer.safetensors"))
    sched = {k: v for k, v in scheduler.state_dict().items() if isinstance(v, (int, float, str, list, type(None)))}
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump({**state, "optimizer": {"param_groups": opt["param_groups"], "entries": scalars},
                   "scheduler": sched}, f, default=float)


def load_state(directory: str, model, optimizer, scheduler) -> tuple[dict[str, Any], dict | None]:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
    with open(os.path.join(directory, "state.json")) as f:
        state = json.load(f)
    flat = load_file(os.path.join(directory, "optimizer.safetensors"))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, info in state["optimizer"]["entries"].items():
        pid, name = key.split(".", 1)
        val = flat[key].reshape(info["shape"]) if "shape" in info else info["value"]
        opt_state.setdefault(int(pid), {})[name] = val
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    sd = scheduler.state_dict()
    sd.update(state["scheduler"])
    scheduler.load_state_dict(sd)
    best_path = os.path.join(directory, "best.safetensors")
    best = load_file(best_path) if os.path.exists(best_path) else None
    return state, best


# --------------------------------------------------------------------------- 3. the Ray Train body


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train the EventLSTM; report train/val loss and val ROC/PR-AUC every epoch.

    ``config``: {"cfg": Config.to_dict(), "model_args": ModelArgs.to_dict(),
    "data": {name: numpy array or ObjectRef} (see ``TrainingData.arrays``),
    "pos_weight": float, optional "_test_kill": {"epoch", "rank", "marker"}}.
    Tune may override keys of ``cfg`` per trial.
    """
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from nadray.model import EventLSTM, ModelArgs

    cfg = config_from_dict(config["cfg"])
    args = ModelArgs.from_dict({**config["model_args"], "sequence_length": cfg.data.sequence_length,
                                "hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers,
                                "dropout": cfg.model.dropout, "objective": cfg.model.objective})
    arrays = {k: (ray.get(v) if isinstance(v, ray.ObjectRef) else v) for k, v in config["data"].items()}
    L, objective, tc = args.sequence_length, args.objective, cfg.train

    ctx = ray.train.get_context()  # Ray: who am I
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # Ray: this worker's GPU with train.use_gpu, else the CPU
    torch.manual_seed(tc.seed)
    torch.set_num_threads(max(1, int(round(tc.cpus_per_worker))))

    model = EventLSTM(args)
    # Warm start (nightly retrain): start from given weights, e.g. the champion's, unless
    # resuming from this run's own checkpoint (which is loaded below and wins).
    init = config.get("init_weights")
    if init is not None and ray.train.get_checkpoint() is None:
        init = ray.get(init) if isinstance(init, ray.ObjectRef) else init
        model.load_state_dict({k: torch.from_numpy(np.array(v, dtype="float32")) for k, v in init.items()})
    model = ray.train.torch.prepare_model(model)  # Ray: DDP across workers when world > 1
    core = model.module if hasattr(model, "module") else model

    # Each epoch: at most max_windows windows, split evenly across ranks (equal
    # step counts keep DDP's collective calls in lockstep).
    n_train = len(arrays["train_idx"])
    per_epoch = min(n_train, tc.max_windows) if tc.max_windows else n_train
    per_rank = max(1, per_epoch // world)
    steps = max(1, -(-per_rank // tc.batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tc.max_epochs * steps)

    start_epoch, best_val, bad_epochs, history, best = 0, float("inf"), 0, [], None
    checkpoint = ray.train.get_checkpoint()  # Ray: resume after a worker failure
    if checkpoint:
        with checkpoint.as_directory() as d:
            state, best = load_state(d, core, optimizer, scheduler)
        start_epoch, best_val = state["epoch"] + 1, state["best_val_loss"]
        bad_epochs, history = state["bad_epochs"], state["history"]

    kill = config.get("_test_kill")
    err_norm = np.ones(args.n_features)
    for epoch in range(start_epoch, tc.max_epochs):
        if kill and rank == kill["rank"] and epoch == kill["epoch"] and not os.path.exists(kill["marker"]):
            open(kill["marker"], "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

        rng = np.random.default_rng(tc.seed + epoch)
        order = rng.permutation(arrays["train_idx"])[: per_rank * world]
        mine = np.sort(order[rank::world])
        mine = mine[rng.permutation(len(mine))]
        losses, sq_sum, sq_n = [], np.zeros(args.n_features), 0
        for s in range(steps):
            b = _batch(arrays, mine[s * tc.batch_size:(s + 1) * tc.batch_size], L, device)
            loss, sq = train_step(model, optimizer, scheduler, b, objective, config["pos_weight"], tc.grad_clip)
            losses.append(loss)
            sq_sum += sq.sum(0).numpy()
            sq_n += len(sq)
        if sq_n:
            err_norm = sq_sum / sq_n

        # Validation on the whole split on every rank: identical numbers, identical stopping.
        val_idx = arrays["val_idx"]
        v_losses, v_sq, v_lg = [], [], []
        for lo in range(0, len(val_idx), 4096):
            b = _batch(arrays, val_idx[lo:lo + 4096], L, device)
            loss, sq, lg = eval_step(model, b, objective, config["pos_weight"])
            v_losses.append(loss * len(b[0]))
            v_sq.append(sq.numpy())
            v_lg.append(lg.numpy())
        val_loss = float(np.sum(v_losses) / max(1, len(val_idx)))
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
                   **_val_metrics(arrays, np.concatenate(v_sq) if v_sq else np.zeros((0, args.n_features)),
                                  np.concatenate(v_lg) if v_lg else np.zeros(0), objective, err_norm)}
        improved = val_loss < best_val - 1e-6
        if improved:
            best_val, bad_epochs = val_loss, 0
            best = {k: v.detach().cpu().clone().contiguous() for k, v in core.state_dict().items()}
        else:
            bad_epochs += 1
        history.append(metrics)
        stop = bad_epochs >= tc.patience
        metrics.update(best_val_loss=best_val, stop=stop)
        if rank == 0:
            line = epoch_line(metrics, tc.max_epochs, tc.patience)
            log.info("%s", f"{config['label']}: {line}" if config.get("label") else line)

        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                save_state(d, core, optimizer, scheduler, {"epoch": epoch, "best_val_loss": best_val,
                                                           "bad_epochs": bad_epochs, "history": history,
                                                           "model_args": args.to_dict()}, best)
                ckpt = ray.train.Checkpoint.from_directory(d)  # Ray: rank 0 passes the checkpoint
            ray.train.report(metrics, checkpoint=ckpt)  # Ray: every rank reports every epoch
        if stop:
            break


# --------------------------------------------------------------------------- 4. the trainer

# Ray Train runs train_loop_per_worker in a thread of its own, and glibc gives such a
# thread a secondary malloc arena whose 64 MB heaps are mapped and unmapped as each
# step's tensors come and go. On 2 cores about half the runs fell into that: 120k page
# faults/s, 30% system time, epochs 40% longer than the same loop in a main thread
# (BENCHMARKS.md, "Ray Train's gap, found and fixed"). With one arena the freed
# memory stays mapped, as in a plain torch process: 11 runs of 11 fast, against 8 of
# 12 slow without it.
WORKER_ENV_VARS = {"MALLOC_ARENA_MAX": "1"}


def _loop_config(data: TrainingData | dict[str, Any], cfg: Config) -> dict[str, Any]:
    import ray

    from nadray.model import ModelArgs

    arrays = data.arrays() if isinstance(data, TrainingData) else dict(data)
    pos_weight = data.pos_weight if isinstance(data, TrainingData) else float(arrays.pop("pos_weight", 1.0))
    refs = {k: (ray.put(v) if isinstance(v, np.ndarray) else v) for k, v in arrays.items()}
    n_features = int(data.encoder.n_features) if isinstance(data, TrainingData) else int(arrays["x"].shape[1])
    config = {"cfg": cfg.to_dict(), "model_args": ModelArgs.from_config(cfg, n_features).to_dict(),
              "data": refs, "pos_weight": pos_weight}
    if os.environ.get(TEST_KILL_ENV[0]):
        config["_test_kill"] = {"epoch": int(os.environ[TEST_KILL_ENV[0]]),
                                "rank": int(os.environ.get(TEST_KILL_ENV[1], "1")),
                                "marker": os.environ[TEST_KILL_ENV[2]]}
    return config


def build_trainer(data: TrainingData | dict[str, Any], cfg: Config, run_config_overrides: dict[str, Any] | None = None,
                  init_weights: dict[str, np.ndarray] | None = None, label: str | None = None):
    """A ``TorchTrainer`` running ``train_loop_per_worker`` on ``data``.

    ``data``: a ``TrainingData`` or the dict of its ``arrays()`` (numpy arrays or
    ObjectRefs, plus "pos_weight"). ``run_config_overrides``: RunConfig keyword
    arguments (``storage_path``, ``name``, ``callbacks``...) replacing the defaults.
    ``init_weights``: parameter name -> array to start from (warm start; the names
    and shapes must match the model args of ``cfg``). ``label``: put before each epoch
    line, so that concurrent runs (Tune trials) can be told apart in one log.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    over = dict(run_config_overrides or {})
    path = over.get("storage_path")
    if isinstance(path, str) and path.startswith("s3://") and "storage_filesystem" not in over:
        from nadray import storage

        # Workers get the driver's S3 settings with the filesystem object itself.
        over["storage_filesystem"] = storage.arrow_s3_filesystem()
        over["storage_path"] = path[len("s3://"):]
    worker_env = dict(over.pop("worker_runtime_env", None) or {})
    worker_env["env_vars"] = {**WORKER_ENV_VARS, **worker_env.get("env_vars", {})}
    run_config = RunConfig(**{
        "name": over.pop("name", None) or "nadray-train",
        "storage_path": over.pop("storage_path", None),
        "failure_config": FailureConfig(max_failures=cfg.train.max_failures),
        "checkpoint_config": CheckpointConfig(num_to_keep=2),
        "worker_runtime_env": worker_env,
        **over,
    })
    loop_config = _loop_config(data, cfg)
    if label:
        loop_config["label"] = str(label)
    if init_weights is not None:
        import ray

        loop_config["init_weights"] = ray.put({k: np.asarray(v, dtype="float32") for k, v in init_weights.items()})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=run_config,
    )


def check_gpus(cfg: Config) -> None:
    """Fail fast where ``train.use_gpu=true`` can never be met. Call it in the driver.

    Ray Train waits for resources it is asked for, so an embedded Ray without GPUs
    would hang. A cluster (``RAY_ADDRESS``, set for a submitted job's driver but not
    for its workers, hence not inside Tune trials) may add GPU nodes through its
    autoscaler: there this is only a warning.
    """
    if not cfg.train.use_gpu:
        return
    import ray

    have, need = float(ray.cluster_resources().get("GPU", 0.0)), cfg.train.num_workers
    if have >= need:
        return
    msg = (f"train.use_gpu=true needs one GPU per worker (train.num_workers={need}), "
           f"but the Ray cluster has {have:g}")
    if os.environ.get("RAY_ADDRESS"):
        log.warning("%s; waiting for the autoscaler to add GPU nodes", msg)
        return
    raise ConfigError(f"{msg}; set train.use_gpu=false, or submit to a cluster with GPUs (RAY_ADDRESS)")


@dataclass
class FitResult:
    model: Any
    history: list[dict[str, Any]]
    checkpoint_path: str | None


def fit(data: TrainingData, cfg: Config, storage_path: str | None = None, name: str | None = None,
        init_weights: dict[str, np.ndarray] | None = None) -> FitResult:
    """Run the trainer and return the best-validation model (``init_weights``: warm start)."""
    check_gpus(cfg)
    over = {"storage_path": _storage_path(storage_path), "name": name}
    with placement.releasing_leaked_placement_groups():
        result = build_trainer(data, cfg, over, init_weights=init_weights).fit()
    if result.checkpoint is None:
        raise NadrayError(f"training run {name} produced no checkpoint (error: {getattr(result, 'error', None)})")
    # The Checkpoint object itself, not its path: it carries the run's (s3) filesystem.
    return _fitted_from(result.checkpoint, data, cfg)


def _fitted_from(checkpoint: Any, data: TrainingData, cfg: Config) -> FitResult:
    """The best-validation model and loss history in a ``ray.train.Checkpoint``."""
    from safetensors.torch import load_file

    from nadray.model import EventLSTM, ModelArgs

    model = EventLSTM(ModelArgs.from_config(cfg, data.encoder.n_features))
    with checkpoint.as_directory() as d:
        path = os.path.join(d, "best.safetensors")
        model.load_state_dict(load_file(path if os.path.exists(path) else os.path.join(d, "model.safetensors")))
        with open(os.path.join(d, "state.json")) as f:
            history = json.load(f)["history"]
    return FitResult(model.eval(), history, getattr(checkpoint, "path", None))


def _storage_path(path: str | None) -> str | None:
    if path is None or path.startswith("s3://"):
        return path
    return os.path.abspath(path)


# --------------------------------------------------------------------------- 5. the command


@dataclass
class TrainResult:
    version: str
    registry: str
    metrics: dict[str, Any]
    promoted: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        t = self.metrics.get("test", {})
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        lines = [
            f"registered {self.registry}@{self.version}" + (" (champion)" if self.promoted else ""),
            f"epochs {len(self.history)}, threshold {self.metrics.get('threshold', {}).get('value', float('nan')):.6g}"
            f" ({self.metrics.get('threshold', {}).get('method')})",
            f"test: rows {t.get('n', 0)}, labelled {t.get('n_labelled', 0)}, ROC-AUC {fmt(t.get('roc_auc'))}, "
            f"PR-AUC {fmt(t.get('pr_auc'))}, precision {fmt(t.get('precision'))}, recall {fmt(t.get('recall'))}, "
            f"F1 {fmt(t.get('f1'))}, FPR {fmt(t.get('fpr'))}",
        ]
        return "\n".join(lines)


def extra_metrics(scorer: Any, data: TrainingData, cfg: Config,
                  event_scores: np.ndarray | None = None) -> dict[str, Any] | None:
    """Baselines on the same split, from the evaluate module when it is installed.

    ``event_scores``: the scorer's scores of ``data.events`` (from ``finalize``), reused.
    """
    try:
        from nadray.evaluate import evaluate_split
    except (ImportError, AttributeError):
        return None
    try:
        return evaluate_split(scorer, data.splits.flows, data.splits, cfg, events=data.events,
                              event_scores=event_scores)
    except (ImportError, AttributeError, NadrayError) as e:
        log.warning("baseline evaluation skipped: %s", e)
        return None


def load_fitted(checkpoint_path: str, data: TrainingData, cfg: Config) -> FitResult:
    """The best-validation model and history from a run's checkpoint folder (local or s3://).

    For Ray Tune: the best trial's ``metrics["checkpoint_path"]``.
    """
    from ray.train import Checkpoint

    fitted = _fitted_from(Checkpoint(checkpoint_path), data, cfg)
    fitted.checkpoint_path = checkpoint_path
    return fitted


def register_fitted(archive: str, registry: str, cfg: Config, data: TrainingData, fitted: FitResult,
                    version: str | None = None, promote_if_first: bool = True,
                    extra_meta: dict[str, Any] | None = None) -> TrainResult:
    """Threshold, test metrics (+ baselines), checkpoint metadata, registration; used by train and tune."""
    from nadray import registry as reg
    from nadray.calibrate import finalize, scoring_meta
    from nadray.data import data_range

    splits = data.splits
    scorer, _, metrics, event_scores = finalize(data, fitted.model, cfg, fitted.history)
    extra = extra_metrics(scorer, data, cfg, event_scores)
    if extra is not None:
        metrics["evaluate"] = extra
    meta = {
        "config": cfg.to_dict(),
        "model_args": fitted.model.args.to_dict(),
        "encoder": data.encoder.to_dict(),
        **scoring_meta(scorer),
        "data_range": {
            "archive": str(archive), "all": data_range(splits.flows),
            **{s: data_range(splits.flows, getattr(splits, f"{s}_mask")) for s in ("train", "val", "test")},
            "boundaries": splits.boundaries,
            "events": {"train_windows": int(len(data.train_idx)), "val": int(len(data.val_idx)),
                       "test": int(len(data.test_idx))},
        },
        "metrics": metrics,
        "history": fitted.history,
        "run": {"checkpoint": fitted.checkpoint_path},
        **(extra_meta or {}),
    }
    version = reg.register(registry, fitted.model.state_dict(), meta, name=cfg.registry.name, version=version)
    promoted = False
    if promote_if_first and reg.champion(registry, cfg.registry.name) is None:
        reg.promote(registry, version, "first version in this registry", name=cfg.registry.name)
        promoted = True
    return TrainResult(version, registry, metrics, promoted, fitted.history)


def train(archive: str, registry: str, cfg: Config, run_storage: str | None = None) -> TrainResult:
    """Load -> split -> fit with Ray Train -> threshold -> test metrics -> register (-> promote if first)."""
    from nadray import registry as reg
    from nadray.data import load_flows, time_split
    from nadray.runtime import ensure_ray

    ensure_ray()
    flows = load_flows(archive, cfg)
    splits = time_split(flows, cfg)
    data = prepare_training_data(splits.flows, cfg, splits)
    log.info("events: %d (train windows %d, val %d, test %d), %d features", len(data.events), len(data.train_idx),
             len(data.val_idx), len(data.test_idx), data.encoder.n_features)
    version = reg.new_version()
    fitted = fit(data, cfg, storage_path=run_storage or _default_run_storage(registry), name=f"train-{version}")
    # Registered only after a successful fit: a failed run leaves the registry untouched.
    return register_fitted(archive, registry, cfg, data, fitted, version=version)


def _default_run_storage(registry: str) -> str:
    from nadray import storage

    return storage.join(registry, "_runs")
