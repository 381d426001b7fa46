"""The LSTM: shapes, causality within the window, score combination."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nadray.config import load_config
from nadray.errors import ModelError
from nadray.model import EventLSTM, ModelArgs, combine_scores, expected_shapes


def test_shapes_and_args_from_config():
    cfg = load_config(None, ["data.sequence_length=5", "model.hidden_size=8"])
    args = ModelArgs.from_config(cfg, n_features=7)
    m = EventLSTM(args).eval()
    pred, logit = m(torch.zeros(3, 6, 8))
    assert pred.shape == (3, 7) and logit.shape == (3,)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected_shapes(args)
    assert ModelArgs.from_dict(args.to_dict()) == args
    with pytest.raises(ModelError, match="model args"):
        ModelArgs.from_dict({**args.to_dict(), "objective": "magic"})


def test_prediction_does_not_see_the_predicted_event():
    torch.manual_seed(0)
    m = EventLSTM(ModelArgs(n_features=4, sequence_length=3, hidden_size=8, dropout=0.0)).eval()
    w = torch.randn(2, 4, 5)
    w2 = w.clone()
    w2[:, -1, :] += 10.0
    p1, l1 = m(w)
    p2, l2 = m(w2)
    assert torch.allclose(p1, p2)  # next-event head reads only events i-L .. i-1
    assert not torch.allclose(l1, l2)  # the classifier reads event i


def test_combine_scores():
    sq = np.array([[1.0, 4.0], [0.0, 0.0]])
    lg = np.array([2.0, -1.0])
    assert combine_scores(sq, lg, "unsupervised", np.array([1.0, 2.0])).tolist() == [1.5, 0.0]
    assert combine_scores(sq, lg, "supervised", None).tolist() == [2.0, -1.0]
    z = {"err_mean": 0.0, "err_std": 1.0, "logit_mean": 0.0, "logit_std": 2.0}
    assert combine_scores(sq, lg, "hybrid", np.array([1.0, 2.0]), z).tolist() == [2.5, -0.5]
