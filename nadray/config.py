"""Typed configuration: one dataclass per lifecycle stage, a why-comment per field.

A config is a YAML file plus ``--set section.key=value`` overrides (the value read
as YAML). An unknown key, a wrong type or a value outside its rule is a
``ConfigError`` naming the key, the rule and the value.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from nadray.errors import ConfigError

Objective = Literal["unsupervised", "supervised", "hybrid"]


@dataclass
class DataConfig:
    # Which side of a flow is "ours". RFC 1918, RFC 4193 and loopback by default:
    # the private ranges a corporate or home network uses. Sources with their own
    # local flags (Zeek local_orig/local_resp) take precedence.
    local_networks: list[str] = field(
        default_factory=lambda: [
            "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "127.0.0.0/8", "::1/128",
        ]
    )
    # Events of history the LSTM sees before scoring one: 32 covers a burst of
    # connections (a scan, a beacon series) without diluting the recent past.
    sequence_length: int = 32
    # "flow": one event per flow. "bin": one event per entity per time bin, for
    # aggregated sources (cs448b) or very chatty hosts.
    granularity: Literal["flow", "bin"] = "flow"
    # Width of a time bin in seconds when granularity is "bin": a day suits daily
    # aggregates, a minute suits raw flows.
    bin_seconds: int = 60
    # Recent flows over which per-entity context (distinct peers, ports) is counted:
    # bounded, so the online endpoint can keep it in memory per host.
    context_window: int = 64
    # Time-ordered split: the earliest fraction trains, the next validates, the
    # rest tests. Never random: a random split leaks the future into training.
    train_fraction: float = 0.6
    val_fraction: float = 0.2
    # Optional absolute bounds (ISO 8601) instead of fractions; partitions outside
    # [start, end) are never read.
    start: str | None = None
    end: str | None = None
    train_end: str | None = None
    val_end: str | None = None
    # Sources (captures) held out entirely for testing: cross-capture evaluation.
    # Substrings of the `source` column.
    holdout_sources: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    # Unsupervised next-event prediction generalises to attacks never seen in
    # training (measured: see README "Choosing the objective").
    objective: Objective = "unsupervised"
    # 64 units are enough for ~20 input features; larger overfits small captures.
    hidden_size: int = 64
    num_layers: int = 1
    # Light dropout between layers and before the heads; only matters with labels.
    dropout: float = 0.1
    # Judge each host against its own predictability: its unsupervised error is divided
    # by its mean error on the training split, credibility-weighted toward the global
    # mean (by few events, and by how little hosts differ: calibrate.entity_scales); unseen
    # hosts use the global mean. A volatile host then no longer outranks a quiet
    # workstation's sudden change (measured: README, cs448b).
    entity_normalization: bool = True


@dataclass
class TrainConfig:
    # Early stopping ends most runs well before this.
    max_epochs: int = 12
    # Windows per step per worker: small enough for many steps per epoch on tiny captures.
    batch_size: int = 128
    # AdamW with a cosine schedule: robust defaults for a small LSTM.
    lr: float = 3e-3
    weight_decay: float = 1e-4
    # LSTMs on heavy-tailed traffic features can spike; clipping keeps steps sane.
    grad_clip: float = 1.0
    # Epochs without validation-loss improvement before stopping.
    patience: int = 3
    # Ray Train workers; on a cluster, more workers and use_gpu=true.
    num_workers: int = 1
    # One GPU per worker. An embedded Ray without GPUs refuses it at once rather than
    # wait forever; a cluster may add GPU nodes (train.check_gpus).
    use_gpu: bool = False
    # CPUs per worker; fractional values let tests share 2 cores with data tasks.
    cpus_per_worker: float = 1.0
    # Worker deaths tolerated before the run fails; each resumes from the last checkpoint.
    max_failures: int = 2
    seed: int = 0
    # Cap on training windows per epoch (0 = all): keeps a nightly run bounded.
    max_windows: int = 200_000


@dataclass
class ThresholdConfig:
    # "fpr" (default): the (1 - target_fpr) quantile of benign validation scores, an
    # alert budget that holds whatever tomorrow's attack prevalence is. "f1": the best
    # F1 on validation (needs both labels; tied to validation's base rate, so it
    # transfers badly across days: measured in the demo's second night). "auto": f1
    # when validation has both labels, else fpr.
    method: Literal["auto", "fpr", "f1"] = "fpr"
    # Alerts per benign event an analyst will tolerate: 1%.
    target_fpr: float = 0.01


@dataclass
class RegistryConfig:
    # Model name under REGISTRY_URI/<name>/versions/.
    name: str = "nadray"


@dataclass
class TuneConfig:
    search: Literal["grid", "random"] = "random"
    num_samples: int = 4
    # Wall-clock cap for the whole search (0 = none).
    time_budget_s: float = 0
    # Validation metric optimised: a detection metric, not the training loss.
    metric: str = "val_pr_auc"
    mode: Literal["max", "min"] = "max"
    # Epochs a trial gets before ASHA may stop it.
    grace_period: int = 1
    # The search space: key -> list (grid / choice) or {"loguniform": [lo, hi]},
    # {"uniform": [lo, hi]}, {"randint": [lo, hi]}. Keys are config keys.
    space: dict[str, Any] = field(
        default_factory=lambda: {
            "model.hidden_size": [32, 64, 128],
            "model.num_layers": [1, 2],
            "model.dropout": [0.0, 0.1, 0.3],
            "data.sequence_length": [16, 32, 64],
            "train.lr": {"loguniform": [3e-4, 1e-2]},
            "model.objective": ["unsupervised", "hybrid"],
            "threshold.target_fpr": [0.005, 0.01, 0.02],
        }
    )


@dataclass
class NightlyConfig:
    # Days of archive the nightly model trains on (ending with the new day).
    window_days: int = 30
    # Promote when challenger >= champion - tolerance on the comparison metric.
    tolerance: float = 0.01
    metric: str = "pr_auc"
    # Population stability index above which a feature is flagged as drifted
    # (0.1 moderate, 0.25 major, the usual credit-scoring cut-offs).
    psi_limit: float = 0.25
    # Score-distribution shift (KS statistic) above which the night is flagged.
    score_shift_limit: float = 0.2
    # Serve HTTP address to tell about a new champion; empty = do not notify.
    serve_url: str = ""
    # Days at the end of the window held out to compare challenger and champion (the
    # challenger trains on the days before them). Counted in days that hold flows, not
    # calendar days, so an archive with gaps still gets a comparison window; 1 = the new day.
    eval_days: int = 1
    # Landing files written less than this many seconds before the night's scan wait for the
    # next night: one still being copied would be archived cut short, and its complete copy
    # (new content) archived again in full, its first records twice.
    min_file_age_s: float = 300.0


@dataclass
class ServeConfig:
    # Bodies over this many bytes get 413 before parsing.
    max_body_bytes: int = 10 * 1024 * 1024
    # Flows per request; more gets 413.
    max_flows: int = 10_000
    # Entities whose context a replica keeps (LRU); each is a few KB.
    max_entities: int = 100_000
    # Requests batched across callers into one forward pass.
    max_batch_size: int = 64
    # 0: a lone request is scored at once (0.005 made it wait the full 5 ms: added p50
    # 9.4-9.6 ms vs 3.4-4.5 ms at 0 in `benchmark.py --only serve --quick`). Batches still form under load:
    # requests that arrive while one batch is scored make up the next. Throughput with
    # 4 clients x 100 flows measured the same (0.38-0.50x no-op Serve at 0, 0.39-0.49x at 0.005).
    batch_wait_timeout_s: float = 0.0
    # Seconds between checks of champion.json for a new version (0 = never).
    poll_champion_s: float = 10.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def get(self, key: str) -> Any:
        section, name = _split_key(key)
        return getattr(getattr(self, section), name)


# Rules checked after types: key -> (predicate, rule text).
_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "data.sequence_length": (lambda v: 1 <= v <= 4096, "must be in [1, 4096]"),
    "data.bin_seconds": (lambda v: v >= 1, "must be >= 1"),
    "data.context_window": (lambda v: 1 <= v <= 100_000, "must be in [1, 100000]"),
    "data.train_fraction": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "data.val_fraction": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "model.hidden_size": (lambda v: 1 <= v <= 4096, "must be in [1, 4096]"),
    "model.num_layers": (lambda v: 1 <= v <= 8, "must be in [1, 8]"),
    "model.dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "train.max_epochs": (lambda v: v >= 1, "must be >= 1"),
    "train.batch_size": (lambda v: v >= 1, "must be >= 1"),
    "train.lr": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "train.weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "train.grad_clip": (lambda v: v > 0, "must be > 0"),
    "train.patience": (lambda v: v >= 1, "must be >= 1"),
    "train.num_workers": (lambda v: v >= 1, "must be >= 1"),
    "train.cpus_per_worker": (lambda v: v > 0, "must be > 0"),
    "train.max_failures": (lambda v: v >= 0, "must be >= 0"),
    "train.max_windows": (lambda v: v >= 0, "must be >= 0"),
    "threshold.target_fpr": (lambda v: 0 < v < 0.5, "must be in (0, 0.5)"),
    "tune.num_samples": (lambda v: v >= 1, "must be >= 1"),
    "nightly.window_days": (lambda v: v >= 1, "must be >= 1"),
    "nightly.tolerance": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "nightly.eval_days": (lambda v: v >= 1, "must be >= 1"),
    "nightly.min_file_age_s": (lambda v: v >= 0, "must be >= 0"),
    "serve.max_body_bytes": (lambda v: v >= 1024, "must be >= 1024"),
    "serve.max_flows": (lambda v: v >= 1, "must be >= 1"),
    "serve.max_entities": (lambda v: v >= 1, "must be >= 1"),
    "serve.max_batch_size": (lambda v: v >= 1, "must be >= 1"),
}


def _split_key(key: str) -> tuple[str, str]:
    parts = key.split(".")
    sections = {f.name for f in dataclasses.fields(Config)}
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(
            f"config key {key!r}: unknown; expected 'section.key' with section one of {sorted(sections)}"
        )
    section_cls = type(getattr(Config(), parts[0]))
    names = {f.name for f in dataclasses.fields(section_cls)}
    if parts[1] not in names:
        raise ConfigError(f"config key {key!r}: unknown; {parts[0]} has {sorted(names)}")
    return parts[0], parts[1]


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` coerced to ``hint`` where lossless, else raise naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(key, value, a)
            except ConfigError:
                pass
        raise ConfigError(f"config key {key!r}: expected {hint}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key {key!r}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"config key {key!r}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (datetime.date, datetime.datetime)):
            return value.isoformat()  # YAML reads an unquoted 2026-01-31 as a date
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    return value


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set ``section.key`` to ``value``, checking the key exists and the value's type and rule."""
    section, name = _split_key(key)
    sec = getattr(cfg, section)
    hints = typing.get_type_hints(type(sec))
    value = _check_type(key, value, hints[name])
    if key in _RULES:
        ok, rule = _RULES[key]
        if not ok(value):
            raise ConfigError(f"config key {key!r}: {rule}, got {value!r}")
    setattr(sec, name, value)


def validate(cfg: Config) -> Config:
    """Cross-field rules, checked after all overrides."""
    for key in _RULES:
        set_key(cfg, key, cfg.get(key))
    if cfg.data.train_fraction + cfg.data.val_fraction >= 1:
        raise ConfigError(
            "config keys 'data.train_fraction' + 'data.val_fraction': must sum to < 1 to leave a test split, "
            f"got {cfg.data.train_fraction} + {cfg.data.val_fraction}"
        )
    for i, net in enumerate(cfg.data.local_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(
                f"config key 'data.local_networks[{i}]': expected a CIDR network like 10.0.0.0/8, got {net!r}"
            ) from None
    return cfg


def from_dict(data: dict[str, Any] | None, where: str = "config") -> Config:
    cfg = Config()
    if data is None:
        return cfg
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {values!r}")
        for name, value in values.items():
            set_key(cfg, f"{section}.{name}", value)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. model.hidden_size=64")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({e.__class__.__name__})") from None
    return key.strip(), value


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (local or s3://), then ``--set`` overrides."""
    data = None
    if path:
        from nadray import storage

        try:
            text = storage.read_bytes(path).decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except (OSError, UnicodeDecodeError) as e:  # a folder, no permission, not UTF-8 text
            raise ConfigError(f"config file {path}: cannot read it as UTF-8 YAML text "
                              f"({e.__class__.__name__}: {e})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML: {str(e).splitlines()[0]}") from None
    cfg = from_dict(data, where=f"config file {path}" if path else "config")
    for item in overrides or []:
        key, value = parse_override(item)
        set_key(cfg, key, value)
    return validate(cfg)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a checkpoint (``Config.to_dict``)."""
    return validate(from_dict(data))
