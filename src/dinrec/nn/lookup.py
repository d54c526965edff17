"""An embedding lookup whose backward is one ``index_add_`` (eager CPU).

``F.embedding``'s CPU backward (``embedding_dense_backward``) walks every id once per
block of table rows with a fresh elementwise kernel per id; for a few thousand ids of a
narrow table (D = 18) it takes ~3x as long as ``index_add_`` into a zero gradient,
which adds the same rows in the same order (ids in order, each row's gradient added to
its table row). The padding row's gradient is then set to zero, as the dense backward
never adds to it. So the gradient is the same, up to float rounding (tested).

:func:`lookup` takes this path for a plain ``nn.Embedding`` (no ``max_norm``, no
``scale_grad_by_freq``, not ``sparse``) on eager CPU runs; tracers, compilers, meta
tensors and other devices call the module (``F.embedding``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinrec.nn._backend import tracing

__all__ = ["lookup"]


class _Lookup(torch.autograd.Function):
    """forward(weight (V, D), ids (...,) int64, padding_idx) -> (..., D); the weight's
    gradient by ``index_add_``. Not twice differentiable."""

    @staticmethod
    def forward(ctx, weight, ids, padding_idx):
        ctx.save_for_backward(ids)
        ctx.rows, ctx.padding_idx = weight.shape[0], padding_idx
        return F.embedding(ids, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        d = g.shape[-1]
        g = g.contiguous().view(-1, d)  # (n, D): index_add_ is ~2x slower from a strided source
        g_w = g.new_zeros(ctx.rows, d).index_add_(0, ids.reshape(-1), g)  # (V, D)
        if ctx.padding_idx is not None:
            g_w[ctx.padding_idx] = 0
        return g_w, None, None


def lookup(table: nn.Embedding, ids: Tensor) -> Tensor:
    """``table(ids)``: ids (...,) -> (..., D), with the ``index_add_`` backward where it
    applies (see the module docstring)."""
    w = table.weight
    plain = table.max_norm is None and not table.scale_grad_by_freq and not table.sparse
    if not (plain and w.requires_grad and torch.is_grad_enabled() and w.device.type == "cpu"
            and ids.device.type == "cpu" and not tracing()):
        return table(ids)
    return _Lookup.apply(w, ids, table.padding_idx)
