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

The last layer's bias is added to every score of a row, which softmax ignores, but it
is kept so the raw scores (``softmax=False``) are the reference's too.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

#: About this many (position, candidate) pairs per chunk: ~2 MB per float32 layer.
CHUNK_ROWS: int = 16384

_local = threading.local()


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A per-thread reusable tensor of ``shape`` (contents undefined)."""
    store: dict[tuple[str, torch.dtype], Tensor] | None = getattr(_local, "buffers", None)
    if store is None:
        store = _local.buffers = {}
    n = 1
    for s in shape:
        n *= s
    buf = store.get((name, dtype))
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buf = store[(name, dtype)] = torch.empty(max(n, 1), dtype=dtype)
    return buf[:n].view(shape)


def _fused_linear_sigmoid():  # type: ignore[no-untyped-def]
    """``f(x, w, b) = sigmoid(x @ w.T + b)`` as one oneDNN call, or None where torch lacks it.

    ``torch.ops.mkldnn._linear_pointwise`` is the fused kernel that torch's own compiler
    emits on CPU; it is internal, so its absence (or failure) falls back to separate ops.
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
        except (AttributeError, RuntimeError):
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

    Returns:
        ``(N, T)`` scores in ``q``'s dtype; padded positions (when some are valid)
        hold 0 and must be masked by the caller.
    """
    n, d = q.shape
    t = history.shape[0]
    a = w_query.shape[0]
    out_dtype = q.dtype
    cdt = compute_dtype or out_dtype
    w_query, w_key, w_prod, b1, b3 = (x.to(out_dtype) for x in (w_query, w_key, w_prod, b1, b3))
    w2, b2, w3 = w2.to(cdt), b2.to(cdt), w3.to(cdt)
    history = history.to(out_dtype)
    keys, idx = history, None
    if valid is not None:
        nv = int(valid.sum())
        if 0 < nv < t:
            idx = valid.nonzero().squeeze(1)  # (Tv,)
            keys = history.index_select(0, idx)  # (Tv, D)
    tv = keys.shape[0]
    # M (D+1, Tv, A), in the output dtype first (exact), then in the compute dtype.
    m = _buffer("m", (d + 1, tv, a), out_dtype)
    torch.addcmul(w_query.t().unsqueeze(1), keys.t().unsqueeze(2), w_prod.t().unsqueeze(1), out=m[:d])
    torch.addmm(b1, keys, w_key.t(), out=m[d])
    q_aug = _buffer("q", (n, d + 1), cdt)
    q_aug[:, :d] = q
    q_aug[:, d] = 1
    if cdt != out_dtype:
        m = _buffer("m_c", (d + 1, tv, a), cdt).copy_(m)
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
            s3 = _buffer("s3", (nc * tv, 1), cdt)
            torch.mm(h2, w3.t(), out=s3)  # (nc*Tv, 1): faster than mv in bfloat16
            scores_v[c0:c1] = s3.view(nc, tv)
            continue
        h1 = _buffer("h1", (nc, tv * a), cdt)
        torch.mm(q_aug[c0:c1], m, out=h1)  # (nc, Tv*A): rows n, columns (t, a)
        h1.sigmoid_()
        h2 = _buffer("h2", (nc * tv, hidden), cdt)
        torch.addmm(b2, h1.view(nc * tv, a), w2t, out=h2)  # (nc*Tv, 40)
        h2.sigmoid_()
        if cdt == out_dtype:
            torch.mv(h2, w3v, out=scores_v[c0:c1].view(nc * tv))  # (nc*Tv,)
        else:
            s3 = _buffer("s3", (nc * tv,), cdt)
            torch.mv(h2, w3v, out=s3)  # (nc*Tv,)
            scores_v[c0:c1] = s3.view(nc, tv)
    scores_v += b3
    if idx is None:
        return scores_v  # (N, T)
    scores = q.new_zeros(n, t)
    scores.index_copy_(1, idx, scores_v)
    return scores  # (N, T)
