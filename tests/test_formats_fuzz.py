"""A small run of ``benchmarks/fuzz_formats.py``: mutated inputs of every reader, no traceback."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fuzz_formats.py"


@pytest.fixture(scope="module")
def fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_formats", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_every_format_is_fuzzed_without_a_traceback(fuzz_module, tmp_path):
    bases = fuzz_module.base_cases()
    from dinrec.data.formats import FORMATS

    assert set(bases) == set(FORMATS)  # a new reader must get fuzz inputs too
    logging.disable(logging.WARNING)
    try:
        for fmt, cases in bases.items():
            tally = fuzz_module.fuzz(fmt, cases, 50, seed=7, save=tmp_path / "fail")
            assert tally.failures == [], (fmt, tally.failures)
            assert tally.cases == 50
            assert tally.outcomes["ok"] > 0, (fmt, tally.outcomes)  # not all broken ...
            errors = sum(v for k, v in tally.outcomes.items() if k.startswith("error"))
            assert errors > 0, (fmt, tally.outcomes)  # ... and not all harmless
    finally:
        logging.disable(logging.NOTSET)


def test_the_fuzz_classifies_a_traceback_as_a_failure(fuzz_module, tmp_path, monkeypatch):
    """Break a reader (a raw ValueError) and the fuzz must report FAIL with the case saved."""
    from dinrec.data.formats import common

    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(common, "check_nonempty", broken)
    from dinrec.data.formats import dien_text

    monkeypatch.setattr(dien_text, "check_nonempty", broken)
    tally = fuzz_module.fuzz("dien-text", fuzz_module.base_cases()["dien-text"], 5, seed=1,
                             save=tmp_path / "fail")
    assert tally.outcomes["FAIL"] > 0
    saved = list((tmp_path / "fail").iterdir())
    assert saved and (saved[0] / "traceback.txt").read_text().strip().endswith("boom")
