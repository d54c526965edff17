"""``dinrec::offset_mlp`` (csrc/offset_mlp.cpp, nn/_ops.py): the fused two-hidden-layer
sigmoid MLP with a per-row offset, against its PyTorch reference through autograd (every
gradient), against the hand-written torch paths it replaces in DIN's packed attention and
DIEN's auxiliary MLP, and wired into both where the measured choice says so."""

from __future__ import annotations

import pytest
import torch

from dinrec.nn import _ops
from dinrec.nn.auxiliary import AuxiliaryNet
from dinrec.nn.packed import _mlp_backward, _mlp_forward

needs_build = pytest.mark.skipif(not _ops.available(), reason="no C++ build of the kernels")

DIN = (72, 80, 40)  # K = 2D, A, A2 of DIN's attention MLP (D = 36)
DIEN = (36, 100, 50)  # K = E, D1, D2 of DIEN's auxiliary MLP
NAMES = ("x", "offset", "w1", "w2", "b2", "w3", "b3")


def _args(n, widths, r=128, dtype=torch.float64, seed=0, sort=False):
    """offset_mlp's arguments: N rows, idx unsorted (or sorted) over R rows, the last 5 unused."""
    k, a, a2 = widths
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype) * 2 / shape[-1] ** 0.5

    idx = torch.randint(0, max(r - 5, 1), (n,), generator=g)
    if sort:
        idx = idx.sort().values
    return rand(n, k), rand(r, a), idx, rand(a, k), rand(a2, a), rand(a2), rand(1, a2), rand(1)


def _grads(fn, args, g):
    """(output, gradients of the float arguments) of ``fn(*args)[0]`` for the output gradient g."""
    leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in args]
    s = fn(*leaves)[0]
    floats = [t for t in leaves if t.requires_grad]
    return s.detach(), torch.autograd.grad(s, floats, g)


def _tol(dtype):
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}


# --------------------------------------------------------------------------- the operator alone
@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("widths", [DIN, DIEN], ids=["din", "dien"])
@pytest.mark.parametrize("n", [0, 1, 511, 1300])  # empty, one row, one short tile, 3 tiles (last short)
def test_equals_its_reference_with_every_gradient(dtype, widths, n):
    args = _args(n, widths, dtype=dtype)
    g = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=dtype)
    want_s, want = _grads(_ops.offset_mlp_reference, args, g)
    got_s, got = _grads(_ops.offset_mlp, args, g)
    torch.testing.assert_close(got_s, want_s, **_tol(dtype))
    for name, a, b in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(a, b, **_tol(dtype), msg=lambda m, name=name: f"d_{name}: {m}")
    # the offset rows no row points at get exactly zero
    unused = torch.ones(args[1].shape[0], dtype=torch.bool)
    unused[args[2]] = False
    assert unused.any() and (got[1][unused] == 0).all()


def _facts_args(n, d=36, a=80, r=128, dtype=torch.float64, seed=0):
    """DIN's form: facts f (N, D), q (R, D), x = [f, f * q[idx]] built by the operator."""
    f, offset, idx, w1, w2, b2, w3, b3 = _args(n, (2 * d, a, 40), r=r, dtype=dtype, seed=seed)
    q = torch.randn(r, d, generator=torch.Generator().manual_seed(seed + 9), dtype=dtype)
    return f[:, :d].contiguous(), offset, idx, w1, w2, b2, w3, b3, q


@needs_build
@pytest.mark.parametrize("products", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 1300])
def test_facts_form_equals_its_reference_with_every_gradient(dtype, n, products):
    """With q the operator builds [f, f * q[idx]] per tile; the gradients of f and q too."""
    if products == "bfloat16" and (dtype == torch.float64 or not _ops.bf16_available()):
        pytest.skip("bfloat16 products: float32 on a CPU with the micro-kernel")
    *args, q = _facts_args(n, dtype=dtype)
    g = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=dtype)

    def run(fn, **kw):
        return _grads(lambda *a: fn(*a[:8], q=a[8], **kw), [*args, q], g)

    want_s, want = run(_ops.offset_mlp_reference)
    got_s, got = run(_ops.offset_mlp, products=products)
    names = ("f", "offset", "w1", "w2", "b2", "w3", "b3", "q")
    if products == "float32":
        torch.testing.assert_close(got_s, want_s, **_tol(dtype))
        for name, a, b in zip(names, got, want, strict=True):
            torch.testing.assert_close(a, b, **_tol(dtype), msg=lambda m, name=name: f"d_{name}: {m}")
    else:
        emulated = run(_ops.offset_mlp_reference, products="bfloat16")[0]
        torch.testing.assert_close(got_s, emulated, rtol=5e-4, atol=5e-4)
        for name, a, b in zip(names, got, want, strict=True):
            assert _rel_err(a, b) < 0.02, name


@needs_build
def test_opcheck_facts_form():
    args = [t.requires_grad_() if t.is_floating_point() else t for t in _facts_args(600, dtype=torch.float32)]
    torch.library.opcheck(_ops.offset_mlp, args[:8], {"q": args[8]})


@needs_build
def test_hidden_layers_are_returned_and_the_offset_is_gathered_by_idx():
    x, offset, idx, w1, w2, b2, w3, b3 = _args(700, DIEN, r=9)
    s, h1, h2 = _ops.offset_mlp(x, offset, idx, w1, w2, b2, w3, b3)
    want_s, want_h1, want_h2 = _ops.offset_mlp_reference(x, offset, idx, w1, w2, b2, w3, b3)
    torch.testing.assert_close(h1, want_h1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h2, want_h2, rtol=1e-10, atol=1e-10)
    # moving one row's offset changes exactly the rows that point at it
    moved = offset.clone()
    moved[3] += 1.0
    s2 = _ops.offset_mlp(x, moved, idx, w1, w2, b2, w3, b3)[0]
    assert torch.equal(s2 != s, idx == 3)


@needs_build
def test_gradcheck_against_finite_differences():
    args = list(_args(9, (4, 6, 5), r=4))
    leaves = [t.requires_grad_() if t.is_floating_point() else t for t in args]
    assert torch.autograd.gradcheck(lambda *a: _ops.offset_mlp(*a)[0], leaves, eps=1e-6, atol=1e-6)


@needs_build
def test_opcheck():
    args = [t.requires_grad_() if t.is_floating_point() else t for t in _args(600, DIN, dtype=torch.float32)]
    torch.library.opcheck(_ops.offset_mlp, args)
    torch.library.opcheck(_ops.offset_mlp, [t.detach() for t in args])


@needs_build
def test_backward_without_the_input_gradient():
    x, offset, idx, w1, w2, b2, w3, b3 = _args(1100, DIN, dtype=torch.float32)
    s, h1, h2 = _ops.offset_mlp(x, offset, idx, w1, w2, b2, w3, b3)
    g = torch.randn_like(s)
    full = _ops.offset_mlp_backward(g, x, idx, w1, w2, w3, h1, h2, offset.shape[0], True)
    part = _ops.offset_mlp_backward(g, x, idx, w1, w2, w3, h1, h2, offset.shape[0], False)
    assert part[0].shape == (0, x.shape[1]) and full[0].shape == x.shape
    assert part[1].shape == full[1].shape == (0, 0)  # no q
    for a, b in zip(full[2:], part[2:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_build
def test_two_threads_give_the_one_thread_result():
    args = _args(3000, DIN, dtype=torch.float32)
    g = torch.randn(3000, generator=torch.Generator().manual_seed(2))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(_ops.offset_mlp, args, g)
        torch.set_num_threads(2)
        two = _grads(_ops.offset_mlp, args, g)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(two[0], one[0], rtol=0, atol=0)  # rows are independent
    for a, b in zip(two[1], one[1], strict=True):  # sums in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_build
def test_bad_arguments_raise():
    x, offset, idx, w1, w2, b2, w3, b3 = _args(10, DIN, r=4)
    with pytest.raises(RuntimeError, match="idx out of range"):
        _ops.offset_mlp(x, offset, idx + 4, w1, w2, b2, w3, b3)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        _ops.offset_mlp(x[:, :-1], offset, idx, w1, w2, b2, w3, b3)
    with pytest.raises(RuntimeError, match="one dtype"):
        _ops.offset_mlp(x, offset.float(), idx, w1, w2, b2, w3, b3)


# --------------------------------------------------------------------------- the two callers
@needs_build
@pytest.mark.parametrize("n", [1, 1300])
def test_din_fused_path_equals_the_torch_path(n):
    """packed.py's _mlp_forward / _mlp_backward, fused or not, float32: every output."""
    g = torch.Generator().manual_seed(4)
    b, d, a = 128, 36, 80
    q_part, q, f = torch.randn(b, a, generator=g), torch.randn(b, d, generator=g), torch.randn(n, d, generator=g)
    rows = torch.randint(0, b - 3, (n,), generator=g).sort().values
    layers = (torch.randn(a, 2 * d, generator=g) / 8, torch.randn(40, a, generator=g) / 9,
              torch.randn(40, generator=g), torch.randn(1, 40, generator=g), torch.randn(1, generator=g))
    w1, w2, _, w3, _ = layers
    gs = torch.randn(n, 1, generator=g)
    out = {}
    for fused in (None, "float32"):
        s, qv, x, h1, h2 = _mlp_forward(q_part, q, f, rows, *layers, fused)
        grads = _mlp_backward(gs, b, (True, True, True), (rows, qv, x, w1, w2, w3, h1, h2), fused)
        out[fused] = (s, h1, h2, *grads)
        partial = _mlp_backward(gs, b, (True, False, True), (rows, qv, x, w1, w2, w3, h1, h2), fused)
        assert partial[1] is None and torch.equal(partial[2], grads[2])
    for got, want in zip(out["float32"], out[None], strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture
def cpp_wins(monkeypatch):
    """The measured choice says the C++ operator runs; count its calls."""
    monkeypatch.setattr(_ops, "use", lambda op: True)
    calls = []
    for name in ("offset_mlp", "offset_mlp_backward"):
        real = getattr(_ops, name)
        monkeypatch.setattr(_ops, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    return calls


def _pair_case(dtype=torch.float32, hidden=(100, 50)):
    g = torch.Generator().manual_seed(5)
    net = AuxiliaryNet(36, 36, hidden=hidden).to(dtype)
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5, generator=g)
        net.norm.bias.normal_(generator=g)
    states = torch.randn(700, 36, generator=g, dtype=dtype)
    items = torch.randn(2, 700, 36, generator=g, dtype=dtype)
    return net, states, items


def _pair_run(net, states, items):
    leaves = [states.clone().requires_grad_(), items.clone().requires_grad_()]
    logits = net.pair_logits(*leaves)  # (M, N)
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(6), dtype=logits.dtype)
    params = list(net.parameters())
    return logits.detach(), torch.autograd.grad(logits, leaves + params, g)


@needs_build
def test_dien_pair_mlp_runs_the_operator_and_equals_the_torch_path(monkeypatch, cpp_wins):
    net, states, items = _pair_case()
    fused = _pair_run(net, states, items)
    assert cpp_wins == ["offset_mlp", "offset_mlp_backward"]
    monkeypatch.setattr(_ops, "use", lambda op: False)
    plain = _pair_run(net, states, items)
    assert cpp_wins == ["offset_mlp", "offset_mlp_backward"]  # not called again
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(fused[1], plain[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_build
@pytest.mark.parametrize("case", ["float64", "three hidden layers"])
def test_dien_pair_mlp_keeps_the_torch_path_elsewhere(cpp_wins, case):
    net, states, items = _pair_case(torch.float64) if case == "float64" else _pair_case(hidden=(30, 20, 10))
    _pair_run(net, states, items)
    assert cpp_wins == []


@needs_build
def test_din_model_runs_the_operator_where_it_wins(cpp_wins):
    """DIN's packed attention (fact_scores) and the padded one (packed_scores) call it."""
    from dinrec.nn.packed import fact_scores, packed_scores

    g = torch.Generator().manual_seed(7)
    b, t, d, a = 16, 30, 36, 80
    valid = torch.rand(b, t, generator=g) < 0.4
    index = valid.reshape(-1).nonzero().squeeze(1)
    rows = torch.div(index, t, rounding_mode="floor")
    q_part, q = torch.randn(b, a, generator=g, requires_grad=True), torch.randn(b, d, generator=g)
    facts = torch.randn(b, t, d, generator=g, requires_grad=True)
    w1 = torch.randn(a, 2 * d, generator=g, requires_grad=True)
    upper = (torch.randn(40, a, generator=g), torch.randn(40, generator=g), torch.randn(1, 40, generator=g),
             torch.randn(1, generator=g))
    packed_scores(q_part, q, facts, index, w1, upper, -1e9)[valid.unsqueeze(1)].sum().backward()
    fact_scores(q_part, q, facts.detach().reshape(b * t, d)[index], rows, w1, upper).sum().backward()
    assert cpp_wins == ["offset_mlp", "offset_mlp_backward"] * 2


# --------------------------------------------------------------------------- bfloat16 products
needs_bf16 = pytest.mark.skipif(not (_ops.available() and _ops.bf16_available()),
                                reason="no bfloat16 micro-kernel on this CPU")


def _rel_err(got, want):
    """Largest error relative to the largest value, or to 0.1 where all are smaller
    (bfloat16 products: ~1e-3)."""
    if want.numel() == 0:
        return 0.0 if got.shape == want.shape else float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(0.1))


@needs_bf16
@pytest.mark.parametrize("widths", [DIN, DIEN], ids=["din", "dien"])
@pytest.mark.parametrize("n", [1, 1300])
def test_bfloat16_products_against_float32(widths, n):
    """The forward equals the reference with its product operands rounded to bfloat16 (to
    float32 round-off), and is ~1e-3 off float32 products; every gradient within 2% of the
    float32 one (relative to its largest value)."""
    args = _args(n, widths, dtype=torch.float32)
    g = torch.randn(n, generator=torch.Generator().manual_seed(1))
    s, h1, h2 = _ops.offset_mlp(*args, products="bfloat16")
    emulated = _ops.offset_mlp_reference(*args, products="bfloat16")
    for got, want in zip((s, h1, h2), emulated, strict=True):
        torch.testing.assert_close(got, want, rtol=5e-4, atol=5e-4)
    want_s, want = _grads(_ops.offset_mlp_reference, args, g)
    got_s, got = _grads(lambda *a: _ops.offset_mlp(*a, products="bfloat16"), args, g)
    assert _rel_err(got_s, want_s) < 0.02
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert _rel_err(a, b) < 0.02, name
    if n > 1:  # and it is not float32 underneath
        assert _rel_err(got_s, want_s) > 1e-5
        assert _rel_err(got[2], want[2]) > 1e-5


@needs_bf16
def test_bfloat16_two_threads_and_bad_settings():
    args = _args(3000, DIN, dtype=torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ops.offset_mlp(*args, products="bfloat16")[0]
        torch.set_num_threads(2)
        two = _ops.offset_mlp(*args, products="bfloat16")[0]
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(two, one, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="products must be"):
        _ops.offset_mlp(*args, products="float16")
    with pytest.raises(RuntimeError, match="need float32"):
        _ops.offset_mlp(*_args(10, DIN), products="bfloat16")
    with pytest.raises(RuntimeError, match="even K"):
        _ops.offset_mlp(*_args(10, (5, 6, 4), dtype=torch.float32), products="bfloat16")


@needs_bf16
def test_the_products_setting_reaches_both_callers(monkeypatch, cpp_wins):
    """dinrec.nn.products("bfloat16") -> both MLPs run with bfloat16 products (the backward
    too, even outside the block); float32 by default; a bad name is refused."""
    from dinrec.nn import products

    seen = []
    real = _ops.offset_mlp
    monkeypatch.setattr(_ops, "offset_mlp", lambda *a: seen.append(a[-1]) or real(*a))
    real_bwd = _ops.offset_mlp_backward
    monkeypatch.setattr(_ops, "offset_mlp_backward", lambda *a: seen.append(a[-1]) or real_bwd(*a))
    net, states, items = _pair_case()
    with products("bfloat16"):
        leaves = [states.clone().requires_grad_(), items.clone().requires_grad_()]
        logits = net.pair_logits(*leaves)
    logits.sum().backward()
    net.pair_logits(states, items).sum().backward()
    assert seen == ["bfloat16", "bfloat16", "float32", "float32"]
    with pytest.raises(ValueError, match="products"):
        with products("float16"):  # type: ignore[arg-type]
            pass


@pytest.fixture
def no_bf16_kernel(monkeypatch):
    """The bfloat16 micro-kernel fails as on a CPU without one (float32 still runs); the
    cached bfloat16 check is cleared before and after."""
    real = _ops.CHECKED["offset_mlp_forward"]

    def no_bf16(*args):
        if args[8] == "bfloat16":
            raise RuntimeError("could not create a BRGeMM ukernel")
        return real(*args)

    monkeypatch.setitem(_ops.CHECKED, "offset_mlp_forward", no_bf16)
    _ops.bf16_available.cache_clear()
    yield
    _ops.bf16_available.cache_clear()



@needs_build
def test_without_a_bfloat16_kernel_float32_products_run_after_one_warning(no_bf16_kernel, cpp_wins):
    """A CPU whose bfloat16 micro-kernel fails (or is missing): one warning, then float32 products."""
    from dinrec.nn import products

    net, states, items = _pair_case()
    w = net.mlp[2].weight
    with products("bfloat16"), pytest.warns(RuntimeWarning, match="bfloat16 products are not available") as rec:
        assert _ops.offset_mlp_runs(w, w, states) == "float32"
        assert _ops.offset_mlp_runs(w, w, states) == "float32"
    assert len(rec) == 1


def test_auto_products_fall_back_to_float32_silently_where_bfloat16_fails(monkeypatch, request):
    """``products("auto")`` (training's default) takes float32 products without a warning
    where the bfloat16 kernel fails its check, and bfloat16 where it passes and is chosen."""
    import warnings as w

    from dinrec.nn import products

    net, states, items = _pair_case()
    weight = net.mlp[2].weight
    if _ops.available() and _ops.bf16_available(warn=False):
        monkeypatch.setattr(_ops, "use", lambda op: True)
        with products("auto"):
            assert _ops.offset_mlp_runs(weight, weight, states) == "bfloat16"

    request.getfixturevalue("no_bf16_kernel")
    with products("auto"), w.catch_warnings():
        w.simplefilter("error")  # any warning fails the test
        assert _ops.offset_mlp_runs(weight, weight, states) in ("float32", None)
        assert not _ops.bf16_available(warn=False)


def test_the_training_option_sets_the_products_of_the_step(monkeypatch, tiny_store, tmp_path):
    """TrainConfig.mlp_products (dinrec train --mlp-products) is in force during each training
    step (evaluation keeps float32 products)."""
    from dinrec.nn import get_products
    from dinrec.train.trainer import TrainConfig, train

    seen = []
    real = _ops.offset_mlp_runs
    monkeypatch.setattr(_ops, "offset_mlp_runs", lambda *a: seen.append(get_products()) or real(*a))
    for name in ("bfloat16", "float32", "auto"):
        seen.clear()
        cfg = TrainConfig(model="din", max_steps=3, eval_every=10**9, progress=False, mlp_products=name)
        train(cfg, tiny_store, tmp_path / name)
        assert seen and (name in seen) and ("bfloat16" in seen) == (name == "bfloat16")
    assert get_products() == "float32"
