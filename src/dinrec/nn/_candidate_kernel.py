"""An optional C build of the float32 layers of :func:`dinrec.nn.candidate_scores.candidate_scores`.

Per chunk of candidates, into a per-call scratch buffer: one BLAS call for the first layer
(``sgemm_``, the one PyTorch links, found in ``libtorch_cpu``), one vectorised sigmoid pass
over it in place, one BLAS call for the second layer, and one fused pass that turns each
(candidate, position) row's 40 hidden pre-activations into its score,
``b3 + sum_j w3[j] sigmoid(h2[j] + b2[j])``, straight into the output: the second layer's
sigmoids are never written back, and there is no separate matrix-vector product. The
sigmoid is ``1 / (1 + 2^(-x log2 e))`` with a degree-5 polynomial for ``2^f`` (about
2e-7 relative; on AVX-512, ``vscalefps`` and a reciprocal estimate with one Newton step),
so scores equal the torch path's up to float round-off. ``candidate_first_layer_f32``
builds the first layer's per-position matrix in one pass (``torch.addcmul`` over the
broadcast shapes took ~0.25 ms).

Threads: built with ``-fopenmp`` where PyTorch's ``libgomp`` is loaded (the library's
``libgomp.so.1`` then resolves to that one, so there is one OpenMP runtime in the process
and the region runs on PyTorch's own thread team) and PyTorch's MKL exports
``MKL_Set_Num_Threads_Local`` (the by-value C entry; the lower-case one takes a pointer).
Each OpenMP thread scores an equal share of the candidates with its BLAS pinned to one
thread (set for that thread only, restored after). Otherwise one thread runs it all.

Built and cached like the GRU kernel (:func:`dinrec.nn._gru_kernel.compile_library`);
:func:`kernel` returns ``None`` where anything is missing, and
``DINREC_CANDIDATE_KERNEL=torch`` (or ``0`` / ``off`` / ``no``) turns it off. The caller
checks it against the torch ops once before use.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dinrec.nn._gru_kernel import C_COMMON, compile_library, find_compiler, torch_cpu_symbol

__all__ = ["CandidateKernel", "kernel"]

logger = logging.getLogger(__name__)

# Row-major arrays: q (N, D+1) the queries with a 1 appended, m (D+1, Tv*A), w2 (H, A),
# b2 (H,), w3 (H,), b3 (1,), out (N, Tv), work >= threads*chunk*Tv*(A + H) floats.
# In BLAS's column-major terms: layer 1 is h1^T (Tv*A, nc) = m^T (Tv*A, D+1) q^T (D+1, nc);
# layer 2 writes h2 as (H, R) row-major, i.e. column-major (R, H) = h1 (R, A) w2^T (A, H),
# so that the fused pass runs over contiguous rows for each hidden unit.
_SOURCE = C_COMMON + r"""
#ifdef _OPENMP
#include <omp.h>
#endif

typedef int (*set_threads_f)(int);

#define BLOCK 256

/* sigmoid(x) = 1 / (1 + 2^y), x clamped to [-87, 87] (NaN stays NaN), y = -x log2(e):
   2^y = 2^n 2^f with n = round(y), f = y - n in [-1/2, 1/2] (x log2(e) in two parts, so f
   is exact to about an ulp) and 2^f a degree-5 minimax polynomial (2.3e-7 relative):
   fewer steps than exp_f32. */
static inline float sigmoid_f32(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 87.0f ? 87.0f : x;
    const float y = x * -1.44269502162933349609375f;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float s = y + magic;
    const float nf = s - magic;
    float f = __builtin_fmaf(x, -1.44269502162933349609375f, -nf);
    f = __builtin_fmaf(x, -1.925963033500011e-08f, f);
    float p = 1.3276470e-3f;
    p = p * f + 9.6755419e-3f;
    p = p * f + 5.5507135e-2f;
    p = p * f + 2.4022120e-1f;
    p = p * f + 6.9314694e-1f;
    p = p * f + 1.0000001f;
    int32_t sb;
    memcpy(&sb, &s, 4);
    const int32_t bits = (sb - 0x4B400000 + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return 1.0f / (1.0f + p * scale);
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* sigmoid_f32 on 16 lanes, with 2^n applied by vscalefps and 1 / d by a reciprocal
   estimate and one Newton step (2^-28 relative): fewer steps than the compiler's own. */
static inline __m512 sigmoid16(__m512 x) {
    const __m512 lhi = _mm512_set1_ps(-1.44269502162933349609375f);
    /* the constant first: max / min return their second operand where one is NaN */
    x = _mm512_min_ps(_mm512_set1_ps(87.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
    const __m512 y = _mm512_mul_ps(x, lhi);
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fmsub_ps(x, lhi, n);
    f = _mm512_fmadd_ps(x, _mm512_set1_ps(-1.925963033500011e-08f), f);
    __m512 p = _mm512_set1_ps(1.3276470e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6755419e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507135e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314694e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001f));
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), one);
    const __m512 z = _mm512_rcp14_ps(d);
    return _mm512_fmadd_ps(_mm512_fnmadd_ps(d, z, one), z, z);
}
#define LANES 16
#else
#define LANES 1
#endif

/* h[i] = sigmoid(h[i]), i < len. */
static void sigmoid_inplace(float* h, int64_t len) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + LANES <= len; i += LANES)
        _mm512_storeu_ps(h + i, sigmoid16(_mm512_loadu_ps(h + i)));
#endif
#pragma omp simd
    for (int64_t k = i; k < len; ++k) h[k] = sigmoid_f32(h[k]);
}

/* acc[r] += w sigmoid(h[r] + b), r < nb. */
static void sigmoid_axpy(float* acc, const float* h, int64_t nb, float w, float b) {
    int64_t r = 0;
#if defined(__AVX512F__)
    const __m512 wv = _mm512_set1_ps(w), bv = _mm512_set1_ps(b);
    for (; r + LANES <= nb; r += LANES) {
        const __m512 s = sigmoid16(_mm512_add_ps(_mm512_loadu_ps(h + r), bv));
        _mm512_storeu_ps(acc + r, _mm512_fmadd_ps(wv, s, _mm512_loadu_ps(acc + r)));
    }
#endif
#pragma omp simd
    for (int64_t k = r; k < nb; ++k) acc[k] += w * sigmoid_f32(h[k] + b);
}

/* Candidates [0, n) of one thread, chunk candidates at a time. */
static void part(int64_t n, int64_t tv, int64_t d1, int64_t a, int64_t hid, const float* q,
                 const float* m, const float* w2, const float* b2, const float* w3,
                 const float* b3, float* out, float* work, int64_t chunk, gemm_f gemm) {
    const int64_t ta = tv * a;
    float* h1 = work;              /* (chunk, Tv*A) */
    float* h2 = work + chunk * ta; /* (H, chunk*Tv) */
    const float one = 1, zero = 0;
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t nc = c0 + chunk < n ? chunk : n - c0;
        const int64_t rows = nc * tv, len = nc * ta;
        gemm("N", "N", &ta, &nc, &d1, &one, m, &ta, q + c0 * d1, &d1, &zero, h1, &ta);
        sigmoid_inplace(h1, len);
        gemm("T", "N", &rows, &hid, &a, &one, h1, &a, w2, &a, &zero, h2, &rows);
        float* o = out + c0 * tv;
        for (int64_t r0 = 0; r0 < rows; r0 += BLOCK) {
            const int64_t nb = r0 + BLOCK < rows ? BLOCK : rows - r0;
            float acc[BLOCK];
            for (int64_t r = 0; r < nb; ++r) acc[r] = 0.0f;
            for (int64_t j = 0; j < hid; ++j) sigmoid_axpy(acc, h2 + j * rows + r0, nb, w3[j], b2[j]);
            for (int64_t r = 0; r < nb; ++r) o[r0 + r] = acc[r] + b3[0];
        }
    }
}

/* The per-position rows of the first layer's matrix, m (D+1, Tv, A) without its last row:
   m[i, t, j] = keys[t, i] wp[j, i] + wq[j, i] for i < D (keys (Tv, D), wq and wp (A, D)). */
void candidate_first_layer_f32(int64_t d, int64_t tv, int64_t a, const float* keys,
                               const float* wq, const float* wp, float* m) {
    float wqc[a], wpc[a];
    for (int64_t i = 0; i < d; ++i) {
        for (int64_t j = 0; j < a; ++j) {
            wqc[j] = wq[j * d + i];
            wpc[j] = wp[j * d + i];
        }
        for (int64_t t = 0; t < tv; ++t) {
            const float k = keys[t * d + i];
            float* row = m + (i * tv + t) * a;
#pragma omp simd
            for (int64_t j = 0; j < a; ++j) row[j] = k * wpc[j] + wqc[j];
        }
    }
}

int candidate_kernel_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The candidates split evenly over nthreads OpenMP threads (each with its own
   chunk*Tv*(A+H) floats of work), each thread's BLAS on one thread. */
void candidate_scores_f32(int64_t n, int64_t tv, int64_t d1, int64_t a, int64_t hid,
                          const float* q, const float* m, const float* w2, const float* b2,
                          const float* w3, const float* b3, float* out, float* work,
                          int64_t chunk, int64_t nthreads, gemm_f gemm, set_threads_f set_threads) {
    const int64_t per = chunk * tv * (a + hid);
#ifdef _OPENMP
#pragma omp parallel num_threads((int)nthreads) if (nthreads > 1)
    {
        const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
#else
    {
        const int64_t nt = 1, id = 0;
        (void)nthreads;
#endif
        const int64_t c0 = n * id / nt, c1 = n * (id + 1) / nt;
        const int prev = set_threads ? set_threads(1) : 0;
        if (c1 > c0)
            part(c1 - c0, tv, d1, a, hid, q + c0 * d1, m, w2, b2, w3, b3, out + c0 * tv,
                 work + id * per, chunk, gemm);
        if (set_threads) set_threads(prev);
    }
}

#undef BLOCK
#undef LANES
"""

#: Polynomials as fused multiply-adds (``-std=c99`` alone turns contraction off).
_FLAGS = ("-ffp-contract=fast",)

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


@dataclass(frozen=True)
class CandidateKernel:
    """The loaded library. ``parallel``: built with OpenMP on PyTorch's own ``libgomp`` (one
    OpenMP runtime in the process) and with a thread-local MKL setting, so one call can
    split its candidates over several threads, each with a one-thread BLAS."""

    lib: ctypes.CDLL
    gemm: int
    set_threads: int | None
    parallel: bool

    def scores(self, n: int, tv: int, d1: int, a: int, hid: int, q: int, m: int, w2: int,
               b2: int, w3: int, b3: int, out: int, work: int, chunk: int, threads: int) -> None:
        """Raw pointers (contiguous float32 data, shapes as in ``_SOURCE``; ``work`` holds
        ``threads * chunk * tv * (a + hid)`` floats) -> ``out`` filled."""
        threads = threads if self.parallel else 1
        self.lib.candidate_scores_f32(n, tv, d1, a, hid, q, m, w2, b2, w3, b3, out, work, chunk,
                                      threads, self.gemm, self.set_threads if self.parallel else None)


    def first_layer(self, d: int, tv: int, a: int, keys: int, wq: int, wp: int, m: int) -> None:
        """Raw pointers: keys (Tv, D), wq / wp (A, D) -> m[:D] of m (D+1, Tv, A) filled."""
        self.lib.candidate_first_layer_f32(d, tv, a, keys, wq, wp, m)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` (a build of ``_SOURCE``) with its functions' argument types set."""
    fn = lib.candidate_scores_f32
    fn.restype = None
    fn.argtypes = [_I64] * 5 + [_PTR] * 8 + [_I64] * 2 + [_PTR] * 2
    lib.candidate_first_layer_f32.restype = None
    lib.candidate_first_layer_f32.argtypes = [_I64] * 3 + [_PTR] * 4
    lib.candidate_kernel_openmp.restype = ctypes.c_int
    return lib


def _gomp_paths() -> set[str]:
    """The ``libgomp`` files mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if "libgomp" in line}
    except OSError:
        return set()


def _load() -> CandidateKernel:
    compiler = find_compiler()
    gemm = torch_cpu_symbol("sgemm_")
    try:  # the by-value C entry; the lower-case one takes a pointer
        set_threads: int | None = torch_cpu_symbol("MKL_Set_Num_Threads_Local")
    except AttributeError:  # not MKL: one thread, the BLAS threads as it likes
        set_threads = None
    # OpenMP only where PyTorch's libgomp.so.1 is already loaded: the library's libgomp.so.1
    # then resolves to it (same soname), and the parallel region runs on PyTorch's thread team.
    # (Other wheels' copies, e.g. scikit-learn's, carry hashed sonames and do not interfere.)
    before = _gomp_paths()
    path = None
    if any(Path(x).name == "libgomp.so.1" for x in before) and set_threads is not None:
        try:
            path = compile_library(_SOURCE, "candidate_kernel", compiler, ("-fopenmp", *_FLAGS))
        except RuntimeError:
            path = None
    if path is None:
        path = compile_library(_SOURCE, "candidate_kernel", compiler, _FLAGS)
    lib = bind(ctypes.CDLL(str(path)))
    parallel = bool(lib.candidate_kernel_openmp()) and _gomp_paths() == before
    if bool(lib.candidate_kernel_openmp()) and not parallel:  # pragma: no cover - a second runtime
        logger.warning("the C candidate kernel loaded a second libgomp; it runs on one thread")
    return CandidateKernel(lib, gemm, set_threads, parallel)


@functools.cache
def kernel() -> CandidateKernel | None:
    """The compiled kernel, or ``None`` (then the torch ops run); built once per process."""
    if os.environ.get("DINREC_CANDIDATE_KERNEL", "").lower() in ("0", "off", "no", "torch"):
        return None
    try:
        return _load()
    except Exception as exc:  # no compiler, no BLAS symbol, unsupported platform ...
        logger.info("C candidate kernel unavailable (%s); the torch ops run instead", exc)
        return None
