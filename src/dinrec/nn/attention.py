"""The reference DIN/DIEN attention unit, `din_fcn_attention`, in PyTorch.

This is an exact port of the TensorFlow 1.x function of the DIEN reference code
(see ``shared/seed`` and ``shared/golden/README.md``). Step by step, for a query
``(B, Q)`` and facts ``(B, T, D)``:

1. tuple facts (Bi-RNN): ``facts = cat(facts, -1)``, ``query = cat([query, query], -1)``;
2. ``time_major``: facts ``(T, B, D) -> (B, T, D)``; the mask is always ``(B, T)``;
3. ``valid = (mask == 1)``: only the value 1 (or True) marks a valid position;
4. ``q = prelu(query @ W_q + b_q)`` -> ``(B, D)``, one PReLU slope per feature;
5. ``din = [q, k, q - k, q * k]`` over the T positions -> ``(B, T, 4D)``;
6. ``sigmoid(A) -> sigmoid(40) -> 1`` dense layers give the scores ``(B, 1, T)``;
7. invalid scores are *replaced* by ``-2**32 + 1`` (unless ``for_cnn``);
8. optional softmax over T;
9. ``mode == "SUM"``: ``scores @ facts`` -> ``(B, 1, D)``; any other mode: the facts
   weighted per step -> ``(B, T, D)`` and alphas ``(B, T)``.

Two implementations compute it, chosen by :func:`dinrec.nn.backend` (or pinned with
``impl="reference"``):

* ``"reference"`` mirrors the TensorFlow code line by line (tile, concatenate,
  three dense layers). It is the readable definition and the yardstick.
* ``"fast"`` (the default) uses that the first layer is linear in
  ``[q, k, q-k, q*k]``::

      W1 [q; k; q-k; q*k] = (W_q + W_d) q + (W_k - W_d) k + W_p (q * k)
                          = (W_q + W_d) q + k M_b,   M_b = (W_k - W_d)^T + diag(q_b) W_p^T

  so the ``(B, T, 4D)`` tensor is never built, the query part is computed once per
  row, and the key and product parts become one batched matmul with a per-row
  ``(D, A)`` matrix. :func:`din_fcn_attention_candidates` scores N candidate
  queries against one history: without autograd through the prepared candidate path
  (:class:`CandidateAttention`, the history part computed once, the C++ operator
  ``dinrec::candidate_scores`` on CPU), with autograd as N rows sharing the history.

  With a mask on a padded batch (shuffled batches are padded to their longest row,
  often more than half padding), the fast path scores only the valid positions
  (:mod:`dinrec.nn.packed`: the valid facts gathered into one ``(N, D)`` matrix, the
  scores scattered back with the padding value) when few enough of the positions are
  valid (:func:`dinrec.nn.packed.use_packed`: a measured share by width); eager CPU runs
  without autocast only (tracers, meta tensors and other devices keep the dense path).
  The SUM output's backward computes the facts' gradient as a broadcast product
  (:class:`_WeightedSum`) instead of a batched matmul with an inner size of 1.

Query and facts widths are free (``Q != D``, odd or large ``D``): nothing assumes a
vector width.

Both give the same values and gradients up to float round-off (tested).

Low precision: the padding constant ``-2**32 + 1`` does not fit in float16. Where
the score dtype cannot hold it, the most negative finite value of that dtype is used
instead, so softmax still gives exactly zero weight to padded positions and uniform
weights to an all-padded row (never NaN or inf). With ``softmax=False`` the padding
value itself is the weight of a padded position, as in the reference; in float16 that
product can overflow, so use float32 for that (degenerate) configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinrec.errors import ShapeError
from dinrec.nn._backend import resolve, tracing
from dinrec.nn.candidate_scores import candidate_scores
from dinrec.nn.packed import can_pack, fact_scores, scores_if_sparse

#: The reference's padding score for invalid positions.
PADDING_SCORE: float = -(2.0**32) + 1
#: The fixed width of the reference's second attention layer.
HIDDEN_SIZE: int = 40

Facts = Tensor | tuple[Tensor, Tensor]


class AttentionWeights(NamedTuple):
    """The parameters of one attention unit, in PyTorch layout (``weight`` is ``[out, in]``)."""

    query_weight: Tensor | None  # (D, Q)   query projection (None: the query is used as is)
    query_bias: Tensor | None  # (D,)
    prelu_alpha: Tensor | None  # (D,)      PReLU slope per feature
    att1_weight: Tensor  # (A, 4D)   first attention layer (sigmoid)
    att1_bias: Tensor  # (A,)
    att2_weight: Tensor  # (40, A)   second attention layer (sigmoid)
    att2_bias: Tensor  # (40,)
    att3_weight: Tensor  # (1, 40)   score layer (linear)
    att3_bias: Tensor  # (1,)


# --------------------------------------------------------------------------- validation
def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _check_rank(name: str, t: Any, rank: int, expected: str) -> None:
    if not isinstance(t, Tensor):
        raise ShapeError(f"{name}: expected a tensor {expected}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ShapeError(f"{name}: expected rank {rank} {expected}, got shape {_shape(t)}")


def _merge_facts(query: Tensor, facts: Facts, time_major: bool) -> tuple[Tensor, Tensor]:
    """Steps 1-2: the Bi-RNN tuple and ``time_major``. Returns query (B, Q'), facts (B, T, D)."""
    layout = "(T, B, D)" if time_major else "(B, T, D)"
    if isinstance(facts, (tuple, list)):
        if len(facts) != 2:
            raise ShapeError(
                f"facts: a tuple must hold exactly 2 tensors (forward, backward), got {len(facts)}"
            )
        for i, f in enumerate(facts):
            _check_rank(f"facts[{i}]", f, 3, layout)
        if facts[0].shape[:2] != facts[1].shape[:2]:
            raise ShapeError(
                f"facts: the two tuple tensors must agree on their first two axes {layout}, "
                f"got {_shape(facts[0])} and {_shape(facts[1])}"
            )
        facts = torch.cat([facts[0], facts[1]], dim=2)  # (., ., D0 + D1)
        query = torch.cat([query, query], dim=1)  # (B, 2Q)
    else:
        _check_rank("facts", facts, 3, layout)
    if time_major:
        facts = facts.transpose(0, 1)  # (T, B, D) -> (B, T, D)
    return query, facts


def _check_inputs(query: Tensor, facts: Tensor, mask: Tensor | None, for_cnn: bool) -> None:
    """Shapes after merging: query (B, Q), facts (B, T, D), mask (B, T)."""
    _check_rank("query", query, 2, "(B, Q)")
    b, t, _ = facts.shape
    if query.shape[0] != b:
        raise ShapeError(
            f"query: batch size {query.shape[0]} does not match facts (B, T, D) = {_shape(facts)}"
        )
    if t == 0:
        raise ShapeError(f"facts: the sequence axis T is empty, got shape {_shape(facts)}")
    if mask is None or for_cnn:
        return
    _check_mask(mask, (b, t), "(B, T)")


def _check_mask(mask: Tensor, expected: tuple[int, ...], layout: str) -> None:
    _check_rank("mask", mask, len(expected), layout)
    if tuple(mask.shape) != expected:
        raise ShapeError(f"mask: expected shape {layout} = {expected}, got {_shape(mask)}")
    if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ShapeError("mask: a floating-point mask must hold only 0.0 and 1.0")


def _check_weights(w: AttentionWeights, query_size: int, facts_size: int) -> None:
    if w.query_weight is None:
        if query_size != facts_size:
            raise ShapeError(
                f"query: without a query projection the query size must equal the facts size "
                f"{facts_size}, got {query_size}"
            )
    elif w.query_weight.shape != (facts_size, query_size):
        raise ShapeError(
            f"query: the query projection maps {w.query_weight.shape[1]} features to "
            f"{w.query_weight.shape[0]}, but got query size {query_size} and facts size {facts_size}"
        )
    if w.att1_weight.shape[1] != 4 * facts_size:
        raise ShapeError(
            f"facts: the attention expects facts of size {w.att1_weight.shape[1] // 4}, got {facts_size}"
        )


def _valid(mask: Tensor) -> Tensor:
    """``mask == 1`` as a bool tensor (bool masks are used as they are)."""
    return mask if mask.dtype == torch.bool else mask == 1


def _padding_value(dtype: torch.dtype) -> float:
    """The reference padding score, or the most negative finite value where it overflows."""
    return max(PADDING_SCORE, torch.finfo(dtype).min)


# --------------------------------------------------------------------------- shared steps
def _project_query(query: Tensor, w: AttentionWeights) -> Tensor:
    """Step 4: dense layer to D, then per-feature PReLU. (N, Q) -> (N, D)."""
    if w.query_weight is None:  # the reference's plain `din_attention`
        return query
    q = F.linear(query, w.query_weight, w.query_bias)  # (N, D)
    return F.prelu(q, w.prelu_alpha.to(q.dtype))  # max(0, q) + alpha * min(0, q)


def _upper_layers(h1_pre: Tensor, w: AttentionWeights) -> Tensor:
    """Step 6 after the first linear map: (N, T, A) pre-activations -> scores (N, 1, T)."""
    n, t, _ = h1_pre.shape
    h1 = torch.sigmoid(h1_pre)  # (N, T, A)
    h2 = torch.sigmoid(F.linear(h1, w.att2_weight, w.att2_bias))  # (N, T, 40)
    s = F.linear(h2, w.att3_weight, w.att3_bias)  # (N, T, 1)
    return s.reshape(n, 1, t)  # (N, 1, T)


def _mask_softmax(scores: Tensor, valid: Tensor | None, softmax: bool) -> Tensor:
    """Steps 7-8. scores (N, 1, T); valid broadcastable to (N, 1, T) or None."""
    if valid is not None:
        scores = scores.masked_fill(~valid, _padding_value(scores.dtype))
    if softmax:
        scores = torch.softmax(scores, dim=-1)
    return scores


class _WeightedSum(torch.autograd.Function):
    """``bmm(scores (N, 1, T), facts (N, T, D)) -> (N, 1, D)`` whose backward computes the
    facts' gradient ``scores^T g`` as a broadcast product: as a batched matmul with an
    inner size of 1 it is ~5x slower on CPU."""

    @staticmethod
    def forward(ctx, scores, facts):
        ctx.save_for_backward(scores, facts)
        return torch.bmm(scores, facts)  # (N, 1, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        scores, facts = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_scores = torch.bmm(g, facts.transpose(1, 2)) if need[0] else None  # (N, 1, T)
        g_facts = scores.transpose(1, 2) * g if need[1] else None  # (N, T, 1) * (N, 1, D)
        return g_scores, g_facts


def _weighted_output(
    scores: Tensor, facts: Tensor, mode: str, return_alphas: bool, fast: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Step 9. scores (N, 1, T), facts (N, T, D) or (T, D) shared by all N rows. ``fast``:
    the SUM of batched facts through :class:`_WeightedSum` where no autocast or tracer
    needs to see the plain ``bmm``."""
    n, _, t = scores.shape
    if mode == "SUM":
        if facts.dim() == 2:  # one history for every row
            output = torch.matmul(scores.reshape(n, t), facts).unsqueeze(1)  # (N, 1, D)
        elif (fast and scores.dtype == facts.dtype and not tracing()
              and not _autocast_enabled(facts.device.type)):
            output = _WeightedSum.apply(scores, facts)  # (N, 1, D)
        else:
            output = torch.bmm(scores.to(facts.dtype), facts)  # (N, 1, D)
        alphas = scores  # (N, 1, T)
    else:
        alphas = scores.reshape(n, t)  # (N, T)
        output = facts * alphas.unsqueeze(-1)  # (N, T, D)
    return (output, alphas) if return_alphas else output


# --------------------------------------------------------------------------- the two paths
def _scores_reference(q: Tensor, facts: Tensor, w: AttentionWeights) -> Tensor:
    """The reference's steps 5-6, line by line. q (B, D), facts (B, T, D) -> (B, 1, T)."""
    b, t, d = facts.shape
    queries = q.repeat(1, t)  # tf.tile: (B, T*D)
    queries = queries.reshape(b, t, d)  # (B, T, D)
    din_all = torch.cat([queries, facts, queries - facts, queries * facts], dim=-1)  # (B, T, 4D)
    d_layer_1 = torch.sigmoid(F.linear(din_all, w.att1_weight, w.att1_bias))  # (B, T, A)
    d_layer_2 = torch.sigmoid(F.linear(d_layer_1, w.att2_weight, w.att2_bias))  # (B, T, 40)
    d_layer_3 = F.linear(d_layer_2, w.att3_weight, w.att3_bias)  # (B, T, 1)
    return d_layer_3.reshape(b, 1, t)  # (B, 1, T)


def _split_first_layer(w: AttentionWeights, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """W1 = [W_q | W_k | W_d | W_p] (each (A, D)) -> (W_q + W_d, W_k - W_d, W_p)."""
    w_q, w_k, w_d, w_p = w.att1_weight.split(d, dim=1)
    return w_q + w_d, w_k - w_d, w_p


_sigmoid_backward_ = torch.ops.aten.sigmoid_backward.grad_input  # out= variant, in place


class _FastScores(torch.autograd.Function):
    """The attention MLP on the folded first layer, with a hand-written, in-place backward.

    forward(q_part (B, A), facts (B, T, D), m (B, D, A), w2 (40, A), b2 (40,), w3 (1, 40),
    b3 (1,)) -> scores (B, 1, T). Autograd would keep a pre-activation and allocate a
    fresh gradient at every elementwise step; here the sigmoids run in place and their
    backward overwrites the incoming gradient, which roughly halves the time of
    forward + backward on CPU. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, q_part, facts, m, w2, b2, w3, b3):  # type: ignore[override]
        b, t, _ = facts.shape
        h1 = torch.baddbmm(q_part.unsqueeze(1), facts, m).sigmoid_()  # (B, T, A)
        h2 = torch.addmm(b2, h1.view(b * t, -1), w2.t()).sigmoid_()  # (B*T, 40)
        s = torch.addmm(b3, h2, w3.t())  # (B*T, 1)
        ctx.save_for_backward(facts, m, w2, w3, h1, h2)
        return s.view(b, 1, t)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_s):  # type: ignore[override]
        facts, m, w2, w3, h1, h2 = ctx.saved_tensors
        b, t, _ = facts.shape
        g = g_s.reshape(b * t, 1)  # (B*T, 1)
        g_w3 = g.t() @ h2  # (1, 40)
        g_b3 = g.sum(0)  # (1,)
        g_h2 = g * w3  # (B*T, 40)
        _sigmoid_backward_(g_h2, h2, grad_input=g_h2)
        g_w2 = g_h2.t() @ h1.view(b * t, -1)  # (40, A)
        g_b2 = g_h2.sum(0)  # (40,)
        g_h1 = (g_h2 @ w2).view(b, t, -1)  # (B, T, A)
        _sigmoid_backward_(g_h1, h1, grad_input=g_h1)
        g_q = g_h1.sum(1)  # (B, A)
        need = ctx.needs_input_grad
        g_f = torch.bmm(g_h1, m.transpose(1, 2)) if need[1] else None  # (B, T, D)
        g_m = torch.bmm(facts.transpose(1, 2), g_h1) if need[2] else None  # (B, D, A)
        return g_q, g_f, g_m, g_w2, g_b2, g_w3, g_b3


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device without autocast (meta)
        return False


def _scores_fast(q: Tensor, facts: Tensor, w: AttentionWeights, valid: Tensor | None = None) -> Tensor:
    """Steps 5-6 without the (B, T, 4D) tensor. q (B, D), facts (B, T, D), valid (B, T) bool
    or None -> (B, 1, T). With ``valid``, the scores at invalid positions are arbitrary
    (the caller masks them); the packed path (:mod:`dinrec.nn.packed`) gives them the padding
    value and computes only the valid ones."""
    w_query, w_key, w_prod = _split_first_layer(w, facts.shape[-1])  # (A, D) each
    q_part = F.linear(q, w_query, w.att1_bias)  # (B, A): once per row
    upper = (w.att2_weight, w.att2_bias, w.att3_weight, w.att3_bias)
    same_dtype = all(x.dtype == facts.dtype for x in (q, q_part, w_key, *upper))
    fused = same_dtype and not _autocast_enabled(facts.device.type)
    if fused and valid is not None and can_pack(facts):
        scores = scores_if_sparse(q_part, q, facts, valid, w_key, w_prod, upper,
                                  _padding_value(facts.dtype))
        if scores is not None:
            return scores
    # Per-row key matrix M_b = (W_k - W_d)^T + diag(q_b) W_p^T folds the key and q*k terms.
    m = torch.addcmul(w_key.t().unsqueeze(0), q.unsqueeze(2), w_prod.t().unsqueeze(0))  # (B, D, A)
    if fused:
        return _FastScores.apply(q_part, facts, m, *upper)
    # Autocast or mixed dtypes: the same algebra through autograd, so autocast picks the precisions.
    h1_pre = torch.baddbmm(q_part.unsqueeze(1), facts, m)  # (B, T, A)
    return _upper_layers(h1_pre, w)


def din_fcn_attention(
    query: Tensor,
    facts: Facts,
    mask: Tensor | None,
    weights: AttentionWeights,
    *,
    mode: str = "SUM",
    softmax: bool = True,
    time_major: bool = False,
    return_alphas: bool = False,
    for_cnn: bool = False,
    impl: str = "fast",
) -> Tensor | tuple[Tensor, Tensor]:
    """The reference ``din_fcn_attention`` as a function of its inputs and weights.

    Args:
        query: ``(B, Q)`` the target (or user) vector.
        facts: ``(B, T, D)``, or ``(T, B, D)`` with ``time_major``, or a tuple of two such
            tensors (Bi-RNN outputs, concatenated on the last axis; the query is then
            concatenated with itself, so the projection takes ``2Q`` features).
        mask: ``(B, T)``; only the value 1 (or True) marks a valid position. ``None``
            means every position is valid. A float mask must hold only 0.0 / 1.0.
        weights: the unit's parameters (:class:`AttentionWeights`, PyTorch layout).
        mode: ``"SUM"`` returns the weighted sum ``(B, 1, D)``; any other string returns
            the facts weighted per step ``(B, T, D)``.
        softmax: normalise the scores over T (the reference's ``softmax_stag``).
        time_major: facts are ``(T, B, D)``; the mask stays ``(B, T)``, the output is
            batch-major.
        return_alphas: also return the weights, ``(B, 1, T)`` in SUM mode, ``(B, T)``
            otherwise.
        for_cnn: ignore the mask entirely (the reference's ``forCnn``).
        impl: ``"fast"`` (default: follow :func:`dinrec.nn.backend`) or ``"reference"``
            (the line-by-line port, pinned).

    Returns:
        ``output`` or ``(output, alphas)``.
    """
    query, facts = _merge_facts(query, facts, time_major)
    _check_inputs(query, facts, mask, for_cnn)
    _check_weights(weights, query.shape[1], facts.shape[2])
    q = _project_query(query, weights)  # (B, D)
    valid = None if (mask is None or for_cnn) else _valid(mask)  # (B, T)
    kind = resolve(impl)
    scores = _row_scores(q, facts, weights, kind, valid)  # (B, 1, T)
    scores = _mask_softmax(scores, None if valid is None else valid.unsqueeze(1), softmax)
    return _weighted_output(scores, facts, mode, return_alphas, fast=kind == "fast")


def _row_scores(
    q: Tensor, facts: Tensor, w: AttentionWeights, impl: str, valid: Tensor | None = None
) -> Tensor:
    """Steps 5-6 by the chosen implementation. q (B, D), facts (B, T, D) -> (B, 1, T);
    ``valid`` (B, T) lets the fast path skip invalid positions (their scores are masked)."""
    if impl == "fast":
        return _scores_fast(q, facts, w, valid)
    return _scores_reference(q, facts, w)


def din_fcn_attention_packed(
    query: Tensor,
    facts: Tensor,
    index: Tensor,
    rows: Tensor,
    length: int,
    weights: AttentionWeights,
    *,
    softmax: bool = True,
    return_alphas: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`din_fcn_attention` in ``"SUM"`` mode on packed facts: only the valid events.

    Equal to ``din_fcn_attention(query, padded, mask, weights, mode="SUM")`` where
    ``padded`` (B, T, D) holds ``facts[i]`` at flat position ``index[i]`` and zero
    everywhere else (padding embeds as zero vectors) and ``mask`` is True exactly at
    ``index``. The attention MLP runs on the N facts only (:func:`dinrec.nn.packed.fact_scores`),
    the scores are scattered into ``(B, 1, T)`` with the padding score for the softmax,
    and the output is a segment sum over the N facts; no ``(B, T, D)`` tensor exists,
    and the facts' gradient is ``(N, D)``. Eager mode (the number of facts is data).

    Args:
        query: ``(B, Q)``.
        facts: ``(N, D)`` the valid facts of every row, in row-major order.
        index: ``(N,)`` int64 flat position ``b * T + t`` of each fact.
        rows: ``(N,)`` int64 row ``b`` of each fact (``index // T``).
        length: T, the padded length the alphas are laid out in.

    Returns:
        ``output`` ``(B, 1, D)``, and with ``return_alphas`` the weights ``(B, 1, T)``.
    """
    b, d = query.shape[0], facts.shape[1]
    _check_weights(weights, query.shape[1], d)
    q = _project_query(query, weights)  # (B, D)
    w_query, w_key, w_prod = _split_first_layer(weights, d)  # (A, D) each
    q_part = F.linear(q, w_query, weights.att1_bias)  # (B, A)
    upper = (weights.att2_weight, weights.att2_bias, weights.att3_weight, weights.att3_bias)
    s = fact_scores(q_part, q, facts, rows, torch.cat([w_key, w_prod], dim=1), upper)  # (N,)
    scores = s.new_full((b * length,), _padding_value(s.dtype)).index_copy(0, index, s)  # (B*T,)
    scores = scores.view(b, 1, length)  # (B, 1, T)
    if softmax:
        scores = torch.softmax(scores, dim=-1)
    p = scores.view(b * length).index_select(0, index)  # (N,) the valid facts' weights
    output = segment_sum(facts * p.unsqueeze(1), rows, b).unsqueeze(1)  # (B, 1, D)
    return (output, scores) if return_alphas else output


def segment_sum(x: Tensor, rows: Tensor, b: int) -> Tensor:
    """Row sums of packed values: x (N, D), rows (N,) in [0, B) -> (B, D), 0 for a row
    without values."""
    return x.new_zeros(b, x.shape[1]).index_add(0, rows, x)  # (B, D)


def din_fcn_attention_candidates(
    candidates: Tensor,
    history: Tensor,
    mask: Tensor | None,
    weights: AttentionWeights,
    *,
    mode: str = "SUM",
    softmax: bool = True,
    return_alphas: bool = False,
    for_cnn: bool = False,
    compute_dtype: torch.dtype | None = None,
    impl: str = "fast",
) -> Tensor | tuple[Tensor, Tensor]:
    """Score N candidate queries against one shared history.

    Equal to :func:`din_fcn_attention` with the history repeated N times. Without
    autograd (``torch.no_grad()``, or no input requiring a gradient) and with the fast
    backend this is the prepared candidate path of :class:`CandidateAttention` (the
    history part computed once, valid positions only, the C++ operator on CPU). With
    autograd the N rows run the fast row path against the shared history (a view, not
    a copy), exactly the batched row computation.

    Args:
        candidates: ``(N, Q)`` candidate queries.
        history: ``(T, D)`` (or ``(1, T, D)``) the one user's facts.
        mask: ``(T,)`` (or ``(1, T)``) validity of each history position, or ``None``.
        compute_dtype: without autograd, the dtype of the attention MLP's products
            (``torch.bfloat16``: faster on CPUs with bfloat16 dot products, ~1e-2
            relative error in the scores); see :mod:`dinrec.nn.candidate_scores`.
        impl: ``"fast"`` (follow :func:`dinrec.nn.backend`) or ``"reference"``.

    Returns:
        ``output`` ``(N, 1, D)`` in SUM mode, ``(N, T, D)`` otherwise, and with
        ``return_alphas`` the weights ``(N, 1, T)`` or ``(N, T)``.
    """
    _check_rank("candidates", candidates, 2, "(N, Q)")
    if isinstance(history, Tensor) and history.dim() == 3 and history.shape[0] == 1:
        history = history[0]
    _check_rank("history", history, 2, "(T, D)")
    t, d = history.shape
    if t == 0:
        raise ShapeError(f"history: the sequence axis T is empty, got shape {_shape(history)}")
    if mask is not None and not for_cnn:
        if mask.dim() == 2 and mask.shape[0] == 1:
            mask = mask[0]
        _check_mask(mask, (t,), "(T,)")
    _check_weights(weights, candidates.shape[1], d)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (candidates, history, *weights)
    )
    kind = resolve(impl)
    if not needs_grad and kind == "fast":
        unit = CandidateAttention(weights, mode=mode, softmax=softmax, for_cnn=for_cnn)
        return unit(candidates, history, mask, return_alphas=return_alphas, compute_dtype=compute_dtype)
    n = candidates.shape[0]
    q = _project_query(candidates, weights)  # (N, D)
    scores = _row_scores(q, history.expand(n, t, d), weights, kind)  # (N, 1, T)
    valid = None if (mask is None or for_cnn) else _valid(mask).view(1, 1, t)  # (1, 1, T)
    scores = _mask_softmax(scores, valid, softmax)
    if mode != "SUM":
        history = history.unsqueeze(0)  # (1, T, D), broadcast over N
    return _weighted_output(scores, history, mode, return_alphas)


class CandidateAttention:
    """:func:`din_fcn_attention_candidates` for inference, with the weight-only work done once.

    Takes a snapshot of ``weights`` (detached; the first layer already split as
    ``W_q + W_d``, ``W_k - W_d``, ``W_p``), so a serving process that scores many requests
    with one model pays for it once. Make a new one after the weights change. Inputs are
    not checked (see the function for the shapes); no autograd.
    """

    def __init__(self, weights: AttentionWeights, *, mode: str = "SUM", softmax: bool = True,
                 for_cnn: bool = False) -> None:
        with torch.no_grad():
            self.weights = AttentionWeights(*(None if x is None else x.detach() for x in weights))
            d = weights.att1_weight.shape[1] // 4
            w_query, w_key, w_prod = _split_first_layer(self.weights, d)  # (A, D) each
            w = self.weights
            self.layers = (w_query, w_key, w_prod, w.att1_bias, w.att2_weight, w.att2_bias,
                           w.att3_weight, w.att3_bias)
        self.mode, self.softmax, self.for_cnn = mode, softmax, for_cnn

    @torch.no_grad()
    def __call__(
        self,
        candidates: Tensor,
        history: Tensor,
        mask: Tensor | None = None,
        return_alphas: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """candidates (N, Q), history (T, D), mask (T,) -> as :func:`din_fcn_attention_candidates`."""
        t = history.shape[0]
        q = _project_query(candidates, self.weights)  # (N, D)
        valid = None if (mask is None or self.for_cnn) else _valid(mask)  # (T,)
        scores = candidate_scores(q, history, valid, *self.layers, compute_dtype=compute_dtype)
        scores = _mask_softmax(scores.unsqueeze(1), None if valid is None else valid.view(1, 1, t),
                               self.softmax)  # (N, 1, T)
        if self.mode != "SUM":
            history = history.unsqueeze(0)  # (1, T, D), broadcast over N
        return _weighted_output(scores, history, self.mode, return_alphas)


# --------------------------------------------------------------------------- module
class DinFcnAttention(nn.Module):
    """The reference ``din_fcn_attention`` as a module with its own parameters.

    Args:
        query_size: Q, the query's feature size (before the Bi-RNN self-concatenation).
        facts_size: D, the facts' feature size (after concatenating a Bi-RNN tuple).
        attention_size: A, width of the first attention layer (reference: 80 in DIEN).
        mode: ``"SUM"`` -> ``(B, 1, D)``; any other string -> per-step ``(B, T, D)``.
        softmax: softmax over T (the reference's ``softmax_stag``).
        time_major: facts come as ``(T, B, D)``.
        return_alphas: default for ``forward(..., return_alphas=None)``.
        for_cnn: ignore the mask (the reference's ``forCnn``).
        bi_rnn: facts come as a tuple of two tensors; the query projection then takes
            ``2 * query_size`` features, as the reference's ``concat([query, query])``.
        query_projection: ``False`` gives the reference's plain ``din_attention`` (no query
            dense layer and PReLU: the raw query, of size D, goes into the MLP).
        impl: ``"fast"`` (default: follow :func:`dinrec.nn.backend`) or ``"reference"``
            (pinned to the line-by-line port).

    Parameters and initialisation follow the reference: a query projection to D with
    per-feature PReLU (alpha 0.1), then ``A`` (sigmoid) -> 40 (sigmoid) -> 1, with
    Glorot-uniform kernels and zero biases.
    """

    def __init__(
        self,
        query_size: int,
        facts_size: int,
        attention_size: int = 80,
        *,
        mode: str = "SUM",
        softmax: bool = True,
        time_major: bool = False,
        return_alphas: bool = False,
        for_cnn: bool = False,
        bi_rnn: bool = False,
        query_projection: bool = True,
        impl: str = "fast",
    ) -> None:
        super().__init__()
        d = facts_size
        self.query_size = query_size
        self.facts_size = facts_size
        self.attention_size = attention_size
        self.mode = mode
        self.softmax = softmax
        self.time_major = time_major
        self.return_alphas = return_alphas
        self.for_cnn = for_cnn
        self.bi_rnn = bi_rnn
        self.impl = impl
        self.query_projection = query_projection
        if query_projection:
            self.query_proj: nn.Linear | None = nn.Linear(2 * query_size if bi_rnn else query_size, d)
            self.prelu_alpha: nn.Parameter | None = nn.Parameter(torch.empty(d))
        else:  # the reference's plain `din_attention`: the raw query goes in
            if (2 * query_size if bi_rnn else query_size) != d:
                raise ShapeError(
                    f"query_size: without a query projection it must equal facts_size {d}, "
                    f"got {query_size}"
                )
            self.query_proj = None
            self.prelu_alpha = None
        self.att1 = nn.Linear(4 * d, attention_size)
        self.att2 = nn.Linear(attention_size, HIDDEN_SIZE)
        self.att3 = nn.Linear(HIDDEN_SIZE, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's initial values: Glorot-uniform kernels, zero biases, alpha 0.1."""
        for layer in (self.query_proj, self.att1, self.att2, self.att3):
            if layer is not None:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        if self.prelu_alpha is not None:
            nn.init.constant_(self.prelu_alpha, 0.1)

    def weights(self) -> AttentionWeights:
        """The parameters as an :class:`AttentionWeights` tuple (for the functional form)."""
        return AttentionWeights(
            None if self.query_proj is None else self.query_proj.weight,
            None if self.query_proj is None else self.query_proj.bias,
            self.prelu_alpha,
            self.att1.weight,
            self.att1.bias,
            self.att2.weight,
            self.att2.bias,
            self.att3.weight,
            self.att3.bias,
        )

    def forward(
        self, query: Tensor, facts: Facts, mask: Tensor | None = None, return_alphas: bool | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """query (B, Q); facts (B, T, D) / (T, B, D) / tuple; mask (B, T) -> see :func:`din_fcn_attention`."""
        if isinstance(facts, (tuple, list)) != self.bi_rnn:
            raise ShapeError(
                "facts: this unit was built with bi_rnn="
                f"{self.bi_rnn}, so facts must {'be' if self.bi_rnn else 'not be'} a tuple of two tensors"
            )
        return din_fcn_attention(
            query,
            facts,
            mask,
            self.weights(),
            mode=self.mode,
            softmax=self.softmax,
            time_major=self.time_major,
            return_alphas=self.return_alphas if return_alphas is None else return_alphas,
            for_cnn=self.for_cnn,
            impl=self.impl,
        )

    @property
    def packable(self) -> bool:
        """Whether :meth:`forward_packed` can compute this unit: SUM mode over a mask."""
        return self.mode == "SUM" and not (self.for_cnn or self.bi_rnn or self.time_major)

    def forward_packed(
        self, query: Tensor, facts: Tensor, index: Tensor, rows: Tensor, length: int,
        return_alphas: bool | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """query (B, Q); the valid facts (N, D) at flat positions ``index`` (N,) of rows
        ``rows`` (N,) of a (B, T = ``length``) layout: see :func:`din_fcn_attention_packed`."""
        if not self.packable:
            raise ShapeError("facts: packed facts need a SUM unit with a mask (no for_cnn, "
                             "bi_rnn or time_major)")
        return din_fcn_attention_packed(
            query, facts, index, rows, length, self.weights(), softmax=self.softmax,
            return_alphas=self.return_alphas if return_alphas is None else return_alphas,
        )

    def score_candidates(
        self,
        candidates: Tensor,
        history: Tensor,
        mask: Tensor | None = None,
        return_alphas: bool | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """candidates (N, Q) against one history (T, D), mask (T,): see :func:`din_fcn_attention_candidates`."""
        if self.bi_rnn:
            raise ShapeError("history: score_candidates takes one (T, D) history, not a Bi-RNN tuple")
        return din_fcn_attention_candidates(
            candidates,
            history,
            mask,
            self.weights(),
            mode=self.mode,
            softmax=self.softmax,
            return_alphas=self.return_alphas if return_alphas is None else return_alphas,
            for_cnn=self.for_cnn,
            compute_dtype=compute_dtype,
            impl=self.impl,
        )

    def candidate_attention(self) -> CandidateAttention:
        """A frozen inference form of :meth:`score_candidates` (a snapshot of the weights)."""
        if self.bi_rnn:
            raise ShapeError("history: score_candidates takes one (T, D) history, not a Bi-RNN tuple")
        return CandidateAttention(self.weights(), mode=self.mode, softmax=self.softmax, for_cnn=self.for_cnn)

    def extra_repr(self) -> str:
        return (
            f"query_size={self.query_size}, facts_size={self.facts_size}, "
            f"attention_size={self.attention_size}, mode={self.mode!r}, softmax={self.softmax}, "
            f"time_major={self.time_major}, for_cnn={self.for_cnn}, bi_rnn={self.bi_rnn}, impl={self.impl!r}"
        )

    # ------------------------------------------------------------------- reference weights
    @torch.no_grad()
    def load_reference_weights(self, params: Mapping[str, Any], stag: str = "null") -> None:
        """Load TensorFlow-layout weights (kernels ``[in, out]``) into this module.

        ``params`` maps either the golden files' keys (``query_proj.kernel``,
        ``prelu.alpha``, ``att1.kernel`` ...) or the reference's variable names
        (``f1{stag}/kernel``, ``prelu_``, ``f1_att{stag}/kernel`` ...) to arrays.
        """
        aliases = {
            "query_proj": f"f1{stag}",
            "att1": f"f1_att{stag}",
            "att2": f"f2_att{stag}",
            "att3": f"f3_att{stag}",
        }

        def get(key: str, tf_name: str) -> Tensor:
            for k in (key, tf_name, tf_name + ":0"):
                if k in params:
                    return torch.as_tensor(np.asarray(params[k]))
            raise KeyError(f"reference weights: missing {key!r} (TensorFlow name {tf_name!r})")

        for name, tf_scope in aliases.items():
            layer: nn.Linear | None = getattr(self, name)
            if layer is None:
                continue
            kernel = get(f"{name}.kernel", f"{tf_scope}/kernel")  # (in, out)
            bias = get(f"{name}.bias", f"{tf_scope}/bias")  # (out,)
            if tuple(kernel.shape) != (layer.in_features, layer.out_features):
                raise ShapeError(
                    f"{name}.kernel: expected [in, out] = [{layer.in_features}, "
                    f"{layer.out_features}], got {list(kernel.shape)}"
                )
            layer.weight.copy_(kernel.t())
            layer.bias.copy_(bias.reshape(layer.out_features))
        if self.prelu_alpha is not None:
            alpha = get("prelu.alpha", "prelu_")
            self.prelu_alpha.copy_(alpha.reshape(self.facts_size))
