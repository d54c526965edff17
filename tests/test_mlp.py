"""Tests of dinrec.nn.mlp: the DIN/DIEN prediction MLP."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from torch import nn

from dinrec.errors import DinrecError, ShapeError
from dinrec.nn.activations import Dice, PReLU
from dinrec.nn.mlp import MLP, MLPConfig


def test_reference_layout():
    m = MLP(36)
    assert isinstance(m.input_bn, nn.BatchNorm1d)
    assert m.input_bn.eps == 1e-3 and m.input_bn.momentum == 0.01
    linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (36, 200),
        (200, 80),
        (80, 1),
    ]
    assert sum(isinstance(x, PReLU) for x in m.modules()) == 2
    assert all(torch.equal(lin.bias, torch.zeros_like(lin.bias)) for lin in linears)
    assert m(torch.randn(8, 36)).shape == (8, 1)


@pytest.mark.parametrize("activation", ["prelu", "dice", "relu", "sigmoid"])
def test_activations_and_shapes(activation):
    torch.manual_seed(0)
    m = MLP(10, hidden=(16, 8), activation=activation, out_features=3, dropout=0.1)
    x = torch.randn(4, 6, 10)
    out = m(x)
    assert out.shape == (4, 6, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    if activation == "dice":
        assert sum(isinstance(x, Dice) for x in m.modules()) == 2
    m.eval()
    assert m(torch.randn(1, 10)).shape == (1, 3)  # one row works in eval mode


def test_eval_is_deterministic_and_row_independent():
    torch.manual_seed(1)
    m = MLP(12, activation="dice", dropout=0.5)
    for _ in range(3):
        m(torch.randn(32, 12))
    m.eval()
    x = torch.randn(5, 12)
    full = m(x)
    assert torch.equal(m(x), full)
    assert torch.allclose(m(x[2:3]), full[2:3], atol=1e-6)


def test_no_input_bn():
    m = MLP(5, hidden=(4,), use_input_bn=False)
    assert m.input_bn is None
    assert not any(isinstance(x, nn.BatchNorm1d) for x in m.modules())


def test_single_logit_equals_two_way_softmax():
    """softmax([z0, z1])[1] == sigmoid(z1 - z0): the 1-logit head loses nothing."""
    torch.manual_seed(2)
    two = MLP(6, hidden=(5,), out_features=2, use_input_bn=False)
    one = MLP(6, hidden=(5,), out_features=1, use_input_bn=False)
    with torch.no_grad():
        one.hidden_layers.load_state_dict(two.hidden_layers.state_dict())
        one.out.weight.copy_(two.out.weight[1:2] - two.out.weight[0:1])
        one.out.bias.copy_(two.out.bias[1:2] - two.out.bias[0:1])
    x = torch.randn(7, 6)
    p_two = torch.softmax(two(x), dim=-1)[:, 1:]
    p_one = torch.sigmoid(one(x))
    assert torch.allclose(p_two, p_one, atol=1e-6)


def test_config_and_errors():
    m = MLP(7, hidden=[3], activation="relu")
    assert m.config == MLPConfig(in_features=7, hidden=(3,), activation="relu")
    rebuilt = MLP(**asdict(m.config))
    assert rebuilt.config == m.config
    with pytest.raises(DinrecError, match="unknown activation"):
        MLP(7, activation="gelu")  # type: ignore[arg-type]
    with pytest.raises(DinrecError):
        MLP(7, dropout=1.0)
    with pytest.raises(ShapeError):
        MLP(0)
    with pytest.raises(ShapeError):
        m(torch.randn(2, 6))
