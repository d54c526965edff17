"""DistributedDataParallel on CPU: 2 gloo processes over loopback."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dinrec.checkpoint import load_checkpoint
from dinrec.data import SampleStore
from dinrec.run import load_run_model
from dinrec.train import distributed as D
from dinrec.train.evaluate import RankShare, eval_loader, evaluate, predict, rank_eval_loader
from dinrec.train.metrics import evaluate_predictions
from dinrec.train.trainer import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


@pytest.fixture(scope="module")
def store(tiny_store: Path) -> Path:
    return tiny_store


def _no_input_batchnorm(monkeypatch=None) -> None:
    """The MLP's input BatchNorm normalises with per-rank batch statistics (there is no
    SyncBatchNorm on CPU), the one thing that makes 2 x 32 rows differ from 1 x 64."""
    import dinrec.nn.mlp as mlp

    init = mlp.MLP.__init__

    def no_bn(self, *args, **kwargs):
        kwargs["use_input_bn"] = False
        init(self, *args, **kwargs)

    if monkeypatch is None:  # a spawned worker: its own process
        mlp.MLP.__init__ = no_bn
    else:
        monkeypatch.setattr(mlp.MLP, "__init__", no_bn)


def _cfg(batch_size: int, **kw) -> TrainConfig:
    # PReLU: Dice (the default) normalises with batch statistics, which differ per rank
    base = dict(model="din", embedding_dim=8, hidden=(32, 16), batch_size=batch_size, threads=1,
                progress=False, log_every=1, max_steps=40, eval_every=20, seed=5, activation="prelu")
    return TrainConfig(**{**base, **kw})


def _env(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _train_worker(rank: int, port: int, store: str, run: str, no_bn: bool, kw: dict) -> None:
    _env(rank, port)
    if no_bn:
        _no_input_batchnorm()
    train(_cfg(32, **kw), store, run)


def _losses(run: Path) -> np.ndarray:
    with open(run / "log.csv", newline="") as f:
        return np.array([float(r["loss"]) for r in csv.DictReader(f) if r["split"] == "train"])


def test_two_ranks_follow_the_one_process_run_with_the_same_global_batch(store, tmp_path, monkeypatch):
    # data_split="batches": rank r trains on rows [32 r, 32 r + 32) of the 64-row global
    # batch of the 1-process run, with loss sum / 64 x 2 (DDP averages over the 2 ranks):
    # the same data order and the same gradient up to float summation order.
    _no_input_batchnorm(monkeypatch)  # in this process (the 1-process run); the workers patch their own
    one = train(_cfg(64), store, tmp_path / "one")
    mp.spawn(_train_worker, nprocs=2,
             args=(D.free_port(), str(store), str(tmp_path / "two"), True, {"data_split": "batches"}))
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 40
    # Observed max |difference| 1.2e-7 over 40 steps (float32 sums in another order).
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["distributed"]["world_size"] == 2 and m2["distributed"]["global_batch_size"] == 64
    assert m2["valid"]["auc"] == pytest.approx(one.metrics["valid"]["auc"], abs=2e-3)


def test_two_ranks_end_with_identical_weights_sharded_data(store, tmp_path):
    # data_split="shards" (the default, with the model's BatchNorm): each rank reads half
    # of the store's one shard; both replicas end bit-identical.
    mp.spawn(_train_worker, nprocs=2, args=(D.free_port(), str(store), str(tmp_path / "run"), False,
                                            {"max_steps": 24, "eval_every": 12, "log_every": 6}))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    digests = m["distributed"]["replica_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    last = load_checkpoint(tmp_path / "run" / "checkpoints/last.pt")["model"]
    assert D.state_digest(last) == digests[0]  # the weights rank 0 saved are the replicas'
    assert m["steps"] == 24 and m["train_samples"] == 24 * 64
    # The metrics gathered over the 2 ranks are those of one process on the whole split.
    model, saved = load_run_model(tmp_path / "run")
    one = evaluate(model, eval_loader(TrainConfig.from_dict(saved["train"]), SampleStore(store), "valid"))
    for key in ("auc", "gauc", "n"):
        assert m["valid"][key] == pytest.approx(one[key], abs=1e-9), key


def _eval_worker(rank: int, port: int, store: str, run: str, out: str) -> None:
    _env(rank, port)
    torch.set_num_threads(1)
    ctx = D.setup("cpu")
    model, saved = load_run_model(run)
    cfg = TrainConfig.from_dict({**saved["train"], "eval_batch_size": 96})
    loader = rank_eval_loader(cfg, SampleStore(store), "valid", ctx)
    labels, probs, users, _ = predict(model, loader)
    gathered = evaluate(model, loader, "cpu", False, ctx)
    np.savez(Path(out) / f"rank{rank}.npz", labels=labels, probs=probs, users=users,
             auc=gathered["auc"], gauc=gathered["gauc"], logloss=gathered["logloss"], n=gathered["n"])
    D.teardown(ctx)


def test_gathered_metrics_are_those_of_the_union_of_the_ranks_predictions(store, tmp_path):
    run = tmp_path / "run"
    train(_cfg(32, max_steps=10, eval_every=10), store, run)
    mp.spawn(_eval_worker, nprocs=2, args=(D.free_port(), str(store), str(run), str(tmp_path)))
    r = [np.load(tmp_path / f"rank{i}.npz") for i in range(2)]
    # Variable lengths are fine, and every rank got the same metrics.
    assert len(r[0]["labels"]) > 0 and len(r[1]["labels"]) > 0
    for key in ("auc", "gauc", "logloss", "n"):
        assert float(r[0][key]) == float(r[1][key]), key
    union = evaluate_predictions(*(np.concatenate([x[k] for x in r]) for k in ("labels", "probs", "users")))
    assert float(r[0]["auc"]) == union["auc"]
    assert float(r[0]["gauc"]) == union["gauc"]
    assert float(r[0]["logloss"]) == pytest.approx(union["logloss"], rel=1e-12)
    # The union is the whole split, once: the 1-process evaluation gives the same AUC.
    model, saved = load_run_model(run)
    full = evaluate(model, eval_loader(TrainConfig.from_dict(saved["train"]), SampleStore(store), "valid"))
    assert int(r[0]["n"]) == full["n"] == SampleStore(store).num_rows("valid")
    assert float(r[0]["auc"]) == pytest.approx(full["auc"], abs=1e-9)


def test_rank_shares_cover_every_evaluation_row_once(store):
    # 400 rows over 3 ranks with batches of 133: per-rank loaders would give 1, 1 and 2
    # batches and the lockstep rule (the smallest count) would drop rows; the share falls
    # back to every 3rd batch of the whole split.
    s = SampleStore(store)
    cfg = TrainConfig(eval_batch_size=133)
    users = []
    for rank in range(3):
        share = RankShare(lambda r, w: eval_loader(cfg, s, "valid", r, w),
                           D.DistContext(rank=rank, world_size=3))
        assert share.stride == 3
        users += [b.group for b in share]
    full = [b.group for b in eval_loader(cfg, s, "valid")]
    assert sorted(torch.cat(users).tolist()) == sorted(torch.cat(full).tolist())
    # Even shares use the per-rank loaders (each rank reads only its rows).
    cfg = TrainConfig(eval_batch_size=100)
    share = RankShare(lambda r, w: eval_loader(cfg, s, "valid", r, w), D.DistContext(rank=1, world_size=2))
    assert share.stride == 1 and share.loader.rank == 1


def test_all_gather_arrays_single_process_is_identity():
    a, b = np.arange(3), np.ones(3)
    assert D.all_gather_arrays(D.DistContext(), a, b) == (a, b)
