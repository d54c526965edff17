"""Shared fixtures: ``tiny_din_run``, a DIN run trained for a few steps on the tiny synthetic preset."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_din_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run folder (config.json, vocab/, checkpoints/best.pt) of DIN, 20 steps."""
    from dinrec.data import PrepareConfig, generate, prepare_events, preset
    from dinrec.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny_din")
    events, _ = generate(preset("tiny"))
    prepare_events(events, root / "store", PrepareConfig())
    train(TrainConfig(model="din", max_steps=20, progress=False), root / "store", root / "run")
    return root / "run"
