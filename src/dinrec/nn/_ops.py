"""The C++ fast paths (``dinrec/csrc``) as PyTorch operators, built on first use.

Three operations have a C++ kernel (CPU, float32 and float64):

* ``dinrec::gru_scan`` -- the GRU recurrence of DIEN's layers given the input projections
  of all steps (:func:`gru_scan`); its backward is ``dinrec::gru_scan_backward``;
  ``dinrec::gru_scan_packed`` is the same over the valid steps of a padded batch only
  (``PackedSequence`` layout, :func:`gru_scan_packed`; eager runs), under the same
  measured choice (``"gru_scan"``);
* ``dinrec::candidate_scores`` -- the attention scores of N candidates against one
  history, for ranking without autograd;
* ``dinrec::offset_mlp`` -- a two-hidden-layer sigmoid MLP whose first layer has a
  per-row offset, fused per tile of rows (:func:`offset_mlp`): DIN's attention MLP on the
  packed events and DIEN's auxiliary MLP; its backward is ``dinrec::offset_mlp_backward``.
  Its matrix products are float32, or bfloat16 with float32 accumulation where
  :func:`dinrec.nn.products` asks for it (measured choices ``"offset_mlp"`` and
  ``"offset_mlp_bf16"``; the bfloat16 kernel is checked on its own, :func:`check_bf16`).

Build: :func:`torch.utils.cpp_extension.load` compiles the sources on first use (g++,
ninja; a file lock makes concurrent processes, e.g. DDP ranks, build once) into torch's
extension cache, keyed by the sources, the flags and the CPU (``-march=native``). The
library registers the raw kernels as ``torch.ops.dinrec_cpp.*``; this module wraps them
as ``torch.library.custom_op`` operators with a fake (meta) implementation and a
registered autograd formula, so ``torch.compile`` and ``torch.export`` see through them.
Exporters that need standard ops (ONNX, TorchScript) export with
``dinrec.nn.backend("reference")``, where these operators are not used.

Before first use the kernels are checked against the literal math at production sizes
(:func:`self_check`). :func:`available` is ``False`` -- with one warning naming the
pure-PyTorch path that runs instead -- when the build fails (no compiler) or the check
fails or raises.

A C++ operator must also *win* on the CPU it runs on: at its first use (:func:`use`),
after the self-check, each operator is timed against the torch path it replaces, at the
production size it serves and the torch thread count in force, interleaved, median of a
few rounds within a fraction of a second (:func:`measure`). It runs only where it is at
least :data:`MIN_GAIN` faster; otherwise one log line names both timings and says that
the torch path runs. The decision is kept per process and thread count, and on disk next
to the build (keyed by the build, which includes the CPU, and the thread count; written
atomically), so later processes do not measure again. :func:`fast_paths` reports it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from dinrec.nn._backend import get_products

__all__ = [
    "Choice", "available", "candidate_scores", "choice", "choices", "fast_paths", "forget", "gru_scan",
    "gru_scan_packed", "gru_scan_packed_reference", "gru_scan_reference", "measure", "offset_mlp",
    "offset_mlp_backward", "offset_mlp_reference", "offset_mlp_runs", "prepare_fast_paths", "self_check", "use",
    "bf16_available",
    "check_bf16",
]

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("gru_scan.cpp", "candidate_scores.cpp", "offset_mlp.cpp")
#: ``-ffp-contract=fast``: the polynomials as fused multiply-adds; ``-fopenmp``: ATen's
#: ``parallel_for`` is an OpenMP region compiled into the caller.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp")
FALLBACK = (
    "the pure-PyTorch paths run instead (GRU layers: their reference loop; candidate "
    "scores and the attention / auxiliary MLPs: torch ops)"
)


def _cpu_id() -> str:
    info = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name")):
                    info += line
                if not line.strip():
                    break
    except OSError:
        pass
    return info


def _build() -> None:
    """Compile (or reuse) and load the library; raises where that is impossible."""
    from torch.utils import cpp_extension

    global build_folder
    paths = [CSRC / s for s in SOURCES]
    key = hashlib.sha256()
    for p in [*paths, *sorted(CSRC.glob("*.h"))]:
        key.update(p.read_bytes())
    key.update("\0".join([*CFLAGS, torch.__version__, _cpu_id()]).encode())
    name = f"dinrec_ops_{key.hexdigest()[:12]}"
    with _exclusive(_build_directory(name)):
        cpp_extension.load(
            name=name,
            sources=[str(p) for p in paths],
            extra_cflags=list(CFLAGS),
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    loaded = [Path(p) for p in torch.ops.loaded_libraries if Path(p).stem == name]
    build_folder = loaded[0].parent if loaded else None


def _build_directory(name: str) -> Path | None:
    """The folder torch builds the library ``name`` in (created), or None where unknown."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, verbose=False))
    except Exception:  # pragma: no cover - a private helper of torch that may move
        return None


@contextlib.contextmanager
def _exclusive(folder: Path | None) -> Iterator[None]:
    """Hold an OS file lock on the build ``folder`` while building and loading.

    torch's own build lock is a plain file (``lock``) that only its creator removes: a
    build killed midway (Ctrl-C on a first run, an OOM kill) leaves it behind, and every
    later process then waits for it forever. The OS releases this lock when its holder
    dies, so whoever holds it knows that no live dinrec process is building here, and
    removes a leftover ``lock`` file first (with a warning)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not a POSIX system
        fcntl = None  # type: ignore[assignment]
    if folder is None or fcntl is None:
        yield
        return
    with open(folder / "dinrec.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = folder / "lock"
            if stale.exists():
                logger.warning("dinrec: removing a build lock left by a killed build: %s", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#: The folder of the loaded build (where the measured choices are kept), if known.
build_folder: Path | None = None


#: Replaced in tests to simulate a machine without a compiler.
builder: Callable[[], None] = _build


_lock = threading.Lock()


@torch.compiler.assume_constant_result  # compilers run it once, eagerly, and keep the answer
def available() -> bool:
    """Whether the C++ kernels are built, loaded and passed :func:`self_check` (once per process)."""
    return _available()


@functools.cache
def _available() -> bool:
    with _lock:
        return _build_and_check()


available.cache_clear = _available.cache_clear


def _build_and_check() -> bool:
    try:
        builder()
    except Exception as exc:  # no compiler, no ninja, a compile error ...
        _warn(f"the C++ kernels could not be built ({_first_line(exc)})")
        return False
    try:
        # The check uses autograd for its yardstick, whatever mode the first caller is in.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            self_check()
    except Exception as exc:  # a wrong result or a kernel that raises
        _warn(f"the C++ kernels failed their self-check ({_first_line(exc)})")
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


def _warn(reason: str) -> None:
    warnings.warn(f"dinrec: {reason}; {FALLBACK}", RuntimeWarning, stacklevel=5)


# --------------------------------------------------------------------------- gru_scan
@torch.library.custom_op("dinrec::gru_scan", mutates_args=(), device_types="cpu")
def gru_scan(
    xi: Tensor, c0: Tensor, c1: Tensor, w_hh: Tensor, b_hh: Tensor, h0: Tensor
) -> tuple[Tensor, Tensor]:
    """The GRU recurrence, time-major: ``h' = h + f (n - h)``, ``f = c0 + c1 z``.

    xi (T, B, 3H) ``W_ih x_t + b_ih`` in gate order (r, z, n); c0, c1 (T, B); w_hh (3H, H);
    b_hh (3H,); h0 (B, H) -> hs (T, B, H) the state after each step, and gates (T, B, 4H)
    ``[r, z, n, W_hn h + b_hn]`` (saved for the backward). :func:`gru_scan_reference` is
    the same in plain PyTorch.
    """
    return torch.ops.dinrec_cpp.gru_scan_forward(xi, c0, c1, w_hh, b_hh, h0)


@gru_scan.register_fake
def _(xi: Tensor, c0: Tensor, c1: Tensor, w_hh: Tensor, b_hh: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    steps, b, _ = xi.shape
    hid = w_hh.shape[1]
    return xi.new_empty(steps, b, hid), xi.new_empty(steps, b, 4 * hid)


@torch.library.custom_op("dinrec::gru_scan_backward", mutates_args=(), device_types="cpu")
def gru_scan_backward(
    g_hs: Tensor, hs: Tensor, gates: Tensor, c0: Tensor, c1: Tensor, w_hh: Tensor, h0: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dL/dhs (T, B, H) -> d (T, B, 4H) ``[d gh_r, d gh_z, d gh_n, d x_n]``, d_c0, d_c1 (T, B),
    dL/dh0 (B, H). Reverse-mode only (not differentiable again)."""
    return torch.ops.dinrec_cpp.gru_scan_backward(g_hs, hs, gates, c0, c1, w_hh, h0)


@gru_scan_backward.register_fake
def _(
    g_hs: Tensor, hs: Tensor, gates: Tensor, c0: Tensor, c1: Tensor, w_hh: Tensor, h0: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    steps, b, hid = hs.shape
    return hs.new_empty(steps, b, 4 * hid), hs.new_empty(steps, b), hs.new_empty(steps, b), hs.new_empty(b, hid)


def _gru_setup(ctx: Any, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
    _, c0, c1, w_hh, _, h0 = inputs
    hs, gates = output
    ctx.save_for_backward(hs, gates, c0, c1, w_hh, h0)
    ctx.set_materialize_grads(False)  # the gates get no gradient: no (T, B, 4H) zeros for them


def _gru_backward(
    ctx: Any, g_hs: Tensor | None, g_gates: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    hs, gates, c0, c1, w_hh, h0 = ctx.saved_tensors
    steps, b, hid = hs.shape
    if g_hs is None:
        g_hs = torch.zeros_like(hs)
    d, d_c0, d_c1, d_h0 = gru_scan_backward(g_hs.contiguous(), hs, gates, c0, c1, w_hh, h0)
    h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]])  # (T, B, H) the state before each step
    d_gh = d[:, :, : 3 * hid].reshape(steps * b, 3 * hid)  # (T B, 3H), order (r, z, n)
    d_w = d_gh.t().mm(h_prev.reshape(steps * b, hid))  # (3H, H)
    d_bias = d_gh.sum(0)  # (3H,)
    d_xi = torch.cat([d[:, :, : 2 * hid], d[:, :, 3 * hid :]], dim=2)  # (T, B, 3H), (r, z, n)
    return d_xi, d_c0, d_c1, d_w, d_bias, d_h0


gru_scan.register_autograd(_gru_backward, setup_context=_gru_setup)


def gru_scan_reference(
    xi: Tensor, c0: Tensor, c1: Tensor, w_hh: Tensor, b_hh: Tensor, h0: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`gru_scan` step by step in PyTorch ops (any device, autograd): the yardstick."""
    hid = w_hh.shape[1]
    h, hs, gates = h0, [], []
    for t in range(xi.shape[0]):
        x_r, x_z, x_n = xi[t].split(hid, 1)  # (B, H) each
        h_r, h_z, h_n = F.linear(h, w_hh, b_hh).split(hid, 1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        f = c0[t, :, None] + c1[t, :, None] * z  # (B, H)
        h = h + f * (n - h)
        hs.append(h)
        gates.append(torch.cat([r, z, n, h_n], 1))
    if not hs:
        return xi.new_empty(0, *h0.shape), xi.new_empty(0, h0.shape[0], 4 * hid)
    return torch.stack(hs), torch.stack(gates)



# --------------------------------------------------------------------------- gru_scan_packed
@torch.library.custom_op("dinrec::gru_scan_packed", mutates_args=(), device_types="cpu")
def gru_scan_packed(
    xi: Tensor, c0: Tensor, c1: Tensor, w_hh: Tensor, b_hh: Tensor, h0: Tensor, batch_sizes: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`gru_scan` over the valid steps only, in ``PackedSequence`` layout.

    Rows sorted by length, longest first; step ``t`` holds the ``batch_sizes[t]`` rows still
    running (non-increasing, int64 on the CPU), stored one step after the other: xi (N, 3H),
    c0, c1 (N,) with N = ``batch_sizes.sum()``; h0 (batch_sizes[0], H) the initial states of
    the non-empty rows. Returns hs (N, H), the state after each step in the same layout, and
    gates (N, 5H) ``[r, z, n, W_hn h + b_hn, h_prev]`` (saved for the backward).
    :func:`gru_scan_packed_reference` is the same in plain PyTorch.
    """
    return torch.ops.dinrec_cpp.gru_scan_packed_forward(xi, c0, c1, w_hh, b_hh, h0, batch_sizes)


@gru_scan_packed.register_fake
def _(xi: Tensor, c0: Tensor, c1: Tensor, w_hh: Tensor, b_hh: Tensor, h0: Tensor,
      batch_sizes: Tensor) -> tuple[Tensor, Tensor]:
    hid = w_hh.shape[1]
    return xi.new_empty(xi.shape[0], hid), xi.new_empty(xi.shape[0], 5 * hid)


@torch.library.custom_op("dinrec::gru_scan_packed_backward", mutates_args=(), device_types="cpu")
def gru_scan_packed_backward(
    g_hs: Tensor, gates: Tensor, c0: Tensor, c1: Tensor, w_hh: Tensor, h0: Tensor, batch_sizes: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dL/dhs (N, H) -> d (N, 4H) ``[d gh_r, d gh_z, d x_n, d gh_n]`` (its first 3H columns
    are dL/dxi), d_c0, d_c1 (N,), dL/dh0 (batch_sizes[0], H)."""
    return torch.ops.dinrec_cpp.gru_scan_packed_backward(g_hs, gates, c0, c1, w_hh, h0, batch_sizes)


@gru_scan_packed_backward.register_fake
def _(g_hs: Tensor, gates: Tensor, c0: Tensor, c1: Tensor, w_hh: Tensor, h0: Tensor,
      batch_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n, hid = g_hs.shape
    return g_hs.new_empty(n, 4 * hid), g_hs.new_empty(n), g_hs.new_empty(n), torch.empty_like(h0)


def _packed_setup(ctx: Any, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
    _, c0, c1, w_hh, _, h0, batch_sizes = inputs
    ctx.save_for_backward(output[1], c0, c1, w_hh, h0, batch_sizes)
    ctx.set_materialize_grads(False)  # the gates get no gradient: no (N, 5H) zeros for them


def _packed_backward(
    ctx: Any, g_hs: Tensor | None, g_gates: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, None]:
    gates, c0, c1, w_hh, h0, batch_sizes = ctx.saved_tensors
    hid = w_hh.shape[1]
    if g_hs is None:
        g_hs = gates.new_zeros(gates.shape[0], hid)
    d, d_c0, d_c1, d_h0 = gru_scan_packed_backward(g_hs.contiguous(), gates, c0, c1, w_hh, h0, batch_sizes)
    h_prev = gates[:, 4 * hid :]  # (N, H) the state before each step
    d_w = w_hh.new_empty(3 * hid, hid)
    torch.mm(d[:, : 2 * hid].t(), h_prev, out=d_w[: 2 * hid])  # (2H, H): r, z
    torch.mm(d[:, 3 * hid :].t(), h_prev, out=d_w[2 * hid :])  # (H, H): n
    sums = d.sum(0)  # (4H,)
    d_bias = torch.cat([sums[: 2 * hid], sums[3 * hid :]])  # (3H,)
    return d[:, : 3 * hid], d_c0, d_c1, d_w, d_bias, d_h0, None


gru_scan_packed.register_autograd(_packed_backward, setup_context=_packed_setup)


def gru_scan_packed_reference(
    xi: Tensor, c0: Tensor, c1: Tensor, w_hh: Tensor, b_hh: Tensor, h0: Tensor, batch_sizes: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`gru_scan_packed` step by step in PyTorch ops (autograd): the yardstick."""
    hid = w_hh.shape[1]
    h, hs, gates, start = h0, [], [], 0
    for n in batch_sizes.tolist():
        h = h[:n]  # (n, H) the rows still running
        x_r, x_z, x_n = xi[start : start + n].split(hid, 1)  # (n, H) each
        h_r, h_z, h_n = F.linear(h, w_hh, b_hh).split(hid, 1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        cand = torch.tanh(x_n + r * h_n)
        f = c0[start : start + n, None] + c1[start : start + n, None] * z  # (n, H)
        gates.append(torch.cat([r, z, cand, h_n, h], 1))
        h = h + f * (cand - h)
        hs.append(h)
        start += n
    if not hs:
        return xi.new_empty(0, hid), xi.new_empty(0, 5 * hid)
    return torch.cat(hs), torch.cat(gates)


# --------------------------------------------------------------------------- candidate_scores
@torch.library.custom_op("dinrec::candidate_scores", mutates_args=(), device_types="cpu")
def candidate_scores(
    q: Tensor, keys: Tensor, w_query: Tensor, w_key: Tensor, w_prod: Tensor, b1: Tensor,
    w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
) -> Tensor:
    """Raw scores (N, Tv) of q (N, D) against keys (Tv, D); w_query / w_key / w_prod (A, D) are
    ``W_q + W_d``, ``W_k - W_d``, ``W_p``; b1 (A,), w2 (40, A), b2 (40,), w3 (1, 40), b3 (1,).
    Inference only (no autograd formula: the autograd path scores candidates as rows)."""
    return torch.ops.dinrec_cpp.candidate_scores(q, keys, w_query, w_key, w_prod, b1, w2, b2, w3, b3)


@candidate_scores.register_fake
def _(
    q: Tensor, keys: Tensor, w_query: Tensor, w_key: Tensor, w_prod: Tensor, b1: Tensor,
    w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
) -> Tensor:
    return q.new_empty(q.shape[0], keys.shape[0])


# --------------------------------------------------------------------------- offset_mlp
@torch.library.custom_op("dinrec::offset_mlp", mutates_args=(), device_types="cpu")
def offset_mlp(
    x: Tensor, offset: Tensor, idx: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
    products: str = "float32", q: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A two-hidden-layer sigmoid MLP whose first layer adds a per-row offset.

    x (N, K); offset (R, A); idx (N,) int64 in [0, R), the offset row of each row of x;
    w1 (A, K); w2 (A2, A); b2 (A2,); w3 (1, A2); b3 (1,) ->
    s (N,) ``= sigmoid(sigmoid(offset[idx] + x w1^T) w2^T + b2) w3^T + b3``, and the hidden
    layers h1 (N, A), h2 (N, A2) (saved for the backward; they get no gradient).
    Rows run in fixed tiles with the elementwise work fused (``csrc/offset_mlp.cpp``);
    :func:`offset_mlp_reference` is the same in plain PyTorch. ``products``
    (:data:`dinrec.nn.Products`): ``"float32"``, or ``"bfloat16"`` for bfloat16 operands of
    every matrix product with float32 accumulation (float32 tensors, even K, A and A2).
    With ``q`` (R, D) the rows are ``[f, f * q[idx]]`` (K = 2D) built per tile from x = the
    facts f (N, D) (DIN's attention MLP): the (N, 2D) input never exists.
    """
    return torch.ops.dinrec_cpp.offset_mlp_forward(x, offset, idx, w1, w2, b2, w3, b3, products, q)


@offset_mlp.register_fake
def _(x: Tensor, offset: Tensor, idx: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
      b3: Tensor, products: str = "float32", q: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    n = x.shape[0]
    return x.new_empty(n), x.new_empty(n, w1.shape[0]), x.new_empty(n, w2.shape[0])


@torch.library.custom_op("dinrec::offset_mlp_backward", mutates_args=(), device_types="cpu")
def offset_mlp_backward(
    g: Tensor, x: Tensor, idx: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, h1: Tensor, h2: Tensor,
    rows: int, need_x: bool, products: str = "float32", q: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dL/ds (N,) -> dL/dx (N, K) (with ``q``: dL/df (N, D); ``(0, .)`` unless ``need_x``),
    dL/dq (R, D) (``(0, D)`` without ``q`` or ``need_x``), dL/doffset (R, A) with R = ``rows``
    (the row sums of the first layer's pre-activation gradient by ``idx``), dL/dw1 (A, K),
    dL/dw2 (A2, A), dL/db2 (A2,), dL/dw3 (1, A2), dL/db3 (1,). Reverse-mode only (not
    differentiable again); ``products`` and ``q`` as :func:`offset_mlp`."""
    return torch.ops.dinrec_cpp.offset_mlp_backward(g, x, idx, w1, w2, w3, h1, h2, rows, need_x, products, q)


@offset_mlp_backward.register_fake
def _(g: Tensor, x: Tensor, idx: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, h1: Tensor, h2: Tensor,
      rows: int, need_x: bool, products: str = "float32",
      q: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    n, width = x.shape
    d = width if q is not None else 0
    a, k, a2 = w1.shape[0], w1.shape[1], w2.shape[0]
    g_x = x.new_empty(n if need_x else 0, width)
    g_q = x.new_empty(rows if need_x and q is not None else 0, d)
    return (g_x, g_q, x.new_empty(rows, a), x.new_empty(a, k), x.new_empty(a2, a), x.new_empty(a2),
            x.new_empty(1, a2), x.new_empty(1))


def _offset_setup(ctx: Any, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, offset, idx, w1, w2, b2, w3, b3, *rest = inputs
    products = rest[0] if rest else "float32"  # the defaults where not given
    q = rest[1] if len(rest) > 1 else None
    _, h1, h2 = output
    ctx.save_for_backward(x, idx, w1, w2, w3, h1, h2, q)
    ctx.shapes = (offset.shape[0], b2.shape, w3.shape, b3.shape)
    ctx.products = products
    ctx.set_materialize_grads(False)  # h1, h2 get no gradient: no zeros for them


def _offset_backward(
    ctx: Any, g_s: Tensor | None, g_h1: Tensor | None, g_h2: Tensor | None
) -> tuple[Tensor | None, ...]:
    x, idx, w1, w2, w3, h1, h2, q = ctx.saved_tensors
    rows, b2_shape, w3_shape, b3_shape = ctx.shapes
    if g_s is None:
        g_s = x.new_zeros(x.shape[0])
    need = ctx.needs_input_grad
    need_x = bool(need[0] or (q is not None and need[9]))
    g_x, g_q, g_off, g_w1, g_w2, g_b2, g_w3, g_b3 = offset_mlp_backward(
        g_s.contiguous(), x, idx, w1, w2, w3, h1, h2, rows, need_x, ctx.products, q
    )
    return (g_x if need[0] else None, g_off, None, g_w1, g_w2, g_b2.reshape(b2_shape),
            g_w3.reshape(w3_shape), g_b3.reshape(b3_shape), None, g_q if q is not None and need[9] else None)


offset_mlp.register_autograd(_offset_backward, setup_context=_offset_setup)


def offset_mlp_runs(w1: Tensor, w2: Tensor, *others: Tensor) -> str | None:
    """The ``products`` with which :func:`offset_mlp` computes an MLP with weights w1 (A, K),
    w2 (A2, A) and the ``others`` tensors, or
    None where the torch ops do: all float32 on the CPU (float64 and other devices take
    the torch ops), the build checked, and the operator measured faster than the torch ops
    here (:func:`use`). ``"bfloat16"`` where :func:`dinrec.nn.products` asks for it
    (``"bfloat16"`` or ``"auto"``), the widths are even, the bfloat16 kernel passed its
    check on this CPU (:func:`bf16_available`) and was measured faster than the torch ops
    (:func:`use`); else the float32 choice. Only an explicit ``"bfloat16"`` warns (once)
    where its check failed; ``"auto"`` falls back silently."""
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (w1, w2, *others)):
        return None
    even = w1.shape[0] % 2 == 0 and w1.shape[1] % 2 == 0 and w2.shape[0] % 2 == 0
    asked = get_products()
    if asked != "float32" and even and bf16_available(warn=asked == "bfloat16") and use("offset_mlp_bf16"):
        return "bfloat16"
    return "float32" if use("offset_mlp") else None


def offset_mlp_reference(
    x: Tensor, offset: Tensor, idx: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
    products: str = "float32", q: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`offset_mlp` in plain PyTorch ops (any device, autograd): the yardstick. With
    ``products="bfloat16"`` the operands of the forward's products are rounded to bfloat16
    first (the backward's are not: its gradients are float32 ones)."""
    if q is not None:
        x = torch.cat([x, x * q.index_select(0, idx)], dim=1)  # (N, 2D)
    r = (lambda t: t.bfloat16().to(t.dtype)) if products == "bfloat16" else (lambda t: t)
    h1 = torch.sigmoid(offset.index_select(0, idx) + r(x) @ r(w1).t())  # (N, A)
    h2 = torch.sigmoid(F.linear(r(h1), r(w2), b2))  # (N, A2)
    s = F.linear(h2, w3.reshape(1, -1), b3.reshape(1)).squeeze(1)  # (N,)
    return s, h1, h2


# --------------------------------------------------------------------------- self-check
#: The kernels :func:`self_check` runs (replaced in tests by broken ones).
CHECKED: dict[str, Callable[..., object]] = {
    "gru_forward": lambda *a: torch.ops.dinrec_cpp.gru_scan_forward(*a),
    "gru_backward": lambda *a: torch.ops.dinrec_cpp.gru_scan_backward(*a),
    "gru_packed_forward": lambda *a: torch.ops.dinrec_cpp.gru_scan_packed_forward(*a),
    "gru_packed_backward": lambda *a: torch.ops.dinrec_cpp.gru_scan_packed_backward(*a),
    "candidate_scores": lambda *a: torch.ops.dinrec_cpp.candidate_scores(*a),
    "offset_mlp_forward": lambda *a: torch.ops.dinrec_cpp.offset_mlp_forward(*a),
    "offset_mlp_backward": lambda *a: torch.ops.dinrec_cpp.offset_mlp_backward(*a),
}


def self_check() -> None:
    """Run every kernel on the paths production runs and compare with the literal math.

    GRU: H = 36 (the 16-lane main loop and its tail) and H = 5 (tail only), a batch of 40
    rows (split over the threads), float32 and float64, forward and backward. Candidate
    scores: 1,000 candidates x 100 positions, D = 36, A = 80 in float32 (the serving case:
    several chunks, split over the threads), 120 x 50 with D = 37 in float64, and 3 x 7
    (one chunk, one thread) in both. Offset MLP: DIN's and DIEN's shapes over several
    tiles (split over the threads), and 3 rows; forward and every gradient, in both dtypes.
    Raises ``AssertionError``.
    """
    gen = torch.Generator().manual_seed(0)
    for dtype, tol, big in ((torch.float64, 1e-10, (120, 50, 37, 80)),
                            (torch.float32, 2e-5, (1000, 100, 36, 80))):
        for steps, b, hid in ((8, 40, 36), (3, 3, 5)):
            _check_gru(gen, steps, b, hid, dtype, tol)
        for lengths in ((9, 9, 8, 5, 5, 5, 3, 2, 2, 1) * 4, (3, 1, 1)):  # 40 rows: two threads
            for hid in (36, 5):
                _check_gru_packed(gen, lengths, hid, dtype, tol)
        for n, t, d, a in (big, (3, 7, 5, 6)):
            _check_candidates(gen, n, t, d, a, dtype, tol)
        # DIN's attention MLP (idx sorted, rows without events) and DIEN's auxiliary MLP
        # (idx = i mod R, unsorted), over several tiles (the last one short) and in one
        for n, k, a, a2, r, din in ((1100, 72, 80, 40, 128, True), (700, 36, 100, 50, 350, False),
                                    (3, 6, 5, 7, 4, True)):
            _check_offset_mlp(gen, n, (k, a, a2), r, din, dtype, tol)


def _close(name: str, got: Tensor, want: Tensor, tol: float) -> None:
    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol):
        err = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        raise AssertionError(f"{name} differs from the reference (max abs error {err:.3g})")


def _check_gru(gen: torch.Generator, steps: int, b: int, hid: int, dtype: torch.dtype, tol: float) -> None:
    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    xi, w, bias, h0 = rand(steps, b, 3 * hid), rand(3 * hid, hid) * 0.3, rand(3 * hid), rand(b, hid)
    c0 = torch.rand(steps, b, generator=gen, dtype=dtype)
    c1 = -c0 * torch.rand(steps, b, generator=gen, dtype=dtype)
    g_hs = rand(steps, b, hid)
    leaves = [x.clone().requires_grad_() for x in (xi, c0, c1, w, bias, h0)]
    hs_ref, gates_ref = gru_scan_reference(*leaves)
    want = torch.autograd.grad(hs_ref, leaves, g_hs)
    hs, gates = cast("tuple[Tensor, Tensor]", CHECKED["gru_forward"](xi, c0, c1, w, bias, h0))
    _close(f"gru_scan forward ({dtype}, H={hid})", hs, hs_ref.detach(), tol)
    _close(f"gru_scan gates ({dtype}, H={hid})", gates, gates_ref.detach(), tol)
    d, d_c0, d_c1, d_h0 = cast(
        "tuple[Tensor, Tensor, Tensor, Tensor]", CHECKED["gru_backward"](g_hs, hs, gates, c0, c1, w, h0)
    )
    d_xi = torch.cat([d[:, :, : 2 * hid], d[:, :, 3 * hid :]], 2)
    h_prev = torch.cat([h0[None], hs[:-1]])
    d_w = d[:, :, : 3 * hid].reshape(-1, 3 * hid).t() @ h_prev.reshape(-1, hid)
    for name, g, r in zip(("xi", "c0", "c1", "w_hh", "h0"), (d_xi, d_c0, d_c1, d_w, d_h0),
                          (want[0], want[1], want[2], want[3], want[5]), strict=True):
        _close(f"gru_scan backward d_{name} ({dtype}, H={hid})", g, r, tol * 10)


def _check_gru_packed(gen: torch.Generator, lengths: tuple[int, ...], hid: int, dtype: torch.dtype,
                      tol: float) -> None:
    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    lens = torch.tensor(sorted(lengths, reverse=True))
    sizes = (torch.arange(int(lens[0]))[:, None] < lens).sum(1)  # (S,) rows running per step
    n, b = int(lens.sum()), len(lengths)
    xi, w, bias, h0 = rand(n, 3 * hid), rand(3 * hid, hid) * 0.3, rand(3 * hid), rand(b, hid)
    c0 = torch.rand(n, generator=gen, dtype=dtype)
    c1 = -c0 * torch.rand(n, generator=gen, dtype=dtype)
    g_hs = rand(n, hid)
    leaves = [x.clone().requires_grad_() for x in (xi, c0, c1, w, bias, h0)]
    l_xi, l_c0, l_c1, l_w, l_bias, l_h0 = leaves
    hs_ref, gates_ref = gru_scan_packed_reference(l_xi, l_c0, l_c1, l_w, l_bias, l_h0, sizes)
    want = torch.autograd.grad(hs_ref, leaves, g_hs)
    hs, gates = cast("tuple[Tensor, Tensor]", CHECKED["gru_packed_forward"](xi, c0, c1, w, bias, h0, sizes))
    _close(f"gru_scan_packed forward ({dtype}, H={hid})", hs, hs_ref.detach(), tol)
    _close(f"gru_scan_packed gates ({dtype}, H={hid})", gates, gates_ref.detach(), tol)
    d, d_c0, d_c1, d_h0 = cast("tuple[Tensor, Tensor, Tensor, Tensor]",
                               CHECKED["gru_packed_backward"](g_hs, gates, c0, c1, w, h0, sizes))
    h_prev = gates[:, 4 * hid :]
    d_w = torch.cat([d[:, : 2 * hid], d[:, 3 * hid :]], 1).t() @ h_prev
    for name, g, r in zip(("xi", "c0", "c1", "w_hh", "h0"), (d[:, : 3 * hid], d_c0, d_c1, d_w, d_h0),
                          (want[0], want[1], want[2], want[3], want[5]), strict=True):
        _close(f"gru_scan_packed backward d_{name} ({dtype}, H={hid})", g, r, tol * 10)


def _check_candidates(gen: torch.Generator, n: int, t: int, d: int, a: int, dtype: torch.dtype,
                      tol: float) -> None:
    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype) / shape[-1] ** 0.5

    q, keys, wq, wk, wp, w2 = rand(n, d), rand(t, d), rand(a, d), rand(a, d), rand(a, d), rand(40, a)
    b1, b2, w3, b3 = rand(a), rand(40), rand(1, 40), rand(1)
    got = cast(Tensor, CHECKED["candidate_scores"](q, keys, wq, wk, wp, b1, w2, b2, w3, b3))
    # The literal first layer W1 [q; k; q-k; q*k] with W_q + W_d = wq, W_k - W_d = wk.
    pre = (q @ wq.t() + b1)[:, None] + (keys @ wk.t())[None] + (q[:, None] * keys[None]) @ wp.t()
    want = F.linear(torch.sigmoid(F.linear(torch.sigmoid(pre), w2, b2)), w3, b3)[..., 0]  # (N, T)
    _close(f"candidate_scores ({dtype}, N={n}, T={t})", got, want, tol)


def _check_offset_mlp(gen: torch.Generator, n: int, widths: tuple[int, int, int], r: int, sorted_idx: bool,
                      dtype: torch.dtype, tol: float, products: str = "float32") -> None:
    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype) / shape[-1] ** 0.5

    k, a, a2 = widths
    if sorted_idx:  # DIN: rows in order, the last rows have none; x = [f, f * q[idx]]
        idx = torch.randint(0, max(r - 3, 1), (n,), generator=gen).sort().values
        x, q = rand(n, k // 2) * 3, rand(r, k // 2) * 3
    else:  # DIEN: idx = i mod R, x given
        idx = torch.arange(n) % r
        x, q = rand(n, k) * 3, None
    w = (rand(r, a), rand(a, k) * 3, rand(a2, a) * 3, rand(a2), rand(1, a2), rand(1))  # offset, w1, w2, b2, w3, b3
    g = torch.randn(n, generator=gen, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, *w, *([q] if q is not None else []))]
    lx, loff, lw1, lw2, lb2, lw3, lb3, *lq = leaves
    lq_ = lq[0] if lq else None
    want_s, want_h1, want_h2 = offset_mlp_reference(lx, loff, idx, lw1, lw2, lb2, lw3, lb3, products, lq_)
    float32_s = offset_mlp_reference(lx, loff, idx, lw1, lw2, lb2, lw3, lb3, "float32", lq_)[0]
    want = torch.autograd.grad(float32_s, leaves, g)  # float32 products
    offset, w1, w2, b2, w3, b3 = w
    s, h1, h2 = cast("tuple[Tensor, Tensor, Tensor]",
                     CHECKED["offset_mlp_forward"](x, offset, idx, w1, w2, b2, w3, b3, products, q))
    name = f"offset_mlp ({dtype}, {products} products, N={n}, K={k}, A={a})"
    _close(f"{name} forward", s, want_s.detach(), tol)
    _close(f"{name} h1", h1, want_h1.detach(), tol)
    _close(f"{name} h2", h2, want_h2.detach(), tol)
    g_x, g_q, *rest = cast("tuple[Tensor, ...]",
                           CHECKED["offset_mlp_backward"](g, x, idx, w1, w2, w3, h1, h2, r, True, products, q))
    got = [g_x, *rest, *([g_q] if q is not None else [])]
    for what, gt, wt in zip(("x", "offset", "w1", "w2", "b2", "w3", "b3", "q"), got, want, strict=False):
        if products == "bfloat16":  # float32 gradients, to 2% of their largest value
            _close(f"{name} backward d_{what}", gt / wt.abs().max(), wt / wt.abs().max(), 0.02)
        else:
            _close(f"{name} backward d_{what}", gt, wt, tol * 10)


@functools.cache
def _bf16_problem() -> str | None:
    """Why bfloat16 products cannot run here, or None (checked once per process)."""
    if not available():
        return "the C++ kernels are not available"
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            check_bf16()
    except Exception as exc:  # no bfloat16 micro-kernel on this CPU, or a wrong result
        return _first_line(exc)
    return None


@functools.cache
def _warn_no_bf16(problem: str) -> None:
    warnings.warn(f"dinrec: bfloat16 products are not available here ({problem}); "
                  "the fused MLP keeps float32 products", RuntimeWarning, stacklevel=5)


def bf16_available(warn: bool = True) -> bool:
    """Whether :func:`offset_mlp` runs with ``products="bfloat16"`` here: built, and
    :func:`check_bf16` passed (once per process). Where not, ``warn`` gives one warning."""
    problem = _bf16_problem()
    if problem is not None and warn:
        _warn_no_bf16(problem)
    return problem is None


def _bf16_cache_clear() -> None:
    _bf16_problem.cache_clear()
    _warn_no_bf16.cache_clear()


bf16_available.cache_clear = _bf16_cache_clear  # type: ignore[attr-defined]


def check_bf16() -> None:
    """:func:`offset_mlp` with bfloat16 products at DIN's and DIEN's shapes over several
    tiles (the last one short, split over the threads) and in one: the forward against the
    reference with its operands rounded the same way (to 5e-4; float32 products miss by ~3e-3), every gradient against the
    float32 gradients to 2% of their largest value. Raises ``AssertionError`` (or the
    kernel's error where the CPU has no bfloat16 micro-kernel)."""
    gen = torch.Generator().manual_seed(1)
    for n, k, a, a2, r, din in ((1100, 72, 80, 40, 128, True), (700, 36, 100, 50, 350, False),
                                (3, 6, 4, 8, 4, True)):
        _check_offset_mlp(gen, n, (k, a, a2), r, din, torch.float32, 5e-4, "bfloat16")


# --------------------------------------------------------------------------- measured choice
#: A C++ operator runs only where it takes at most ``1 - MIN_GAIN`` of the torch path's time.
MIN_GAIN: float = 0.03
#: Seconds one operator's measurement should take (warm-up excluded): rounds stop there,
#: except that a close call (within :data:`CLOSE` of the threshold) gets ``MIN_ROUNDS``.
BUDGET_S: float = 0.1
MIN_ROUNDS, MAX_ROUNDS = 3, 9
CLOSE: float = 0.15

Call = Callable[[], object]


@dataclass(frozen=True)
class Choice:
    """Which implementation of one operator runs at one thread count, and why."""

    op: str
    cpp: bool  # the C++ operator runs (else the torch path)
    cpp_ms: float  # median time per call at the production size (nan: not measured)
    torch_ms: float
    threads: int
    source: str  # "measured", "cached", "no build" or "measurement failed: ..."

    def line(self) -> str:
        """One line for logs and benchmark headers."""
        which = "C++ operator" if self.cpp else "torch path"
        timing = (f"C++ {self.cpp_ms:.2f} ms vs torch {self.torch_ms:.2f} ms"
                  if not math.isnan(self.cpp_ms) else "not timed")
        return f"{self.op}: {which} ({timing}, {self.threads} threads, {self.source})"


#: For each operator, a maker of its two calls at the production size it serves:
#: ``() -> (C++ call, torch call)``. Registered by the module that uses the operator.
BENCHMARKS: dict[str, Callable[[], tuple[Call, Call]]] = {}


def _time_pair(cpp: Call, ref: Call) -> tuple[float, float]:
    """Median seconds per call of ``cpp`` and ``ref``, called alternately (the order
    swapped each round) after one warm-up call each: rounds until ``BUDGET_S`` is spent,
    at least one, and ``MIN_ROUNDS`` where the ratio is close to the threshold (at most
    ``MAX_ROUNDS``). A clear win of either side is decided in one or two rounds."""
    cpp()
    ref()
    times: dict[Call, list[float]] = {cpp: [], ref: []}
    start = time.perf_counter()
    for i in range(MAX_ROUNDS):
        if i >= 1 and time.perf_counter() - start > BUDGET_S:
            ratio = statistics.median(times[cpp]) / statistics.median(times[ref])
            if i >= MIN_ROUNDS or abs(ratio - (1 - MIN_GAIN)) > CLOSE:
                break
        for f in (cpp, ref) if i % 2 == 0 else (ref, cpp):
            t0 = time.perf_counter()
            f()
            times[f].append(time.perf_counter() - t0)
    return statistics.median(times[cpp]), statistics.median(times[ref])


def _timer(op: str) -> tuple[float, float]:
    """Seconds per call (C++, torch) of ``op`` at its production size, whatever the
    caller's mode (the GRU is timed forward + backward)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        return _time_pair(*BENCHMARKS[op]())


#: Times one operator: ``op -> (C++ seconds, torch seconds)``. Replaced in tests.
measure: Callable[[str], tuple[float, float]] = _timer

#: The decisions of this process, by (operator, thread count).
_choices: dict[tuple[str, int], Choice] = {}
_choice_lock = threading.RLock()


@torch.compiler.assume_constant_result  # compilers run it once, eagerly, and keep the answer
def use(op: str) -> bool:
    """Whether the C++ operator ``op`` runs: built, self-checked, and measured faster than
    the torch path here (at the current torch thread count; measured once)."""
    return available() and choice(op).cpp


def choice(op: str, threads: int | None = None) -> Choice:
    """The :class:`Choice` for ``op`` at ``threads`` (default: the current count), made now
    if not yet made: from the disk cache, else by measuring (logged once)."""
    threads = torch.get_num_threads() if threads is None else threads
    key = (op, threads)
    found = _choices.get(key)
    if found is not None:
        return found
    with _choice_lock:
        if key not in _choices:
            _choices[key] = _decide(op, threads)
        return _choices[key]


def _decide(op: str, threads: int) -> Choice:
    nan = float("nan")
    if not available():
        return Choice(op, False, nan, nan, threads, "no build")
    cached = _read_cache(op, threads)
    if cached is not None:
        _log(cached)
        return cached
    previous = torch.get_num_threads()
    try:
        if threads != previous:  # only from an explicit choice(op, threads): never inside a forward
            torch.set_num_threads(threads)
        cpp_s, torch_s = measure(op)
    except Exception as exc:  # a kernel or a timer that raises: the torch path is the safe one
        made = Choice(op, False, nan, nan, threads, f"measurement failed: {_first_line(exc)}")
        logger.warning("dinrec: %s; the torch path runs", made.line())
        return made
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
    made = Choice(op, cpp_s <= (1 - MIN_GAIN) * torch_s, 1e3 * cpp_s, 1e3 * torch_s, threads, "measured")
    _write_cache(made)
    _log(made)
    return made


def _log(made: Choice) -> None:
    if made.cpp:
        logger.info("dinrec: %s", made.line())
    else:
        logger.warning("dinrec: %s; the C++ operator is not faster here, the torch path runs", made.line())


def choices() -> dict[tuple[str, int], Choice]:
    """The decisions made in this process so far, by (operator, thread count)."""
    return dict(_choices)


def prepare_fast_paths(products: str = "float32") -> None:
    """Build (or load) and self-check the C++ operators now, and check the bfloat16 kernel
    where ``products`` (:data:`dinrec.nn.Products`) may use it, instead of inside the first
    forward that needs them. Training calls this before its clock starts, so its first
    interval's samples/s are those of its steps (the checks take a few tenths of a second)."""
    if available() and products != "float32":
        bf16_available(warn=products == "bfloat16")


def fast_paths() -> str:
    """One line per operator: which implementation runs at the current thread count and
    why (measuring now where not yet decided)."""
    return "\n".join(choice(op).line() for op in sorted(BENCHMARKS))


def forget() -> None:
    """Drop every decision, in this process and on disk: the next use measures again (after
    a hardware or load change; the disk cache is keyed by build, CPU and thread count)."""
    with _choice_lock:
        _choices.clear()
        for path in build_folder.glob("choice-*.json") if build_folder is not None else ():
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- decision cache
def _cache_file(op: str, threads: int) -> Path | None:
    """``<build folder>/choice-<op>-<threads>t.json`` (the build's name holds the sources,
    flags, torch version and CPU), or None where the build folder is unknown."""
    if build_folder is None:
        return None
    return build_folder / f"choice-{op}-{threads}t.json"


def _read_cache(op: str, threads: int) -> Choice | None:
    path = _cache_file(op, threads)
    try:
        if path is None or not path.is_file():
            return None
        data = json.loads(path.read_text())
        made = Choice(**{**data, "source": "cached"})
        if made.op != op or made.threads != threads or not isinstance(made.cpp, bool):
            return None
        return made
    except (OSError, ValueError, TypeError):  # unreadable or not ours: measure again
        return None


def _write_cache(made: Choice) -> None:
    """Write atomically (a temporary file renamed over the target), so concurrent
    processes never see a partial file; failures only cost a later re-measurement."""
    path = _cache_file(made.op, made.threads)
    if path is None:
        return
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(made), f)
        os.replace(tmp, path)
    except OSError as exc:
        logger.debug("dinrec: could not keep the fast-path choice in %s (%s)", path, exc)


# --------------------------------------------------------------------------- the two benchmarks
def _gru_benchmark() -> tuple[Call, Call]:
    """gru_scan forward + backward at a DIEN training size (B 128, T 50, H 36, float32)
    against the same recurrence step by step in torch ops through autograd."""
    gen = torch.Generator().manual_seed(0)
    steps, b, hid = 50, 128, 36
    xi, w, bias, h0 = (torch.randn(*s, generator=gen) * 0.3 for s in
                       ((steps, b, 3 * hid), (3 * hid, hid), (3 * hid,), (b, hid)))
    c0 = torch.rand(steps, b, generator=gen)
    c1 = -c0 * torch.rand(steps, b, generator=gen)
    leaves = [x.requires_grad_() for x in (xi, c0, c1, w, bias, h0)]
    g_hs = torch.randn(steps, b, hid, generator=gen)

    def run(f: Callable[..., tuple[Tensor, Tensor]]) -> Call:
        return lambda: torch.autograd.grad(f(*leaves)[0], leaves, g_hs)

    return run(gru_scan), run(gru_scan_reference)


BENCHMARKS["gru_scan"] = _gru_benchmark
