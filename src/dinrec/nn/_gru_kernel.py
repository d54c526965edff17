"""An optional C build of the fused GRU loops in :mod:`dinrec.nn.rnn` (CPU, float32 / float64).

The TorchScript loops pay a few microseconds of dispatch for each of their small ops,
and the backward pass reads and writes a dozen (T, B, H) temporaries around its loop.
Here each step is one BLAS call (``sgemm_`` / ``dgemm_``, the ones PyTorch itself links,
found in ``libtorch_cpu``) plus one pass over the step's (B, H) values while they are in
cache; the backward computes its per-step coefficients inside the loop. Same buffers, same
meaning, same values up to float round-off (``tests/test_rnn.py`` checks both builds
against the literal autograd cell).

The source is compiled on first use with the system C compiler (``$CC``, ``cc``, ``gcc``
or ``clang``; about a second) into ``$XDG_CACHE_HOME/dinrec`` (or the temp directory),
keyed by the source, the compiler, its flags and the CPU, then loaded with ``ctypes``.
Where anything is missing (no compiler, no exported BLAS symbol, not Linux/macOS, a failed
self-check), :func:`kernel` returns ``None`` and the TorchScript loops run instead.
``DINREC_GRU_KERNEL=torchscript`` turns the C build off. The build, cache and BLAS
helpers (:func:`compile_library`, :func:`find_compiler`, :func:`torch_cpu_symbol`,
``C_COMMON``) serve the other C kernels too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["C_COMMON", "GRUKernel", "compile_library", "find_compiler", "kernel", "torch_cpu_symbol"]

logger = logging.getLogger(__name__)

# One template, instantiated for float and double. Arrays are row-major and time-major:
#   xi (T, B, 3H)  input projections, gate order (n, r, z), biases b_ih included
#   shift (3H,)    b_hh - W_hh 1, order (r, z, n)
#   g (T, B, 4H)   per step [s, r, z, W_hn h + b_hn], s = (1 + n) / 2 (the forward writes it)
#   us (T + 1, B, H) u = (1 + h) / 2: u0, then the state after each step
#   c0, c1 (T, B)  candidate fraction f = c0 + c1 z
#   w2 (3H, H)     2 W_hh (the forward), w (3H, H) W_hh (the backward)
# BLAS is column-major: a row-major (R, C) matrix with row stride ld is the column-major
# (C, R) matrix with leading dimension ld, so row-major Y = X W^T is Y^T = W X^T.
# The prelude shared with the other C kernels (:mod:`dinrec.nn._candidate_kernel`): the BLAS
# gemm signature and exp without libm.
C_COMMON = r"""
#include <stdint.h>
#include <string.h>

typedef void (*gemm_f)(const char*, const char*, const int64_t*, const int64_t*, const int64_t*,
                       const void*, const void*, const int64_t*, const void*, const int64_t*,
                       const void*, void*, const int64_t*);

/* exp(x) without libm, written so that the compiler vectorises it: Cody-Waite range
   reduction and the Cephes polynomials (about 1 ulp), 2^n built in the exponent bits. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 87.0f ? 87.0f : x;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float t = x * 1.44269504088896341f + magic;
    int32_t tb, mb;
    memcpy(&tb, &t, 4);
    memcpy(&mb, &magic, 4);
    const int32_t n = tb - mb;
    const float nf = t - magic;
    float r = x - nf * 0.693359375f;
    r = r + nf * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static inline double exp_f64(double x) {
    x = x < -700.0 ? -700.0 : x;
    x = x > 700.0 ? 700.0 : x;
    const double magic = 6755399441055744.0; /* 1.5 * 2^52 */
    double t = x * 1.4426950408889634073599 + magic;
    int64_t tb, mb;
    memcpy(&tb, &t, 8);
    memcpy(&mb, &magic, 8);
    const int64_t n = tb - mb;
    const double nf = t - magic;
    double r = x - nf * 6.93145751953125e-1;
    r = r - nf * 1.42860682030941723212e-6;
    const double rr = r * r;
    double p = 1.26177193074810590878e-4;
    p = p * rr + 3.02994407707441961300e-2;
    p = p * rr + 9.99999999999999999910e-1;
    p = p * r;
    double q = 3.00198505138664455042e-6;
    q = q * rr + 2.52448340349684104192e-3;
    q = q * rr + 2.27265548208155028766e-1;
    q = q * rr + 2.00000000000000000009e0;
    const double e = 1.0 + 2.0 * (p / (q - p));
    const int64_t bits = (n + 1023) << 52;
    double scale;
    memcpy(&scale, &bits, 8);
    return e * scale;
}
"""

# The kernels, once per real type. Each forward step's elementwise work runs over the first
# H - H % 16 columns of every row in place, then over the last H % 16 columns of all rows
# gathered into short contiguous lanes (``PACK`` at a time): a row's last few columns
# would otherwise fall to a slow scalar loop of three exp each (H = 36 is 2 x 16 + 4).
_KERNELS = r"""
#define PACK 256

static inline real sigmoid_SUF(real x) { return (real)1 / ((real)1 + EXP(-x)); }

/* One forward element: gates from their pre-activations, u' = u + f (s - u). */
static inline void fwd_SUF(real xn, real pr, real pz, real gn, real u, real a0, real a1,
                           real* s_o, real* r_o, real* z_o, real* u_o) {
    const real r = sigmoid_SUF(pr);
    const real z = sigmoid_SUF(pz);
    const real s = sigmoid_SUF(2 * xn + 2 * r * gn); /* (1 + tanh(x_n + r gn)) / 2 */
    const real f = a0 + a1 * z;
    *u_o = u + f * (s - u);
    *s_o = s;
    *r_o = r;
    *z_o = z;
}

void gru_forward_SUF(int64_t T, int64_t B, int64_t H, const real* xi, const real* shift,
                     const real* c0, const real* c1, const real* w2, real* g, real* us,
                     gemm_f gemm) {
    const int64_t m = 3 * H, k = H, lda = H, ldb = H, ldc = 4 * H;
    const int64_t h16 = H - H % 16, tail = H - h16;
    const real one = 1;
    real px[PACK], pr[PACK], pz[PACK], pg[PACK], pu[PACK], pa0[PACK], pa1[PACK];
    real os[PACK], orr[PACK], oz[PACK], ou[PACK];
    for (int64_t t = 0; t < T; ++t) {
        real* gt = g + t * B * 4 * H;
        const real* xt = xi + t * B * 3 * H;
        const real* ca = c0 + t * B;
        const real* cb = c1 + t * B;
        for (int64_t b = 0; b < B; ++b) {
            real* gr = gt + b * 4 * H;
            const real* xr = xt + b * 3 * H;
            for (int64_t j = 0; j < 2 * H; ++j) gr[H + j] = xr[H + j] + shift[j];
            for (int64_t j = 0; j < H; ++j) gr[3 * H + j] = shift[2 * H + j];
        }
        const real* u = us + t * B * H;
        real* un = us + (t + 1) * B * H;
        /* g_t[:, H:] += u (2 W_hh)^T */
        gemm("T", "N", &m, &B, &k, &one, w2, &lda, u, &ldb, &one, gt + H, &ldc);
        for (int64_t b = 0; b < B; ++b) {
            real* gr = gt + b * 4 * H;
            const real* xr = xt + b * 3 * H;
            const real* ub = u + b * H;
            real* unb = un + b * H;
            const real a0 = ca[b], a1 = cb[b];
#pragma omp simd
            for (int64_t j = 0; j < h16; ++j)
                fwd_SUF(xr[j], gr[H + j], gr[2 * H + j], gr[3 * H + j], ub[j], a0, a1,
                        &gr[j], &gr[H + j], &gr[2 * H + j], &unb[j]);
        }
        if (tail == 0) continue;
        for (int64_t b0 = 0; b0 < B; b0 += PACK / tail) {
            const int64_t b1 = b0 + PACK / tail < B ? b0 + PACK / tail : B;
            int64_t n = 0;
            for (int64_t b = b0; b < b1; ++b)
                for (int64_t j = h16; j < H; ++j, ++n) {
                    const real* gr = gt + b * 4 * H;
                    px[n] = xt[b * 3 * H + j];
                    pr[n] = gr[H + j];
                    pz[n] = gr[2 * H + j];
                    pg[n] = gr[3 * H + j];
                    pu[n] = u[b * H + j];
                    pa0[n] = ca[b];
                    pa1[n] = cb[b];
                }
#pragma omp simd
            for (int64_t i = 0; i < n; ++i)
                fwd_SUF(px[i], pr[i], pz[i], pg[i], pu[i], pa0[i], pa1[i], &os[i], &orr[i], &oz[i], &ou[i]);
            n = 0;
            for (int64_t b = b0; b < b1; ++b)
                for (int64_t j = h16; j < H; ++j, ++n) {
                    real* gr = gt + b * 4 * H;
                    gr[j] = os[n];
                    gr[H + j] = orr[n];
                    gr[2 * H + j] = oz[n];
                    un[b * H + j] = ou[n];
                }
        }
    }
}

/* One backward element: the four per-step gradients [d x_n, d x_r, d x_z, d gh_n] of
   h' = h + f (n - h) for dh = dL/dh', the carried part of dL/dh, h_prev, and
   d_f = dL/df (the caller sums d_f and d_f z over the row into d_c0, d_c1). */
static inline void bwd_SUF(real s, real r, real z, real gn, real up, real dv, real go,
                           real a0, real a1, real* d0, real* d1, real* d2, real* d3,
                           real* hp, real* nx, real* df_o) {
    const real f = a0 + a1 * z;
    const real an = 4 * f * s * (1 - s) * dv; /* f (1 - n^2) dh, n = 2 s - 1 */
    const real df = dv * 2 * (s - up);        /* dh (n - h_prev) */
    *d0 = an;
    *d1 = an * gn * r * (1 - r);
    *d2 = z * (1 - z) * a1 * df;
    *d3 = an * r;
    *hp = 2 * up - 1;
    *nx = go + dv * (1 - f);
    *df_o = df;
}

void gru_backward_SUF(int64_t T, int64_t B, int64_t H, const real* g, const real* us,
                      const real* c0, const real* c1, const real* g_out, const real* w,
                      real* d, real* h_prev, real* d_c0, real* d_c1, real* d_h0, real* work,
                      gemm_f gemm) {
    real* dh = work;
    real* nxt = work + B * H;
    real* zeros = work + 2 * B * H;
    memset(zeros, 0, sizeof(real) * B * H);
    memcpy(dh, g_out + (T - 1) * B * H, sizeof(real) * B * H);
    const int64_t m = H, k = 3 * H, lda = H, ldb = 4 * H, ldc = H;
    const real one = 1;
    for (int64_t t = T - 1; t >= 0; --t) {
        const real* gt = g + t * B * 4 * H;
        const real* ut = us + t * B * H;       /* u_{t-1}: us[0] is u0 */
        const real* got = t > 0 ? g_out + (t - 1) * B * H : zeros;
        real* dt = d + t * B * 4 * H;
        real* hpt = h_prev + t * B * H;
        for (int64_t b = 0; b < B; ++b) {
            const int64_t row = t * B + b;
            const real* gr = gt + b * 4 * H;
            real* dr = dt + b * 4 * H;
            const real a0 = c0[row], a1 = c1[row];
            real acc0 = 0, acc1 = 0;
            /* No transcendental here: a plain scalar epilogue is cheaper than packing. */
#pragma omp simd reduction(+:acc0, acc1)
            for (int64_t j = 0; j < H; ++j) {
                real df;
                bwd_SUF(gr[j], gr[H + j], gr[2 * H + j], gr[3 * H + j], ut[b * H + j], dh[b * H + j],
                        got[b * H + j], a0, a1, &dr[j], &dr[H + j], &dr[2 * H + j], &dr[3 * H + j],
                        &hpt[b * H + j], &nxt[b * H + j], &df);
                acc0 += df;
                acc1 += df * gr[2 * H + j];
            }
            d_c0[row] = acc0;
            d_c1[row] = acc1;
        }
        /* dh_{t-1} = g_out_{t-1} + dh_t (1 - f_t) + d gh_t W_hh */
        gemm("N", "N", &m, &B, &k, &one, w, &lda, dt + H, &ldb, &one, nxt, &ldc);
        real* tmp = dh;
        dh = nxt;
        nxt = tmp;
    }
    memcpy(d_h0, dh, sizeof(real) * B * H);
}

#undef PACK
"""

_SOURCE = (
    C_COMMON
    + _KERNELS.replace("real", "float").replace("SUF", "f32").replace("EXP", "exp_f32")
    + _KERNELS.replace("real", "double").replace("SUF", "f64").replace("EXP", "exp_f64")
)

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


@dataclass(frozen=True)
class GRUKernel:
    """The loaded library: ``forward`` and ``backward`` for float32 and float64 CPU tensors."""

    lib: ctypes.CDLL
    gemm: dict[torch.dtype, int]

    def forward(
        self, xi: Tensor, shift: Tensor, c0: Tensor, c1: Tensor, w2: Tensor, u0: Tensor
    ) -> tuple[Tensor, Tensor]:
        """xi (T, B, 3H) (n, r, z), shift (3H,), c0 / c1 (T, B, 1), w2 (3H, H), u0 (B, H)
        -> g (T, B, 4H), us (T + 1, B, H), as the TorchScript loop leaves them."""
        steps, b, three_h = xi.shape
        hid = three_h // 3
        g = xi.new_empty(steps, b, 4 * hid)
        us = xi.new_empty(steps + 1, b, hid)
        us[0] = u0
        fn = self.lib.gru_forward_f32 if xi.dtype == torch.float32 else self.lib.gru_forward_f64
        args = [xi, shift, c0, c1, w2]
        _check(args)
        fn(steps, b, hid, *(t.data_ptr() for t in args), g.data_ptr(), us.data_ptr(), self.gemm[xi.dtype])
        return g, us

    def backward(
        self, g_out: Tensor, us: Tensor, g: Tensor, c0: Tensor, c1: Tensor, w_hh: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """g_out (T, B, H) -> d (T, B, 4H), h_prev (T, B, H), d_c0 / d_c1 (T, B, 1), d_h0 (B, H)."""
        steps, b, hid = g_out.shape
        d = g.new_empty(steps, b, 4 * hid)
        h_prev = g.new_empty(steps, b, hid)
        d_c0 = g.new_empty(steps, b, 1)
        d_c1 = g.new_empty(steps, b, 1)
        d_h0 = g.new_empty(b, hid)
        work = g.new_empty(3, b, hid)
        fn = self.lib.gru_backward_f32 if g.dtype == torch.float32 else self.lib.gru_backward_f64
        args = [g, us, c0, c1, g_out, w_hh]
        _check(args)
        outs = (d, h_prev, d_c0, d_c1, d_h0, work)
        fn(steps, b, hid, *(t.data_ptr() for t in (*args, *outs)), self.gemm[g.dtype])
        return d, h_prev, d_c0, d_c1, d_h0


def _check(tensors: list[Tensor]) -> None:
    for t in tensors:
        if not t.is_contiguous():  # pragma: no cover - the callers pass contiguous tensors
            raise ValueError("the C GRU kernel needs contiguous tensors")


def supports(*tensors: Tensor) -> bool:
    """Whether the C kernel can run on these tensors (CPU, float32 or float64, one dtype)."""
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.float64) and all(
        t.device.type == "cpu" and t.dtype == dtype for t in tensors
    )


def _cpu_id() -> str:
    """What the compiled code depends on besides its source: the CPU (``-march=native``)."""
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features", "CPU part")):
                    info += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return info


def _private_dir(path: Path) -> Path:
    """``path``, created if needed, provided it belongs to this user and no one else can
    write to it (a shared library is loaded from it)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise RuntimeError(f"{path} is not a private directory")
    return path


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    try:
        path = _private_dir(Path(base) / "dinrec")
        if os.access(path, os.W_OK):
            return path
    except (OSError, RuntimeError):
        pass
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return _private_dir(Path(tempfile.gettempdir()) / f"dinrec-{user}")


def compile_library(source: str, stem: str, compiler: str, extra: tuple[str, ...] = ()) -> Path:
    """``source`` compiled into a shared library in the private cache (reused when there),
    keyed by the source, the compiler, its flags and the CPU; the best flags that work,
    each time with the ``extra`` ones (e.g. ``-fopenmp``)."""
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    for flags in (["-O3", "-march=native", "-fopenmp-simd"], ["-O3", "-fopenmp-simd"], ["-O3"]):
        args = [*flags, *extra, "-fPIC", "-shared", "-std=c99"]
        key = hashlib.sha256("\0".join([source, compiler, *args, _cpu_id()]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"{stem}_{key}{suffix}"
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(suffix=suffix, dir=target.parent)
        os.close(fd)
        src = Path(tmp).with_suffix(".c")
        src.write_text(source)
        try:
            proc = subprocess.run(
                [compiler, *args, str(src), "-o", tmp], capture_output=True, text=True, timeout=120
            )
            if proc.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent processes may compile too
                return target
            logger.debug("C kernel %s: %s %s failed: %s", stem, compiler, " ".join(flags), proc.stderr[-2000:])
        finally:
            src.unlink(missing_ok=True)
            Path(tmp).unlink(missing_ok=True)
    raise RuntimeError(f"{compiler} could not compile {stem}")


def find_compiler() -> str:
    """``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on the PATH."""
    compiler = os.environ.get("CC") or next(
        (c for c in ("cc", "gcc", "clang") if shutil.which(c)), None
    )
    if compiler is None:
        raise RuntimeError("no C compiler")
    return compiler


def torch_cpu_symbol(name: str) -> int:
    """The address of ``name`` exported by PyTorch's CPU library (``RuntimeError`` / ``AttributeError``
    where there is no such library or symbol)."""
    if sys.byteorder != "little":
        raise RuntimeError("big-endian machine")
    lib_dir = Path(torch.__file__).parent / "lib"
    names = {"linux": "libtorch_cpu.so", "darwin": "libtorch_cpu.dylib"}
    lib_name = names.get(sys.platform)
    if lib_name is None or not (lib_dir / lib_name).exists():
        raise RuntimeError(f"no libtorch_cpu for {sys.platform}")
    lib = ctypes.CDLL(str(lib_dir / lib_name))
    return ctypes.cast(getattr(lib, name), _PTR).value  # AttributeError if not exported


def _blas() -> dict[torch.dtype, int]:
    """Addresses of the Fortran ``sgemm_`` / ``dgemm_`` that PyTorch's CPU library exports.

    Integer arguments are passed as int64: a 32-bit (LP64) BLAS reads their low half,
    which on a little-endian machine is the same value.
    """
    return {torch.float32: torch_cpu_symbol("sgemm_"), torch.float64: torch_cpu_symbol("dgemm_")}


def _load() -> GRUKernel:
    compiler = find_compiler()
    gemm = _blas()
    lib = ctypes.CDLL(str(compile_library(_SOURCE, "gru_kernel", compiler)))
    for suf in ("f32", "f64"):
        fwd = getattr(lib, f"gru_forward_{suf}")
        fwd.restype = None
        fwd.argtypes = [_I64] * 3 + [_PTR] * 8
        bwd = getattr(lib, f"gru_backward_{suf}")
        bwd.restype = None
        bwd.argtypes = [_I64] * 3 + [_PTR] * 13
    return GRUKernel(lib, gemm)


@functools.cache
def kernel() -> GRUKernel | None:
    """The compiled kernel, or ``None`` (then the TorchScript loops run); built once per process."""
    if os.environ.get("DINREC_GRU_KERNEL", "").lower() in ("0", "off", "no", "torchscript"):
        return None
    try:
        k = _load()
    except Exception as exc:  # no compiler, no BLAS symbol, unsupported platform ...
        logger.info("C GRU kernel unavailable (%s); the TorchScript loops run instead", exc)
        return None
    return k
