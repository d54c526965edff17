"""DIEN recurrent layers: the masked GRU interest extractor and the attention GRUs.

Sequences are batch-major and left-aligned: ``inputs (B, T, E)`` with ``mask (B, T)``
true on a valid prefix of each row and padding at the end. Every layer here returns
``outputs (B, T, H)`` (zero at padded steps) and ``final (B, H)``, the state after the
row's last valid step (the initial state, zeros by default, for an empty row).
Padding never updates the state, so values at padded steps never change a result.

Weights use PyTorch's ``nn.GRU`` layout, gate order ``(r, z, n)``::

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)             reset gate
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)             keep gate
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))          candidate ("reset after")
    h' = z * h + (1 - z) * n

``z`` is the reference's (TensorFlow ``GRUCell``) ``u``: the fraction of the old state
kept. TensorFlow applies the reset gate *before* the matrix product,
``n = tanh(W_in x + W_hn (r * h) + b_n)``; ``reset_after=False`` gives that form (the
reference's exact cell) at the cost of a second matrix product per step.

The attention GRUs take per-step scores ``a (B, T)`` in [0, 1] (``DinFcnAttention``
in LIST mode with ``return_alphas`` and softmax). Writing every variant as
``h' = h + f * (n - h)``, with ``f`` the fraction of the candidate taken:

==================  ===========================  ===================================
variant             f                            a -> 0 / a -> 1
==================  ===========================  ===================================
GRU, ``AIGRU``      1 - z  (inputs ``a * x``)    input vanishes (state still moves)
``AGRU``            a                            state kept / state := candidate
AUGRU ``reference`` 1 - (1 - a) z                plain GRU / state := candidate
AUGRU ``paper``     a (1 - z)                    state kept / plain GRU
==================  ===========================  ===================================

*AUGRU, reference* (``VecAttGRUCell`` of the DIEN code): ``u' = (1 - a) * u`` with
``u`` its keep gate, ``h' = u' h + (1 - u') c``; so ``f = 1 - (1 - a) z``. Attention
only ever *adds* to the candidate fraction: an unattended step (``a = 0``) updates the
state like a plain GRU, a fully attended one overwrites it with the candidate.

*AUGRU, paper* (DIEN, eq. 5-6): ``u'_t = a_t * u_t``, ``h_t = (1 - u'_t) h_{t-1} +
u'_t h~_t`` with ``u_t`` the paper's update gate, the fraction of the candidate taken,
which in the layout above is ``1 - z``; so ``f = a (1 - z)``. An unattended step
leaves the state untouched, a fully attended one is a plain GRU step.

Where it matters: with softmax scores over a long history most ``a_t`` are about
``1 / length``, so the reference AUGRU behaves almost like a plain GRU (attention is
a small perturbation), while the paper AUGRU barely moves from its initial state
unless the attention is concentrated. The two are different models, not two
spellings of one: pick the convention the experiment needs (``"reference"`` by
default, to reproduce the published code).

Speed. The recurrence is sequential and each step is small, so per-op overhead
dominates on CPU. ``impl="fused"`` (default) computes the input projections of all
steps in one matrix product, folds the variant, the attention and the mask into two
per-step coefficients ``f = c0 + c1 * z`` (computed outside the loop, so autograd
carries their gradients to ``a``), runs only up to the longest valid length, and runs
a loop with a hand-written backward, on one intra-op thread (:func:`_one_thread`):

* where a C compiler is available, a small C build of both loops
  (:mod:`dinrec.nn._gru_kernel`: one BLAS call and one pass over the step's values per
  step, the backward's per-step coefficients computed inside its loop);
* otherwise (and with ``impl="fused_script"``) TorchScript loops of six ops per forward
  step and three per backward step, the backward's coefficients precomputed over all
  steps at once.

Both carry the state as ``u = (1 + h) / 2`` and the candidate as ``s = (1 + n) / 2 =
sigmoid(2 p)`` (``tanh(p) = 2 sigmoid(2 p) - 1``; a sigmoid is several times cheaper
than a tanh on CPU), so that ``h' = h + f (n - h)`` is ``u' = u + f (s - u)``, one
``lerp``; the gates still see ``W_hh h``, the outputs and gradients are those of ``h``.
``impl="autograd"`` is the literal per-step cell through autograd: the readable
definition and the yardstick in the tests.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinrec.errors import ShapeError
from dinrec.nn import _gru_kernel

__all__ = [
    "AGRU",
    "AIGRU",
    "AUGRU",
    "AttentionGRU",
    "AttentionGRUConfig",
    "GRUWeights",
    "InterestExtractor",
    "attention_gru",
    "lengths_from_mask",
    "masked_gru",
]

Kind = Literal["gru", "aigru", "agru", "augru"]
Gate = Literal["reference", "paper"]
_KINDS = ("gru", "aigru", "agru", "augru")
logger = logging.getLogger(__name__)
_GATES = ("reference", "paper")
#: The fused implementations and the loops they run (see :class:`_FusedGRUFunction`).
_FUSED = {"fused": "c", "fused_script": "script", "fused_eager": "eager"}


class GRUWeights(NamedTuple):
    """One GRU layer's parameters in ``nn.GRU`` layout, gate order ``(r, z, n)``."""

    weight_ih: Tensor  # (3H, E)
    weight_hh: Tensor  # (3H, H)
    bias_ih: Tensor  # (3H,)
    bias_hh: Tensor  # (3H,)


# --------------------------------------------------------------------------- validation
def _check_rank(name: str, t: Any, rank: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise ShapeError(f"{name}: expected a tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ShapeError(f"{name}: expected rank {rank} {layout}, got shape {tuple(t.shape)}")


def lengths_from_mask(mask: Tensor) -> Tensor:
    """Valid lengths ``(B,)`` (int64) of a left-aligned mask ``(B, T)``.

    Only the value 1 (or True) marks a valid step. Raises :class:`ShapeError` if a
    row's valid steps are not a prefix (padding must be at the end).
    """
    _check_rank("mask", mask, 2, "(B, T)")
    valid = mask if mask.dtype == torch.bool else mask == 1  # (B, T)
    lengths = valid.sum(1)  # (B,)
    prefix = torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]  # (B, T)
    if not bool(torch.equal(prefix, valid)):
        raise ShapeError(
            "mask: valid steps must be a prefix of each row (left-aligned, padding at the "
            "end); reverse right-aligned histories before the GRU"
        )
    return lengths


def _check_sequence(inputs: Tensor, mask: Tensor, h0: Tensor | None, hidden: int) -> Tensor:
    """Validate (B, T, E) inputs, (B, T) mask and (B, H) h0; return lengths (B,)."""
    _check_rank("inputs", inputs, 3, "(B, T, E)")
    _check_rank("mask", mask, 2, "(B, T)")
    if tuple(mask.shape) != tuple(inputs.shape[:2]):
        raise ShapeError(
            f"mask: expected shape (B, T) = {tuple(inputs.shape[:2])}, got {tuple(mask.shape)}"
        )
    if h0 is not None and tuple(h0.shape) != (inputs.shape[0], hidden):
        raise ShapeError(
            f"h0: expected shape (B, H) = {(inputs.shape[0], hidden)}, got {tuple(h0.shape)}"
        )
    return lengths_from_mask(mask)


# --------------------------------------------------------------------------- extractor
def masked_gru(
    gru: nn.GRU,
    inputs: Tensor,
    mask: Tensor,
    h0: Tensor | None = None,
    *,
    impl: str = "padded",
) -> tuple[Tensor, Tensor]:
    """Run a one-layer, unidirectional, ``batch_first`` ``nn.GRU`` over left-aligned sequences.

    Args:
        gru: the GRU (its weights; ``num_layers=1``, ``batch_first=True``).
        inputs: ``(B, T, E)``.
        mask: ``(B, T)``, valid prefix of each row (1/True), padding at the end.
        h0: ``(B, H)`` initial state, zeros if ``None``.
        impl: ``"padded"`` (default): the fused ``nn.GRU`` over the whole batch, cut at
            the longest length; a GRU is causal, so outputs at valid steps do not see
            the padding after them; the final state is gathered at ``length - 1``.
            ``"packed"``: ``pack_padded_sequence``. ``"fused"``, ``"fused_script"``,
            ``"fused_eager"``: this module's loop with a hand-written backward (see
            :func:`attention_gru`). All give the same values.

    Returns:
        ``outputs (B, T, H)``, zero at padded steps, and ``final (B, H)``.
    """
    if gru.num_layers != 1 or gru.bidirectional or not gru.batch_first:
        raise ShapeError("gru: masked_gru needs nn.GRU(num_layers=1, batch_first=True), unidirectional")
    hidden = gru.hidden_size
    lengths = _check_sequence(inputs, mask, h0, hidden)
    b, t, _ = inputs.shape
    if impl in _FUSED:
        weights = GRUWeights(gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
        return _fused_gru(
            inputs, None, lengths, weights, kind="gru", gate="reference", h0=h0, loops=_FUSED[impl]
        )
    if h0 is None:
        h0 = inputs.new_zeros(b, hidden)  # (B, H)
    t_max = int(lengths.max()) if b > 0 else 0
    if t_max == 0:
        return inputs.new_zeros(b, t, hidden), h0
    valid = lengths > 0  # (B,)
    if impl == "packed":
        nonempty = valid.nonzero().squeeze(1)  # rows with something to run
        packed = nn.utils.rnn.pack_padded_sequence(
            inputs[nonempty], lengths[nonempty].cpu(), batch_first=True, enforce_sorted=False
        )
        out_p, h_n = gru(packed, h0[nonempty].unsqueeze(0).contiguous())
        out_p, _ = nn.utils.rnn.pad_packed_sequence(out_p, batch_first=True, total_length=t)
        outputs = inputs.new_zeros(b, t, hidden).index_copy(0, nonempty, out_p)  # (B, T, H)
        final = h0.index_copy(0, nonempty, h_n[0])  # (B, H)
        return outputs, final
    if impl != "padded":
        raise ValueError(
            f"impl: expected 'padded', 'packed' or one of {', '.join(_FUSED)}, got {impl!r}"
        )
    m = (torch.arange(t_max, device=inputs.device) < lengths[:, None]).unsqueeze(-1)  # (B, t_max, 1)
    x = inputs[:, :t_max].masked_fill(~m, 0.0)  # padding may hold anything, even NaN
    out, _ = gru(x, h0.unsqueeze(0).contiguous())  # (B, t_max, H)
    last = (lengths - 1).clamp(min=0).view(b, 1, 1).expand(b, 1, hidden)  # (B, 1, H)
    final = out.gather(1, last).squeeze(1)  # (B, H)
    final = torch.where(valid[:, None], final, h0)  # empty rows keep h0
    outputs = F.pad(out * m, (0, 0, 0, t - t_max))  # (B, T, H)
    return outputs, final


def _reference_init(weights: GRUWeights) -> None:
    """TensorFlow GRUCell's initial values: Glorot-uniform kernels over the joint [x, h]
    input, gate biases 1 (so the gates start half-open, ``sigmoid(1)``), candidate bias 0."""
    h = weights.weight_hh.shape[1]
    e = weights.weight_ih.shape[1]
    with torch.no_grad():
        gate_bound = math.sqrt(6.0 / (e + h + 2 * h))  # kernel [E + H, 2H]
        cand_bound = math.sqrt(6.0 / (e + h + h))  # kernel [E + H, H]
        for w in (weights.weight_ih, weights.weight_hh):
            w[: 2 * h].uniform_(-gate_bound, gate_bound)
            w[2 * h :].uniform_(-cand_bound, cand_bound)
        weights.bias_ih.zero_()
        weights.bias_ih[: 2 * h].fill_(1.0)
        weights.bias_hh.zero_()


class InterestExtractor(nn.Module):
    """DIEN's interest extractor: a GRU over the behaviour sequence that padding never updates.

    Args:
        input_size: E, the behaviour embedding width.
        hidden_size: H.
        impl: see :func:`masked_gru`; ``"fused"`` by default, the fastest forward +
            backward on CPU (``benchmarks/rnn.py``).
        init: ``"reference"`` (TensorFlow GRUCell: Glorot kernels, gate bias 1) or
            ``"pytorch"`` (``nn.GRU``'s uniform(+-1/sqrt(H))).

    ``forward(inputs (B, T, E), mask (B, T), h0=None) -> (outputs (B, T, H), final (B, H))``.
    The extractor uses PyTorch's reset-after candidate (cuDNN / Keras ``reset_after``),
    the reference's TensorFlow GRUCell resets before the product: same family, not
    bit-identical weights.
    """

    def __init__(
        self, input_size: int, hidden_size: int, *, impl: str = "fused", init: str = "reference"
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.impl = impl
        self.gru = nn.GRU(input_size, hidden_size, batch_first=True)
        if init == "reference":
            _reference_init(self.weights())
        elif init != "pytorch":
            raise ValueError(f"init: expected 'reference' or 'pytorch', got {init!r}")

    def weights(self) -> GRUWeights:
        g = self.gru
        return GRUWeights(g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0)

    def forward(
        self, inputs: Tensor, mask: Tensor, h0: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return masked_gru(self.gru, inputs, mask, h0, impl=self.impl)

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}, impl={self.impl!r}"


# --------------------------------------------------------------------------- fused kernel
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the recurrent loops on one intra-op thread.

    Each step is a handful of (B, 3H) ops, far below what pays for waking an OpenMP
    team; with more threads every step's matrix product synchronises them, and on a
    loaded machine the spinning workers steal the main thread's core (the loop ran 2.5x
    slower at 2 threads than at 1). Only the loops run inside: the large matrix products
    and the (T, B, H) passes around them keep every thread. ``torch.set_num_threads``
    (which also sets MKL's threads for this thread) costs well under a microsecond.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _forward_loop(g: Tensor, c0: Tensor, c1: Tensor, w2: Tensor, u0: Tensor) -> Tensor:
    """The forward loop, in place, in the coordinates ``u = (1 + h) / 2``.

    g (T, B, 4H) holds ``[2 x_n, x_r + b_r', x_z + b_z', b_n']`` on entry (see
    :func:`_gate_inputs`) and ``[s, r, z, W_hn h + b_hn]`` on return, with ``s = (1 + n) / 2``;
    c0/c1 (T, B, 1); w2 (3H, H) = ``2 W_hh``; u0 (B, H). Returns us (T + 1, B, H): u0, then
    ``u`` after each step. Time-major, so that each step's slices are close together.

    ``tanh(p) = 2 sigmoid(2 p) - 1`` (sigmoid is several times cheaper than tanh on CPU),
    and in ``u``, ``h' = h + f (n - h)`` becomes ``u' = u + f (s - u)``: the same
    ``lerp``, with the candidate ``s`` straight out of a sigmoid. ``W_hh h = 2 W_hh u -
    W_hh 1``, so the gates see exactly the state ``h``. Six ops a step.
    """
    steps = g.shape[0]
    b = g.shape[1]
    hid = g.shape[2] // 4
    us = g.new_empty(steps + 1, b, hid)
    us[0] = u0
    w_t = w2.t()
    # Per-step views made once (one unbind each), not a few slicing ops every step.
    gh_l = g[:, :, hid:].unbind(0)  # (B, 3H): [r, z, n] hidden parts
    rz_l = g[:, :, hid : 3 * hid].unbind(0)
    s_l = g[:, :, :hid].unbind(0)
    r_l = g[:, :, hid : 2 * hid].unbind(0)
    z_l = g[:, :, 2 * hid : 3 * hid].unbind(0)
    gn_l = g[:, :, 3 * hid :].unbind(0)
    us_l = us.unbind(0)
    c0_l = c0.unbind(0)
    c1_l = c1.unbind(0)
    f = g.new_empty(b, hid)
    u = us_l[0]
    for t in range(steps):
        gh_l[t].addmm_(u, w_t)  # (B, 3H): [pre_r - x part, pre_z - x part, W_hn h + b_hn]
        rz_l[t].sigmoid_()  # (B, 2H): r, z
        s = s_l[t].addcmul_(r_l[t], gn_l[t], value=2.0).sigmoid_()  # (B, H): (1 + n) / 2
        torch.addcmul(c0_l[t], c1_l[t], z_l[t], out=f)  # (B, H) candidate fraction
        u = torch.lerp(u, s, f, out=us_l[t + 1])  # (B, H)
    return us


def _backward_loop(coef: Tensor, keep: Tensor, g_out: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The backward loop. coef (T, B, 4H) as in :func:`_fused_backward`, keep (T, B, H) =
    1 - f, g_out (T, B, H) = dL/dh_t from outside the recurrence, w_hh (3H, H).

    Returns d (T, B, 4H) (coef times the total state gradient; the loop fills the
    d gh = ``d[:, :, H:]`` part the recurrence needs, the caller the rest), d_h_all
    (T, B, H) (the total dL/dh_t) and dL/dh0. Three ops a step: ``d_gh_t = coef_t dh_t``,
    ``dh_{t-1} = (g_out_{t-1} + dh_t * keep_t) + d_gh_t W_hh``.
    """
    steps = coef.shape[0]
    b = coef.shape[1]
    hid = w_hh.shape[1]
    d = coef.new_empty(steps, b, 4 * hid)
    d_h_all = coef.new_empty(steps, b, hid)
    dgh3_l = d.view(steps, b, 4, hid)[:, :, 1:].unbind(0)  # (B, 3, H) views
    dgh_l = d[:, :, hid:].unbind(0)  # the same, as (B, 3H)
    coef_l = coef.view(steps, b, 4, hid)[:, :, 1:].unbind(0)
    keep_l = keep.unbind(0)
    g_l = g_out.unbind(0)
    dh_l = d_h_all.unbind(0)
    dh = dh_l[steps - 1].copy_(g_l[steps - 1])
    for t in range(steps - 1, 0, -1):
        torch.mul(coef_l[t], dh.unsqueeze(1), out=dgh3_l[t])  # (B, 3, H)
        dh = torch.addcmul(g_l[t - 1], dh, keep_l[t], out=dh_l[t - 1]).addmm_(dgh_l[t], w_hh)
    torch.mul(coef_l[0], dh.unsqueeze(1), out=dgh3_l[0])
    d_h0 = torch.addmm(dh * keep_l[0], dgh_l[0], w_hh)  # (B, H)
    return d, d_h_all, d_h0


def _gate_inputs(xi: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """The forward loop's buffer g (T, B, 4H) from the input projections xi (T, B, 3H)
    in kernel order (n, r, z), biases ``b_ih`` included: ``[2 x_n, x_r + b_hr - W_hr 1,
    x_z + b_hz - W_hz 1, b_hn - W_hn 1]``. The ``- W_hh 1`` terms turn the loop's
    ``2 W_hh u`` back into ``W_hh h`` (``h = 2 u - 1``)."""
    steps, b, three_h = xi.shape
    hid = three_h // 3
    shift = b_hh - w_hh.sum(1)  # (3H,), order (r, z, n)
    g = xi.new_empty(steps, b, 4 * hid)
    torch.mul(xi[:, :, :hid], 2.0, out=g[:, :, :hid])
    torch.add(xi[:, :, hid:], shift[: 2 * hid], out=g[:, :, hid : 3 * hid])
    g[:, :, 3 * hid :] = shift[2 * hid :]
    return g


def _fused_backward(
    g_out: Tensor,
    us: Tensor,
    g: Tensor,
    c0: Tensor,
    c1: Tensor,
    w_hh: Tensor,
    loop: Any = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BPTT of the forward loop for g_out = dL/dh_t (T, B, H), t = 1..T.

    Everything that does not depend on the carried gradient is computed over all steps
    at once, into one buffer ``coef (T, B, 4H)`` laid out as the per-step gradients
    ``d = [d x_n, d x_r (= d gh_r), d x_z (= d gh_z), d gh_n]`` (``x_*`` the input
    projections, ``gh_*`` the hidden ones, biases included); the loop is then three small
    ops per step (``d x_n`` is filled after it, over all steps at once).

    Returns d (T, B, 4H) (``d[:, :, :3H]`` is the gradient of xi, order (n, r, z),
    ``d[:, :, H:]`` that of ``W_hh h + b_hh``, order (r, z, n)), h_prev (T, B, H) the state
    before each step, d_c0 / d_c1 (T, B, 1) and dL/dh0 (B, H).
    """
    steps, b, hid = g_out.shape
    s, r, z, gn = g.split(hid, 2)  # (T, B, H) each; n = 2 s - 1
    u_prev = us[:-1]  # (T, B, H), u = (1 + h) / 2
    f = torch.addcmul(c0, c1, z)  # (T, B, H)
    coef = g.new_empty(steps, b, 4 * hid)
    q = torch.addcmul(s, s, s, value=-1.0)  # s (1 - s) = (1 - n^2) / 4
    a_n = torch.mul(f, q, out=coef[:, :, :hid]).mul_(4.0)  # f (1 - n^2)
    torch.mul(a_n * gn, torch.addcmul(r, r, r, value=-1.0), out=coef[:, :, hid : 2 * hid])
    diff = torch.sub(s, u_prev).mul_(2.0)  # n - h_prev
    torch.mul(torch.addcmul(z, z, z, value=-1.0) * diff, c1, out=coef[:, :, 2 * hid : 3 * hid])
    torch.mul(a_n, r, out=coef[:, :, 3 * hid :])
    keep = torch.rsub(f, 1.0)  # (T, B, H)
    with _one_thread():
        d, d_h_all, d_h0 = (loop or _backward_loop)(coef, keep, g_out, w_hh)
    torch.mul(coef[:, :, :hid], d_h_all, out=d[:, :, :hid])  # d x_n, all steps at once
    d_f = d_h_all * diff  # (T, B, H)
    d_c0 = d_f.sum(2, keepdim=True)  # (T, B, 1)
    d_c1 = (d_f * z).sum(2, keepdim=True)  # (T, B, 1)
    h_prev = torch.mul(u_prev, 2.0).sub_(1.0)  # (T, B, H)
    return d, h_prev, d_c0, d_c1, d_h0


@functools.cache
def _scripted() -> tuple[Any, Any]:
    """The two loops compiled by TorchScript (deprecated in recent PyTorch, but still the
    cheapest per-op dispatch on CPU here); the plain functions where scripting fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_forward_loop), torch.jit.script(_backward_loop)
    except Exception as exc:  # pragma: no cover - depends on the PyTorch build
        logger.warning("TorchScript unavailable (%s); the fused GRU loop runs eagerly", exc)
        return _forward_loop, _backward_loop


@functools.cache
def _c_kernel() -> _gru_kernel.GRUKernel | None:
    """The C build of the loops (:mod:`dinrec.nn._gru_kernel`) once it has reproduced the
    eager loops on a small problem in float32 and float64; ``None`` where it is unavailable."""
    k = _gru_kernel.kernel()
    if k is None:
        return None
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        ok = _c_kernel_agrees(k)
    if not ok:
        logger.warning("the C GRU kernel disagrees with the eager loops; it stays off")
    return k if ok else None


def _c_kernel_agrees(k: _gru_kernel.GRUKernel) -> bool:
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        steps, b, hid = 3, 5, 4
        xi, w, bias, c0, c1, u0, g_out = (
            torch.randn(*shape, generator=gen, dtype=dtype)
            for shape in ((steps, b, 3 * hid), (3 * hid, hid), (3 * hid,), (steps, b, 1),
                          (steps, b, 1), (b, hid), (steps, b, hid))
        )  # fmt: skip
        g_ref = _gate_inputs(xi, w, bias)
        us_ref = _forward_loop(g_ref, c0, c1, w * 2.0, u0)
        ref = (g_ref, us_ref, *_fused_backward(g_out, us_ref, g_ref, c0, c1, w, _backward_loop))
        g, us = k.forward(xi, bias - w.sum(1), c0, c1, w * 2.0, u0)
        got = (g, us, *k.backward(g_out, us, g, c0, c1, w))
        if not all(torch.allclose(x, y, rtol=tol, atol=tol) for x, y in zip(got, ref, strict=True)):
            return False
    return True


class _FusedGRUFunction(torch.autograd.Function):
    """(outputs, final) = the GRU loop over xi; hand-written backward.

    forward(xi (T, B, 3H) input projections in kernel order (n, r, z), c0 / c1 (T, B, 1),
    m (T, B, 1) the float mask, t_out >= T, w_hh (3H, H), b_hh (3H,), h0 (B, H), loops) ->
    outputs (B, t_out, H) (zero at padded steps), final (B, H) (the state after the row's
    last valid step; h0 exactly for an empty row). ``loops``: ``"c"`` (the C build where it is
    available, else TorchScript), ``"script"`` or ``"eager"``. Only the loops run on one
    thread.
    """

    @staticmethod
    def forward(ctx, xi, c0, c1, m, t_out, w_hh, b_hh, h0, loops):  # type: ignore[override]
        steps, b, _ = xi.shape
        ctx.xi_dtype = xi.dtype
        xi = xi.to(w_hh.dtype)  # under autocast the projection may be bfloat16; the loop is not
        u0 = torch.add(h0, 1.0).mul_(0.5)  # (B, H), u = (1 + h) / 2
        ck = None
        if loops == "c" and _gru_kernel.supports(xi, c0, c1, w_hh, b_hh, h0):
            ck = _c_kernel()
        if ck is not None:
            shift = b_hh - w_hh.sum(1)  # (3H,)
            with _one_thread():
                g, us = ck.forward(xi.contiguous(), shift, c0, c1, w_hh * 2.0, u0)
        else:
            loop = _forward_loop if loops == "eager" else _scripted()[0]
            g = _gate_inputs(xi, w_hh, b_hh)  # (T, B, 4H)
            with _one_thread():
                us = loop(g, c0, c1, w_hh * 2.0, u0)  # (T + 1, B, H)
        hid = h0.shape[1]
        outputs = xi.new_empty(b, t_out, hid) if t_out == steps else xi.new_zeros(b, t_out, hid)
        m_b = m.transpose(0, 1)  # (B, T, 1)
        torch.addcmul(-m_b, us[1:].transpose(0, 1), m_b * 2.0, out=outputs[:, :steps])  # (2 u - 1) m
        final = torch.where(m[0] > 0, us[-1] * 2.0 - 1.0, h0)  # (B, H)
        ctx.kernel = ck
        ctx.loops = loops
        ctx.save_for_backward(us, g, c0, c1, m, w_hh)
        return outputs, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_outputs, g_final):  # type: ignore[override]
        us, g, c0, c1, m, w_hh = ctx.saved_tensors
        steps, b, _ = g.shape
        hid = w_hh.shape[1]
        g_out = g.new_empty(steps, b, hid)  # (T, B, H)
        torch.mul(g_outputs[:, :steps].transpose(0, 1), m, out=g_out)  # outputs are masked
        g_out[-1] += g_final  # final is the state after the last step (held since)
        if ctx.kernel is not None:
            with _one_thread():
                d, h_prev, d_c0, d_c1, d_h0 = ctx.kernel.backward(
                    g_out, us, g, c0, c1, w_hh.contiguous()
                )
        else:
            loop = _backward_loop if ctx.loops == "eager" else _scripted()[1]
            d, h_prev, d_c0, d_c1, d_h0 = _fused_backward(g_out, us, g, c0, c1, w_hh, loop)
        d_gh = d.view(steps * b, 4 * hid)[:, hid:]  # (T B, 3H), order (r, z, n)
        d_w = d_gh.t().mm(h_prev.view(steps * b, hid))  # (3H, H)
        d_b = d_gh.sum(0)  # (3H,)
        d_xi = d[:, :, : 3 * hid].to(ctx.xi_dtype)  # (T, B, 3H), order (n, r, z)
        return d_xi, d_c0, d_c1, None, None, d_w, d_b, d_h0, None


def _coefficients(kind: str, gate: str, a: Tensor | None, m: Tensor) -> tuple[Tensor, Tensor]:
    """f = c0 + c1 * z for each variant; a, m (B, T, 1) -> c0, c1 (B, T, 1)."""
    if kind in ("gru", "aigru"):
        return m, -m
    assert a is not None
    if kind == "agru":
        return m * a, torch.zeros_like(m * a)
    if gate == "reference":  # f = 1 - (1 - a) z
        return m, -m * (1.0 - a)
    ma = m * a  # paper: f = a (1 - z)
    return ma, -ma


def _fused_gru(
    inputs: Tensor,
    scores: Tensor | None,
    lengths: Tensor,
    weights: GRUWeights,
    *,
    kind: str,
    gate: str,
    h0: Tensor | None,
    loops: str = "c",
) -> tuple[Tensor, Tensor]:
    b, t, _ = inputs.shape
    hid = weights.weight_hh.shape[1]
    if h0 is None:
        h0 = inputs.new_zeros(b, hid)
    t_max = int(lengths.max()) if b > 0 else 0
    if t_max == 0:
        return inputs.new_zeros(b, t, hid), h0
    # Time-major from here on: each step's slices are contiguous for the loops.
    pad = (torch.arange(t_max, device=inputs.device)[:, None] >= lengths).unsqueeze(-1)  # (t_max, B, 1)
    x = inputs[:, :t_max].transpose(0, 1).clone(memory_format=torch.contiguous_format)
    x = x.masked_fill_(pad, 0.0)  # (t_max, B, E); padding may hold anything, even NaN
    a = None
    if scores is not None:
        a = scores[:, :t_max].t().unsqueeze(-1).masked_fill(pad, 0.0).to(inputs.dtype)  # (t_max, B, 1)
    m = (~pad).to(inputs.dtype)  # (t_max, B, 1)
    if kind == "aigru":
        assert a is not None
        x = x * a  # i'_t = a_t * i_t
    w, bias = weights.weight_ih, weights.bias_ih
    w_ih = torch.cat([w[2 * hid :], w[: 2 * hid]])  # gate order (n, r, z) for the kernel
    b_ih = torch.cat([bias[2 * hid :], bias[: 2 * hid]])  # (cat: its backward is two slices)
    xi = F.linear(x, w_ih, b_ih)  # (t_max, B, 3H), all steps in one matrix product
    c0, c1 = _coefficients(kind, gate, a, m)  # (t_max, B, 1) each
    return _FusedGRUFunction.apply(
        xi, c0.contiguous(), c1.contiguous(), m, t, weights.weight_hh, weights.bias_hh,
        h0.contiguous(), loops,
    )  # (B, T, H), (B, H)


# --------------------------------------------------------------------------- autograd path
def _cell(
    xi_t: Tensor,
    h: Tensor,
    a_t: Tensor | None,
    w: GRUWeights,
    kind: str,
    gate: str,
    reset_after: bool,
) -> Tensor:
    """One step, literally. xi_t (B, 3H) = W_ih x_t + b_ih, h (B, H), a_t (B, 1) -> h' (B, H)."""
    hid = h.shape[1]
    x_r, x_z, x_n = xi_t.split(hid, 1)
    if reset_after:
        h_r, h_z, h_n = F.linear(h, w.weight_hh, w.bias_hh).split(hid, 1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)  # keep gate (TF GRUCell's u)
        cand = torch.tanh(x_n + r * h_n)
    else:  # TensorFlow GRUCell: reset before the product
        h_r, h_z = F.linear(h, w.weight_hh[: 2 * hid], w.bias_hh[: 2 * hid]).split(hid, 1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        cand = torch.tanh(x_n + F.linear(r * h, w.weight_hh[2 * hid :], w.bias_hh[2 * hid :]))
    if kind in ("gru", "aigru"):
        return z * h + (1.0 - z) * cand
    assert a_t is not None
    if kind == "agru":  # QAAttGRUCell: attention replaces the update gate
        return (1.0 - a_t) * h + a_t * cand
    if gate == "reference":  # VecAttGRUCell: u' = (1 - a) u, h' = u' h + (1 - u') c
        u = (1.0 - a_t) * z
        return u * h + (1.0 - u) * cand
    u = a_t * (1.0 - z)  # paper eq. 5-6: u'_t = a_t u_t, u_t = 1 - z
    return (1.0 - u) * h + u * cand


def _autograd_gru(
    inputs: Tensor,
    scores: Tensor | None,
    lengths: Tensor,
    weights: GRUWeights,
    *,
    kind: str,
    gate: str,
    reset_after: bool,
    h0: Tensor | None,
) -> tuple[Tensor, Tensor]:
    b, t, _ = inputs.shape
    hid = weights.weight_hh.shape[1]
    h = inputs.new_zeros(b, hid) if h0 is None else h0  # (B, H)
    pad = ~(torch.arange(t, device=inputs.device) < lengths[:, None])  # (B, T)
    x = inputs.masked_fill(pad.unsqueeze(-1), 0.0)  # padding may hold anything, even NaN
    if scores is not None:
        scores = scores.masked_fill(pad, 0.0)  # (B, T)
        if kind == "aigru":
            x = x * scores.unsqueeze(-1)  # i'_t = a_t * i_t
    xi = F.linear(x, weights.weight_ih, weights.bias_ih)  # (B, T, 3H)
    t_max = int(lengths.max()) if b > 0 else 0
    outs = []
    for step in range(t_max):
        a_t = None if scores is None else scores[:, step : step + 1]  # (B, 1)
        h_new = _cell(xi[:, step], h, a_t, weights, kind, gate, reset_after)
        valid = (lengths > step).unsqueeze(1)  # (B, 1)
        h = torch.where(valid, h_new, h)  # padding never updates the state
        outs.append(torch.where(valid, h, torch.zeros_like(h)))
    outs += [inputs.new_zeros(b, hid)] * (t - t_max)
    outputs = torch.stack(outs, 1) if outs else inputs.new_zeros(b, t, hid)  # (B, T, H)
    return outputs, h


# --------------------------------------------------------------------------- public API
def attention_gru(
    inputs: Tensor,
    scores: Tensor | None,
    mask: Tensor,
    weights: GRUWeights,
    *,
    kind: str = "augru",
    gate: str = "reference",
    reset_after: bool = True,
    h0: Tensor | None = None,
    impl: str = "fused",
) -> tuple[Tensor, Tensor]:
    """An attention GRU (DIEN's interest evolving layer) over left-aligned sequences.

    Args:
        inputs: ``(B, T, E)``, e.g. the interest extractor's outputs.
        scores: ``(B, T)`` attention scores in [0, 1] (``None`` only for ``kind="gru"``).
            Scores at padded steps are ignored.
        mask: ``(B, T)`` valid prefix of each row, padding at the end.
        weights: :class:`GRUWeights` (``nn.GRU`` layout, ``(r, z, n)``).
        kind: ``"augru"``, ``"agru"``, ``"aigru"`` or ``"gru"`` (see the module docstring).
        gate: AUGRU convention, ``"reference"`` (``VecAttGRUCell``) or ``"paper"``.
        reset_after: ``True``: PyTorch / cuDNN candidate ``tanh(x_n + r (W_hn h + b_hn))``;
            ``False``: TensorFlow GRUCell's ``tanh(x_n + W_hn (r h) + b_hn)`` (the
            reference's cell exactly; runs on the autograd path).
        h0: ``(B, H)`` initial state, zeros if ``None``.
        impl: ``"fused"`` (the fused loops with a hand-written backward, compiled C where
            a C compiler is available, else TorchScript), ``"fused_script"`` (always
            TorchScript), ``"fused_eager"`` (the same loops in plain Python, for
            comparison) or ``"autograd"`` (the literal cell).

    Returns:
        ``outputs (B, T, H)`` (zero at padded steps) and ``final (B, H)``.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind: expected one of {', '.join(_KINDS)}, got {kind!r}")
    if gate not in _GATES:
        raise ValueError(f"gate: expected 'reference' or 'paper', got {gate!r}")
    hid = weights.weight_hh.shape[1]
    lengths = _check_sequence(inputs, mask, h0, hid)
    if weights.weight_ih.shape != (3 * hid, inputs.shape[2]):
        raise ShapeError(
            f"inputs: the GRU expects {weights.weight_ih.shape[1]} features, got {inputs.shape[2]}"
        )
    if kind != "gru":
        if scores is None:
            raise ShapeError(f"scores: kind={kind!r} needs attention scores (B, T)")
        _check_rank("scores", scores, 2, "(B, T)")
        if scores.shape != mask.shape:
            raise ShapeError(
                f"scores: expected shape (B, T) = {tuple(mask.shape)}, got {tuple(scores.shape)}"
            )
    if impl in _FUSED and reset_after:
        return _fused_gru(
            inputs, scores, lengths, weights, kind=kind, gate=gate, h0=h0, loops=_FUSED[impl]
        )
    if impl not in (*_FUSED, "autograd"):
        raise ValueError(f"impl: expected one of {', '.join(_FUSED)} or 'autograd', got {impl!r}")
    return _autograd_gru(
        inputs, scores, lengths, weights, kind=kind, gate=gate, reset_after=reset_after, h0=h0
    )


@dataclass(frozen=True)
class AttentionGRUConfig:
    """Everything that defines an :class:`AttentionGRU` (``AttentionGRU(cfg)`` rebuilds it)."""

    input_size: int
    hidden_size: int
    kind: Kind = "augru"
    gate: Gate = "reference"
    reset_after: bool = True
    init: Literal["reference", "pytorch"] = "reference"
    impl: Literal["fused", "fused_script", "fused_eager", "autograd"] = "fused"


class AttentionGRU(nn.Module):
    """DIEN's interest evolving layer, one of AUGRU / AGRU / AIGRU (see the module docstring).

    ``forward(inputs (B, T, E), scores (B, T), mask (B, T), h0=None)
    -> (outputs (B, T, H), final (B, H))``. Gradients flow to the inputs, the scores,
    ``h0`` and all weights.
    """

    def __init__(self, config: AttentionGRUConfig) -> None:
        super().__init__()
        if config.kind not in _KINDS:
            raise ValueError(f"kind: expected one of {', '.join(_KINDS)}, got {config.kind!r}")
        if config.gate not in _GATES:
            raise ValueError(f"gate: expected 'reference' or 'paper', got {config.gate!r}")
        self.config = config
        e, h = config.input_size, config.hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * h, e))
        self.weight_hh = nn.Parameter(torch.empty(3 * h, h))
        self.bias_ih = nn.Parameter(torch.empty(3 * h))
        self.bias_hh = nn.Parameter(torch.empty(3 * h))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.config.init == "reference":
            _reference_init(self.weights())
            return
        bound = 1.0 / math.sqrt(self.config.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def weights(self) -> GRUWeights:
        return GRUWeights(self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)

    def forward(
        self, inputs: Tensor, scores: Tensor | None, mask: Tensor, h0: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        c = self.config
        return attention_gru(
            inputs,
            scores,
            mask,
            self.weights(),
            kind=c.kind,
            gate=c.gate,
            reset_after=c.reset_after,
            h0=h0,
            impl=c.impl,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"input_size={c.input_size}, hidden_size={c.hidden_size}, kind={c.kind!r}, "
            f"gate={c.gate!r}, reset_after={c.reset_after}, impl={c.impl!r}"
        )


class AUGRU(AttentionGRU):
    """GRU with attentional update gate (DIEN). ``gate="reference"`` or ``"paper"``."""

    def __init__(self, input_size: int, hidden_size: int, gate: Gate = "reference", **kw: Any) -> None:
        super().__init__(AttentionGRUConfig(input_size, hidden_size, kind="augru", gate=gate, **kw))


class AGRU(AttentionGRU):
    """Attention-based GRU: the score replaces the update gate, ``h' = (1 - a) h + a n``."""

    def __init__(self, input_size: int, hidden_size: int, **kw: Any) -> None:
        super().__init__(AttentionGRUConfig(input_size, hidden_size, kind="agru", **kw))


class AIGRU(AttentionGRU):
    """GRU with attentional input: a plain GRU on ``a_t * x_t``."""

    def __init__(self, input_size: int, hidden_size: int, **kw: Any) -> None:
        super().__init__(AttentionGRUConfig(input_size, hidden_size, kind="aigru", **kw))
