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

* **An optional C build of the float32 layers** (:mod:`dinrec.nn._candidate_kernel`):
  the first layer's matrix built in one pass, then per chunk of candidates (about
  ``C_CHUNK_ROWS`` pairs) one ``sgemm`` per layer, one vectorised sigmoid pass, and one
  fused pass from the second layer's pre-activations to the scores (no write-back of its
  sigmoids, no separate product with ``w3``). With ``torch.get_num_threads()`` threads
  (from ``C_SPLIT_ROWS`` pairs on) the candidates are split over PyTorch's own OpenMP
  team, each thread's BLAS on one thread. It is checked against the torch ops once per
  process before use; ``DINREC_CANDIDATE_KERNEL=torch`` or ``impl="torch"`` runs the
  torch ops, as do bfloat16 and float64. Measured on a 2-core Zen4, T = 100, N = 1000:
  8.9 ms against 10.9 ms on one thread, 4.9 ms against 6.2 ms on two.

The last layer's bias is added to every score of a row, which softmax ignores, but it
is kept so the raw scores (``softmax=False``) are the reference's too.
"""

from __future__ import annotations

import functools
import logging
import threading

import torch
from torch import Tensor

from dinrec.nn import _candidate_kernel
from dinrec.nn._candidate_kernel import CandidateKernel

logger = logging.getLogger(__name__)

#: About this many (position, candidate) pairs per chunk: ~2 MB per float32 layer.
CHUNK_ROWS: int = 16384
#: The C build's chunk (per thread). Measured on Zen4 (1 MB L2 per core), N = 1000, T = 100,
#: 2 threads: 5.8 ms at 2048 pairs, 5.5 at 4096, 5.2 at 8192 and 16384 (larger GEMMs).
C_CHUNK_ROWS: int = 8192
#: The C build splits the candidates over the torch threads from this many pairs on
#: (measured: a gain from about 5,000 pairs, none at 3,000).
C_SPLIT_ROWS: int = 4096

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
    impl: str = "auto",
) -> Tensor:
    """Raw attention scores of every (candidate, position) pair, no autograd.

    Args:
        q: ``(N, D)`` projected candidate queries.
        history: ``(T, D)`` the shared facts.
        valid: ``(T,)`` bool, or ``None`` for all positions.
        w_query, w_key, w_prod: ``(A, D)`` each: ``W_q + W_d``, ``W_k - W_d``, ``W_p``.
        b1: ``(A,)``; w2 ``(40, A)``, b2 ``(40,)``; w3 ``(1, 40)``, b3 ``(1,)``.
        compute_dtype: dtype of the GEMMs and sigmoids (default: ``q``'s dtype).
        chunk_rows: about this many pairs per chunk (the C build takes at most
            ``C_CHUNK_ROWS``).
        impl: ``"auto"`` (the C build for float32 where it is available) or ``"torch"``.

    Returns:
        ``(N, T)`` scores in ``q``'s dtype; padded positions (when some are valid)
        hold 0 and must be masked by the caller.
    """
    ck = None
    if impl not in ("auto", "torch"):
        raise ValueError(f"impl must be 'auto' or 'torch', not {impl!r}")
    if (impl == "auto" and q.dtype == torch.float32 and q.device.type == "cpu"
            and compute_dtype in (None, torch.float32)):
        ck = _c_kernel()  # every other input is cast to q's dtype and is on q's device
    return _candidate_scores(q, history, valid, w_query, w_key, w_prod, b1, w2, b2, w3, b3,
                             compute_dtype, chunk_rows, ck)


def _candidate_scores(
    q: Tensor, history: Tensor, valid: Tensor | None, w_query: Tensor, w_key: Tensor,
    w_prod: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
    compute_dtype: torch.dtype | None, chunk_rows: int, ck: CandidateKernel | None,
) -> Tensor:
    """:func:`candidate_scores` with the C build ``ck`` (float32 CPU only) or the torch ops."""
    n, d = q.shape
    t = history.shape[0]
    a = w_query.shape[0]
    out_dtype, dev = q.dtype, q.device
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
    m = _buffer("m", (d + 1, tv, a), out_dtype, dev)
    if ck is not None:
        keys, w_query, w_prod = (x.contiguous() for x in (keys, w_query, w_prod))
        ck.first_layer(d, tv, a, keys.data_ptr(), w_query.data_ptr(), w_prod.data_ptr(), m.data_ptr())
    else:
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
    if ck is not None:
        _c_layers(ck, q_aug, m, w2, b2, w3v, b3, scores_v, min(chunk_rows, C_CHUNK_ROWS))
        return _expand(scores_v, idx, t)
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


# --------------------------------------------------------------------------- C build
def _c_layers(ck: CandidateKernel, q_aug: Tensor, m: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
              b3: Tensor, out: Tensor, chunk_rows: int) -> None:
    """out (N, Tv) = layers 1-3 of q_aug (N, D+1) against m (D+1, Tv*A), in C."""
    n, tv = out.shape
    d1 = q_aug.shape[1]
    hid, a = w2.shape
    w2, b2, w3, b3 = (x.contiguous() for x in (w2, b2, w3, b3))
    threads = min(torch.get_num_threads(), n) if n * tv >= C_SPLIT_ROWS else 1
    chunk = max(1, min(-(-n // threads), chunk_rows // max(tv, 1)))  # candidates per chunk
    work = _buffer("c_work", (threads * chunk * tv * (a + hid),), torch.float32, out.device)
    ck.scores(n, tv, d1, a, hid, q_aug.data_ptr(), m.data_ptr(), w2.data_ptr(), b2.data_ptr(),
              w3.data_ptr(), b3.data_ptr(), out.data_ptr(), work.data_ptr(), chunk, threads)


@functools.cache
def _c_kernel() -> CandidateKernel | None:
    """The C build (:mod:`dinrec.nn._candidate_kernel`) once it has reproduced the torch ops
    on a small problem; ``None`` where it is unavailable."""
    k = _candidate_kernel.kernel()
    if k is None:
        return None
    try:
        ok = _c_kernel_agrees(k)
    except Exception as exc:  # pragma: no cover - a broken build
        logger.warning("the C candidate kernel failed its self-check (%s); it stays off", exc)
        return None
    if not ok:
        logger.warning("the C candidate kernel disagrees with the torch ops; it stays off")
    return k if ok else None


def _c_kernel_agrees(k: CandidateKernel) -> bool:
    gen = torch.Generator().manual_seed(0)
    n, t, d, a, hid = 9, 7, 5, 6, 4
    q, history, w_query, w_key, w_prod, b1, w2, b2, w3, b3 = (
        torch.randn(*shape, generator=gen) for shape in
        ((n, d), (t, d), (a, d), (a, d), (a, d), (a,), (hid, a), (hid,), (1, hid), (1,))
    )  # fmt: skip
    valid = torch.arange(t) % 3 != 1
    args = (q, history, valid, w_query, w_key, w_prod, b1, w2, b2, w3, b3, None)
    with torch.no_grad():
        for rows in (CHUNK_ROWS, 10):  # one chunk and several, one thread and two
            want = _candidate_scores(*args, rows, None)
            got = _candidate_scores(*args, rows, k)
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                return False
    return True
