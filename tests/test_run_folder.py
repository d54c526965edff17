"""The run folder survives a kill at any moment: it appears atomically, a half-made one is
replaced, and `--resume` starts afresh (saying so) when there is nothing to resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from dinrec.checkpoint import load_checkpoint
from dinrec.errors import RunFolderError
from dinrec.run import create_run_dir, is_half_made
from dinrec.train.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def store(tiny_store: Path) -> Path:
    return tiny_store


def _cfg(**kw) -> TrainConfig:
    base = dict(model="din", batch_size=32, progress=False, log_every=4, threads=1,
                embedding_dim=8, hidden=(16,), max_steps=12, eval_every=6, checkpoint_every=3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    train(_cfg(), store, run)
    return run


def _same_run(a: Path, b: Path) -> None:
    for name in ("last.pt", "best.pt"):
        wa = load_checkpoint(a / "checkpoints" / name)["model"]
        wb = load_checkpoint(b / "checkpoints" / name)["model"]
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma["steps"] == mb["steps"] and ma["validations"] == mb["validations"]
    assert ma["test"]["auc"] == mb["test"]["auc"]


def test_resume_with_nothing_to_resume_starts_afresh_and_says_so(store, reference, tmp_path, caplog):
    run = tmp_path / "never-started"
    with caplog.at_level(logging.WARNING, logger="dinrec.train.trainer"):
        assert train(_cfg(), store, run, resume=True).completed
    assert "nothing to resume" in caplog.text and "starting the run afresh" in caplog.text
    _same_run(reference, run)


def test_killed_before_the_first_checkpoint_the_same_resume_command_finishes(store, reference, tmp_path):
    run = tmp_path / "run"
    train(_cfg(), store, run)
    for p in (run / "checkpoints").iterdir():  # as if killed after config.json, before last.pt
        p.unlink()
    (run / "metrics.json").unlink()
    assert train(_cfg(), store, run, resume=True).completed
    _same_run(reference, run)


@pytest.mark.parametrize("resume", [False, True])
def test_a_half_made_folder_is_replaced(store, reference, tmp_path, resume):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # killed after the folder, before config.json
    (run / "log.csv").write_text("step\n")
    assert is_half_made(run)
    assert train(_cfg(), store, run, resume=resume).completed
    _same_run(reference, run)


@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_with_other_files_is_never_replaced(store, tmp_path, resume):
    run = tmp_path / "mine"
    (run / "checkpoints").mkdir(parents=True)
    (run / "precious.txt").write_text("x")
    assert not is_half_made(run)
    with pytest.raises(RunFolderError, match="not a run folder|exists and is not empty"):
        train(_cfg(), store, run, resume=resume, overwrite=True)
    assert (run / "precious.txt").read_text() == "x"


def test_resuming_a_finished_run_trains_no_further_step(store, reference, tmp_path):
    run = tmp_path / "run"
    train(_cfg(), store, run)
    (run / "metrics.json").unlink()  # as if killed after the final checkpoint
    res = train(_cfg(), store, run, resume=True)
    assert res.metrics["steps"] == 12
    assert load_checkpoint(run / "checkpoints/last.pt")["state"]["step"] == 12
    _same_run(reference, run)


def test_the_run_folder_appears_only_when_filled(tmp_path):
    run = tmp_path / "run"

    def fill_then_die(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        assert not run.exists()  # nothing under the run's name while it is being made
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        create_run_dir(run, fill_then_die, overwrite=False)
    assert not run.exists() and list(tmp_path.iterdir()) == []
    # A leftover of a kill (the temporary folder) is cleaned up by the next creation.
    (tmp_path / ".run.deadbeef.partial").mkdir()
    create_run_dir(run, lambda tmp: (tmp / "config.json").write_text("{}"), overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (run / "config.json").exists() and (run / "checkpoints").is_dir()
