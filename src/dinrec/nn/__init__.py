"""Building blocks, each usable alone in any PyTorch model."""

from dinrec.nn._backend import Backend, backend, get_backend
from dinrec.nn.activations import Dice, PReLU
from dinrec.nn.attention import (
    AttentionWeights,
    DinFcnAttention,
    din_fcn_attention,
    din_fcn_attention_candidates,
)
from dinrec.nn.mlp import MLP

__all__ = [
    "MLP",
    "Backend",
    "AttentionWeights",
    "Dice",
    "DinFcnAttention",
    "PReLU",
    "backend",
    "din_fcn_attention",
    "din_fcn_attention_candidates",
    "get_backend",
]
