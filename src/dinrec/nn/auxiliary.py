"""DIEN's auxiliary loss: each interest state must tell the next click from a non-click.

For a left-aligned history (valid prefix, padding at the end) with extractor states
``h (B, T, H)``, clicked-item embeddings ``e (B, T, E)`` and sampled non-clicked
embeddings ``e_neg (B, T, K, E)`` (or ``(B, T, E)`` for K = 1), every pair of valid
steps ``(t, t + 1)`` contributes::

    loss_t = -log sigmoid(g([h_t, e_{t+1}])) - mean_k log(1 - sigmoid(g([h_t, e_neg_{t+1,k}])))

and the loss is the mean over the valid pairs (``reduction="mean"``). Steps without a
valid successor (the last valid step, padding) contribute nothing, and the values at
padded positions never change the loss or its gradients.

How the data's ``neg_items (B, T, K)`` is used: ``neg_items[:, s]`` is a negative
for history position ``s`` (never equal to ``hist_items[:, s]``), so the negative that
the state ``h_t`` must reject is ``neg_items[:, t + 1]``, paired with the positive
``hist_items[:, t + 1]``. Pass the *unshifted* embeddings; :func:`auxiliary_loss`
shifts them. This is the reference's ``auxiliary_loss(rnn_outputs[:, :-1],
item_his_eb[:, 1:], noclk_item_his_eb[:, 1:], mask[:, 1:])``. The reference uses only
the first negative (``noclk[:, :, 0]``); with K > 1 we average the negative term over
the K negatives, which equals the reference for K = 1.

The network ``g`` follows the reference's ``auxiliary_net``: BatchNorm -> dense 100
(sigmoid) -> dense 50 (sigmoid) -> dense 2 (softmax) + 1e-8. We output one logit:
``softmax([z0, z1])[0] == sigmoid(z0 - z1)`` and ``z0 - z1`` is an affine map of the
last hidden layer, so one output unit is the same model without the redundant
parameters, and ``-log(softmax + 1e-8)`` becomes the (stabler) BCE-with-logits,
``softplus(-l)`` / ``softplus(l)``; they differ only where the reference's ``1e-8``
floor clips the loss at about 18.4.

The reference's ``tf.layers.batch_normalization`` is called without ``training=True``,
so it always uses its never-updated moving statistics (mean 0, variance 1): it is the
learned per-feature affine map ``gamma * x / sqrt(1 + 1e-3) + beta``. ``norm="reference"``
(default) is exactly that; ``norm="batch"`` is a real ``BatchNorm1d`` over the valid
pairs only (positive and negative rows together); ``norm="none"`` has no norm layer.
The reference's ``reduce_mean`` divides by all ``B * (T - 1)`` pairs, padded ones
included; ``reduction="reference"`` reproduces that, ``"sum"`` gives the plain sum.
The model applies its weight ``alpha`` to the returned loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinrec.errors import ShapeError
from dinrec.nn import _ops

__all__ = ["AuxiliaryNet", "auxiliary_loss", "pair_loss", "pair_positions"]

NormName = Literal["reference", "batch", "none"]
_REDUCTIONS = ("mean", "reference", "sum")


class _FrozenStatsNorm(nn.Module):
    """The reference's inference-mode batch norm: ``gamma * x / sqrt(1 + eps) + beta``."""

    def __init__(self, num_features: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.scale = float((1.0 + eps) ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.bias, x, self.weight * self.scale)  # (N, F)


class AuxiliaryNet(nn.Module):
    """The auxiliary classifier ``g([h, e]) -> logit``: norm -> 100 (sigmoid) -> 50 (sigmoid) -> 1.

    Args:
        state_size: H, the interest state width.
        item_size: E, the behaviour embedding width.
        hidden: hidden widths, (100, 50) as in the reference.
        norm: ``"reference"`` (frozen-statistics BN, i.e. a learned affine map),
            ``"batch"`` (real ``BatchNorm1d``) or ``"none"``.
        bn_eps: the norm's epsilon (TensorFlow's default 1e-3).

    ``forward(x (N, H + E)) -> logits (N,)``: the logit that ``e`` is the next click.
    Dense layers start like ``tf.layers.dense``: Glorot-uniform weights, zero biases.
    """

    def __init__(
        self,
        state_size: int,
        item_size: int,
        hidden: Sequence[int] = (100, 50),
        norm: NormName = "reference",
        bn_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        self.state_size = state_size
        self.item_size = item_size
        width = state_size + item_size
        if norm == "reference":
            self.norm: nn.Module = _FrozenStatsNorm(width, bn_eps)
        elif norm == "batch":
            self.norm = nn.BatchNorm1d(width, eps=bn_eps, momentum=0.01)
        elif norm == "none":
            self.norm = nn.Identity()
        else:
            raise ValueError(f"norm: expected 'reference', 'batch' or 'none', got {norm!r}")
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(width, size), nn.Sigmoid()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm(x)).squeeze(-1)  # (N,)

    def pair_logits(self, states: Tensor, items: Tensor) -> Tensor:
        """``logits[m, i] = self(cat([states[i], items[m, i]]))`` for states (N, H), items (M, N, E).

        The first dense layer is linear in ``[h, e]``, so ``W [h; e] = W_h h + W_e e``: the
        state part is computed once per pair instead of M times and the (M N, H + E)
        concatenation never exists. The reference norm (a fixed affine map) is folded into
        that layer's weights, ``W (g * x + b) = (W * g) x + W b``. The layers then run in
        :class:`_PairMLP` (in-place sigmoids, hand-written backward). A real
        ``BatchNorm1d`` (``norm="batch"``) needs the concatenated rows and takes the plain path.
        """
        m, n, e = items.shape
        first = self.mlp[0]
        if isinstance(self.norm, nn.BatchNorm1d) or not isinstance(first, nn.Linear):
            x = torch.cat([states.expand(m, n, states.shape[1]), items], 2)  # (M, N, H + E)
            return self(x.reshape(m * n, -1)).view(m, n)
        weight, bias = first.weight, first.bias  # (D1, H + E), (D1,)
        if isinstance(self.norm, _FrozenStatsNorm):
            bias = torch.addmv(bias, weight, self.norm.bias)  # W b + b1
            weight = weight * (self.norm.weight * self.norm.scale)  # (D1, H + E)
        hid = self.state_size
        w_h, w_e = weight[:, :hid], weight[:, hid:]  # (D1, H), (D1, E)
        rest = [t for layer in self.mlp[2::2] for t in (layer.weight, layer.bias)]  # type: ignore[union-attr]
        tensors = (states, items, w_h, w_e, bias, *rest)
        if rest and _same_dtype(tensors) and not torch.is_autocast_enabled(states.device.type):
            return _PairMLP.apply(*tensors)  # (M, N)
        z_h = F.linear(states, w_h, bias)  # (N, D1), once per pair
        z = F.linear(items.reshape(m * n, e), w_e)  # (M N, D1)
        x = (z.view(m, n, -1) + z_h).view(m * n, -1)  # (M N, D1)
        return self.mlp[1:](x).view(m, n)  # (M, N)

    def loss(
        self, states: Tensor, clicked: Tensor, non_clicked: Tensor, mask: Tensor, reduction: str = "mean"
    ) -> Tensor:
        """:func:`auxiliary_loss` with this network."""
        return auxiliary_loss(self, states, clicked, non_clicked, mask, reduction=reduction)


_sigmoid_backward_ = torch.ops.aten.sigmoid_backward.grad_input  # out= variant, in place


def _same_dtype(tensors: Sequence[Tensor]) -> bool:
    return all(t.dtype == tensors[0].dtype for t in tensors)


class _PairMLP(torch.autograd.Function):
    """The auxiliary MLP on pairs ``[h_i, e_{m,i}]`` with the first layer split, and a
    hand-written backward.

    forward(states (N, H), items (M, N, E), w_h (D1, H), w_e (D1, E), b1 (D1,),
    w2, b2, ..., w_out (1, Dk), b_out (1,)) -> logits (M, N); sigmoid after every layer
    but the last. ``W_h h + b1`` is computed once per pair and broadcast over the M items.
    Autograd would keep a pre-activation and allocate a fresh gradient at every
    elementwise step; here the sigmoids run in place and their backward overwrites the
    incoming gradient. With exactly two hidden layers in float32 on the CPU, the layers run
    in the fused C++ operator :func:`dinrec.nn._ops.offset_mlp` where it was measured
    faster (:func:`dinrec.nn._ops.offset_mlp_runs`). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, states, items, w_h, w_e, b1, *rest):  # type: ignore[override]
        m, n, e = items.shape
        x = items.reshape(m * n, e)  # (M N, E)
        a_h = torch.addmm(b1, states, w_h.t())  # (N, D1)
        ctx.layers = layers = len(rest) // 2
        ctx.fused = (_ops.offset_mlp_runs(w_e, rest[0], states, items, w_h, b1, *rest)
                     if layers == 2 else None)
        if ctx.fused:  # the two hidden layers and the logit in the C++ operator
            idx = torch.arange(m * n, device=x.device) % n  # (M N,) the pair of each row
            logits, h1, h2 = _ops.offset_mlp(x, a_h, idx, w_e, *rest, ctx.fused)  # (M N,), (M N, D1), (M N, D2)
            ctx.save_for_backward(states, x, w_h, w_e, rest[0], rest[2], h1, h2, idx)
            return logits.view(m, n)
        h = torch.mm(x, w_e.t()).view(m, n, -1).add_(a_h).sigmoid_().view(m * n, -1)  # (M N, D1)
        acts = [h]
        for i in range(layers):
            h = torch.addmm(rest[2 * i + 1], h, rest[2 * i].t())  # (M N, D_{i+2})
            if i < layers - 1:
                acts.append(h.sigmoid_())
        ctx.save_for_backward(states, x, w_h, w_e, *rest[0::2], *acts)
        return h.view(m, n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logits):  # type: ignore[override]
        states, x, w_h, w_e = ctx.saved_tensors[:4]
        m, n = g_logits.shape
        need = ctx.needs_input_grad
        if ctx.fused:
            w2, w3, h1, h2, idx = ctx.saved_tensors[4:]
            g_x, _, g_a, g_w_e, *rest = _ops.offset_mlp_backward(
                g_logits.reshape(m * n).contiguous(), x, idx, w_e, w2, w3, h1, h2, n, bool(need[1]), ctx.fused
            )  # g_a (N, D1): the state part's gradient, summed over the M items
            g_items = g_x.view(m, n, -1) if need[1] else None  # (M, N, E)
        else:
            g_a, g_items, g_w_e, rest = _pair_layer_grads(ctx, g_logits, x, w_e, bool(need[1]))
        g_states = g_a.mm(w_h) if need[0] else None  # (N, H)
        return g_states, g_items, g_a.t().mm(states), g_w_e, g_a.sum(0), *rest


def _pair_layer_grads(ctx: Any, g_logits: Tensor, x: Tensor, w_e: Tensor, need_items: bool) -> tuple:
    """The torch ops of :meth:`_PairMLP.backward`: g_a (N, D1) the state part's gradient,
    g_items (M, N, E) (None unless ``need_items``), g_w_e (D1, E), [d W, d b of each upper layer]."""
    layers = ctx.layers
    weights = ctx.saved_tensors[4 : 4 + layers]
    acts = ctx.saved_tensors[4 + layers :]
    m, n = g_logits.shape
    g = g_logits.reshape(m * n, 1)  # (M N, 1)
    rest: list[Tensor] = []
    for i in reversed(range(layers)):
        rest[:0] = [g.t().mm(acts[i]), g.sum(0)]  # d W, d b of layer i + 2
        # (M N, D_{i+1}); an outer product as a broadcast (a K = 1 mm is slow in BLAS)
        g = g * weights[i] if g.shape[1] == 1 else g.mm(weights[i])
        _sigmoid_backward_(g, acts[i], grad_input=g)  # in place: d pre-activation
    g_items = g.mm(w_e).view(m, n, -1) if need_items else None  # (M, N, E)
    g_w_e = g.t().mm(x)  # (D1, E)
    g3 = g.view(m, n, -1)
    g_a = g3[0] if m == 1 else torch.add(g3[0], g3[1])  # (N, D1): the state part's gradient
    for i in range(2, m):
        g_a += g3[i]
    return g_a, g_items, g_w_e, rest


def _check(states: Tensor, clicked: Tensor, non_clicked: Tensor, mask: Tensor) -> Tensor:
    """Validate shapes; return non_clicked as (B, T, K, E)."""
    for name, t, rank, layout in (
        ("states", states, 3, "(B, T, H)"),
        ("clicked", clicked, 3, "(B, T, E)"),
        ("mask", mask, 2, "(B, T)"),
    ):
        if not isinstance(t, Tensor) or t.dim() != rank:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ShapeError(f"{name}: expected rank {rank} {layout}, got {got}")
    b, t = mask.shape
    if tuple(states.shape[:2]) != (b, t) or tuple(clicked.shape[:2]) != (b, t):
        raise ShapeError(
            f"states {tuple(states.shape)}, clicked {tuple(clicked.shape)} and mask "
            f"{tuple(mask.shape)} must agree on (B, T)"
        )
    if non_clicked.dim() == 3:
        non_clicked = non_clicked.unsqueeze(2)  # (B, T, 1, E)
    if non_clicked.dim() != 4 or tuple(non_clicked.shape[:2]) != (b, t) or (
        non_clicked.shape[3] != clicked.shape[2]
    ):
        raise ShapeError(
            f"non_clicked: expected (B, T, K, E) or (B, T, E) with (B, T, E) = "
            f"{tuple(clicked.shape)}, got {tuple(non_clicked.shape)}"
        )
    return non_clicked


def auxiliary_loss(
    net: nn.Module,
    states: Tensor,
    clicked: Tensor,
    non_clicked: Tensor,
    mask: Tensor,
    *,
    reduction: str = "mean",
) -> Tensor:
    """The auxiliary loss over the valid ``(t, t + 1)`` pairs of a left-aligned history.

    Args:
        net: the classifier, ``(N, H + E) -> (N,)`` logits (an :class:`AuxiliaryNet`).
        states: ``(B, T, H)`` interest-extractor states ``h_t``.
        clicked: ``(B, T, E)`` embeddings of the clicked history items (unshifted).
        non_clicked: ``(B, T, K, E)`` or ``(B, T, E)``: embeddings of ``neg_items``,
            the negatives of each history position (unshifted).
        mask: ``(B, T)``, 1/True at valid history positions.
        reduction: ``"mean"`` over valid pairs (0 when there is none), ``"reference"``
            (sum / ``(B * (T - 1))``, the reference's ``reduce_mean``) or ``"sum"``.

    Returns:
        A scalar: ``softplus(-g(h_t, e_{t+1})) + mean_k softplus(g(h_t, e_neg_{t+1,k}))``
        reduced over pairs where both ``t`` and ``t + 1`` are valid.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    non_clicked = _check(states, clicked, non_clicked, mask)
    b, t = mask.shape
    k = non_clicked.shape[2]
    flat, nxt = pair_positions(mask)  # (N,) each
    if flat.shape[0] == 0:
        return states[:, :0].sum()  # 0, still attached to the graph
    # Gathering only the valid pairs drops every padded value (NaN included).
    h = states.reshape(b * t, -1).index_select(0, flat)  # (N, H)
    pos = clicked.reshape(b * t, -1).index_select(0, nxt)  # (N, E)
    neg = non_clicked.reshape(b * t, k, -1).index_select(0, nxt)  # (N, K, E)
    return pair_loss(net, h, pos, neg, reduction=reduction, all_pairs=b * (t - 1))


def pair_positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """The valid ``(t, t + 1)`` pairs of a left-aligned mask ``(B, T)``, row-major: the
    flat ``(B * T)`` positions of each pair's state ``h_t`` and of its target ``t + 1``,
    ``(N,)`` each."""
    t = mask.shape[1]
    valid = mask if mask.dtype == torch.bool else mask == 1  # (B, T)
    at = (valid[:, 1:] & valid[:, :-1]).nonzero()  # (N, 2): (row, t) of each valid pair
    flat = at[:, 0] * t + at[:, 1]  # (N,)
    return flat, flat + 1


def pair_loss(
    net: nn.Module, h: Tensor, pos: Tensor, neg: Tensor, *, reduction: str = "mean", all_pairs: int = 0
) -> Tensor:
    """The auxiliary loss of N gathered pairs (see :func:`auxiliary_loss`, which gathers them).

    Args:
        net: the classifier (an :class:`AuxiliaryNet`, or any ``(N, H + E) -> (N,)``).
        h: ``(N, H)`` the states ``h_t``; pos: ``(N, E)`` the clicked ``e_{t+1}``;
            neg: ``(N, K, E)`` the negatives of position ``t + 1``.
        reduction: ``"mean"`` over the N pairs (0 when N = 0), ``"sum"``, or
            ``"reference"``: the sum over ``all_pairs`` (``B * (T - 1)``, padded pairs included).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    n, k = neg.shape[0], neg.shape[1]
    if n == 0:
        return h.sum() * 0.0  # 0, still attached to the graph
    items = torch.cat([pos.unsqueeze(0), neg.transpose(0, 1)], 0)  # (1 + K, N, E)
    if isinstance(net, AuxiliaryNet):
        logits = net.pair_logits(h, items)  # (1 + K, N)
    else:
        x = torch.cat([h.expand(k + 1, n, h.shape[1]), items], 2)  # (1 + K, N, H + E)
        logits = net(x.reshape((k + 1) * n, -1)).view(k + 1, n)
    pos_logit, neg_logit = logits[0], logits[1:]  # (N,), (K, N)
    per_pair = F.softplus(-pos_logit) + F.softplus(neg_logit).mean(0)  # (N,)
    total = per_pair.sum()
    if reduction == "sum":
        return total
    if reduction == "reference":
        return total / max(all_pairs, 1)
    return total / n
