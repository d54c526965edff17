"""Parity of `DinFcnAttention` with the reference TensorFlow outputs in tests/fixtures/golden."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dinrec.nn.attention import DinFcnAttention

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "din_fcn_attention"
CASES = sorted(GOLDEN.glob("*.npz"))


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _build(case: dict[str, np.ndarray], impl: str, dtype: torch.dtype):
    tuple_facts = bool(case["tuple_facts"])
    time_major = bool(case["time_major"])
    if tuple_facts:
        facts_np = (case["facts.0"], case["facts.1"])
        facts_size = facts_np[0].shape[-1] + facts_np[1].shape[-1]
        facts = tuple(torch.tensor(f, dtype=dtype) for f in facts_np)
    else:
        facts_size = case["facts"].shape[-1]
        facts = torch.tensor(case["facts"], dtype=dtype)
    unit = DinFcnAttention(
        query_size=case["query"].shape[1],
        facts_size=facts_size,
        attention_size=int(case["attention_size"]),
        mode=str(case["mode"]),
        softmax=bool(int(case["softmax_stag"])),
        time_major=time_major,
        return_alphas=bool(case["return_alphas"]),
        for_cnn=bool(case["forCnn"]),
        bi_rnn=tuple_facts,
        impl=impl,
    )
    unit.load_reference_weights(case)
    unit.to(dtype)
    query = torch.tensor(case["query"], dtype=dtype)
    mask = torch.tensor(case["mask"])  # int32, any value other than 1 is invalid
    return unit, query, facts, mask


def test_all_golden_cases_present():
    assert len(CASES) == 18


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_case(path: Path, impl: str, dtype: torch.dtype):
    case = _load(path)
    unit, query, facts, mask = _build(case, impl, dtype)
    with torch.no_grad():
        result = unit(query, facts, mask)
    if bool(case["return_alphas"]):
        output, alphas = result
        assert alphas.shape == case["alphas"].shape
        np.testing.assert_allclose(alphas.double().numpy(), case["alphas"], rtol=1e-5, atol=1e-5)
    else:
        output = result
    assert output.shape == case["output"].shape
    np.testing.assert_allclose(output.double().numpy(), case["output"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_intermediates(path: Path):
    """The projected query and the raw logits match too (localises any mismatch)."""
    case = _load(path)
    unit, query, facts, _ = _build(case, "reference", torch.float64)
    q = query
    if bool(case["tuple_facts"]):
        q = torch.cat([q, q], dim=1)
    with torch.no_grad():
        q_prelu = torch.nn.functional.prelu(unit.query_proj(q), unit.prelu_alpha)
    np.testing.assert_allclose(q_prelu.numpy(), case["intermediate.query_prelu"], rtol=1e-5, atol=1e-5)


def test_softmax_off_masked_cases_are_large():
    """The softmax-off masked cases really exercise the 1e10 range (relative tolerance matters)."""
    case = _load(GOLDEN / "s10_sum_softmax0_masked_alphas.npz")
    assert np.abs(case["output"]).max() > 1e9
    assert (case["alphas"] == np.float32(-(2.0**32) + 1)).any()


def test_seed_demo_case_output_equals_facts():
    case = _load(GOLDEN / "s01_demo_seed2_B4_T1_D32.npz")
    unit, query, facts, mask = _build(case, "fast", torch.float32)
    with torch.no_grad():
        out = unit(query, facts, mask)
    assert torch.equal(out, facts)
    assert int(out.flatten().argmax()) == int(case["demo.best_item_index"]) == 56
