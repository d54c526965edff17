"""`dinrec demo --seed-example`: the seed's demo inputs, what they compute, and the claim."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dinrec.cli import main
from dinrec.seed_demo import compute_seed_demo, seed_inputs

DEMO_CASE = Path(__file__).parent / "fixtures" / "golden" / "din_fcn_attention" / "s01_demo_seed2_B4_T1_D32.npz"


def test_seed_inputs_are_the_reference_demo_inputs():
    user, item = seed_inputs()
    with np.load(DEMO_CASE) as case:
        np.testing.assert_array_equal(user, case["demo.user_features_float64"])
        np.testing.assert_array_equal(item, case["demo.item_features_float64"])


def test_demo_result_matches_reference_and_claim():
    result = compute_seed_demo(weight_draws=3)
    with np.load(DEMO_CASE) as case:
        assert result.best_index == int(case["demo.best_item_index"])
        item = case["demo.item_features_float64"]
        assert result.best_value_float64 == float(item.max())
        assert result.best_output_float32 == float(np.float32(item.max()))
    assert result.output_equals_facts
    assert result.best_index != 73


def test_cli_prints_computed_numbers(capsys):
    assert main(["demo", "--seed-example"]) == 0
    out = capsys.readouterr().out
    assert "Best item index: 56" in out
    assert "np.max: 4.108692623805201" in out
    assert "73" in out and "does not compute" in out
    assert "holds for" in out
