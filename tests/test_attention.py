"""Behaviour of `dinrec.nn.attention`: fast path == reference path, shapes, errors, low precision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinrec.errors import ShapeError
from dinrec.nn.attention import (
    PADDING_SCORE,
    DinFcnAttention,
    din_fcn_attention,
    din_fcn_attention_candidates,
)


def _randomize(unit: DinFcnAttention, seed: int = 0) -> DinFcnAttention:
    """Random biases and PReLU slopes too, so that every parameter affects the result."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return unit


def _inputs(b=6, t=7, q=5, d=8, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, q, generator=g, dtype=dtype)
    facts = torch.randn(b, t, d, generator=g, dtype=dtype)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0], lengths[1] = 0, t  # an all-masked row and a full row
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return query, facts, mask


@pytest.mark.parametrize("mode", ["SUM", "LIST"])
@pytest.mark.parametrize("softmax", [True, False])
def test_fast_path_equals_reference_values_and_gradients(mode, softmax):
    query, facts, mask = _inputs()
    unit = _randomize(DinFcnAttention(5, 8, 16, mode=mode, softmax=softmax)).double()
    results = {}
    for impl in ("reference", "fast"):
        unit.zero_grad()
        unit.impl = impl
        qv = query.clone().requires_grad_()
        fv = facts.clone().requires_grad_()
        out, alphas = unit(qv, fv, mask, return_alphas=True)
        # A loss that weighs every element differently and avoids the huge padded weights.
        w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        finite = out.abs() < 1e6
        (out * w * finite).sum().backward()
        grads = [qv.grad, fv.grad] + [p.grad.clone() for p in unit.parameters()]
        results[impl] = (out.detach(), alphas.detach(), grads)
    ref, fast = results["reference"], results["fast"]
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-10, atol=1e-10)
    for g_fast, g_ref in zip(fast[2], ref[2], strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-8, atol=1e-10)
    # The attention parameters really receive gradient.
    assert unit.att1.weight.grad.abs().sum() > 0


def test_fast_path_float32_close_to_reference():
    query, facts, mask = _inputs(b=32, t=50, q=18, d=36, dtype=torch.float32)
    unit = _randomize(DinFcnAttention(18, 36, 80))
    with torch.no_grad():
        ref = unit(query, facts, mask)
        unit.impl = "fast"
        fast = unit(query, facts, mask)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_output_shapes():
    query, facts, mask = _inputs(b=3, t=4, q=5, d=8, dtype=torch.float32)
    unit = DinFcnAttention(5, 8, 16, mode="SUM")
    out, alphas = unit(query, facts, mask, return_alphas=True)
    assert out.shape == (3, 1, 8) and alphas.shape == (3, 1, 4)
    unit.mode = "LIST"
    out, alphas = unit(query, facts, mask, return_alphas=True)
    assert out.shape == (3, 4, 8) and alphas.shape == (3, 4)
    assert unit(query, facts, mask).shape == (3, 4, 8)


def test_time_major_and_tuple_facts():
    query, facts, mask = _inputs(b=3, t=4, q=5, d=8, dtype=torch.float64)
    bm = _randomize(DinFcnAttention(5, 8, 16)).double()
    tm = DinFcnAttention(5, 8, 16, time_major=True).double()
    tm.load_state_dict(bm.state_dict())
    torch.testing.assert_close(tm(query, facts.transpose(0, 1), mask), bm(query, facts, mask))
    # Tuple facts: concatenated on the last axis, query concatenated with itself.
    bi = _randomize(DinFcnAttention(5, 16, 16, bi_rnn=True), seed=3).double()
    plain = DinFcnAttention(10, 16, 16).double()
    plain.load_state_dict(bi.state_dict())
    got = bi(query, (facts, facts * 2), mask)
    want = plain(torch.cat([query, query], 1), torch.cat([facts, facts * 2], 2), mask)
    torch.testing.assert_close(got, want)


def test_mask_semantics_all_masked_row_is_uniform_and_prefix():
    query, facts, _ = _inputs(b=3, t=5, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [2, 1, -1, 1, 0]])
    unit = _randomize(DinFcnAttention(5, 8, 16)).double()
    out, alphas = unit(query, facts, mask, return_alphas=True)
    torch.testing.assert_close(alphas[0, 0], torch.full((5,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(out[0, 0], facts[0].mean(0))
    assert alphas[1, 0, 0] == 1 and (alphas[1, 0, 1:] == 0).all()
    # Only the value 1 is valid: 2 and -1 get zero weight.
    assert (alphas[2, 0, [0, 2, 4]] == 0).all() and alphas[2, 0, [1, 3]].sum().item() == pytest.approx(1)
    # bool and 0/1 float masks mean the same thing.
    bool_mask = mask == 1
    torch.testing.assert_close(unit(query, facts, bool_mask), out)
    torch.testing.assert_close(unit(query, facts, bool_mask.double()), out)
    # No mask means every position is valid; for_cnn ignores the mask.
    unit.for_cnn = True
    torch.testing.assert_close(unit(query, facts, mask), unit(query, facts, None))


def test_softmax_off_uses_the_padding_constant_as_weight():
    query, facts, mask = _inputs(b=4, t=5, dtype=torch.float64)
    unit = _randomize(DinFcnAttention(5, 8, 16, softmax=False)).double()
    _, alphas = unit(query, facts, mask, return_alphas=True)
    assert (alphas[0] == PADDING_SCORE).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_autocast_low_precision_all_masked_rows_are_finite(dtype, impl):
    query, facts, mask = _inputs(b=8, t=6, q=5, d=8, dtype=torch.float32)
    mask[2] = 0
    unit = _randomize(DinFcnAttention(5, 8, 16, impl=impl))
    with torch.no_grad():
        want_out, want_alpha = unit(query, facts, mask, return_alphas=True)
        with torch.autocast("cpu", dtype=dtype):
            out, alphas = unit(query, facts, mask, return_alphas=True)
    assert torch.isfinite(out).all() and torch.isfinite(alphas).all()
    # The all-masked rows still get uniform weights 1/T.
    for row in (0, 2):
        torch.testing.assert_close(
            alphas[row, 0].float(), torch.full((6,), 1 / 6), rtol=0.0, atol=1e-2
        )
    torch.testing.assert_close(out.float(), want_out, rtol=0.05, atol=0.05)
    torch.testing.assert_close(alphas.float(), want_alpha, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_module_all_masked_rows_are_finite(dtype):
    """The unit run directly in float16 / bfloat16 (no autocast) clamps the padding score."""
    query, facts, mask = _inputs(b=4, t=6, q=5, d=8, dtype=torch.float32)
    unit = _randomize(DinFcnAttention(5, 8, 16)).to(dtype)
    with torch.no_grad():
        out, alphas = unit(query.to(dtype), facts.to(dtype), mask, return_alphas=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(alphas[0, 0].float(), torch.full((6,), 1 / 6), rtol=0, atol=1e-2)


@pytest.mark.parametrize("mode", ["SUM", "LIST"])
def test_candidates_equal_repeated_history(mode):
    g = torch.Generator().manual_seed(5)
    n, t, q, d = 9, 7, 5, 8
    cands = torch.randn(n, q, generator=g, dtype=torch.float64)
    history = torch.randn(t, d, generator=g, dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 0, 1, 0, 0])
    unit = _randomize(DinFcnAttention(q, d, 16, mode=mode)).double()
    out, alphas = unit.score_candidates(cands, history, mask, return_alphas=True)
    want, want_alphas = unit(cands, history.expand(n, t, d), mask.expand(n, t), return_alphas=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(alphas, want_alphas)
    # (1, T, D) history and (1, T) mask are accepted too; gradients reach the history.
    h = history.unsqueeze(0).clone().requires_grad_()
    unit.score_candidates(cands, h, mask.unsqueeze(0)).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_functional_form_matches_module():
    query, facts, mask = _inputs(dtype=torch.float64)
    unit = _randomize(DinFcnAttention(5, 8, 16)).double()
    got = din_fcn_attention(query, facts, mask, unit.weights(), mode="SUM", return_alphas=False)
    torch.testing.assert_close(got, unit(query, facts, mask))


def test_default_initialisation_is_the_reference():
    unit = DinFcnAttention(18, 36, 80)
    assert (unit.prelu_alpha == 0.1).all()
    for layer in (unit.query_proj, unit.att1, unit.att2, unit.att3):
        assert (layer.bias == 0).all()
        fan_in, fan_out = layer.in_features, layer.out_features
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.8 * bound  # really spread over the Glorot range
    assert unit.att1.weight.shape == (80, 4 * 36) and unit.att2.weight.shape == (40, 80)


def test_load_reference_weights_by_tensorflow_names():
    rng = np.random.default_rng(0)
    q, d, a, stag = 4, 6, 10, "_x"
    params = {
        f"f1{stag}/kernel": rng.normal(size=(q, d)),
        f"f1{stag}/bias": rng.normal(size=d),
        "prelu_": rng.normal(size=d),
        f"f1_att{stag}/kernel": rng.normal(size=(4 * d, a)),
        f"f1_att{stag}/bias": rng.normal(size=a),
        f"f2_att{stag}/kernel": rng.normal(size=(a, 40)),
        f"f2_att{stag}/bias": rng.normal(size=40),
        f"f3_att{stag}/kernel": rng.normal(size=(40, 1)),
        f"f3_att{stag}/bias": rng.normal(size=1),
    }
    unit = DinFcnAttention(q, d, a).double()
    unit.load_reference_weights(params, stag=stag)
    np.testing.assert_allclose(unit.att1.weight.detach().numpy(), params[f"f1_att{stag}/kernel"].T)
    np.testing.assert_allclose(unit.prelu_alpha.detach().numpy(), params["prelu_"])
    bad = dict(params)
    bad[f"f2_att{stag}/kernel"] = rng.normal(size=(40, a))
    with pytest.raises(ShapeError, match=r"att2.kernel: expected \[in, out\]"):
        unit.load_reference_weights(bad, stag=stag)
    with pytest.raises(KeyError, match="att3"):
        unit.load_reference_weights({k: v for k, v in params.items() if "f3" not in k}, stag=stag)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (dict(query=torch.zeros(3, 5), facts=torch.zeros(4, 7, 8)), r"query: batch size 3 .* \(4, 7, 8\)"),
        (dict(query=torch.zeros(3, 5, 1)), r"query: expected rank 2 \(B, Q\), got shape \(3, 5, 1\)"),
        (dict(facts=torch.zeros(3, 8)), r"facts: expected rank 3 \(B, T, D\), got shape \(3, 8\)"),
        (dict(facts=torch.zeros(3, 0, 8), mask=torch.zeros(3, 0)), r"facts: the sequence axis T is empty"),
        (dict(mask=torch.ones(3, 6)), r"mask: expected shape \(B, T\) = \(3, 7\), got \(3, 6\)"),
        (dict(mask=torch.ones(7, 3)), r"mask: expected shape \(B, T\) = \(3, 7\), got \(7, 3\)"),
        (dict(mask=torch.ones(3)), r"mask: expected rank 2"),
        (dict(mask=torch.full((3, 7), 0.5)), r"mask: a floating-point mask must hold only 0.0 and 1.0"),
        (dict(query=torch.zeros(3, 4)), r"query: the query projection maps 5 features"),
        (dict(facts=torch.zeros(3, 7, 9)), r"query projection maps 5 features to 8, but got .* facts size 9"),
    ],
)
def test_bad_input_errors_name_argument_and_shapes(args, message):
    unit = DinFcnAttention(5, 8, 16)
    call = dict(query=torch.zeros(3, 5), facts=torch.zeros(3, 7, 8), mask=torch.ones(3, 7))
    call.update(args)
    with pytest.raises(ShapeError, match=message):
        unit(call["query"], call["facts"], call["mask"])


def test_bad_tuple_facts():
    unit = DinFcnAttention(5, 16, 16, bi_rnn=True)
    f = torch.zeros(3, 7, 8)
    with pytest.raises(ShapeError, match="exactly 2 tensors"):
        unit(torch.zeros(3, 5), (f, f, f), torch.ones(3, 7))
    with pytest.raises(ShapeError, match="agree on their first two axes"):
        unit(torch.zeros(3, 5), (f, torch.zeros(3, 6, 8)), torch.ones(3, 7))
    with pytest.raises(ShapeError, match="must be a tuple"):
        unit(torch.zeros(3, 5), torch.zeros(3, 7, 16), torch.ones(3, 7))
    with pytest.raises(ShapeError, match="must not be a tuple"):
        DinFcnAttention(5, 16, 16)(torch.zeros(3, 5), (f, f), torch.ones(3, 7))


def test_bad_candidate_inputs():
    unit = DinFcnAttention(5, 8, 16)
    with pytest.raises(ShapeError, match=r"history: expected rank 2 \(T, D\)"):
        unit.score_candidates(torch.zeros(4, 5), torch.zeros(2, 7, 8))
    with pytest.raises(ShapeError, match=r"mask: expected shape \(T,\) = \(7,\), got \(6,\)"):
        unit.score_candidates(torch.zeros(4, 5), torch.zeros(7, 8), torch.ones(6))
    with pytest.raises(ShapeError, match="history: the sequence axis T is empty"):
        din_fcn_attention_candidates(torch.zeros(4, 5), torch.zeros(0, 8), None, unit.weights())


def test_without_query_projection_is_plain_din_attention():
    """query_projection=False: the reference's `din_attention`, the raw query in [q, k, q-k, q*k]."""
    query, facts, mask = _inputs(b=5, t=6, q=8, d=8, dtype=torch.float64)
    unit = _randomize(DinFcnAttention(8, 8, 16, query_projection=False)).double()
    assert unit.query_proj is None and unit.prelu_alpha is None
    out, alphas = unit(query, facts, mask, return_alphas=True)
    # By hand: the reference din_attention on the raw query.
    w1, b1 = unit.att1.weight, unit.att1.bias
    qs = query[:, None, :].expand_as(facts)
    din = torch.cat([qs, facts, qs - facts, qs * facts], -1)
    h = torch.sigmoid(torch.sigmoid(din @ w1.T + b1) @ unit.att2.weight.T + unit.att2.bias)
    s = (h @ unit.att3.weight.T + unit.att3.bias).reshape(5, 1, 6)
    s = torch.softmax(s.masked_fill(mask[:, None, :] != 1, PADDING_SCORE), -1)
    torch.testing.assert_close(alphas, s)
    torch.testing.assert_close(out, s @ facts)
    unit.impl = "reference"
    torch.testing.assert_close(unit(query, facts, mask), out)
    with pytest.raises(ShapeError, match="without a query projection"):
        DinFcnAttention(5, 8, 16, query_projection=False)


# --------------------------------------------------------------------------- any width (#11)
WIDTHS = [(5, 37), (36, 100), (100, 7), (18, 36), (3, 1)]  # Q != D, odd D, large D, D = 1


@pytest.mark.parametrize(("q", "d"), WIDTHS)
def test_fast_rows_equal_reference_for_any_width(q, d):
    """The folded first layer holds for any query width Q and facts width D."""
    query, facts, mask = _inputs(b=5, t=9, q=q, d=d, seed=q + d)
    unit = _randomize(DinFcnAttention(q, d, 16), seed=d).double()
    results = []
    for impl in ("fast", "reference"):
        unit.impl = impl
        unit.zero_grad()
        fv = facts.clone().requires_grad_()
        out = unit(query, fv, mask)
        out.sin().sum().backward()
        results.append([out, fv.grad, *(p.grad for p in unit.parameters())])
    for fast, ref in zip(*results, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("q", "d"), WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad", [False, True])
def test_candidates_equal_reference_rows_for_any_width(q, d, dtype, grad):
    """Prepared candidate path (C++ operator on CPU) without autograd, shared-history rows
    with it: both equal the reference rows with the history repeated, for any widths."""
    g = torch.Generator().manual_seed(q * d)
    n, t = 300, 50  # 15,000 pairs: split over threads, several chunks
    cands = torch.randn(n, q, generator=g, dtype=dtype)
    history = torch.randn(t, d, generator=g, dtype=dtype)
    mask = torch.arange(t) < 31
    unit = _randomize(DinFcnAttention(q, d, 16, mode="SUM"), seed=q).to(dtype)
    with torch.no_grad():
        unit.impl = "reference"
        want = unit(cands, history.expand(n, t, d), mask.expand(n, t))
        unit.impl = "fast"
    with torch.set_grad_enabled(grad):
        got = unit.score_candidates(cands, history, mask)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got.requires_grad == grad
