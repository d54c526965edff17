"""The randomized kill test (benchmarks/kill_test.py), short: one command re-run after
SIGKILLs at random moments ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _kill_test():
    spec = importlib.util.spec_from_file_location("kill_test", ROOT / "benchmarks" / "kill_test.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_random_kills_of_one_resume_command_end_bit_identical(tmp_path, capsys):
    kt = _kill_test()
    rc = kt.main(["--models", "din,dien", "--rounds", "1", "--kills", "3", "--seed", "7",
                  "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "mismatched rounds 0" in out and "rounds 2" in out


def test_differences_sees_one_changed_tensor(tiny_din_run, tmp_path):
    """The comparison the kill test relies on notices a single changed weight."""
    import shutil

    from dinrec.checkpoint import load_checkpoint, save_checkpoint

    kt = _kill_test()
    other = tmp_path / "other"
    shutil.copytree(tiny_din_run, other)
    assert kt.differences(tiny_din_run, other) == []
    last = other / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    name = next(iter(state["model"]))
    state["model"][name].view(-1)[0] += 1e-6
    save_checkpoint(last, state)
    assert kt.differences(tiny_din_run, other) == [f"last.pt/model/{name}"]
