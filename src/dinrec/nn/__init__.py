"""Building blocks, each usable alone in any PyTorch model."""

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
    "AttentionWeights",
    "Dice",
    "DinFcnAttention",
    "PReLU",
    "din_fcn_attention",
    "din_fcn_attention_candidates",
]
