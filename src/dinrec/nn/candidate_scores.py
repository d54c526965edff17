"""The inference kernel of `din_fcn_attention` for N candidates against one history.

Serving ranks N candidate items for one user: the same history ``(T, D)`` is scored
against every candidate query. :func:`candidate_scores` computes the attention scores
``(N, T)`` of all pairs without autograd, as fast as this CPU allows:

* **One GEMM for the first layer.** With ``q`` the projected candidate queries and
  ``W1 [q; k; q-k; q*k] = (W_q + W_d) q + (W_k - W_d) k + W_p (q * k) + b1``, the
  pre-activation of pair ``(n, t)`` is ``[q_n, 1] @ M[:, t, :]`` with::

      M[d, t, a] = k[t, d] W_p[a, d] + (W_q + W_d)[a, d]     (d < D)
      M[D, t, a] = ((W_k - W_d) k_t + b1)[a]                  (the history part)

  so one ``(N, D+1) @ (D+1, T*A)`` product gives every pair, and ``M`` (built once
  per history, ``T*A*(D+1)`` values) is N/T times smaller than its per-candidate twin.
* **Valid positions only.** Padded history positions get weight exactly 0 after the
  reference's masking and softmax, so only valid ones are scored (when at least one
  is valid; the all-padded case is scored in full, as the reference does).
* **Cache-sized chunks, reused buffers.** Candidates go through the three layers in
  chunks of about ``chunk_rows`` pairs, so the intermediates stay in the L2 cache, into
  per-thread buffers that are reused from call to call. Fresh multi-MB tensors per
  request cost page faults (measured: some processes ran 2x slower from it).
* **Optional bfloat16 GEMMs** (``compute_dtype=torch.bfloat16``): the two large
  products and sigmoids in bfloat16 with float32 accumulation, for CPUs with native
  bfloat16 dot products (AVX512-BF16, AMX); where torch has oneDNN, each sigmoid runs
  in its GEMM's epilogue (measured 1.25x over separate bfloat16 ops). Scores then differ from float32 by about
  1e-2 relative; rankings rarely change. float32 (the default) equals the reference.

* **A C++ operator for float32 / float64 on CPU** (``dinrec::candidate_scores``,
  :mod:`dinrec.nn._ops`, source ``dinrec/csrc/candidate_scores.cpp``): the first layer's
  matrix built in one pass, then per chunk of candidates (about 8,192 pairs) one matrix
  product per layer, one vectorised sigmoid pass, and one fused pass from the second
  layer's pre-activations to the scores (no write-back of its sigmoids, no separate
  product with ``w3``). From 4,096 pairs on, the chunks are spread over ATen's threads.
  It runs under the ``"fast"`` backend where it is built and, timed at first use against
  the torch ops above (1,000 candidates x 100 positions, D = 36, A = 80, float32, at the
  current thread count), at least 3% faster; bfloat16, other devices, machines without a
  build and CPUs where it does not win run the torch ops above.

The last layer's bias is added to every score of a row, which softmax ignores, but it
is kept so the raw scores (``softmax=False``) are the reference's too.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import Tensor

from dinrec.nn import _ops
from dinrec.nn._backend import resolve

logger = logging.getLogger(__name__)

#: About this many (position, candidate) pairs per chunk: ~2 MB per float32 layer.
CHUNK_ROWS: int = 16384

_local = threading.local()


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A per-thread reusable tensor of ``shape`` on ``device`` (contents undefined)."""
    store: dict[tuple[str, torch.dtype, torch.device], Tensor] | None = getattr(_local, "buffers", None)
    if store is None:
        store = _local.buffers = {}
    n = 1
    for s in shape:
        n *= s
    key = (name, dtype, device)
    buf = store.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buf = store[key] = torch.empty(max(n, 1), dtype=dtype, device=device)
    return buf[:n].view(shape)


def _fused_linear_sigmoid():  # type: ignore[no-untyped-def]
    """``f(x, w, b) = sigmoid(x @ w.T + b)`` as one oneDNN call, or None where torch lacks it.

    ``torch.ops.mkldnn._linear_pointwise`` is the fused kernel that torch's own compiler
    emits on CPU; it is internal, so it is checked once on a small input, and its absence,
    failure or a wrong result falls back to separate ops (tested).
    """
    global _FUSED
    if _FUSED is False:
        return None
    if _FUSED is None:
        try:
            op = torch.ops.mkldnn._linear_pointwise
            x = torch.ones(2, 3, dtype=torch.bfloat16)
            ok = torch.backends.mkldnn.is_available() and torch.allclose(
                op(x, torch.zeros(4, 3, dtype=torch.bfloat16), None, "sigmoid", [], "").float(),
                torch.full((2, 4), 0.5),
            )
        except Exception:  # absent (AttributeError), or failing in any way
            ok = False
        _FUSED = (lambda x, w, b: op(x, w, b, "sigmoid", [], "")) if ok else False
    return _FUSED or None


_FUSED = None


def clear_buffers() -> None:
    """Free this thread's reusable buffers."""
    _local.buffers = {}


def candidate_scores(
    q: Tensor,
    history: Tensor,
    valid: Tensor | None,
    w_query: Tensor,
    w_key: Tensor,
    w_prod: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
    *,
    compute_dtype: torch.dtype | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Tensor:
    """Raw attention scores of every (candidate, position) pair, no autograd.

    Args:
        q: ``(N, D)`` projected candidate queries.
        history: ``(T, D)`` the shared facts.
        valid: ``(T,)`` bool, or ``None`` for all positions.
        w_query, w_key, w_prod: ``(A, D)`` each: ``W_q + W_d``, ``W_k - W_d``, ``W_p``.
        b1: ``(A,)``; w2 ``(40, A)``, b2 ``(40,)``; w3 ``(1, 40)``, b3 ``(1,)``.
        compute_dtype: dtype of the GEMMs and sigmoids (default: ``q``'s dtype).
        chunk_rows: about this many pairs per chunk of the torch ops.

    Returns:
        ``(N, T)`` scores in ``q``'s dtype; padded positions (when some are valid)
        hold 0 and must be masked by the caller.

    Runs ``dinrec::candidate_scores`` under the ``"fast"`` backend for float32 / float64 on
    CPU where it is built and measured faster than the torch ops on this CPU
    (:func:`dinrec.nn._ops.use`), otherwise :func:`torch_candidate_scores`.
    """
    use_op = (
        resolve(None) == "fast"
        and q.dtype in (torch.float32, torch.float64)
        and q.device.type == "cpu"
        and compute_dtype in (None, q.dtype)
        and _ops.use("candidate_scores")
    )
    if not use_op:
        return torch_candidate_scores(q, history, valid, w_query, w_key, w_prod, b1, w2, b2, w3, b3,
                                      compute_dtype=compute_dtype, chunk_rows=chunk_rows)
    return _operator_scores(q, history, valid, w_query, w_key, w_prod, b1, w2, b2, w3, b3)


def _operator_scores(q: Tensor, history: Tensor, valid: Tensor | None, *layers: Tensor) -> Tensor:
    """:func:`candidate_scores` through ``dinrec::candidate_scores`` (float32 / float64, CPU)."""
    keys, idx = _valid_keys(history.to(q.dtype), valid)
    weights = (x.to(q.dtype) for x in layers)
    return _expand(_ops.candidate_scores(q, keys, *weights), idx, history.shape[0])


def _valid_keys(history: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """history (T, D) -> its valid rows (Tv, D) and their indices, or itself and None when
    all (or none: the reference scores an all-padded row in full) are valid."""
    if valid is not None and valid.device.type != "meta":  # meta: no data, shapes only
        nv = int(valid.sum())
        if 0 < nv < history.shape[0]:
            idx = valid.nonzero().squeeze(1)  # (Tv,)
            return history.index_select(0, idx), idx
    return history, None


def torch_candidate_scores(
    q: Tensor, history: Tensor, valid: Tensor | None, w_query: Tensor, w_key: Tensor,
    w_prod: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
    *, compute_dtype: torch.dtype | None = None, chunk_rows: int = CHUNK_ROWS,
) -> Tensor:
    """:func:`candidate_scores` in torch ops (any device and dtype; bfloat16 products)."""
    return _candidate_scores(q, history, valid, w_query, w_key, w_prod, b1, w2, b2, w3, b3,
                             compute_dtype, chunk_rows)


def _candidate_scores(
    q: Tensor, history: Tensor, valid: Tensor | None, w_query: Tensor, w_key: Tensor,
    w_prod: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
    compute_dtype: torch.dtype | None, chunk_rows: int,
) -> Tensor:
    """:func:`torch_candidate_scores`."""
    n, d = q.shape
    t = history.shape[0]
    a = w_query.shape[0]
    out_dtype, dev = q.dtype, q.device
    cdt = compute_dtype or out_dtype
    w_query, w_key, w_prod, b1, b3 = (x.to(out_dtype) for x in (w_query, w_key, w_prod, b1, b3))
    w2, b2, w3 = w2.to(cdt), b2.to(cdt), w3.to(cdt)
    keys, idx = _valid_keys(history.to(out_dtype), valid)  # (Tv, D)
    tv = keys.shape[0]
    # M (D+1, Tv, A), in the output dtype first (exact), then in the compute dtype.
    m = _buffer("m", (d + 1, tv, a), out_dtype, dev)
    torch.addcmul(w_query.t().unsqueeze(1), keys.t().unsqueeze(2), w_prod.t().unsqueeze(1),
                  out=m[:d])
    torch.addmm(b1, keys, w_key.t(), out=m[d])
    q_aug = _buffer("q", (n, d + 1), cdt, dev)
    q_aug[:, :d] = q
    q_aug[:, d] = 1
    if cdt != out_dtype:
        m = _buffer("m_c", (d + 1, tv, a), cdt, dev).copy_(m)
    m = m.view(d + 1, tv * a)
    w2t = w2.t()  # (A, 40)
    w3v = w3.reshape(-1)  # (40,)
    hidden = w2.shape[0]
    scores_v = q.new_empty(n, tv)  # the result (or its valid columns): never a buffer
    step = max(1, min(n, chunk_rows // max(tv, 1)))
    fused = _fused_linear_sigmoid() if cdt == torch.bfloat16 else None
    if fused is not None:
        m_t = m.t().contiguous()  # (Tv*A, D+1): oneDNN takes (out, in) weights
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        nc = c1 - c0
        if fused is not None:  # sigmoid in the GEMM epilogue, from the float32 accumulators
            h2 = fused(fused(q_aug[c0:c1], m_t, None).view(nc * tv, a), w2, b2)  # (nc*Tv, 40)
            s3 = _buffer("s3", (nc * tv, 1), cdt, dev)
            torch.mm(h2, w3.t(), out=s3)  # (nc*Tv, 1): faster than mv in bfloat16
            scores_v[c0:c1] = s3.view(nc, tv)
            continue
        h1 = _buffer("h1", (nc, tv * a), cdt, dev)
        torch.mm(q_aug[c0:c1], m, out=h1)  # (nc, Tv*A): rows n, columns (t, a)
        h1.sigmoid_()
        h2 = _buffer("h2", (nc * tv, hidden), cdt, dev)
        torch.addmm(b2, h1.view(nc * tv, a), w2t, out=h2)  # (nc*Tv, 40)
        h2.sigmoid_()
        if cdt == out_dtype:
            torch.mv(h2, w3v, out=scores_v[c0:c1].view(nc * tv))  # (nc*Tv,)
        else:
            s3 = _buffer("s3", (nc * tv,), cdt, dev)
            torch.mv(h2, w3v, out=s3)  # (nc*Tv,)
            scores_v[c0:c1] = s3.view(nc, tv)
    scores_v += b3
    return _expand(scores_v, idx, t)


def _expand(scores_v: Tensor, idx: Tensor | None, t: int) -> Tensor:
    """(N, Tv) scores of the valid positions ``idx`` -> (N, T), 0 elsewhere."""
    if idx is None:
        return scores_v  # (N, T)
    scores = scores_v.new_zeros(scores_v.shape[0], t)
    scores.index_copy_(1, idx, scores_v)
    return scores  # (N, T)


def _benchmark() -> tuple[_ops.Call, _ops.Call]:
    """The serving size, 1 history (T = 100, all valid) x 1,000 candidates, D = 36, A = 80,
    float32: the C++ operator against :func:`torch_candidate_scores`, without autograd."""
    gen = torch.Generator().manual_seed(0)
    n, t, d, a = 1000, 100, 36, 80

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    q, history = rand(n, d), rand(t, d)
    layers = (rand(a, d), rand(a, d), rand(a, d), rand(a), rand(40, a), rand(40), rand(1, 40), rand(1))
    valid = torch.ones(t, dtype=torch.bool)

    def cpp() -> object:
        with torch.no_grad():
            return _operator_scores(q, history, valid, *layers)

    def ref() -> object:
        with torch.no_grad():
            return torch_candidate_scores(q, history, valid, *layers)

    return cpp, ref


_ops.BENCHMARKS["candidate_scores"] = _benchmark
