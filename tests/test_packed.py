"""The packed attention path (`dinrec.nn.packed`): equal to the reference, values and
gradients, on every edge case of the unit; chosen by the valid-share rule only where it can
run (eager CPU, no autocast, no tracer)."""

from __future__ import annotations

import pytest
import torch

from dinrec.nn import packed
from dinrec.nn.attention import DinFcnAttention

B, T, Q, D, A = 7, 9, 5, 8, 16


@pytest.fixture
def calls(monkeypatch):
    """Counts the packed path's runs; every batch with a mask is packed (share < 1.01)."""
    seen = []
    original = packed.packed_scores

    def spy(*args, **kwargs):
        seen.append(args[3].numel())  # the number of valid positions
        return original(*args, **kwargs)

    monkeypatch.setattr(packed, "packed_scores", spy)
    _pack_below(monkeypatch, 1.01)
    return seen


def _pack_below(monkeypatch, share: float) -> None:
    """Pack below ``share`` for every attention width."""
    monkeypatch.setattr(packed, "PACKED_BELOW", share)
    monkeypatch.setattr(packed, "PACKED_BELOW_WIDE", share)
    monkeypatch.setattr(packed, "PACKED_INPUTS_BELOW", share)  # DIN's packed embeddings
    monkeypatch.setattr(packed, "PACKED_INPUTS_BELOW_WIDE", share)


def _unit(query_projection: bool = True, dtype=torch.float64, seed: int = 0, **kw) -> DinFcnAttention:
    q = Q if query_projection else D
    unit = DinFcnAttention(q, D, A, query_projection=query_projection, **kw).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random biases and slopes too: every parameter matters
        for p in unit.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    return unit


def _mask(b: int, t: int, seed: int, prefix: bool) -> torch.Tensor:
    """Random (B, T) bool mask with an empty row and a full row (where B allows)."""
    g = torch.Generator().manual_seed(seed)
    if prefix:
        lengths = torch.randint(0, t + 1, (b,), generator=g)
        mask = torch.arange(t)[None, :] < lengths[:, None]
    else:  # holes anywhere
        mask = torch.rand(b, t, generator=g) < 0.4
    if b >= 2:
        mask[0], mask[1] = False, True
    return mask


def _run(unit: DinFcnAttention, impl: str, query, facts, mask, return_alphas=True):
    """Outputs and the gradients of query, facts and every parameter for one weighted loss."""
    unit.zero_grad()
    unit.impl = impl
    qv, fv = query.clone().requires_grad_(), facts.clone().requires_grad_()
    res = unit(qv, fv, mask, return_alphas=return_alphas)
    outs = res if isinstance(res, tuple) else (res,)
    loss = 0
    for i, o in enumerate(outs):
        w = torch.linspace(-1, 1 + i, o.numel(), dtype=o.dtype).reshape(o.shape)
        loss = loss + (o * w * (o.abs() < 1e6)).sum()  # skip softmax=False's huge padded weights
    loss.backward()
    grads = [qv.grad, fv.grad] + [p.grad for p in unit.parameters()]
    return [o.detach() for o in outs], grads


def _assert_same(unit, query, facts, mask, rtol=1e-10, atol=1e-12, return_alphas=True):
    ref_out, ref_grads = _run(unit, "reference", query, facts, mask, return_alphas)
    out, grads = _run(unit, "fast", query, facts, mask, return_alphas)
    for a, b in zip(out, ref_out, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g is not None and r is not None
        torch.testing.assert_close(g, r, rtol=rtol * 100, atol=atol * 100)


def _inputs(b: int, t: int, q: int, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, q, generator=g, dtype=dtype), torch.randn(b, t, D, generator=g, dtype=dtype)


@pytest.mark.parametrize("mode", ["SUM", "LIST"])
@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("query_projection", [True, False])
@pytest.mark.parametrize("prefix", [True, False])
def test_packed_equals_reference_values_and_gradients(calls, mode, softmax, query_projection, prefix):
    unit = _unit(query_projection, mode=mode, softmax=softmax)
    query, facts = _inputs(B, T, Q if query_projection else D)
    mask = _mask(B, T, seed=3, prefix=prefix)
    _assert_same(unit, query, facts, mask)
    assert calls == [int(mask.sum())]  # the packed path ran, once, on the valid positions


@pytest.mark.parametrize(("b", "t"), [(1, 1), (1, 6), (5, 1), (4, 3)])
@pytest.mark.parametrize("fill", ["random", "empty", "full"])
def test_packed_tiny_and_degenerate_batches(calls, b, t, fill):
    unit = _unit(query_projection=True)
    query, facts = _inputs(b, t, Q, seed=b * 10 + t)
    mask = {"random": _mask(b, t, seed=t, prefix=False), "empty": torch.zeros(b, t, dtype=torch.bool),
            "full": torch.ones(b, t, dtype=torch.bool)}[fill]
    _assert_same(unit, query, facts, mask)
    assert calls == [int(mask.sum())]


def test_all_empty_rows_are_uniform_as_the_reference(calls):
    unit = _unit(query_projection=False)
    query, facts = _inputs(3, 5, D)
    mask = torch.zeros(3, 5, dtype=torch.long)
    unit.impl = "fast"
    with torch.no_grad():
        _, alphas = unit(query, facts, mask, return_alphas=True)
    torch.testing.assert_close(alphas, torch.full((3, 1, 5), 0.2, dtype=torch.float64))
    assert calls == [0]


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.float32, torch.bool])
def test_mask_values_other_than_one_are_padding(calls, mask_dtype):
    """Only 1 marks a valid position (a long mask's 2 is padding, as in the reference)."""
    unit = _unit()
    query, facts = _inputs(B, T, Q)
    mask = _mask(B, T, seed=5, prefix=False).to(mask_dtype)
    if mask_dtype == torch.long:
        mask[2, :3] = 2
    _assert_same(unit, query, facts, mask)


def test_time_major_and_tuple_facts(calls):
    unit = DinFcnAttention(Q, 2 * D, A, bi_rnn=True, time_major=True, mode="LIST").double()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in unit.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    query = torch.randn(B, Q, dtype=torch.float64, generator=g)
    fw, bw = (torch.randn(T, B, D, dtype=torch.float64, generator=g) for _ in range(2))  # (T, B, D)
    mask = _mask(B, T, seed=6, prefix=True)
    results = {}
    for impl in ("reference", "fast"):
        unit.impl = impl
        unit.zero_grad()
        f1, f2 = fw.clone().requires_grad_(), bw.clone().requires_grad_()
        out, alphas = unit(query, (f1, f2), mask, return_alphas=True)
        (out.sum() + (alphas * torch.arange(T)).sum()).backward()
        results[impl] = [out, alphas, f1.grad, f2.grad, *(p.grad for p in unit.parameters())]
    for a, b in zip(results["fast"], results["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert calls == [int(mask.sum())]


def test_for_cnn_ignores_the_mask_and_does_not_pack(calls):
    unit = _unit(for_cnn=True)
    query, facts = _inputs(B, T, Q)
    _assert_same(unit, query, facts, _mask(B, T, seed=7, prefix=True))
    assert calls == []


def test_no_mask_does_not_pack(calls):
    unit = _unit()
    query, facts = _inputs(B, T, Q)
    _assert_same(unit, query, facts, None)
    assert calls == []


@pytest.mark.parametrize("query_projection", [True, False])
def test_float32_and_eval_without_autograd(calls, query_projection):
    unit = _unit(query_projection, dtype=torch.float32)
    query, facts = _inputs(32, 50, Q if query_projection else D, dtype=torch.float32)
    mask = _mask(32, 50, seed=8, prefix=True)
    with torch.no_grad():
        unit.impl = "reference"
        ref = unit(query, facts, mask, return_alphas=True)
        unit.impl = "fast"
        fast = unit(query, facts, mask, return_alphas=True)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _assert_same(unit, query, facts, mask, rtol=1e-4, atol=1e-5)
    assert len(calls) == 2


@pytest.mark.parametrize(("attention_size", "packs_at_half"), [(16, False), (80, True)])
def test_the_rule_packs_only_padded_batches(monkeypatch, attention_size, packs_at_half):
    seen = []
    original = packed.packed_scores
    monkeypatch.setattr(packed, "packed_scores", lambda *a, **k: seen.append(1) or original(*a, **k))
    unit = DinFcnAttention(Q, D, attention_size).double()
    query, facts = _inputs(4, 10, Q)
    full = torch.ones(4, 10, dtype=torch.bool)
    short = torch.arange(10)[None, :] < torch.tensor([[2], [3], [10], [1]])  # share 0.4
    half = torch.arange(10)[None, :] < torch.tensor([[2], [3], [10], [7]])  # share 0.55
    with torch.no_grad():
        unit(query, facts, full)
        assert seen == []
        unit(query, facts, short)
        assert seen == [1]
        unit(query, facts, half)
        assert seen == [1, 1] if packs_at_half else seen == [1]


def test_autocast_and_meta_keep_the_dense_path(calls):
    unit = _unit(dtype=torch.float32)
    query, facts = _inputs(B, T, Q, dtype=torch.float32)
    mask = _mask(B, T, seed=9, prefix=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unit(query, facts, mask)
    assert torch.isfinite(out).all()
    meta = unit.to("meta")
    out = meta(query.to("meta"), facts.to("meta"), mask.to("meta"))
    assert out.shape == (B, 1, D) and out.device.type == "meta"
    assert calls == []


def test_only_needed_gradients_and_no_double_backward(calls):
    unit = _unit()
    query, facts = _inputs(B, T, Q)
    mask = _mask(B, T, seed=10, prefix=True)
    for p in unit.parameters():
        p.requires_grad_(False)
    unit.att2.weight.requires_grad_(True)
    unit(query, facts, mask).sum().backward()  # facts need no gradient
    assert unit.att2.weight.grad is not None
    f = facts.clone().requires_grad_()
    (g,) = torch.autograd.grad(unit(query, f, mask).sum(), f, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize(("name", "options"), [("din", {"attention": "din"}), ("din", {}), ("dien", {})])
def test_models_train_the_same_packed_or_dense(monkeypatch, name, options):
    """One float64 training step of DIN / DIEN: loss and every gradient, packed == dense."""
    from dinrec.data.schema import Schema
    from dinrec.models import create_model
    from model_inputs import DEFAULT_SIZES, random_batch

    schema = Schema.default(11)
    batch = random_batch(schema, DEFAULT_SIZES, b=16, seed=0, empty_rows=True)  # row 0 full, row 1 empty
    batch.label = batch.label.double()
    results = {}
    for side, below in (("dense", 0.0), ("packed", 1.01)):
        _pack_below(monkeypatch, below)
        torch.manual_seed(0)
        model = create_model(name, schema, DEFAULT_SIZES, activation="dice", **options).double().train()
        out = model(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch.label)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        loss.backward()
        results[side] = [loss.detach(), *(p.grad for p in model.parameters() if p.grad is not None)]
    assert len(results["packed"]) == len(results["dense"]) > 10
    for a, c in zip(results["packed"], results["dense"], strict=True):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- packed facts
@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("query_projection", [True, False])
@pytest.mark.parametrize("fill", ["random", "prefix", "empty", "full", "ones"])
def test_attention_on_packed_facts_equals_the_padded_unit(softmax, query_projection, fill):
    """``forward_packed`` (only the N valid facts, (N, D)) == the unit on the padded facts
    (zero at padded positions, as embedded padding): output, alphas and the gradients of
    the query, the valid facts and every parameter; the reference and the fast path alike."""
    b, t = 6, 7
    unit = _unit(query_projection, softmax=softmax)
    query, facts = _inputs(b, t, Q if query_projection else D, seed=5)
    mask = {"random": _mask(b, t, seed=2, prefix=False), "prefix": _mask(b, t, seed=2, prefix=True),
            "empty": torch.zeros(b, t, dtype=torch.bool), "full": torch.ones(b, t, dtype=torch.bool),
            "ones": torch.arange(t)[None, :] < torch.tensor([1, 1, 0, 1, 2, 1])[:, None]}[fill]
    facts = facts * mask.unsqueeze(-1)  # padding embeds as zeros
    index = mask.reshape(-1).nonzero().squeeze(1)
    rows = index // t

    def run(packed_side: bool, impl: str):
        unit.zero_grad()
        unit.impl = impl
        q, f = query.clone().requires_grad_(), facts.clone().requires_grad_()
        if packed_side:
            valid = f.reshape(b * t, D)[index]  # (N, D), the packed leaf's gradient = f's rows
            out, alphas = unit.forward_packed(q, valid, index, rows, t, return_alphas=True)
        else:
            out, alphas = unit(q, f, mask, return_alphas=True)
        w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        keep = alphas.abs() < 1e6  # skip softmax=False's huge padded weights
        wa = torch.linspace(-1, 2, alphas.numel(), dtype=out.dtype).reshape(alphas.shape)
        ((out * w).sum() + (alphas * wa * keep).sum()).backward()
        grads = [q.grad, f.grad.reshape(b * t, D)[index]] + [p.grad for p in unit.parameters()]
        return [out.detach(), alphas.detach()], grads

    for impl in ("reference", "fast"):
        want = run(False, impl)
        got = run(True, "fast")
        for a, c in zip(got[0], want[0], strict=True):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
        for a, c in zip(got[1], want[1], strict=True):
            assert a is not None and c is not None
            torch.testing.assert_close(a, c, rtol=1e-8, atol=1e-10)


def test_packed_facts_need_a_sum_unit_over_a_mask():
    from dinrec.errors import ShapeError

    for kw in ({"mode": "LIST"}, {"for_cnn": True}):
        unit = _unit(query_projection=False, **kw)
        assert not unit.packable
        with pytest.raises(ShapeError):
            unit.forward_packed(torch.zeros(2, D, dtype=torch.float64), torch.zeros(1, D, dtype=torch.float64),
                                torch.tensor([0]), torch.tensor([0]), 3)
