"""Behaviour of `dinrec.nn.rnn`: masked GRU == per-sequence nn.GRU, padding-invariance,
each gate convention against hand-written steps, fast (the C++ operator) == reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinrec.errors import ShapeError
from dinrec.nn import _ops, backend, rnn
from dinrec.nn.rnn import (
    AGRU,
    AIGRU,
    AUGRU,
    AttentionGRU,
    AttentionGRUConfig,
    InterestExtractor,
    attention_gru,
    lengths_from_mask,
    masked_gru,
)

B, T, E, H = 6, 7, 5, 4
LENGTHS = torch.tensor([0, 7, 3, 1, 5, 7])
KINDS = [("gru", "reference"), ("aigru", "reference"), ("agru", "reference"),
         ("augru", "reference"), ("augru", "paper")]  # fmt: skip
FUSED = ["fast"]  # the C++ operator where it is built (else the reference runs)
EXTRACTOR_IMPLS = ["reference", "fast"]
has_kernels = pytest.mark.skipif(not _ops.available(), reason="no C++ build of the kernels")


def _data(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, E, generator=g, dtype=dtype)
    mask = torch.arange(T)[None, :] < LENGTHS[:, None]  # (B, T)
    a = torch.rand(B, T, generator=g, dtype=dtype)
    return x, mask, a


def _garbage(x: torch.Tensor, mask: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
    """A copy of x with every padded position replaced by `fill` / large random values."""
    pad = ~mask
    out = x.clone()
    noise = torch.randn_like(x) * 1e3
    out[pad] = noise[pad] if fill == 0 else fill
    return out


def _unit(kind: str, gate: str, impl: str = "fast", reset_after: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    cfg = AttentionGRUConfig(E, H, kind=kind, gate=gate, impl=impl, reset_after=reset_after)  # type: ignore[arg-type]
    unit = AttentionGRU(cfg).double()
    with torch.no_grad():  # random biases too, so every parameter matters
        for p in unit.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return unit


# --------------------------------------------------------------------------- extractor
@pytest.mark.parametrize("impl", EXTRACTOR_IMPLS)
def test_extractor_equals_nn_gru_on_each_unpadded_sequence(impl):
    x, mask, _ = _data()
    ex = InterestExtractor(E, H, impl=impl).double()
    h0 = torch.randn(B, H, dtype=torch.float64)
    out, final = ex(x, mask, h0)
    assert out.shape == (B, T, H) and final.shape == (B, H)
    for i, n in enumerate(LENGTHS.tolist()):
        if n == 0:
            torch.testing.assert_close(final[i], h0[i])
        else:
            ref_out, ref_h = ex.gru(x[i : i + 1, :n], h0[i].view(1, 1, H))
            torch.testing.assert_close(out[i, :n], ref_out[0])
            torch.testing.assert_close(final[i], ref_h[0, 0])
        assert torch.all(out[i, n:] == 0)


@pytest.mark.parametrize("impl", EXTRACTOR_IMPLS)
def test_extractor_padding_never_changes_values_or_gradients(impl):
    x, mask, _ = _data()
    ex = InterestExtractor(E, H, impl=impl).double()
    results = []
    for xx in (x, _garbage(x, mask), _garbage(x, mask, 0)):
        xx = xx.clone().requires_grad_()
        out, final = ex(xx, mask)
        (out.sin().sum() + final.cos().sum()).backward()
        grads = [p.grad.clone() for p in ex.parameters()]
        ex.zero_grad()
        results.append((out, final, xx.grad[mask], grads))
    for other in results[1:]:
        torch.testing.assert_close(other[0], results[0][0])
        torch.testing.assert_close(other[1], results[0][1])
        torch.testing.assert_close(other[2], results[0][2])
        for g0, g1 in zip(results[0][3], other[3], strict=True):
            torch.testing.assert_close(g1, g0)


def test_extractor_all_empty_rows():
    x, _, _ = _data()
    mask = torch.zeros(B, T, dtype=torch.bool)
    for impl in EXTRACTOR_IMPLS:
        out, final = InterestExtractor(E, H, impl=impl).double()(x, mask)
        assert torch.all(out == 0) and torch.all(final == 0)


def test_masked_gru_checks():
    x, mask, _ = _data()
    gru = nn.GRU(E, H, batch_first=True).double()
    bad = mask.clone()
    bad[1, 2] = False  # a hole: not left-aligned
    with pytest.raises(ShapeError, match="prefix"):
        masked_gru(gru, x, bad)
    with pytest.raises(ShapeError):
        masked_gru(gru, x, mask[:, :3])
    with pytest.raises(ShapeError):
        masked_gru(nn.GRU(E, H), x, mask)  # not batch_first
    assert lengths_from_mask(mask.long()).tolist() == LENGTHS.tolist()


# --------------------------------------------------------------------------- hand steps
def _hand_step(x, h, a, unit, kind, gate, reset_after=True):
    """One step written out gate by gate, independently of the module's code."""
    w_ih, w_hh, b_ih, b_hh = unit.weight_ih, unit.weight_hh, unit.bias_ih, unit.bias_hh
    if kind == "aigru":
        x = a * x
    wr, wz, wn = w_ih.chunk(3)
    ur, uz, un = w_hh.chunk(3)
    bir, biz, bin_ = b_ih.chunk(3)
    bhr, bhz, bhn = b_hh.chunk(3)
    r = torch.sigmoid(x @ wr.T + bir + h @ ur.T + bhr)
    z = torch.sigmoid(x @ wz.T + biz + h @ uz.T + bhz)
    if reset_after:
        c = torch.tanh(x @ wn.T + bin_ + r * (h @ un.T + bhn))
    else:
        c = torch.tanh(x @ wn.T + bin_ + (r * h) @ un.T + bhn)
    if kind in ("gru", "aigru"):
        return z * h + (1 - z) * c
    if kind == "agru":
        return (1 - a) * h + a * c
    if gate == "reference":  # VecAttGRUCell
        u = (1 - a) * z
        return u * h + (1 - u) * c
    u = a * (1 - z)  # paper: u'_t = a_t u_t with u_t = 1 - z
    return (1 - u) * h + u * c


def _hand_loop(x, mask, a, unit, kind, gate, h0=None, reset_after=True):
    h = torch.zeros(x.shape[0], H, dtype=x.dtype) if h0 is None else h0
    outs = torch.zeros(x.shape[0], x.shape[1], H, dtype=x.dtype)
    for i in range(x.shape[0]):
        hi = h[i : i + 1]
        for t in range(int(mask[i].sum())):
            hi = _hand_step(x[i : i + 1, t], hi, a[i : i + 1, t : t + 1], unit, kind, gate, reset_after)
            outs[i, t] = hi[0]
        h = torch.cat([h[:i], hi, h[i + 1 :]])
    return outs, h


@pytest.mark.parametrize("kind,gate", KINDS)
@pytest.mark.parametrize("impl", [*FUSED, "reference"])
def test_single_step_matches_hand_written_cell(kind, gate, impl):
    x, _, a = _data()
    unit = _unit(kind, gate, impl)
    h0 = torch.randn(B, H, dtype=torch.float64)
    mask = torch.ones(B, 1, dtype=torch.bool)
    out, final = unit(x[:, :1], a[:, :1], mask, h0)
    expected = _hand_step(x[:, 0], h0, a[:, :1], unit, kind, gate)
    torch.testing.assert_close(final, expected)
    torch.testing.assert_close(out[:, 0], expected)


@pytest.mark.parametrize("kind,gate", KINDS)
@pytest.mark.parametrize("impl", [*FUSED, "reference"])
def test_multi_step_matches_hand_loop(kind, gate, impl):
    x, mask, a = _data(1)
    unit = _unit(kind, gate, impl)
    h0 = torch.randn(B, H, dtype=torch.float64)
    out, final = unit(x, a, mask, h0)
    ref_out, ref_final = _hand_loop(x, mask, a, unit, kind, gate, h0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(final, ref_final)
    torch.testing.assert_close(final[0], h0[0])  # the empty row keeps h0


@pytest.mark.parametrize("kind,gate", KINDS)
def test_tensorflow_reset_before_matches_hand_loop(kind, gate):
    x, mask, a = _data(2)
    unit = _unit(kind, gate, "fast", reset_after=False)  # falls back to the autograd path
    out, final = unit(x, a, mask)
    ref_out, ref_final = _hand_loop(x, mask, a, unit, kind, gate, reset_after=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(final, ref_final)


def test_gate_conventions_at_the_extremes():
    x, mask, _ = _data(3)
    zeros, ones = torch.zeros(B, T, dtype=torch.float64), torch.ones(B, T, dtype=torch.float64)
    gru = _unit("gru", "reference")
    ref, paper = _unit("augru", "reference"), _unit("augru", "paper")
    paper.load_state_dict(gru.state_dict())
    ref.load_state_dict(gru.state_dict())
    h0 = torch.randn(B, H, dtype=torch.float64)
    plain = gru(x, None, mask, h0)[1]
    torch.testing.assert_close(ref(x, zeros, mask, h0)[1], plain)  # reference, a = 0: plain GRU
    torch.testing.assert_close(paper(x, ones, mask, h0)[1], plain)  # paper, a = 1: plain GRU
    torch.testing.assert_close(paper(x, zeros, mask, h0)[1], h0)  # paper, a = 0: state kept
    agru = _unit("agru", "reference")
    agru.load_state_dict(gru.state_dict())
    torch.testing.assert_close(agru(x, zeros, mask, h0)[1], h0)  # AGRU, a = 0: state kept
    # reference, a = 1: the state becomes the candidate (same as AGRU with a = 1)
    torch.testing.assert_close(ref(x, ones, mask, h0)[1], agru(x, ones, mask, h0)[1])


# --------------------------------------------------------------------------- implementations
@pytest.mark.parametrize("kind,gate", KINDS)
def test_fast_and_reference_agree_on_values_and_gradients(kind, gate):
    x, mask, a = _data(4)
    h0 = torch.randn(B, H, dtype=torch.float64)
    results = {}
    for impl in ("reference", *FUSED):
        unit = _unit(kind, gate, impl)
        xx, aa, hh = (v.clone().requires_grad_() for v in (x, a, h0))
        out, final = unit(xx, aa if kind != "gru" else None, mask, hh)
        (out.sin().sum() + (final * final).sum()).backward()
        grads = [xx.grad, hh.grad] + [p.grad for p in unit.parameters()]
        if kind != "gru":
            grads.append(aa.grad)
        results[impl] = [out, final, *grads]
    for impl in FUSED:
        for ref, got in zip(results["reference"], results[impl], strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls,kw", [(AUGRU, {"gate": "reference"}), (AUGRU, {"gate": "paper"}),
                                    (AGRU, {}), (AIGRU, {})])  # fmt: skip
def test_gradients_reach_the_attention_scores_and_ignore_padding(cls, kw):
    x, mask, a = _data(5, torch.float32)
    unit = cls(E, H, **kw)
    grads = []
    for xx, aa in ((x, a), (_garbage(x, mask), _garbage(a, mask))):
        xx, aa = xx.clone().requires_grad_(), aa.clone().requires_grad_()
        out, final = unit(xx, aa, mask)
        assert torch.isfinite(out).all() and torch.isfinite(final).all()
        (out.sum() + final.sum()).backward()
        assert aa.grad[mask].abs().sum() > 0  # attention scores get a gradient
        assert torch.all(aa.grad[~mask] == 0) and torch.all(xx.grad[~mask] == 0)
        grads.append((out, final, xx.grad, aa.grad))
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g0)


@pytest.mark.parametrize("kind,gate,impl", [(k, g, "fast") for k, g in KINDS])
def test_fast_gradients_pass_gradcheck(kind, gate, impl):
    """float64 finite differences through the hand-written backward: inputs, scores, h0
    and every weight, with an empty row, a full row and rows ending early."""
    x, mask, a = _data(7)
    x, a = x[:, :5], a[:, :5].clamp(0.05, 0.95)  # (B, 5, E): keep it small
    mask = mask[:, :5]
    h0 = torch.randn(B, H, dtype=torch.float64)
    unit = _unit(kind, gate, impl)
    params = list(unit.parameters())

    def f(xx, aa, hh, *ps):
        w = rnn.GRUWeights(*ps)
        out, final = attention_gru(xx, aa if kind != "gru" else None, mask, w, kind=kind, gate=gate,
                                   h0=hh, impl=impl)
        return out, final

    inputs = [v.clone().requires_grad_() for v in (x, a, h0, *params)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@has_kernels
@pytest.mark.parametrize("kind,gate,h", [(k, g, 36) for k, g in KINDS]  # 16-lane loop + tail
                         + [("augru", "reference", h) for h in (37, 16, 5)])  # odd, exact, tail only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
def test_fast_equals_reference_at_realistic_sizes(kind, gate, h, dtype, tol):
    """The C++ operator against the literal cell: T = 100, a batch split over two threads,
    H = 36 (the production width), both dtypes, values and every gradient."""
    g = torch.Generator().manual_seed(8)
    b, t, e = 48, 100, 18
    x = torch.randn(b, t, e, generator=g, dtype=dtype)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = torch.arange(t)[None] < lengths[:, None]
    a = torch.rand(b, t, generator=g, dtype=dtype)
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the batch splits over two threads (restored below)
    for impl in ("fast", "reference"):
        torch.manual_seed(0)
        unit = AttentionGRU(AttentionGRUConfig(e, h, kind=kind, gate=gate, impl=impl)).to(dtype)  # type: ignore[arg-type]
        xx, aa = x.clone().requires_grad_(), a.clone().requires_grad_()
        out, final = unit(xx, aa if kind != "gru" else None, mask)
        (out.sin().sum() + final.square().sum()).backward()
        results.append([out, final, xx.grad, *(p.grad for p in unit.parameters())]
                       + ([aa.grad] if kind != "gru" else []))
    torch.set_num_threads(threads)
    for fast, ref in zip(*results, strict=True):
        torch.testing.assert_close(fast, ref, rtol=tol * 10, atol=tol * 10)


def test_the_fast_path_runs_the_operator(monkeypatch):
    """Under the fast backend on CPU the recurrence is ``dinrec::gru_scan`` (or its packed
    form); under ``backend("reference")`` neither is called."""
    if not _ops.use("gru_scan"):
        pytest.skip("no C++ build, or measured no faster here")
    calls = []
    for name in ("gru_scan", "gru_scan_packed"):  # dense or packed, as the batch's padding says
        real = getattr(_ops, name)
        monkeypatch.setattr(_ops, name, lambda *a, real=real: calls.append(1) or real(*a))
    x, mask, a = _data(9)
    unit = _unit("augru", "reference", "fast")
    fast = unit(x, a, mask)
    assert len(calls) == 1
    with backend("reference"):
        ref = unit(x, a, mask)
    assert len(calls) == 1
    InterestExtractor(E, H).double()(x, mask)
    assert len(calls) == 2
    for f, r in zip(fast, ref, strict=True):
        torch.testing.assert_close(f, r)


def test_without_a_build_the_reference_runs_with_one_warning(monkeypatch):
    """No compiler (the builder fails): one warning naming the pure-PyTorch path, and the
    fast layers give the reference's values."""
    def no_compiler() -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_ops, "builder", no_compiler)
    _ops.available.cache_clear()
    try:
        x, mask, a = _data(9)
        with pytest.warns(RuntimeWarning, match="pure-PyTorch") as record:
            out, final = _unit("augru", "reference", "fast")(x, a, mask)
            InterestExtractor(E, H).double()(x, mask)
        assert len(record) == 1
        ref_out, ref_final = _unit("augru", "reference", "reference")(x, a, mask)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(final, ref_final)
    finally:
        _ops.available.cache_clear()


@pytest.mark.parametrize("impl", FUSED)
def test_fast_under_bfloat16_autocast(impl):
    """Under CPU autocast the input projection is bfloat16; the loop runs in the weights'
    float32, and the gradients come back in the inputs' dtype."""
    x, mask, a = _data(10, torch.float32)
    torch.manual_seed(0)
    unit = AUGRU(E, H, impl=impl)
    results = []
    for amp in (False, True):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out, final = unit(xx, a, mask)
        assert out.dtype == final.dtype == torch.float32
        (out.sum() + final.sum()).backward()
        assert xx.grad.dtype == torch.float32 and torch.isfinite(xx.grad).all()
        results.append((out, final, xx.grad))
    for ref, got in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)


def test_steps_past_the_longest_length_are_skipped_but_shapes_kept():
    x, mask, a = _data(6)
    short = mask.clone()
    short[:, 4:] = False  # longest valid length 4 < T
    out, final = attention_gru(x, a, short, _unit("augru", "reference").weights())
    assert out.shape == (B, T, H) and torch.all(out[:, 4:] == 0)
    ref_out, ref_final = _hand_loop(x, short, a, _unit("augru", "reference"), "augru", "reference")
    torch.testing.assert_close(final, ref_final)


def test_attention_gru_checks():
    x, mask, a = _data()
    w = _unit("augru", "reference").weights()
    with pytest.raises(ShapeError, match="scores"):
        attention_gru(x, None, mask, w, kind="augru")
    with pytest.raises(ShapeError, match="scores"):
        attention_gru(x, a[:, :3], mask, w)
    with pytest.raises(ShapeError, match="features"):
        attention_gru(x[..., :3], a, mask, w)
    with pytest.raises(ValueError, match="gate"):
        attention_gru(x, a, mask, w, gate="tf")


# --------------------------------------------------------------------------- packed fast path
def _run_layer(layer: str, kind: str, gate: str, x, a, mask, h0, packed: bool, monkeypatch):
    """Outputs, final state and every gradient of one fast layer, packed or dense scan."""
    monkeypatch.setattr(rnn, "PACKED_BELOW", 2.0 if packed else 0.0)
    calls = []
    for name in ("gru_scan", "gru_scan_packed"):
        real = getattr(_ops, name)
        monkeypatch.setattr(_ops, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    torch.manual_seed(0)
    if layer == "extractor":
        unit = InterestExtractor(x.shape[2], H, impl="fast").to(x.dtype)
    else:
        unit = AttentionGRU(AttentionGRUConfig(x.shape[2], H, kind=kind, gate=gate)).to(x.dtype)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in unit.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    xx, aa, hh = (v.clone().requires_grad_() for v in (x, a, h0))
    if layer == "extractor":
        out, final = unit(xx, mask, hh)
    else:
        out, final = unit(xx, aa if kind != "gru" else None, mask, hh)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=x.dtype)).sum() + final.sin().sum()
    leaves = [xx, hh, *unit.parameters()] + ([aa] if layer != "extractor" and kind != "gru" else [])
    grads = torch.autograd.grad(loss, leaves)
    assert calls == (["gru_scan_packed"] if packed else ["gru_scan"]), calls
    return [out, final, *(torch.where(v.isnan(), 0.0, v) for v in grads)]


PACKED_CASES = {  # lengths of each case's rows, T = the longest + 2 (padding after every row)
    "mixed": [0, 7, 3, 1, 5, 7],
    "empty rows and length 1": [1, 0, 0, 1],
    "all full": [6, 6, 6],
    "one row": [4],
    "long batch": torch.randint(0, 40, (70,), generator=torch.Generator().manual_seed(0)).tolist(),
}


@pytest.mark.skipif(not _ops.available(), reason="no C++ build of the kernels")
@pytest.mark.parametrize("case", list(PACKED_CASES))
@pytest.mark.parametrize("layer,kind,gate", [("extractor", "gru", "reference")] + [("attention", k, g) for k, g in KINDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_scan_equals_the_dense_scan(monkeypatch, case, layer, kind, gate, dtype):
    """Scanning only the valid steps gives the dense scan's outputs (zero at padding), final
    states (h0 for empty rows) and gradients, whatever the padding holds (NaN here)."""
    if not _ops.use("gru_scan"):
        pytest.skip("the C++ operator does not run here")
    lengths = torch.tensor(PACKED_CASES[case])
    b, t = len(lengths), int(lengths.max()) + 2
    g = torch.Generator().manual_seed(2)
    mask = torch.arange(t)[None] < lengths[:, None]
    x = torch.randn(b, t, E, generator=g, dtype=dtype).masked_fill(~mask[..., None], float("nan"))
    a = torch.rand(b, t, generator=g, dtype=dtype).masked_fill(~mask, float("nan"))
    h0 = torch.randn(b, H, generator=g, dtype=dtype)
    packed = _run_layer(layer, kind, gate, x, a, mask, h0, True, monkeypatch)
    dense = _run_layer(layer, kind, gate, x, a, mask, h0, False, monkeypatch)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for p, d in zip(packed, dense, strict=True):
        torch.testing.assert_close(p, d, rtol=tol, atol=tol)
    assert not packed[0][~mask].any()  # zero at padding


@pytest.mark.skipif(not _ops.available(), reason="no C++ build of the kernels")
def test_packing_layout():
    """Rows sorted by length (ties in batch order), step-major positions, each row's last step."""
    p = rnn._packing(torch.tensor([2, 0, 3, 2]), 4)
    assert p.sizes.tolist() == [3, 3, 1]
    assert p.rows.tolist() == [2, 0, 3]
    assert p.positions.tolist() == [8, 0, 12, 9, 1, 13, 10]
    assert p.last.tolist() == [6, 4, 5]


@pytest.mark.skipif(not _ops.available(), reason="no C++ build of the kernels")
def test_packing_only_when_padded_enough(monkeypatch):
    """A batch with padding below PACKED_BELOW runs the dense scan, one above it the packed."""
    if not _ops.use("gru_scan"):
        pytest.skip("the C++ operator does not run here")
    calls = []
    for name in ("gru_scan", "gru_scan_packed"):
        real = getattr(_ops, name)
        monkeypatch.setattr(_ops, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    unit = InterestExtractor(E, H)
    for lengths, want in (([20] * 9 + [19], "gru_scan"), ([20, 10, 5], "gru_scan_packed")):
        lengths = torch.tensor(lengths)
        mask = torch.arange(20)[None] < lengths[:, None]
        unit(torch.randn(len(lengths), 20, E), mask)
        assert calls[-1] == want
