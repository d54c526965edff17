"""The inference kernel for N candidates against one history (nn/candidate_scores.py),
checked against the row-by-row attention with the history repeated N times."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dinrec.nn import candidate_scores as cs
from dinrec.nn.attention import DinFcnAttention, _project_query, _split_first_layer
from dinrec.nn.mlp import MLP


def _unit(q: int, d: int, a: int = 16, seed: int = 0, **kw) -> DinFcnAttention:
    g = torch.Generator().manual_seed(seed)
    unit = DinFcnAttention(q, d, a, **kw).double()
    with torch.no_grad():
        for p in unit.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return unit


def _case(n: int, t: int, q: int = 5, d: int = 8, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    cands = torch.randn(n, q, generator=g, dtype=torch.float64)
    history = torch.randn(t, d, generator=g, dtype=torch.float64)
    return cands, history


MASKS = {
    "gaps": lambda t: torch.arange(t) % 3 != 1,  # padding between valid positions too
    "tail": lambda t: torch.arange(t) < t - 2,
    "none_valid": lambda t: torch.zeros(t, dtype=torch.bool),
    "all_valid": lambda t: torch.ones(t, dtype=torch.bool),
    "int": lambda t: (torch.arange(t) < 4).long() * 1,
    "no_mask": lambda t: None,
}


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize(("mode", "softmax", "for_cnn"), [
    ("SUM", True, False), ("LIST", True, False), ("SUM", False, False), ("SUM", True, True),
])
def test_inference_kernel_equals_repeated_rows(mask_kind, mode, softmax, for_cnn):
    n, t = 23, 9
    cands, history = _case(n, t)
    mask = MASKS[mask_kind](t)
    unit = _unit(5, 8, mode=mode, softmax=softmax, for_cnn=for_cnn)
    with torch.inference_mode():  # the kernel path (no autograd)
        out, alphas = unit.score_candidates(cands, history, mask, return_alphas=True)
        rows_mask = None if mask is None else mask.expand(n, t)
        want, want_alphas = unit(cands, history.expand(n, t, 8), rows_mask, return_alphas=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(alphas, want_alphas)


def test_kernel_chunks_and_valid_positions_match_the_autograd_form():
    """Many chunks (chunk_rows tiny) and the valid-only compaction give the same scores."""
    n, t, d = 37, 11, 8
    cands, history = _case(n, t, d=d)
    unit = _unit(5, d)
    w = unit.weights()
    valid = torch.arange(t) % 4 != 0
    with torch.no_grad():
        q = _project_query(cands, w)
        wq, wk, wp = _split_first_layer(w, d)
        args = (q, history, valid, wq, wk, wp, w.att1_bias, w.att2_weight, w.att2_bias,
                w.att3_weight, w.att3_bias)
        full = cs.candidate_scores(*args[:2], None, *args[3:], chunk_rows=10**6)  # (N, T)
        for rows in (1, 7, 50, 10**6):
            got = cs.candidate_scores(*args, chunk_rows=rows)
            torch.testing.assert_close(got[:, valid], full[:, valid])
            assert (got[:, ~valid] == 0).all()
        # The reference first layer, written out: [q, k, q-k, q*k] @ W1 -> sigmoid -> ...
        qq, kk = q[:, None, :].expand(n, t, d), history[None].expand(n, t, d)
        din = torch.cat([qq, kk, qq - kk, qq * kk], -1)
        h = torch.sigmoid(din @ w.att1_weight.t() + w.att1_bias)
        h = torch.sigmoid(h @ w.att2_weight.t() + w.att2_bias)
        torch.testing.assert_close(full, (h @ w.att3_weight.t() + w.att3_bias).squeeze(-1))


def test_results_never_alias_the_reused_buffers():
    unit = _unit(5, 8, softmax=False, for_cnn=True)
    cands, history = _case(1, 6)  # N = 1: the transposed scores are already contiguous
    with torch.inference_mode():
        first = unit.score_candidates(cands, history, None).clone()
        kept = unit.score_candidates(cands, history, None)
        unit.score_candidates(cands * 3, history + 1, None)
    torch.testing.assert_close(kept, first)


def test_buffers_are_reused_and_per_thread():
    unit = _unit(5, 8)
    cands, history = _case(20, 6)
    cs.clear_buffers()
    with torch.inference_mode():
        unit.score_candidates(cands, history)
        ptrs = {k: v.data_ptr() for k, v in cs._local.buffers.items()}
        unit.score_candidates(cands[:10], history[:4])  # smaller: same memory
    with torch.no_grad():  # buffers made in inference mode still work outside it
        unit.score_candidates(cands, history)
    assert {k: v.data_ptr() for k, v in cs._local.buffers.items()} == ptrs

    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        with torch.inference_mode():
            for _ in range(20):
                results[i] = unit.score_candidates(cands * (i + 1), history)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    with torch.inference_mode():
        for i in range(3):
            torch.testing.assert_close(results[i], unit.score_candidates(cands * (i + 1), history))


@pytest.mark.parametrize("fused", [True, False])
def test_bfloat16_compute_is_close_to_float32(fused, monkeypatch):
    if not fused:  # the separate-ops fallback (torch without oneDNN's fused linear)
        monkeypatch.setattr(cs, "_FUSED", False)
    elif cs._fused_linear_sigmoid() is None:
        pytest.skip("this torch has no oneDNN fused linear")
    n, t = 200, 50
    cands, history = (x.float() for x in _case(n, t, q=16, d=16))
    unit = _unit(16, 16, 36).float()
    mask = torch.arange(t) < 40
    with torch.inference_mode():
        out, alphas = unit.score_candidates(cands, history, mask, return_alphas=True)
        out_b, alphas_b = unit.score_candidates(
            cands, history, mask, return_alphas=True, compute_dtype=torch.bfloat16
        )
    assert out_b.dtype == torch.float32
    assert not torch.equal(alphas_b, alphas)  # it did compute in bfloat16
    torch.testing.assert_close(alphas_b, alphas, rtol=0.05, atol=2e-3)
    torch.testing.assert_close(out_b, out, rtol=0.05, atol=2e-2)
    assert (alphas_b[..., 40:] == 0).all()


@pytest.mark.parametrize("kw", [
    {}, {"use_input_bn": False}, {"hidden": ()}, {"activation": "dice"}, {"dropout": 0.2},
])
def test_mlp_input_layer_folding(kw):
    torch.manual_seed(0)
    mlp = MLP(12, **{"hidden": (9, 5), **kw}).double()
    x = torch.randn(64, 12, dtype=torch.float64) * 2 + 1
    mlp.train()
    for _ in range(3):  # give BatchNorm / Dice non-trivial running statistics
        mlp(x)
    mlp.eval()
    with torch.no_grad():
        w, b = mlp.input_layer()
        got = mlp.forward_from_input_layer(x @ w.t() + b)
        torch.testing.assert_close(got, mlp(x))
    mlp.train()
    with pytest.raises(Exception, match="eval mode"):
        mlp.input_layer()


def test_din_candidate_scorer_is_a_snapshot_of_eval_mode():
    from dinrec.errors import DinrecError
    from dinrec.models import build_model

    torch.manual_seed(2)
    model = build_model("din", n_users=20, n_items=60, n_cats=9, embedding_dim=4, hidden=[8, 4])
    with pytest.raises(DinrecError, match="eval mode"):
        model.candidate_scorer()
    model.eval()
    args = (torch.tensor(3), torch.tensor([5, 9, 2, 0]), torch.tensor([3, 4, 2, 0]),
            torch.arange(10, 30), torch.arange(10, 30) % 9)
    scorer = model.candidate_scorer()
    before = scorer(*args, return_alphas=True)
    want = model.score_candidates(*args, return_alphas=True)
    torch.testing.assert_close(before.logits, want.logits)
    torch.testing.assert_close(before.alphas, want.alphas)
    with torch.no_grad():
        model.mlp.out.bias += 1.0
        model.attention.att2.bias += 0.5
    torch.testing.assert_close(scorer(*args).logits, before.logits)  # the snapshot
    fresh = model.candidate_scorer()(*args, return_alphas=True)
    torch.testing.assert_close(fresh.logits, model.score_candidates(*args).logits)
    assert not torch.allclose(fresh.logits, before.logits)
    assert not torch.allclose(fresh.alphas, before.alphas)


# --------------------------------------------------------------------------- the C build
has_c_kernel = pytest.mark.skipif(cs._c_kernel() is None, reason="no C compiler / BLAS symbol")


def _layers(n: int, t: int, d: int = 36, a: int = 36, hidden: int = 40, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> tuple:
    """Arguments of ``candidate_scores`` (float32) but the mask: q, history, valid=None, weights."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.5) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return (r(n, d), r(t, d), None, r(a, d), r(a, d), r(a, d), r(a), r(hidden, a), r(hidden),
            r(1, hidden, scale=1.0), r(1))


def _assert_c_equals_torch(args: tuple, **kw) -> torch.Tensor:
    got = cs.candidate_scores(*args, **kw)
    want = cs.candidate_scores(*args, impl="torch", **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    return got


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@has_c_kernel
@pytest.mark.parametrize(("n", "t"), [(1, 1), (1, 100), (7, 9), (100, 100), (1000, 100), (333, 37)])
@pytest.mark.parametrize("mask_kind", ["gaps", "tail", "none_valid", "no_mask"])
@pytest.mark.parametrize("threads", [1, 2])
def test_c_kernel_equals_the_torch_ops(n, t, mask_kind, threads):
    args = list(_layers(n, t))
    args[2] = MASKS[mask_kind](t)
    with _threads(threads), torch.inference_mode():
        got = _assert_c_equals_torch(tuple(args))
    if args[2] is not None and args[2].any():
        assert (got[:, ~args[2]] == 0).all()


@has_c_kernel
@pytest.mark.parametrize("chunk_rows", [1, 7, 100, 101, 999, 10**6])
@pytest.mark.parametrize("threads", [1, 2])
def test_c_kernel_chunk_boundaries(chunk_rows, threads):
    args = _layers(61, 50, d=8, a=16, seed=1)  # 3050 pairs: one thread; below, two
    big = _layers(203, 50, d=8, a=16, seed=2)  # 10150 pairs >= C_SPLIT_ROWS
    with _threads(threads), torch.no_grad():
        for a in (args, big):
            _assert_c_equals_torch(a, chunk_rows=chunk_rows)


@has_c_kernel
def test_c_kernel_results_do_not_depend_on_threads():
    args = _layers(1000, 100)
    with torch.inference_mode():
        with _threads(1):
            one = cs.candidate_scores(*args)
        with _threads(2):
            two = cs.candidate_scores(*args)
    torch.testing.assert_close(two, one, rtol=1e-6, atol=1e-6)  # only the chunking differs


def test_other_dtypes_run_the_torch_ops(monkeypatch):
    """float64 and bfloat16 never reach the C build."""
    class Boom:
        def __getattr__(self, name):
            raise AssertionError("the C kernel ran")

    monkeypatch.setattr(cs, "_c_kernel", lambda: Boom())
    with torch.no_grad():
        args = _layers(20, 9, d=8, a=16, dtype=torch.float64)
        torch.testing.assert_close(cs.candidate_scores(*args), cs.candidate_scores(*args, impl="torch"))
        args32 = _layers(20, 9, d=8, a=16)
        cs.candidate_scores(*args32, compute_dtype=torch.bfloat16)
        with pytest.raises(AssertionError, match="the C kernel ran"):
            cs.candidate_scores(*args32)
        with pytest.raises(ValueError, match="impl"):
            cs.candidate_scores(*args32, impl="c")


@has_c_kernel
def test_self_check_accepts_the_build_and_rejects_a_wrong_one(monkeypatch):
    from dinrec.nn import _candidate_kernel

    k = _candidate_kernel.kernel()
    assert cs._c_kernel_agrees(k)

    class Wrong:  # the real library, but every score off by 1e-3
        parallel = k.parallel

        def first_layer(self, *a):
            k.first_layer(*a)

        def scores(self, n, tv, *rest):
            k.scores(n, tv, *rest)
            out = rest[-4]
            view = torch.from_numpy(np.ctypeslib.as_array((ctypes.c_float * (n * tv)).from_address(out)))
            view += 1e-3

    assert not cs._c_kernel_agrees(Wrong())
    cs._c_kernel.cache_clear()
    monkeypatch.setattr(_candidate_kernel, "kernel", lambda: Wrong())
    try:
        assert cs._c_kernel() is None  # it stays off
        with torch.no_grad():
            args = _layers(30, 9, d=8, a=16)
            torch.testing.assert_close(cs.candidate_scores(*args), cs.candidate_scores(*args, impl="torch"))
    finally:
        cs._c_kernel.cache_clear()


@pytest.mark.parametrize("env", [("DINREC_CANDIDATE_KERNEL", "torch"), ("CC", "/no/such/cc")])
def test_without_the_c_kernel_the_torch_ops_run(monkeypatch, env):
    """Turned off, or no compiler: no C kernel, and the torch ops give the same scores."""
    from dinrec.nn import _candidate_kernel

    with torch.no_grad():
        args = _layers(50, 20, d=8, a=16)
        want = cs.candidate_scores(*args, impl="torch")
    monkeypatch.setenv(*env)
    _candidate_kernel.kernel.cache_clear()
    cs._c_kernel.cache_clear()
    try:
        assert cs._c_kernel() is None
        with torch.no_grad():
            torch.testing.assert_close(cs.candidate_scores(*args), want)
    finally:
        monkeypatch.delenv(env[0])
        _candidate_kernel.kernel.cache_clear()
        cs._c_kernel.cache_clear()


@has_c_kernel
def test_c_kernel_from_several_python_threads_at_once():
    cases = [_layers(400 + 100 * i, 60, seed=i) for i in range(4)]
    with torch.no_grad():
        want = [cs.candidate_scores(*c) for c in cases]
    results: dict[int, list[torch.Tensor]] = {}

    def work(i: int) -> None:
        with torch.inference_mode():
            results[i] = [cs.candidate_scores(*cases[i]) for _ in range(10)]

    with _threads(2):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    for i in range(4):
        for got in results[i]:
            torch.testing.assert_close(got, want[i], rtol=1e-6, atol=1e-6)


@has_c_kernel
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="Linux only")
def test_c_kernel_runs_on_torchs_openmp_team_and_one_blas_thread_per_call():
    """One libgomp in the process (PyTorch's), and no thread appears while the kernel runs:
    each OpenMP thread's MKL call runs alone instead of starting a nested team."""
    from dinrec.nn import _candidate_kernel

    k = _candidate_kernel.kernel()
    gomp = _candidate_kernel._gomp_paths()
    if any(Path(x).name == "libgomp.so.1" for x in gomp):  # PyTorch's OpenMP runtime
        assert k.parallel
        assert len([x for x in gomp if Path(x).name == "libgomp.so.1"]) == 1
    args = _layers(1000, 100)
    with _threads(2), torch.no_grad():
        torch.ones(10**6).exp_()  # start PyTorch's team
        cs.candidate_scores(*args)
        before = len(os.listdir("/proc/self/task"))
        for _ in range(5):
            cs.candidate_scores(*args)
        assert len(os.listdir("/proc/self/task")) == before
    if k.parallel:
        assert k.set_threads is not None


@has_c_kernel
def test_portable_build_without_avx512_agrees(tmp_path):
    """The plain C loops (no ``-march=native``: no AVX-512 intrinsics, no OpenMP) pass the
    self-check too."""
    import subprocess

    from dinrec.nn import _candidate_kernel
    from dinrec.nn._gru_kernel import find_compiler

    src, lib_path = tmp_path / "k.c", tmp_path / "k.so"
    src.write_text(_candidate_kernel._SOURCE)
    subprocess.run([find_compiler(), "-O3", "-fopenmp-simd", *_candidate_kernel._FLAGS, "-fPIC",
                    "-shared", "-std=c99", str(src), "-o", str(lib_path)], check=True)
    lib = _candidate_kernel.bind(ctypes.CDLL(str(lib_path)))
    assert lib.candidate_kernel_openmp() == 0
    real = _candidate_kernel.kernel()
    k = _candidate_kernel.CandidateKernel(lib, real.gemm, None, False)
    assert cs._c_kernel_agrees(k)
    args = _layers(300, 40)
    with torch.no_grad():
        want = cs.candidate_scores(*args, impl="torch")
        got = cs._candidate_scores(*args, None, cs.CHUNK_ROWS, k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@has_c_kernel
def test_c_kernel_extreme_and_nan_inputs():
    """Huge pre-activations saturate as in torch; a NaN query gives NaN scores in its row only."""
    q, history, _, *w = _layers(40, 30, d=8, a=16)
    q = q.clone()
    q[3] = 1e30
    q[4] = -1e30
    q[5, 2] = float("nan")
    q[6] = 300.0
    with torch.no_grad():
        got = cs.candidate_scores(q, history, None, *w)
        want = cs.candidate_scores(q, history, None, *w, impl="torch")
    assert got[5].isnan().all()
    assert not got[torch.arange(40) != 5].isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6, equal_nan=True)
