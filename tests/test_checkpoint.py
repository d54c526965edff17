"""Tests of dinrec.checkpoint: atomic writes, corruption detection, recovery."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from dinrec import checkpoint as ck
from dinrec.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from dinrec.errors import DinrecError


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.PReLU(3), torch.nn.Linear(3, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return {
        "step": seed,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": capture_rng_state(),
        "nested": {"a": [1, 2.5, (3, "x")], "b": None, "c": {"t": torch.arange(6).view(2, 3)}},
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def no_temp_files(d) -> bool:
    return not [p for p in os.listdir(d) if p.endswith(".tmp")]


def test_round_trip(tmp_path):
    state = make_state(3)
    path = save_checkpoint(tmp_path / "sub" / "ckpt-3.pt", state)
    assert path.exists() and no_temp_files(path.parent)
    loaded = load_checkpoint(path)
    assert_same(state, loaded)
    # the optimizer state really restores
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.PReLU(3), torch.nn.Linear(3, 1))
    opt = torch.optim.Adam(model.parameters())
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    assert opt.state_dict()["state"][0]["step"] == 1


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(1)  # noqa: NPY002 - the legacy global is what is saved
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "r.pt", {"rng": capture_rng_state()})
    want = (random.random(), np.random.rand(3), torch.rand(3))  # noqa: NPY002
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), np.random.rand(3), torch.rand(3))  # noqa: NPY002
    assert want[0] == got[0] and np.array_equal(want[1], got[1]) and torch.equal(want[2], got[2])


def test_overwrite_replaces(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"v": 1})
    save_checkpoint(p, {"v": 2})
    assert load_checkpoint(p) == {"v": 2}
    assert os.listdir(tmp_path) == ["c.pt"]


@pytest.mark.parametrize("keep", [0, 10, 16, 100, -49, -1])
def test_truncated_file_is_detected(tmp_path, keep):
    p = save_checkpoint(tmp_path / "c.pt", make_state())
    data = p.read_bytes()
    p.write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])
    with pytest.raises(CheckpointError, match=r"truncated|corrupt"):
        load_checkpoint(p)


@pytest.mark.parametrize("where", [0, 9, 20, 0.5, -40, -45, -1])
def test_flipped_byte_is_detected(tmp_path, where):
    p = save_checkpoint(tmp_path / "c.pt", make_state())
    data = bytearray(p.read_bytes())
    i = int(len(data) * where) if isinstance(where, float) else where
    data[i] ^= 0x10
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert str(p) in str(e.value)
    assert issubclass(CheckpointError, DinrecError)


def test_other_files_and_missing(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"a": 1}, plain)
    with pytest.raises(CheckpointError, match="not a dinrec checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="must be a dict"):
        save_checkpoint(tmp_path / "x.pt", [1, 2])  # type: ignore[arg-type]


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    p = save_checkpoint(tmp_path / "obj.pt", {"obj": _Custom(3)})
    verify_checkpoint(p)  # the bytes are intact
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint(p)
    assert load_checkpoint(p, weights_only=False)["obj"].v == 3


class _Custom:
    def __init__(self, v):
        self.v = v


def test_failure_mid_write_keeps_old_file(tmp_path, monkeypatch):
    p = save_checkpoint(tmp_path / "c.pt", {"v": "old"})
    before = p.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="disk full"):
        save_checkpoint(p, {"v": "new"})
    assert p.read_bytes() == before and no_temp_files(tmp_path)

    def interrupted_fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.undo()
    monkeypatch.setattr(ck.os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):  # non-OSError propagates unchanged
        save_checkpoint(p, {"v": "new"})
    monkeypatch.undo()
    assert load_checkpoint(p) == {"v": "old"} and no_temp_files(tmp_path)
