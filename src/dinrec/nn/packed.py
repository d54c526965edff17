"""The attention MLP over the valid positions of a padded batch only ("packed").

A shuffled batch is padded to its longest row, so a large share of its ``(B, T)``
positions can be padding (on the synthetic set about 60%). The attention unit's scores
at padded positions are replaced by the padding value before the softmax, so computing
them is wasted work. Here the valid facts are gathered into one ``(N, D)`` matrix
(``N`` = number of valid positions, in row-major order) and the folded first layer

    h1 = (W_q + W_d) q_b + b_1 + (W_k - W_d) k + W_p (q_b * k)
       = q_part[b] + [k, q_b * k] @ [W_k - W_d | W_p]^T

is one ``(N, 2D) @ (2D, A)`` product instead of one small product per row; layers 2-3
follow on ``(N, .)`` and the scores are scattered back into ``(B, 1, T)`` with the
padding value everywhere else. Those are exactly the scores the masked reference
produces (a padded position's score is the padding value whatever the MLP says), and
so are the gradients: the reference's masking gives every padded position a zero score
gradient, which is what not computing it gives.

:func:`packed_scores` is called by the ``"fast"`` backend of
:func:`dinrec.nn.attention.din_fcn_attention` when :func:`use_packed` says so.

A model can go further and never build the padded facts: DIN looks up only the valid
events (``FeatureEmbedding.packed``) and calls
:func:`dinrec.nn.attention.din_fcn_attention_packed`, which scores the ``(N, D)`` facts
with :func:`fact_scores` (the same MLP, its facts' gradient ``(N, D)`` with no scatter),
scatters only the N scores into ``(B, 1, T)`` for the softmax and sums the weighted facts
per row. :func:`packs` with ``inputs=True`` is its rule (eager CPU runs, as
:func:`can_pack`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from dinrec.nn import _ops
from dinrec.nn._backend import tracing

__all__ = ["PACKED_BELOW", "PACKED_BELOW_WIDE", "PACKED_INPUTS_BELOW", "PACKED_INPUTS_BELOW_WIDE", "WIDE", "can_pack", "fact_scores", "packed_scores", "packs", "scores_if_sparse",
           "use_packed", "valid_index"]

#: Pack when less than this share of the (B, T) positions is valid, for an attention
#: MLP narrower than :data:`WIDE` (``din_fcn_attention``, A = 36) and at least that wide
#: (the plain ``din_attention``, A = 80). Measured (AMD EPYC Zen 4, 1 thread, B = 128,
#: D = 36, CPU time). The whole DIN training step, against the dense path
#: (``benchmarks/train_throughput.py --against ... --step-cpu``): A = 36 gains 1.14x at a
#: 0.37 share and loses (0.96x) at 0.52; A = 80 gains 1.51x at 0.37 and 1.15x at 0.52.
#: The unit alone (``benchmarks/packed_threshold.py``) breaks even at about 0.6 (A = 36)
#: and 0.7 (A = 80), and the dense path wins above that (0.7-0.9x at 0.9). Packing doubles
#: the first layer's inner size (``[k, q*k]`` against one folded per-row matrix) and adds
#: gathers and scatters, which weigh more next to a narrow MLP. Length-bucketed batches
#: (~96% valid) stay dense. (Also tried: rows sorted by length and run densely in groups
#: of 8-32 rows, each padded to its own longest; on real batch masks it was 10-30% slower
#: than packing.)
PACKED_BELOW: float = 0.45
PACKED_BELOW_WIDE: float = 0.65
#: The attention width from which :data:`PACKED_BELOW_WIDE` applies.
WIDE: int = 64
#: The same rule for a model whose embeddings are packed too (DIN: ``FeatureEmbedding.packed``
#: looks up only the valid events, so no (B, T, D) tensor, concatenation or scatter exists
#: at all). Measured (AMD EPYC Zen 4, 1 thread, B = 128, D = 36, Dice MLP, whole training
#: step in one process, the two paths alternating batch by batch: ``benchmarks/packed_model.py``,
#: on a loaded machine): A = 80 gains 1.14-1.25x
#: at a 0.37 share, 1.14x at 0.52, 1.08x at 0.74 and loses (0.95x) at 0.84, 0.92x at 0.96;
#: A = 36 gains 1.25x at 0.37 and 0.52, loses (0.96x) at 0.74 and 0.83x at 0.96.
PACKED_INPUTS_BELOW: float = 0.65
PACKED_INPUTS_BELOW_WIDE: float = 0.8

_sigmoid_backward_ = torch.ops.aten.sigmoid_backward.grad_input  # out= variant, in place


def valid_index(valid: Tensor) -> Tensor:
    """The flat row-major indices of the valid positions. valid (B, T) bool -> (N,) int64."""
    return valid.reshape(-1).nonzero().squeeze(1)  # (N,)


def use_packed(facts: Tensor, index: Tensor, attention_size: int) -> bool:
    """Whether scoring only the ``index`` positions of ``facts`` (B, T, D) pays: the valid
    share is below :data:`PACKED_BELOW` (:data:`PACKED_BELOW_WIDE` for a first layer of
    at least :data:`WIDE` units)."""
    b, t, _ = facts.shape
    return packs(index.numel(), b * t, attention_size)


def packs(valid: int, positions: int, attention_size: int, inputs: bool = False) -> bool:
    """Whether ``valid`` of ``positions`` padded positions are few enough for packing to pay
    with an attention MLP ``attention_size`` wide: the rule of :func:`use_packed`, or with
    ``inputs`` the one for packed embeddings (:data:`PACKED_INPUTS_BELOW`)."""
    if inputs:
        below = PACKED_INPUTS_BELOW_WIDE if attention_size >= WIDE else PACKED_INPUTS_BELOW
    else:
        below = PACKED_BELOW_WIDE if attention_size >= WIDE else PACKED_BELOW
    return valid < below * positions


def can_pack(facts: Tensor) -> bool:
    """Packing is data-dependent (the number of valid positions): eager CPU runs only.
    Tracers and compilers (symbolic shapes), meta tensors and other devices (not
    measured there) keep the dense path."""
    return facts.device.type == "cpu" and not tracing() and not _is_fake(facts)


def _is_fake(x: Tensor) -> bool:
    """A FakeTensor (torch.export / torch.compile's shape propagation)."""
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - the API moved
        return False
    return bool(is_fake(x))


def _mlp_forward(q_part: Tensor, q: Tensor, f: Tensor, rows: Tensor, w1: Tensor, w2: Tensor,
                 b2: Tensor, w3: Tensor, b3: Tensor, fused: str | None = None) -> tuple[Tensor, ...]:
    """The attention MLP on N gathered facts f (N, D) of rows ``rows`` (N,) -> scores (N, 1)
    and what the backward needs: (scores, qv (N, D), x (N, 2D), h1 (N, A), h2 (N, 40)).
    ``fused`` (the products, :func:`dinrec.nn._ops.offset_mlp_runs`): the layers run in the
    C++ operator :func:`dinrec.nn._ops.offset_mlp`, which builds x = [f, f * q[rows]] per
    tile itself, and qv, x are q (B, D), f (N, D); None: torch ops."""
    if fused:
        s, h1, h2 = _ops.offset_mlp(f, q_part, rows, w1, w2, b2, w3, b3, fused, q)  # (N,), (N, A), (N, 40)
        return s.unsqueeze(1), q, f, h1, h2
    qv = q.index_select(0, rows)  # (N, D)
    x = torch.cat([f, f * qv], dim=1)  # (N, 2D)
    h1 = torch.addmm(q_part.index_select(0, rows), x, w1.t()).sigmoid_()  # (N, A)
    h2 = torch.addmm(b2, h1, w2.t()).sigmoid_()  # (N, 40)
    s = torch.addmm(b3, h2, w3.t())  # (N, 1)
    return s, qv, x, h1, h2


def _mlp_backward(g: Tensor, b: int, need: tuple[bool, ...], saved: tuple[Tensor, ...],
                  fused: str | None = None) -> tuple:
    """Backward of :func:`_mlp_forward` for the score gradient g (N, 1): the gradients of
    q_part (B, A), q (B, D) (if ``need[1]``), the facts (N, D) (if ``need[2]``), w1, w2,
    b2, w3, b3. ``saved`` = (rows, qv, x, w1, w2, w3, h1, h2) (fused: qv, x = q, f); g is not kept."""
    rows, qv, x, w1, w2, w3, h1, h2 = saved
    d = qv.shape[1]
    need_x = need[1] or need[2]
    if fused:
        g_f, g_q, g_q_part, *g_w = _ops.offset_mlp_backward(
            g.view(-1), x, rows, w1, w2, w3, h1, h2, b, need_x, fused, qv
        )
        return g_q_part, g_q if need[1] else None, g_f if need[2] else None, *g_w
    g_q_part, g_x, g_w = _layer_grads(g, b, need_x, saved)
    g_q = g_f = None
    if need_x:
        g_key, g_prod = g_x[:, :d], g_x[:, d:]  # (N, D) each
        if need[1]:
            g_q = g_prod.new_zeros(b, d).index_add_(0, rows, g_prod * x[:, :d])  # (B, D)
        if need[2]:
            g_f = torch.addcmul(g_key, g_prod, qv)  # (N, D)
    return g_q_part, g_q, g_f, *g_w


def _layer_grads(g: Tensor, b: int, need_x: bool, saved: tuple[Tensor, ...]) -> tuple:
    """The torch ops of :func:`_mlp_backward`: g_q_part (B, A), g_x (N, 2D) = ``[g_k, g_(q*k)]``
    (None unless ``need_x``) and [g_w1, g_w2, g_b2, g_w3, g_b3]."""
    rows, _, x, w1, w2, w3, h1, h2 = saved
    g_w3 = g.t() @ h2  # (1, 40)
    g_b3 = g.sum(0)  # (1,)
    g_h2 = g * w3  # (N, 40)
    _sigmoid_backward_(g_h2, h2, grad_input=g_h2)
    g_w2 = g_h2.t() @ h1  # (40, A)
    g_b2 = g_h2.sum(0)  # (40,)
    g_h1 = g_h2 @ w2  # (N, A)
    _sigmoid_backward_(g_h1, h1, grad_input=g_h1)
    g_w1 = g_h1.t() @ x  # (A, 2D)
    g_q_part = g_h1.new_zeros(b, g_h1.shape[1]).index_add_(0, rows, g_h1)  # (B, A)
    g_x = g_h1 @ w1 if need_x else None  # (N, 2D)
    return g_q_part, g_x, [g_w1, g_w2, g_b2, g_w3, g_b3]


class _PackedScores(torch.autograd.Function):
    """The attention MLP on the valid positions, with a hand-written, in-place backward.

    forward(q_part (B, A), q (B, D), facts (B, T, D), index (N,), rows (N,), w1 (A, 2D),
    w2 (40, A), b2 (40,), w3 (1, 40), b3 (1,), pad) -> scores (B, 1, T), ``pad`` at every
    position not in ``index``. ``w1 = [W_k - W_d | W_p]``; ``rows = index // T``.
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, q_part, q, facts, index, rows, w1, w2, b2, w3, b3, pad):
        b, t, d = facts.shape
        f = facts.reshape(b * t, d).index_select(0, index)  # (N, D)
        ctx.fused = _ops.offset_mlp_runs(w1, w2, q_part, q, f, b2, w3, b3)
        s, qv, x, h1, h2 = _mlp_forward(q_part, q, f, rows, w1, w2, b2, w3, b3, ctx.fused)
        out = s.new_full((b * t,), pad).index_copy_(0, index, s.view(-1))  # (B*T,)
        ctx.save_for_backward(index, rows, qv, x, w1, w2, w3, h1, h2)
        ctx.shapes = (b, t, d)
        return out.view(b, 1, t)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        index, *saved = ctx.saved_tensors
        b, t, d = ctx.shapes
        g = g_out.reshape(b * t).index_select(0, index).unsqueeze(1)  # (N, 1)
        g_q_part, g_q, g_f, *g_w = _mlp_backward(g, b, ctx.needs_input_grad, tuple(saved), ctx.fused)
        g_facts = None
        if g_f is not None:
            g_facts = g_f.new_zeros(b * t, d).index_copy_(0, index, g_f).view(b, t, d)
        return g_q_part, g_q, g_facts, None, None, *g_w, None


class _FactScores(torch.autograd.Function):
    """:class:`_PackedScores` on facts already packed: forward(q_part (B, A), q (B, D),
    facts (N, D), rows (N,), w1, w2, b2, w3, b3) -> scores (N,), the facts' gradient
    (N, D) without any scatter. Not twice differentiable."""

    @staticmethod
    def forward(ctx, q_part, q, facts, rows, w1, w2, b2, w3, b3):
        ctx.fused = _ops.offset_mlp_runs(w1, w2, q_part, q, facts, b2, w3, b3)
        s, qv, x, h1, h2 = _mlp_forward(q_part, q, facts, rows, w1, w2, b2, w3, b3, ctx.fused)
        ctx.save_for_backward(rows, qv, x, w1, w2, w3, h1, h2)
        ctx.b = q_part.shape[0]
        return s.view(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_s):
        g = g_s.reshape(-1, 1).contiguous()  # (N, 1)
        g_q_part, g_q, g_f, *g_w = _mlp_backward(g, ctx.b, ctx.needs_input_grad, tuple(ctx.saved_tensors),
                                                 ctx.fused)
        return g_q_part, g_q, g_f, None, *g_w


def fact_scores(
    q_part: Tensor,
    q: Tensor,
    facts: Tensor,
    rows: Tensor,
    w1: Tensor,
    upper: tuple[Tensor, Tensor, Tensor, Tensor],
) -> Tensor:
    """The attention MLP's scores of packed facts.

    Args:
        q_part: ``(B, A)`` the query part of the first layer, ``(W_q + W_d) q + b_1``.
        q: ``(B, D)`` the (projected) query.
        facts: ``(N, D)`` the valid facts, in any order.
        rows: ``(N,)`` the batch row of each fact.
        w1, upper: as :func:`packed_scores`.

    Returns:
        ``(N,)`` scores.
    """
    return _FactScores.apply(q_part, q, facts, rows, w1, *upper)


def packed_scores(
    q_part: Tensor,
    q: Tensor,
    facts: Tensor,
    index: Tensor,
    w1: Tensor,
    upper: tuple[Tensor, Tensor, Tensor, Tensor],
    pad: float,
) -> Tensor:
    """Scores of the valid positions, ``pad`` elsewhere.

    Args:
        q_part: ``(B, A)`` the query part of the first layer, ``(W_q + W_d) q + b_1``.
        q: ``(B, D)`` the (projected) query.
        facts: ``(B, T, D)``.
        index: ``(N,)`` flat row-major indices of the valid positions (:func:`valid_index`).
        w1: ``(A, 2D)`` ``[W_k - W_d | W_p]``.
        upper: ``(w2 (40, A), b2 (40,), w3 (1, 40), b3 (1,))`` the second and score layers.
        pad: the score of every position not in ``index``.

    Returns:
        ``(B, 1, T)`` scores.
    """
    rows = torch.div(index, facts.shape[1], rounding_mode="floor")  # (N,) row of each position
    return _PackedScores.apply(q_part, q, facts, index, rows, w1, *upper, pad)



def scores_if_sparse(
    q_part: Tensor,
    q: Tensor,
    facts: Tensor,
    valid: Tensor,
    w_key: Tensor,
    w_prod: Tensor,
    upper: tuple[Tensor, Tensor, Tensor, Tensor],
    pad: float,
) -> Tensor | None:
    """The packed scores ``(B, 1, T)`` when the batch is padded enough for packing to pay
    (:func:`use_packed`), else ``None`` (the caller runs the dense path).

    ``valid`` is ``(B, T)`` bool; ``w_key = W_k - W_d`` and ``w_prod = W_p`` are ``(A, D)``;
    the other arguments are those of :func:`packed_scores`.
    """
    index = valid_index(valid)  # (N,)
    if not use_packed(facts, index, w_key.shape[0]):
        return None
    w1 = torch.cat([w_key, w_prod], dim=1)  # (A, 2D) = [W_k - W_d | W_p]
    return packed_scores(q_part, q, facts, index, w1, upper, pad)


def _benchmark(products: str = "float32") -> tuple[_ops.Call, _ops.Call]:
    """DIN's attention MLP forward + backward at a training size (B 128, N 4,300 valid
    events, D 36, A 80, float32; the synthetic set's default batches): the C++ operator
    with ``products`` against the torch ops. The same choice serves DIEN's auxiliary MLP
    (the same operator)."""
    gen = torch.Generator().manual_seed(0)
    b, n, d, a = 128, 4300, 36, 80

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    q_part, q, f = rand(b, a), rand(b, d), rand(n, d)
    rows = torch.randint(0, b, (n,), generator=gen).sort().values  # (N,)
    layers = (rand(a, 2 * d), rand(40, a), rand(40), rand(1, 40), rand(1))
    g = torch.randn(n, 1, generator=gen)

    def run(fused: str | None) -> _ops.Call:
        def call() -> object:
            s, qv, x, h1, h2 = _mlp_forward(q_part, q, f, rows, *layers, fused)
            w1, w2, _, w3, _ = layers
            return _mlp_backward(g, b, (True, True, True), (rows, qv, x, w1, w2, w3, h1, h2), fused)
        return call

    return run(products), run(None)


_ops.BENCHMARKS["offset_mlp"] = _benchmark
_ops.BENCHMARKS["offset_mlp_bf16"] = functools.partial(_benchmark, "bfloat16")
