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

Implementations (chosen by :func:`dinrec.nn.backend`, see :mod:`dinrec.nn._backend`):

* ``"reference"``: the literal per-step cell through autograd (any device), and for the
  interest extractor ``nn.GRU`` over the padded batch (cuDNN on CUDA);
* ``"fast"`` (default): the input projections of all steps in one matrix product, the
  variant, the attention and the mask folded into a per-step candidate fraction
  ``f = c0 + c1 * z`` (computed outside the loop, so autograd carries their gradients to
  ``a``), and the recurrence as one operator, ``dinrec::gru_scan`` (C++, CPU, float32 /
  float64, with a hand-written backward; :mod:`dinrec.nn._ops`). It runs only up to the
  longest valid length. Elsewhere (CUDA, other dtypes, no C++ build, or a CPU where it was
  measured no faster than the reference at first use) the reference runs.
  On a padded batch (less than :data:`PACKED_BELOW` of the positions valid) in an eager
  CPU run, the valid steps alone are scanned, in ``PackedSequence`` layout (rows sorted by
  length, the rows still running at step t a prefix): the input product covers N valid
  rows instead of B * T and the recurrence ``dinrec::gru_scan_packed`` only the running
  rows of each step. Outputs, final states and gradients are the dense scan's (up to
  float rounding); tracers and compilers keep the dense scan (the layout is data-dependent).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinrec.errors import ShapeError
from dinrec.nn import _ops
from dinrec.nn._backend import resolve, tracing

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
#: Older names of the two implementations, still accepted.
_ALIASES = {"fused": "fast", "fused_script": "fast", "fused_eager": "fast", "autograd": "reference",
            "padded": "reference"}


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
    if tracing() or mask.device.type == "meta":  # data-dependent: checked in eager runs only
        return lengths
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
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Run a one-layer, unidirectional, ``batch_first`` ``nn.GRU`` over left-aligned sequences.

    Args:
        gru: the GRU (its weights; ``num_layers=1``, ``batch_first=True``).
        inputs: ``(B, T, E)``.
        mask: ``(B, T)``, valid prefix of each row (1/True), padding at the end.
        h0: ``(B, H)`` initial state, zeros if ``None``.
        impl: ``None`` / ``"fast"``: follow :func:`dinrec.nn.backend`; ``"reference"``:
            ``nn.GRU`` itself over the batch cut at the longest length (cuDNN on CUDA; a
            GRU is causal, so outputs at valid steps do not see the padding after them;
            the final state is gathered at ``length - 1``). The fast path is
            ``dinrec::gru_scan`` on CPU. Both give the same values.

    Returns:
        ``outputs (B, T, H)``, zero at padded steps, and ``final (B, H)``.
    """
    if gru.num_layers != 1 or gru.bidirectional or not gru.batch_first:
        raise ShapeError("gru: masked_gru needs nn.GRU(num_layers=1, batch_first=True), unidirectional")
    hidden = gru.hidden_size
    lengths = _check_sequence(inputs, mask, h0, hidden)
    weights = GRUWeights(gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
    if _impl(impl) == "fast" and _scan_supported(inputs, *weights, h0):
        return _scan_gru(inputs, None, lengths, weights, kind="gru", gate="reference", h0=h0)
    b, t, _ = inputs.shape
    if h0 is None:
        h0 = inputs.new_zeros(b, hidden)  # (B, H)
    t_max = _steps(lengths, t) if b > 0 else 0
    if t_max == 0:
        return inputs.new_zeros(b, t, hidden), h0
    m = (torch.arange(t_max, device=inputs.device) < lengths[:, None]).unsqueeze(-1)  # (B, t_max, 1)
    x = inputs[:, :t_max].masked_fill(~m, 0.0)  # padding may hold anything, even NaN
    out, _ = gru(x, h0.unsqueeze(0).contiguous())  # (B, t_max, H)
    last = (lengths - 1).clamp(min=0).view(b, 1, 1).expand(b, 1, hidden)  # (B, 1, H)
    final = out.gather(1, last).squeeze(1)  # (B, H)
    final = torch.where((lengths > 0)[:, None], final, h0)  # empty rows keep h0
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
        impl: see :func:`masked_gru`: ``"fast"`` (default, follows
            :func:`dinrec.nn.backend`) or ``"reference"``.
        init: ``"reference"`` (TensorFlow GRUCell: Glorot kernels, gate bias 1) or
            ``"pytorch"`` (``nn.GRU``'s uniform(+-1/sqrt(H))).

    ``forward(inputs (B, T, E), mask (B, T), h0=None) -> (outputs (B, T, H), final (B, H))``.
    The extractor uses PyTorch's reset-after candidate (cuDNN / Keras ``reset_after``),
    the reference's TensorFlow GRUCell resets before the product: same family, not
    bit-identical weights.
    """

    def __init__(
        self, input_size: int, hidden_size: int, *, impl: str = "fast", init: str = "reference"
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


# --------------------------------------------------------------------------- fast path
def _impl(impl: str | None) -> str:
    """A layer's ``impl`` (new or old name) -> ``"fast"`` or ``"reference"`` in force now."""
    return resolve(_ALIASES.get(impl, impl) if impl is not None else None)  # type: ignore[arg-type]


def _scan_supported(*tensors: Tensor | None) -> bool:
    """Whether ``dinrec::gru_scan`` runs on these tensors (CPU, one float32/64 dtype, built,
    and measured faster than the reference on this CPU: :func:`dinrec.nn._ops.use`)."""
    ts = [t for t in tensors if t is not None]
    dtype = ts[0].dtype
    return (
        dtype in (torch.float32, torch.float64)
        and all(t.device.type == "cpu" and t.dtype == dtype for t in ts)
        and _ops.use("gru_scan")
    )


def _steps(lengths: Tensor, t: int) -> int:
    """The longest valid length (the loops stop there), or T where it cannot be read:
    under a tracer or compiler, and on the meta device."""
    if t == 0 or tracing() or lengths.device.type == "meta":
        return t
    return int(lengths.max())


def _coefficients(kind: str, gate: str, a: Tensor | None, m: Tensor) -> tuple[Tensor, Tensor]:
    """f = c0 + c1 * z for each variant; a, m (T, B) -> c0, c1 (T, B)."""
    if kind in ("gru", "aigru"):
        return m, -m
    assert a is not None
    if kind == "agru":
        return m * a, torch.zeros_like(m)
    if gate == "reference":  # f = 1 - (1 - a) z
        return m, -m * (1.0 - a)
    ma = m * a  # paper: f = a (1 - z)
    return ma, -ma


def _scan_gru(
    inputs: Tensor,
    scores: Tensor | None,
    lengths: Tensor,
    weights: GRUWeights,
    *,
    kind: str,
    gate: str,
    h0: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The fast path: one input product, the folded coefficients, ``dinrec::gru_scan``."""
    b, t, _ = inputs.shape
    hid = weights.weight_hh.shape[1]
    dtype = weights.weight_hh.dtype
    h0 = inputs.new_zeros(b, hid, dtype=dtype) if h0 is None else h0.to(dtype)
    steps = _steps(lengths, t)
    if steps == 0:
        return inputs.new_zeros(b, t, hid, dtype=dtype), h0
    if _use_packed(inputs, lengths, steps):
        return _packed_scan(inputs, scores, lengths, weights, kind=kind, gate=gate, h0=h0)
    # Time-major from here on: each step's rows are contiguous for the loop.
    valid = torch.arange(steps, device=inputs.device)[:, None] < lengths  # (S, B)
    x = inputs[:, :steps].transpose(0, 1).masked_fill(~valid[..., None], 0.0)  # (S, B, E)
    a = None
    if scores is not None:
        a = scores[:, :steps].t().masked_fill(~valid, 0.0).to(dtype)  # (S, B)
        if kind == "aigru":
            x = x * a.unsqueeze(-1).to(x.dtype)  # i'_t = a_t * i_t
    xi = F.linear(x, weights.weight_ih, weights.bias_ih).to(dtype)  # (S, B, 3H), one product
    c0, c1 = _coefficients(kind, gate, a, valid.to(dtype))  # (S, B) each
    hs, _ = _ops.gru_scan(xi, c0, c1, weights.weight_hh, weights.bias_hh, h0)  # (S, B, H)
    final = hs[-1]  # a padded step keeps the state (f = 0), so this is each row's last valid one
    outputs = (hs * valid[..., None].to(dtype)).transpose(0, 1)  # (B, S, H), zero at padding
    if steps < t:
        outputs = F.pad(outputs, (0, 0, 0, t - steps))  # (B, T, H)
    return outputs, final



# --------------------------------------------------------------------------- packed fast path
#: Scan only the valid steps (``PackedSequence`` layout) when less than this share of the
#: ``(B, steps)`` positions up to the longest row is valid (:func:`_use_packed`). Measured
#: (AMD EPYC Zen 4, 1 thread, B 128, H 36, the extractor + AUGRU forward and backward,
#: CPU time, packed / dense): 1.06 at a 0.98 share, 0.92 at 0.90, 0.88 at 0.80, 0.68 at
#: 0.61, 0.60 at 0.53. Packing costs a gather and a scatter; the dense scan pays for
#: every padded step.
PACKED_BELOW: float = 0.95


class _Packing(NamedTuple):
    """Where the valid steps of a left-aligned batch go in ``PackedSequence`` layout: rows
    sorted by length (longest first, ties in batch order), one step after the other."""

    positions: Tensor  # (N,) flat (B * T) position of each packed step
    sizes: Tensor  # (S,) int64: rows still running at each step (non-increasing)
    rows: Tensor  # (R,) the batch row of each sorted non-empty row
    last: Tensor  # (R,) packed position of each sorted row's last step


def _packing(lengths: Tensor, t: int) -> _Packing:
    """The packed layout of rows with ``lengths (B,)`` in a batch of ``T`` steps."""
    order = torch.argsort(lengths, descending=True, stable=True)  # (B,)
    ordered = lengths.index_select(0, order)  # (B,) non-increasing
    r = int((ordered > 0).sum())
    rows, ordered = order[:r], ordered[:r]  # (R,)
    steps = int(ordered[0]) if r else 0
    running = torch.arange(steps, device=lengths.device)[:, None] < ordered  # (S, R)
    sizes = running.sum(1)  # (S,)
    step, row = running.nonzero(as_tuple=True)  # (N,) each, step-major
    index = rows.index_select(0, row) * t + step  # (N,)
    starts = torch.cumsum(sizes, 0) - sizes  # (S,) first packed position of each step
    last = starts.index_select(0, ordered - 1) + torch.arange(r, device=lengths.device)  # (R,)
    return _Packing(index, sizes.cpu(), rows, last)


def _use_packed(inputs: Tensor, lengths: Tensor, steps: int) -> bool:
    """Pack in eager CPU runs on batches padded enough (:data:`PACKED_BELOW`): the layout
    is data-dependent, so tracers and compilers keep the dense scan."""
    if inputs.device.type != "cpu" or tracing() or inputs.device.type == "meta":
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - the API moved
        return False
    if is_fake(inputs):
        return False
    return int(lengths.sum()) < PACKED_BELOW * steps * lengths.shape[0]


def _gather_steps(x: Tensor, index: Tensor) -> Tensor:
    """x (B, T, ...) -> (N, ...) at the flat positions ``index``."""
    b, t = x.shape[:2]
    if x.is_contiguous():
        return x.reshape(b * t, *x.shape[2:]).index_select(0, index)
    return x[torch.div(index, t, rounding_mode="floor"), index % t]  # an expanded x stays unexpanded


def _packed_scan(
    inputs: Tensor,
    scores: Tensor | None,
    lengths: Tensor,
    weights: GRUWeights,
    *,
    kind: str,
    gate: str,
    h0: Tensor,
) -> tuple[Tensor, Tensor]:
    """The fast path over the valid steps only: gather them (N of B * T), one input
    product over N rows, ``dinrec::gru_scan_packed``, scatter back with zeros at padding."""
    b, t, _ = inputs.shape
    hid = weights.weight_hh.shape[1]
    dtype = h0.dtype
    p = _packing(lengths, t)
    x = _gather_steps(inputs, p.positions)  # (N, E)
    a = None
    if scores is not None:
        a = _gather_steps(scores, p.positions).to(dtype)  # (N,)
        if kind == "aigru":
            x = x * a.unsqueeze(-1).to(x.dtype)  # i'_t = a_t * i_t
    xi = F.linear(x, weights.weight_ih, weights.bias_ih).to(dtype)  # (N, 3H)
    c0, c1 = _coefficients(kind, gate, a, xi.new_ones(xi.shape[0]))  # (N,) each
    hs, _ = _ops.gru_scan_packed(
        xi, c0, c1, weights.weight_hh, weights.bias_hh, h0.index_select(0, p.rows), p.sizes
    )  # (N, H)
    # In place into fresh zeros (no copy of them); autograd still records the scatter.
    outputs = hs.new_zeros(b * t, hid).index_copy_(0, p.positions, hs).view(b, t, hid)  # zero at padding
    final = h0.index_copy(0, p.rows, hs.index_select(0, p.last))  # (B, H); empty rows keep h0
    return outputs, final


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
    t_max = _steps(lengths, t) if b > 0 else 0
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
    impl: str | None = None,
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
        impl: ``None`` / ``"fast"``: follow :func:`dinrec.nn.backend` (the fast path is
            ``dinrec::gru_scan`` on CPU); ``"reference"``: the literal cell through
            autograd. ``reset_after=False`` always runs the literal cell.

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
    if _impl(impl) == "fast" and reset_after and _scan_supported(inputs, *weights, h0):
        return _scan_gru(inputs, scores, lengths, weights, kind=kind, gate=gate, h0=h0)
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
    #: ``"fast"`` follows :func:`dinrec.nn.backend`; ``"reference"`` pins the literal cell.
    #: (The older names ``"fused"``, ``"fused_script"``, ``"fused_eager"`` mean ``"fast"``,
    #: ``"autograd"`` means ``"reference"``.)
    impl: str = "fast"


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
