"""The causal LSTM over one entity's window of events, and how it turns into a score.

Input: windows (B, L+1, F+1) from ``features.make_windows`` (F features plus the
padding mask). The LSTM reads the window left to right with a zero initial
state, so a window's output depends on nothing outside it: batch and online
scoring agree exactly.

Two heads:

- **next-event prediction**: from the hidden state after events [i-L .. i-1]
  (step L-1), predict all F features of event i. One MSE over every feature,
  continuous and one-hot alike: the one-hots are small, bounded targets, and a
  single per-feature squared error keeps the score a plain sum of per-feature
  surprises (each divided by its mean on the training set, so no feature
  dominates by scale; a feature that never varied in training is predicted as
  its constant, ``Scorer.constant_features``, so only real departures count).
  Cross-entropy per categorical group would be slightly
  sharper but makes the score a mix of units.
- **classifier**: from the hidden state after event i (step L), the logit of
  P(malicious).

Objectives (``model.objective``): ``unsupervised`` trains the prediction head and
scores by normalised prediction error; ``supervised`` trains the classifier and
scores by its logit; ``hybrid`` trains both and scores by the sum of the two
scores z-scored on benign validation events.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from nadray.errors import ModelError

OBJECTIVES = ("unsupervised", "supervised", "hybrid")


@dataclass
class ModelArgs:
    # Features per event (from the FeatureEncoder); the window adds one padding-mask channel.
    n_features: int
    # Events of history before the scored one (data.sequence_length); a window is L+1 steps.
    sequence_length: int = 32
    # LSTM width: 64 is enough for ~30 input features; larger overfits small captures.
    hidden_size: int = 64
    # Stacked layers: 1 suffices for next-event prediction on flow features.
    num_layers: int = 1
    # Dropout between LSTM layers and before the heads; only matters with labels.
    dropout: float = 0.1
    # Which heads are trained and how the score is formed (see the module docstring).
    objective: str = "unsupervised"

    @classmethod
    def from_config(cls, cfg: Any, n_features: int) -> ModelArgs:
        return cls(
            n_features=int(n_features), sequence_length=int(cfg.data.sequence_length),
            hidden_size=int(cfg.model.hidden_size), num_layers=int(cfg.model.num_layers),
            dropout=float(cfg.model.dropout), objective=str(cfg.model.objective),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        try:
            args = cls(**{k: d[k] for k in ("n_features", "sequence_length", "hidden_size", "num_layers",
                                             "dropout", "objective")})
        except (KeyError, TypeError) as e:
            raise ModelError(f"model args: malformed ({e.__class__.__name__}: {e})") from None
        if args.objective not in OBJECTIVES or not (1 <= args.n_features <= 10_000) or not (
            1 <= args.hidden_size <= 4096 and 1 <= args.num_layers <= 8 and 1 <= args.sequence_length <= 4096
        ):
            raise ModelError(f"model args: out of range: {args.to_dict()}")
        return args


class EventLSTM(nn.Module):
    """Causal LSTM with a next-event head and a classifier head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.lstm = nn.LSTM(
            input_size=args.n_features + 1, hidden_size=args.hidden_size, num_layers=args.num_layers,
            batch_first=True, dropout=args.dropout if args.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(args.dropout)
        self.predict = nn.Linear(args.hidden_size, args.n_features)
        self.classify = nn.Linear(args.hidden_size, 1)

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """windows (B, L+1, F+1) -> (prediction of event i (B, F), logit of event i (B,))."""
        out, _ = self.lstm(windows)  # zero initial state per window
        before = self.drop(out[:, -2, :])  # after events i-L .. i-1
        after = self.drop(out[:, -1, :])  # after event i
        return self.predict(before), self.classify(after).squeeze(-1)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape for ``args``: checkpoints are validated against it."""
    with torch.device("meta"):
        m = EventLSTM(args)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def squared_errors(pred: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Per-feature squared error of the prediction of event i (the window's last step): (B, F)."""
    target = windows[:, -1, :-1]
    return (pred - target) ** 2


def combine_scores(
    sqerr: np.ndarray, logit: np.ndarray, objective: str, err_norm: np.ndarray | None,
    z: dict[str, float] | None = None,
) -> np.ndarray:
    """The anomaly score per event from the two heads' outputs (higher = more anomalous).

    sqerr : (n, F) per-feature squared prediction errors; logit : (n,);
    err_norm : (F,) mean squared error per feature on the training set;
    z : {"err_mean", "err_std", "logit_mean", "logit_std"} from benign validation (hybrid).
    """
    sqerr = np.asarray(sqerr, dtype="float64")
    logit = np.asarray(logit, dtype="float64")
    if objective == "supervised":
        s = logit
    else:
        norm = np.ones(sqerr.shape[1]) if err_norm is None else np.maximum(np.asarray(err_norm, "float64"), 1e-8)
        err = (sqerr / norm).mean(axis=1) if sqerr.size else np.zeros(len(sqerr))
        if objective == "unsupervised":
            s = err
        else:
            z = z or {}
            s = (err - z.get("err_mean", 0.0)) / max(z.get("err_std", 1.0), 1e-8) + (
                logit - z.get("logit_mean", 0.0)) / max(z.get("logit_std", 1.0), 1e-8)
    return np.nan_to_num(s, nan=0.0, posinf=1e12, neginf=-1e12)
