"""Building blocks, each usable alone in any PyTorch model."""

from dinrec.nn._backend import Backend, Products, backend, get_backend, get_products, products
from dinrec.nn._ops import fast_paths, prepare_fast_paths
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
    "Products",
    "AttentionWeights",
    "Dice",
    "DinFcnAttention",
    "PReLU",
    "backend",
    "din_fcn_attention",
    "din_fcn_attention_candidates",
    "fast_paths",
    "get_backend",
    "get_products",
    "prepare_fast_paths",
    "products",
]
