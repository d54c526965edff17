"""The inference kernel for N candidates against one history (nn/candidate_scores.py),
checked against the row-by-row attention with the history repeated N times."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from dinrec.nn import _ops, backend
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
    from dinrec.data.schema import Schema
    from dinrec.errors import DinrecError
    from dinrec.models import create_model
    from model_inputs import history_row, random_batch, random_candidates

    schema, sizes = Schema.default(max_len=4), {"user": 20, "item": 60, "cat": 9}
    torch.manual_seed(2)
    model = create_model("din", schema, sizes, embedding_dim=4, hidden=[8, 4])
    with pytest.raises(DinrecError, match="eval mode"):
        model.candidate_scorer()
    model.eval()
    args = (history_row(random_batch(schema, sizes, b=2), 0), random_candidates(schema, sizes, 20))
    scorer = model.candidate_scorer()
    before = scorer(*args, return_alphas=True)
    want = model.score_candidates(*args, return_alphas=True)
    torch.testing.assert_close(before.logits, want.logits)
    torch.testing.assert_close(before.alphas, want.alphas)
    with torch.no_grad():
        model.mlp.out.bias += 1.0
        model.attentions["hist"].att2.bias += 0.5
    torch.testing.assert_close(scorer(*args).logits, before.logits)  # the snapshot
    fresh = model.candidate_scorer()(*args, return_alphas=True)
    torch.testing.assert_close(fresh.logits, model.score_candidates(*args).logits)
    assert not torch.allclose(fresh.logits, before.logits)
    assert not torch.allclose(fresh.alphas["hist"], before.alphas["hist"])


# --------------------------------------------------------------------------- the C++ operator
has_kernels = pytest.mark.skipif(not _ops.available(), reason="no C++ build of the kernels")


@pytest.fixture(autouse=True)
def _operator_wherever_built(monkeypatch):
    """These tests test the C++ operator wherever it is built, whatever the first-use
    measurement chose on this CPU (tests/test_ops.py tests that choice)."""
    monkeypatch.setattr(_ops, "use", lambda op: _ops.available())


def _layers(n: int, t: int, d: int = 36, a: int = 36, hidden: int = 40, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> tuple:
    """Arguments of ``candidate_scores`` (float32) but the mask: q, history, valid=None, weights."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.5) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return (r(n, d), r(t, d), None, r(a, d), r(a, d), r(a, d), r(a), r(hidden, a), r(hidden),
            r(1, hidden, scale=1.0), r(1))


def _assert_op_equals_torch(args: tuple, **kw) -> torch.Tensor:
    got = cs.candidate_scores(*args, **kw)
    want = cs.torch_candidate_scores(*args, **kw)
    tol = (1e-5, 2e-6) if args[0].dtype == torch.float32 else (1e-10, 1e-12)
    torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1])
    return got


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@has_kernels
@pytest.mark.parametrize(("n", "t"), [(1, 1), (1, 100), (7, 9), (100, 100), (1000, 100), (333, 37)])
@pytest.mark.parametrize("mask_kind", ["gaps", "tail", "none_valid", "no_mask"])
@pytest.mark.parametrize("threads", [1, 2])
def test_operator_equals_the_torch_ops(n, t, mask_kind, threads):
    args = list(_layers(n, t))
    args[2] = MASKS[mask_kind](t)
    with _threads(threads), torch.inference_mode():
        got = _assert_op_equals_torch(tuple(args))
    if args[2] is not None and args[2].any():
        assert (got[:, ~args[2]] == 0).all()


@has_kernels
@pytest.mark.parametrize(("n", "t", "d", "a"), [
    (40, 100, 36, 80),  # 4,000 pairs: one thread
    (41, 100, 36, 80),  # 4,100 pairs: split over the threads
    (163, 50, 37, 80),  # two chunks, odd D
    (1000, 100, 100, 80),  # large D, 13 chunks
    (3, 9000, 8, 16),  # a history longer than a chunk: one candidate per chunk
    (97, 13, 5, 7),  # every vector loop with a tail (A = 7, rows * A odd)
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_operator_chunks_threads_tails_and_dtypes(n, t, d, a, dtype, threads):
    args = _layers(n, t, d=d, a=a, seed=n, dtype=dtype)
    with _threads(threads), torch.no_grad():
        _assert_op_equals_torch(args)


@has_kernels
def test_operator_results_do_not_depend_on_threads():
    args = _layers(1000, 100)
    with torch.inference_mode():
        with _threads(1):
            one = cs.candidate_scores(*args)
        with _threads(2):
            two = cs.candidate_scores(*args)
    torch.testing.assert_close(two, one, rtol=1e-6, atol=1e-6)  # only the chunking differs


def test_bfloat16_and_the_reference_backend_run_the_torch_ops(monkeypatch):
    """bfloat16 products and ``backend("reference")`` never reach the C++ operator."""
    def boom(*a):
        raise AssertionError("the C++ operator ran")

    monkeypatch.setattr(_ops, "candidate_scores", boom)
    with torch.no_grad():
        args32 = _layers(20, 9, d=8, a=16)
        cs.candidate_scores(*args32, compute_dtype=torch.bfloat16)
        with backend("reference"):
            cs.candidate_scores(*args32)
        if _ops.use("candidate_scores"):
            with pytest.raises(AssertionError, match="operator ran"):
                cs.candidate_scores(*args32)


def test_without_a_build_the_torch_ops_run(monkeypatch):
    """No compiler: the torch ops give the same scores, after one warning."""
    with torch.no_grad():
        args = _layers(50, 20, d=8, a=16)
        want = cs.torch_candidate_scores(*args)

    def no_compiler() -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_ops, "builder", no_compiler)
    _ops.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="pure-PyTorch"), torch.no_grad():
            torch.testing.assert_close(cs.candidate_scores(*args), want)
    finally:
        _ops.available.cache_clear()


def test_the_private_fused_bfloat16_op_falls_back(monkeypatch):
    """``torch.ops.mkldnn._linear_pointwise`` (private) failing or absent: separate ops, same scores."""
    args = _layers(30, 20, d=8, a=16)
    with torch.no_grad():
        want = cs.torch_candidate_scores(*args, compute_dtype=torch.bfloat16)
        monkeypatch.setattr(cs, "_FUSED", False)
        got = cs.torch_candidate_scores(*args, compute_dtype=torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    monkeypatch.setattr(cs, "_FUSED", None)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", None, raising=False)
    assert cs._fused_linear_sigmoid() is None  # a broken op is detected, not used


@has_kernels
def test_operator_from_several_python_threads_at_once():
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


@has_kernels
def test_operator_extreme_and_nan_inputs():
    """Huge pre-activations saturate as in torch; a NaN query gives NaN scores in its row only."""
    q, history, _, *w = _layers(40, 30, d=8, a=16)
    q = q.clone()
    q[3] = 1e30
    q[4] = -1e30
    q[5, 2] = float("nan")
    q[6] = 300.0
    with torch.no_grad():
        got = cs.candidate_scores(q, history, None, *w)
        want = cs.torch_candidate_scores(q, history, None, *w)
    assert got[5].isnan().all()
    assert not got[torch.arange(40) != 5].isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6, equal_nan=True)
