"""Surviving faults: kill -9 at any point, then --resume, ends with the uninterrupted weights."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dinrec.checkpoint import load_checkpoint
from dinrec.cli import main
from dinrec.errors import RunFolderError
from dinrec.train.trainer import TrainConfig, train

# 218 steps per epoch (6,970 rows / 32): the runs below cross an epoch boundary.
ARGS = ["--model", "din", "--embedding-dim", "8", "--hidden", "32,16", "--batch-size", "32",
        "--threads", "1", "--eval-every", "50", "--checkpoint-every", "5", "--log-every", "10",
        "--quiet"]


@pytest.fixture(scope="module")
def store(tiny_store: Path) -> Path:
    return tiny_store


def _assert_same_weights(a: Path, b: Path) -> None:
    wa = load_checkpoint(a / "checkpoints/last.pt")["model"]
    wb = load_checkpoint(b / "checkpoints/last.pt")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ba = load_checkpoint(a / "checkpoints/best.pt")
    bb = load_checkpoint(b / "checkpoints/best.pt")
    assert ba["step"] == bb["step"]
    for k in ba["model"]:
        assert torch.equal(ba["model"][k], bb["model"][k]), k


def _kill_after_checkpoint(cmd: list[str], run: Path, timeout: float = 120) -> None:
    """Start ``cmd`` in its own process group; SIGKILL the group once a checkpoint exists."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not (run / "checkpoints" / "last.pt").exists():
            assert proc.poll() is None, f"the run ended (status {proc.returncode}) before a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.01)
        time.sleep(0.05)  # somewhere after it: mid-step, mid-evaluation or mid-save
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run / "metrics.json").exists(), "the run finished before the kill"
    # Nothing of the run is left: torch.distributed.run's workers (process groups of their
    # own) die with the launcher.
    deadline = time.monotonic() + 10
    while _processes_of(run):
        assert time.monotonic() < deadline, f"still running after the kill: {_processes_of(run)}"
        time.sleep(0.1)


def _processes_of(run: Path) -> list[int]:
    """Processes whose command line names ``run``."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(run).encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.mark.parametrize("nproc", [1, 2], ids=["1-process", "2-ddp-processes"])
def test_kill9_then_resume_gives_the_uninterrupted_weights(store, tmp_path, nproc):
    steps = "300" if nproc == 1 else "120"
    args = [*ARGS, "--max-steps", steps, "--nproc", str(nproc)]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", str(store), str(full), *args]) == 0
    cmd = [sys.executable, "-m", "dinrec", "train", str(store), str(part), *args]
    _kill_after_checkpoint(cmd, part)
    assert main(["train", str(store), str(part), *args, "--resume"]) == 0
    _assert_same_weights(full, part)
    import json

    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((part / "metrics.json").read_text())
    assert a["validations"] == b["validations"] and a["test"]["auc"] == b["test"]["auc"]


def _cfg(**kw) -> TrainConfig:
    base = dict(model="din", batch_size=32, progress=False, log_every=4, threads=1,
                embedding_dim=8, hidden=(32, 16), max_steps=24, eval_every=8, checkpoint_every=4)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "missing"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(store, tmp_path, caplog, damage):
    full = tmp_path / "full"
    train(_cfg(), store, full)
    part = tmp_path / "part"
    assert not train(_cfg(stop_after=14), store, part).completed  # last.pt: step 14, prev.pt: step 12
    last, prev = part / "checkpoints/last.pt", part / "checkpoints/prev.pt"
    assert load_checkpoint(last)["state"]["step"] == 14
    assert load_checkpoint(prev)["state"]["step"] == 12
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif damage == "corrupt":
        data = bytearray(last.read_bytes())
        data[len(data) // 2] ^= 0xFF
        last.write_bytes(bytes(data))
    else:  # killed between moving last.pt to prev.pt and writing the new last.pt
        last.unlink()
    with caplog.at_level(logging.WARNING, logger="dinrec.train.trainer"):
        assert train(_cfg(), store, part, resume=True).completed
    assert "resuming from the previous checkpoint checkpoints/prev.pt (step 12)" in caplog.text
    _assert_same_weights(full, part)


def test_no_intact_checkpoint_is_a_clear_error(store, tmp_path):
    part = tmp_path / "part"
    train(_cfg(stop_after=10), store, part)
    for name in ("last.pt", "prev.pt"):
        path = part / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(RunFolderError, match="cannot resume: no intact checkpoint.*truncated"):
        train(_cfg(), store, part, resume=True)
    assert main(["train", str(store), str(part), "--resume", "--quiet"]) == 2
