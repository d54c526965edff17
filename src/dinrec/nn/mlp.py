"""The DIN/DIEN prediction MLP: [BatchNorm] -> (dense -> activation -> dropout)* -> dense.

Reference (DIEN ``model.py``, ``build_fcn_net``)::

    bn1  = batch_normalization(inp)
    dnn1 = prelu|dice(dense(bn1, 200))
    dnn2 = prelu|dice(dense(dnn1, 80))
    y    = softmax(dense(dnn2, 2)) + 1e-8

We output one logit instead of two softmax logits. A two-way softmax is a sigmoid of
the logit difference, ``softmax([z0, z1])[1] == sigmoid(z1 - z0)``, and ``z1 - z0`` is
itself an affine function of the last hidden layer, so a single output unit is the
same model with one redundant set of parameters removed; train it with
``BCEWithLogitsLoss`` (numerically safer than the reference's ``+ 1e-8``).

Notes on the reference:

- ``tf.layers.batch_normalization`` is called there without ``training=True``, so it
  always normalises with its (never updated) moving statistics, i.e. it is only a
  learned affine map. Our input BatchNorm is a real one (batch statistics in train
  mode, running statistics in eval mode), with TensorFlow's default epsilon (1e-3) and
  momentum (decay 0.99 == torch momentum 0.01). Turn it off with ``use_input_bn=False``.
- Dense layers are initialised like ``tf.layers.dense``: Glorot-uniform weights, zero
  biases (not PyTorch's default).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from dinrec.errors import DinrecError, ShapeError
from dinrec.nn.activations import Dice, PReLU

__all__ = ["MLP", "MLPConfig", "ActivationName", "make_activation"]

ActivationName = Literal["prelu", "dice", "relu", "sigmoid"]
_ACTIVATIONS = ("prelu", "dice", "relu", "sigmoid")


@dataclass(frozen=True)
class MLPConfig:
    """Everything that defines an :class:`MLP` (``MLP(**asdict(cfg))`` rebuilds it)."""

    in_features: int
    hidden: tuple[int, ...] = (200, 80)
    activation: ActivationName = "prelu"
    out_features: int = 1
    dropout: float = 0.0
    use_input_bn: bool = True
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01


def make_activation(name: str, num_features: int) -> nn.Module:
    """A fresh activation module by name, for ``num_features`` channels on the last axis."""
    if name == "prelu":
        return PReLU(num_features)
    if name == "dice":
        return Dice(num_features)
    if name == "relu":
        return nn.ReLU()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise DinrecError(f"unknown activation {name!r}; choose one of {', '.join(_ACTIVATIONS)}")


class MLP(nn.Module):
    """The prediction MLP of DIN/DIEN.

    Args:
        in_features: width of the concatenated input features.
        hidden: hidden layer widths, (200, 80) as in the reference.
        activation: "prelu" (reference default), "dice" (reference ``use_dice``),
            "relu" or "sigmoid".
        out_features: 1 (a CTR logit) by default.
        dropout: dropout probability after each hidden activation (0 = none, as the
            reference).
        use_input_bn: BatchNorm over the input features first, as the reference.
        bn_eps, bn_momentum: of that BatchNorm (TensorFlow defaults, torch convention).

    Shape: ``(..., in_features) -> (..., out_features)``. Leading axes are flattened
    for the batch statistics of BatchNorm and Dice.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (200, 80),
        activation: ActivationName = "prelu",
        out_features: int = 1,
        dropout: float = 0.0,
        use_input_bn: bool = True,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
    ):
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if in_features < 1 or out_features < 1 or any(h < 1 for h in hidden):
            raise ShapeError(
                f"MLP sizes must be >= 1: in_features={in_features}, hidden={hidden}, "
                f"out_features={out_features}"
            )
        if not 0.0 <= dropout < 1.0:
            raise DinrecError(f"MLP dropout must be in [0, 1), got {dropout}")
        if activation not in _ACTIVATIONS:
            raise DinrecError(
                f"unknown activation {activation!r}; choose one of {', '.join(_ACTIVATIONS)}"
            )
        self.config = MLPConfig(
            in_features=in_features,
            hidden=hidden,
            activation=activation,
            out_features=out_features,
            dropout=dropout,
            use_input_bn=use_input_bn,
            bn_eps=bn_eps,
            bn_momentum=bn_momentum,
        )
        self.input_bn = (
            nn.BatchNorm1d(in_features, eps=bn_eps, momentum=bn_momentum) if use_input_bn else None
        )
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            layers.append(make_activation(activation, h))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.hidden_layers = nn.Sequential(*layers)
        self.out = nn.Linear(width, out_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weights and zero biases, like ``tf.layers.dense``."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.config
        if x.dim() < 1 or x.shape[-1] != cfg.in_features:
            raise ShapeError(f"MLP expects input (..., {cfg.in_features}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        h = x.reshape(-1, cfg.in_features)  # (N, F)
        if self.input_bn is not None:
            h = self.input_bn(h)  # (N, F)
        h = self.hidden_layers(h)  # (N, hidden[-1])
        out = self.out(h)  # (N, out_features)
        return out.reshape(*lead, cfg.out_features)  # (..., out_features)

    # ------------------------------------------------------------------ inference helpers
    def input_layer(self) -> tuple[Tensor, Tensor]:
        """The first dense layer as ``(W (H1, F), b (H1,))`` with the input BatchNorm
        folded in, so that ``x @ W.T + b`` is its pre-activation. Eval mode only (BatchNorm
        is then the affine map of its running statistics).

        Lets a caller that knows the structure of ``x`` compute that product cheaper
        (e.g. once for the parts shared by many rows); continue with
        :meth:`forward_from_input_layer`.
        """
        if self.training:
            raise DinrecError("MLP.input_layer folds the input BatchNorm: call it in eval mode")
        first = self.hidden_layers[0] if len(self.hidden_layers) else self.out
        w, b = first.weight, first.bias  # (H1, F), (H1,)
        bn = self.input_bn
        if bn is None:
            return w, b
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.running_var.add(bn.eps).rsqrt()  # (F,)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale  # (F,)
        if bn.bias is not None:
            shift = shift + bn.bias
        return w * scale, torch.addmv(b, w, shift)

    def forward_from_input_layer(self, pre: Tensor) -> Tensor:
        """(N, H1) pre-activations of the first dense layer -> (N, out_features)."""
        if not len(self.hidden_layers):
            return pre
        h = pre
        for layer in itertools.islice(self.hidden_layers, 1, None):  # all but the first dense layer
            h = layer(h)  # (N, ...)
        return self.out(h)  # (N, out_features)

