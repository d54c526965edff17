"""Shared fixtures: ``tiny_store`` (the tiny synthetic preset, prepared) and ``tiny_din_run``."""

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


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sample store of the tiny synthetic preset (seed 3); read-only for the tests."""
    from dinrec.data import PrepareConfig, generate, prepare_events, preset

    path = tmp_path_factory.mktemp("store") / "tiny"
    events, _ = generate(preset("tiny", seed=3))
    prepare_events(events, path, PrepareConfig(seed=3))
    return path
