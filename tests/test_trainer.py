"""The trainer: run folders, metrics, exact resume, early stopping, clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from dinrec.checkpoint import load_checkpoint
from dinrec.data import PrepareConfig, SampleStore, generate, prepare_events, preset
from dinrec.errors import RunFolderError
from dinrec.run import load_run_model
from dinrec.train.evaluate import eval_loader, evaluate_run, predict
from dinrec.train.trainer import TrainConfig, TrainingError, train


@pytest.fixture(scope="module")
def store(tiny_store: Path) -> Path:
    return tiny_store


def _cfg(**kw) -> TrainConfig:
    base = dict(model="din", batch_size=32, progress=False, log_every=5, threads=1,
                embedding_dim=8, hidden=(32, 16))
    base.update(kw)
    return TrainConfig(**base)


def test_run_folder_metrics_and_learning(store, tmp_path):
    run = tmp_path / "run"
    res = train(_cfg(epochs=3, eval_every=40), store, run)
    assert res.completed
    for name in ("config.json", "log.csv", "metrics.json", "curves.png", "checkpoints/best.pt",
                 "checkpoints/last.pt", "vocab/item.arrow"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    n_train = SampleStore(store).num_rows("train")
    assert metrics["steps"] == res.metrics["steps"] == 3 * -(-n_train // 32)  # 3 epochs
    assert metrics["train_samples"] == 3 * n_train
    assert 0 < metrics["train_seconds"] < metrics["wall_seconds_this_process"]
    assert metrics["train_samples_per_s"] == pytest.approx(
        metrics["train_samples"] / metrics["train_seconds"], rel=1e-9)
    for split in ("valid", "test"):
        assert 0.5 < metrics[split]["auc"] <= 1.0
    # The training loss goes down.
    with open(run / "log.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r["split"] == "train"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    # metrics.json's test AUC / logloss are those of the best model, as sklearn computes them.
    model, saved = load_run_model(run)
    loader = eval_loader(TrainConfig.from_dict(saved["train"]), SampleStore(store), "test")
    labels, probs, _, _ = predict(model, loader)
    assert metrics["test"]["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-9)
    assert metrics["test"]["logloss"] == pytest.approx(log_loss(labels, probs), rel=1e-6)
    # The best model is the one with the best validation AUC.
    best = max(metrics["validations"], key=lambda e: e["auc"])
    assert metrics["best_step"] == best["step"]


def test_resume_reproduces_the_uninterrupted_run(store, tmp_path):
    cfg = _cfg(max_steps=24, eval_every=8, checkpoint_every=4, model="din", activation="dice")
    full = train(cfg, store, tmp_path / "full")
    part = train(TrainConfig(**{**cfg.__dict__, "stop_after": 10}), store, tmp_path / "part")
    assert not part.completed and not (tmp_path / "part" / "metrics.json").exists()
    resumed = train(cfg, store, tmp_path / "part", resume=True)
    assert resumed.completed
    a = load_checkpoint(tmp_path / "full" / "checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints/last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.metrics["test"]["auc"] == resumed.metrics["test"]["auc"]
    assert full.metrics["validations"] == resumed.metrics["validations"]


def test_a_reference_run_loads_and_resumes_under_the_new_defaults(store, tmp_path):
    """A run made with the DIEN reference configuration (the defaults before the switch:
    length-sorted batches, PReLU, din_fcn_attention) keeps it: config.json records every
    option, so `dinrec train --resume` without options continues it as it was, bit for bit,
    and the run folder loads the model it trained."""
    from dinrec.cli import main

    cfg = TrainConfig.reference("din", batch_size=32, progress=False, log_every=5, threads=1,
                                embedding_dim=8, hidden=(32, 16), max_steps=12, eval_every=6,
                                checkpoint_every=3)
    full = train(cfg, store, tmp_path / "full")
    train(TrainConfig(**{**cfg.__dict__, "stop_after": 5}), store, tmp_path / "part")
    saved = json.loads((tmp_path / "part" / "config.json").read_text())
    assert saved["train"]["bucket"] is True and saved["train"]["activation"] == "prelu"
    assert saved["model"]["config"]["attention"] == "fcn"
    assert main(["train", str(store), str(tmp_path / "part"), "--resume", "--quiet"]) == 0
    assert json.loads((tmp_path / "part" / "config.json").read_text())["train"] == saved["train"]
    a = load_checkpoint(tmp_path / "full" / "checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints/last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, _ = load_run_model(tmp_path / "part")
    assert model.config.attention == "fcn" and model.attention.query_proj is not None
    assert model.config.activation == "prelu"
    got = json.loads((tmp_path / "part" / "metrics.json").read_text())["test"]
    assert {k: got[k] for k in ("auc", "gauc", "logloss")} == {
        k: full.metrics["test"][k] for k in ("auc", "gauc", "logloss")}


def test_embedding_init_follows_the_configuration(store):
    """The default configuration starts the tables at N(0, 1e-4) (FuxiCTR's), the reference
    at N(0, 0.05); a config.json recorded before the option existed reads as 0.05, the
    value those runs were initialised with."""
    from dinrec.run import build_model
    from dinrec.train.parts import model_options

    def table_std(cfg: TrainConfig) -> float:
        torch.manual_seed(0)
        model = build_model(cfg.model, model_options(cfg), SampleStore(store))
        return float(model.embedding.tables["item"].weight[1:].detach().std())

    default, reference = TrainConfig(), TrainConfig.reference("din")
    assert default.embedding_init_std == 1e-4 and reference.embedding_init_std == 0.05
    assert table_std(default) == pytest.approx(1e-4, rel=0.2)
    assert table_std(reference) == pytest.approx(0.05, rel=0.2)
    assert table_std(TrainConfig(embedding_init_std=0.01)) == pytest.approx(0.01, rel=0.2)
    old = default.to_dict()
    del old["embedding_init_std"]
    assert TrainConfig.from_dict(old).embedding_init_std == 0.05
    assert TrainConfig.from_dict(default.to_dict()).embedding_init_std == 1e-4


def test_mlp_products_of_runs_recorded_before_the_option_read_as_float32():
    """A config.json written before ``mlp_products`` existed was trained with float32
    products; a new one keeps what it recorded."""
    old = TrainConfig().to_dict()
    del old["mlp_products"]
    assert TrainConfig.from_dict(old).mlp_products == "float32"
    assert TrainConfig.from_dict(TrainConfig().to_dict()).mlp_products == "auto"


def test_early_stopping(store, tmp_path, monkeypatch):
    import dinrec.train.trainer as trainer_module

    real_evaluate = trainer_module.evaluate
    scripted = iter([0.60, 0.70, 0.65, 0.64, 0.90, 0.95])

    def fake_evaluate(model, loader, device="cpu", amp=False, ctx=None):
        m = real_evaluate(model, loader, device, amp, ctx)
        if loader.split == "valid":
            m["auc"] = next(scripted)
        return m

    monkeypatch.setattr(trainer_module, "evaluate", fake_evaluate)
    res = train(_cfg(epochs=50, eval_every=5, patience=2), store, tmp_path / "run")
    assert res.metrics["stopped_early"]
    assert res.metrics["best_step"] == 10  # AUC 0.70
    assert res.metrics["steps"] == 20  # two validations without improvement after it
    assert [e["step"] for e in res.metrics["validations"]] == [5, 10, 15, 20]


def test_run_folder_errors(store, tmp_path):
    run = tmp_path / "run"
    train(_cfg(max_steps=3), store, run)
    with pytest.raises(RunFolderError, match="exists and is not empty"):
        train(_cfg(max_steps=3), store, run)
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(RunFolderError, match="not a run folder"):
        train(_cfg(max_steps=3), store, other, overwrite=True)
    assert (other / "precious.txt").exists()
    with pytest.raises(RunFolderError, match="not a dinrec run folder"):
        load_run_model(other)



def test_incompatible_store_is_refused(store, tmp_path):
    run = tmp_path / "run"
    train(_cfg(max_steps=3), store, run)
    other = tmp_path / "other"
    events, _ = generate(preset("tiny", seed=99, n_items=200))
    prepare_events(events, other, PrepareConfig(seed=1))
    with pytest.raises(RunFolderError, match="vocabulary differs"):
        evaluate_run(run, other)
    with pytest.raises(RunFolderError, match="do not match"):
        train(_cfg(), other, run, resume=True)
    row = evaluate_run(run, store, "valid")
    assert row["model"] == "din" and row["split"] == "valid" and row["n"] > 0


def test_nan_loss_stops_with_a_clear_error_and_no_metrics(store, tmp_path, monkeypatch):
    from dinrec.models.din import DIN

    real_forward = DIN.forward

    def nan_forward(self, batch, return_alphas=False):
        out = real_forward(self, batch, return_alphas)
        out.logits = out.logits * float("nan")
        return out

    monkeypatch.setattr(DIN, "forward", nan_forward)
    with pytest.raises(TrainingError, match="loss became nan by step 5"):
        train(_cfg(max_steps=20), store, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_ranking_metrics(store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(_cfg(max_steps=20), store, run)
    row = evaluate_run(run, store, "test", ranking_negatives=20, ks=(1, 5, 21))
    assert row["ranking_rows"] > 0 and row["ranking_negatives"] == 20
    assert 0 <= row["hr@1"] <= row["hr@5"] <= row["hr@21"] == 1.0
    assert row["ndcg@5"] <= row["hr@5"]
    assert row["ndcg@1"] == row["hr@1"]
    # A model that cannot tell items apart ranks no positive first (ties count against it).
    from dinrec.models.din import DIN

    real_forward = DIN.forward

    def constant(self, batch, return_alphas=False):
        out = real_forward(self, batch, return_alphas)
        out.logits = out.logits * 0
        return out

    monkeypatch.setattr(DIN, "forward", constant)
    row = evaluate_run(run, store, "test", ranking_negatives=20, ks=(5,))
    assert row["hr@5"] == 0.0


def test_gauc_under_the_by_user_split_is_not_a_plain_auc(tmp_path):
    # Every valid and test user of the by-user split is out of the train vocabulary: one
    # encoded id (OOV) for all of them. Grouping by it made GAUC the plain AUC.
    events, _ = generate(preset("tiny", seed=4))
    prepare_events(events, tmp_path / "store", PrepareConfig(seed=4, split="by-user"))
    res = train(_cfg(max_steps=10, eval_every=10), tmp_path / "store", tmp_path / "run")
    for split in ("valid", "test"):
        m = res.metrics[split]
        assert not m["gauc"] == pytest.approx(m["auc"])
        # grouped by the raw user (the store's user key), every row has its own user
        assert m["gauc_users_skipped_share"] < 1.0


class _Recorder(torch.nn.Module):
    """Scores nothing (logit 0) and keeps the rows it was asked to score."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def forward(self, batch, return_alphas=False):
        from dinrec.models import ModelOutput

        self.rows.append(batch)
        return ModelOutput(logits=torch.zeros(len(batch)))


def test_ranking_negatives_are_never_a_positive_of_the_user_and_are_redrawn(store):
    from dinrec.data import BatchLoader
    from dinrec.train.evaluate import ranking_metrics, user_positives

    s = SampleStore(store)
    n_keys = len(s.items)  # item keys (== ids for items of the training vocabulary)
    positives = set(user_positives(s).tolist())
    model, negatives = _Recorder(), 30
    loader = BatchLoader(s, "test", batch_size=64, shuffle=False)
    ranking_metrics(model, loader, s, negatives=negatives, ks=(5,))
    seen = 0
    counts = np.zeros(n_keys, np.int64)
    for rows in model.rows:
        items = rows.item["item"].reshape(-1, 1 + negatives)  # (b, 1 + negatives), target first
        hist = rows.sequences["hist"].items["item"][:: 1 + negatives]  # (b, T)
        users = rows.group[:: 1 + negatives]  # user keys: one per raw user
        for target, negs, h, u in zip(items[:, 0], items[:, 1:], hist, users, strict=True):
            mine = set(h.tolist()) | {int(target)}
            mine |= {i for i in range(n_keys) if int(u) * n_keys + i in positives}
            assert not mine & set(negs.tolist())
            counts[negs.numpy()] += 1
            seen += 1
    assert seen > 100
    # Redrawn, not replaced by a fixed item: items 2 and 3 (the old stand-ins) get no more
    # than their popularity share.
    pop = s.items.counts.astype(float)
    pop[:2] = 0
    pop[s.items.n_known:] = 0
    expected = counts.sum() * pop / pop.sum()
    assert counts[2] < 1.5 * expected[2] + 10 and counts[3] < 1.5 * expected[3] + 10


def test_the_fast_paths_are_prepared_before_the_clock_starts(monkeypatch, store, tmp_path):
    """Building, self-checking and the bfloat16 check happen in the set-up, with the run's
    products, not inside the first timed step."""
    import dinrec.train.trainer as trainer_module

    order = []
    monkeypatch.setattr(trainer_module, "prepare_fast_paths", lambda p: order.append(("prepare", p)))
    real_clock = trainer_module.Clock

    def clock(*a, **k):
        order.append(("clock",))
        return real_clock(*a, **k)

    monkeypatch.setattr(trainer_module, "Clock", clock)
    for products in ("auto", "float32"):
        order.clear()
        cfg = TrainConfig(model="din", max_steps=2, eval_every=10**9, progress=False, mlp_products=products)
        train(cfg, store, tmp_path / products)
        assert order[:2] == [("prepare", products), ("clock",)]
