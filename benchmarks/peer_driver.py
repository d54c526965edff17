"""Train one peer library's DIN or DIEN on an exported dinrec sample store (see peers.py).

Runs inside the peer's own virtual environment (it imports only NumPy, torch and the
peer), so it must not import dinrec. The export folder (written by ``peers.py``) holds::

    meta.json                  vocabulary sizes (ids are dinrec's: 0 padding, 1 OOV)
    sequences.npz              items, cats: every behaviour sequence, flat (oldest first)
    {train,valid,test}.npz     user, item, cat, label, start, len: a row's history is
                               items[start : start + len] (at most max_len, most recent);
                               group: the raw user (GAUC's groups, also for OOV users)

Every peer sees dinrec's ids, rows and histories unchanged; batches are built here with
NumPy (history padded to the batch's longest row, after the items, as FuxiCTR's LongCTR
loader does), which is at least as fast as each peer's own loader, so the measured
samples/s flatter the peer if anything. The training loop is the peer's own train step
(FuxiCTR: ``model.train_step``; the others: forward, loss, backward, step, as their
``fit``) under the budget peers.py passes: epochs or max steps, a validation every N
steps, early stopping, the best-validation weights kept for the test predictions.

Writes ``--out`` (JSON: train samples/s, steps, validation AUCs) and ``--preds`` (NPZ:
test labels, probabilities, users) that peers.py scores with dinrec's own metrics.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


# --------------------------------------------------------------------------- data
class Split:
    def __init__(self, folder: Path, name: str) -> None:
        z = np.load(folder / f"{name}.npz")
        self.user, self.item, self.cat = z["user"], z["item"], z["cat"]
        self.label, self.start, self.len = z["label"].astype(np.float32), z["start"], z["len"]
        # GAUC's group: the raw user (distinct also where the user id is OOV), as dinrec's
        self.group = z["group"] if "group" in z else self.user

    def __len__(self) -> int:
        return len(self.label)


class Data:
    def __init__(self, folder: Path) -> None:
        self.meta = json.loads((folder / "meta.json").read_text())
        z = np.load(folder / "sequences.npz")
        self.items, self.cats = z["items"], z["cats"]
        self.meta["item_cat"] = z["item_cat"]
        self.splits = {s: Split(folder, s) for s in ("train", "valid", "test")}

    def batch(self, split: str, rows: np.ndarray, pad_to: int | None = None) -> dict[str, np.ndarray]:
        s = self.splits[split]
        lens = s.len[rows]  # (B,)
        t = pad_to or max(1, int(lens.max()))
        pos = np.arange(t)
        mask = pos[None, :] < lens[:, None]  # (B, T)
        idx = (s.start[rows][:, None] + pos) * mask  # (B, T)
        return {
            "user": s.user[rows], "item": s.item[rows], "cat": s.cat[rows],
            "label": s.label[rows], "mask": mask,
            "hist_items": self.items[idx] * mask, "hist_cats": self.cats[idx] * mask,
        }


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Rank AUC with ties averaged."""
    order = np.argsort(probs, kind="mergesort")
    p = probs[order]
    ranks = np.empty(len(p))
    _, first, counts = np.unique(p, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    pos = labels > 0.5
    n_pos, n_neg = pos.sum(), (~pos).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --------------------------------------------------------------------------- peers
class Peer:
    """A peer model behind one interface: step(batch) -> loss; predict(batch) -> probs."""

    model: nn.Module
    pad_to: int | None = None  # histories padded to the batch's longest row unless set

    def step(self, b: dict[str, np.ndarray]) -> float:
        raise NotImplementedError

    def predict(self, b: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class FuxiCTR(Peer):
    """FuxiCTR 2.3.10 LongCTR DIN / DIEN (model_zoo), fed as its LongCTR loader feeds it."""

    def __init__(self, model: str, meta: dict, a: argparse.Namespace) -> None:
        from fuxictr.features import FeatureMap

        fm = FeatureMap("peers", a.workdir)
        fm.features = {
            "user_id": {"type": "categorical", "source": "user", "vocab_size": meta["n_users"],
                        "padding_idx": 0},
            "item_id": {"type": "categorical", "source": "item", "vocab_size": meta["n_items"],
                        "padding_idx": 0},
            "cat_id": {"type": "categorical", "source": "item", "vocab_size": meta["n_cats"],
                       "padding_idx": 0},
        }
        fm.labels = ["label"]
        fm.group_id = "user_id"
        fm.default_emb_dim = a.emb
        fm.num_fields = 3
        common = dict(gpu=-1, optimizer="adam", loss="binary_crossentropy", verbose=0,
                      model_root=a.workdir, metrics=["AUC", "logloss"], learning_rate=a.lr,
                      embedding_dim=a.emb, dnn_hidden_units=[200, 80])
        if model == "din":
            from model_zoo.LongCTR.DIN.DIN import DIN

            self.model = DIN(fm, dnn_activations="Dice", attention_hidden_units=[80, 40],
                             attention_hidden_activations="Dice", din_use_softmax=True, **common)
        else:
            from model_zoo.LongCTR.DIEN.DIEN import DIEN

            self.model = DIEN(fm, dnn_activations="Dice", gru_type="AUGRU",
                              attention_type="din_attention", attention_hidden_units=[80, 40],
                              attention_activation="Dice", use_attention_softmax=True,
                              enable_sum_pooling=True, **common)
        self.model._max_gradient_norm = 10.0  # FuxiCTR's fit() default
        self.model._batch_index = 0

    def _inputs(self, b: dict[str, np.ndarray]):
        t = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
        both_i = np.concatenate([b["hist_items"], b["item"][:, None]], axis=1)  # (B, T+1)
        both_c = np.concatenate([b["hist_cats"], b["cat"][:, None]], axis=1)
        batch_dict = {"user_id": t(b["user"]), "label": t(b["label"])}
        item_dict = {"item_id": t(both_i.reshape(-1)), "cat_id": t(both_c.reshape(-1))}
        return batch_dict, item_dict, t(b["mask"].astype(np.float32))

    def step(self, b: dict[str, np.ndarray]) -> float:
        self.model.train()
        return float(self.model.train_step(self._inputs(b)))

    @torch.no_grad()
    def predict(self, b: dict[str, np.ndarray]) -> np.ndarray:
        self.model.eval()
        return self.model.forward(self._inputs(b))["y_pred"].reshape(-1).numpy()


class DeepCTR(Peer):
    """DeepCTR-Torch 0.3.0 DIN / DIEN (AUGRU + its auxiliary loss); the loop is its ``fit``'s
    (binary cross-entropy summed over the batch + L2 on embeddings + alpha * auxiliary loss).
    Its inputs are one float matrix with a fixed ``maxlen`` for every sequence column, so
    histories are padded to ``max_len`` (DeepCTR-Torch has no per-batch length)."""

    def __init__(self, model: str, meta: dict, a: argparse.Namespace) -> None:
        from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat, build_input_features

        e, self.maxlen, self.dien = a.emb, meta["max_len"], model == "dien"
        self.pad_to = self.maxlen
        self.item_cat = meta["item_cat"]
        self.rng = np.random.default_rng(a.seed + 1000)
        feats = [SparseFeat("user", meta["n_users"], embedding_dim=e),
                 SparseFeat("item", meta["n_items"], embedding_dim=e),
                 SparseFeat("cat", meta["n_cats"], embedding_dim=e)]
        seqs = ["hist_item", "hist_cat"] + (["neg_hist_item", "neg_hist_cat"] if self.dien else [])
        for name in seqs:
            base = name.split("_")[-1]
            feats.append(VarLenSparseFeat(SparseFeat(name, meta[f"n_{base}s"], embedding_dim=e,
                                                     embedding_name=base),
                                          maxlen=self.maxlen, length_name="seq_length"))
        self.index = build_input_features(feats)
        self.width = max(end for _, end in self.index.values())
        # its DNN cannot take "dice" (Dice is built for 3-d inputs there): PReLU, as the reference MLP
        common = dict(dnn_hidden_units=(200, 80), dnn_activation="prelu", seed=a.seed)
        if self.dien:
            from deepctr_torch.models import DIEN

            self.model = DIEN(feats, ["item", "cat"], gru_type="AUGRU", use_negsampling=True,
                              alpha=1.0, att_hidden_units=(80, 40), att_activation="dice",
                              att_weight_normalization=True, **common)
        else:
            from deepctr_torch.models import DIN

            self.model = DIN(feats, ["item", "cat"], att_hidden_size=(80, 40), att_activation="Dice",
                             att_weight_normalization=True, **common)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=a.lr)

    def _x(self, b: dict[str, np.ndarray]) -> torch.Tensor:
        n, t = b["hist_items"].shape
        x = np.zeros((n, self.width), np.float32)
        cols = {"user": b["user"], "item": b["item"], "cat": b["cat"], "seq_length": b["mask"].sum(1),
                "hist_item": b["hist_items"], "hist_cat": b["hist_cats"]}
        if self.dien:
            neg = self.rng.integers(2, len(self.item_cat), size=(n, t)) * b["mask"]
            cols["neg_hist_item"], cols["neg_hist_cat"] = neg, self.item_cat[neg] * b["mask"]
        for name, v in cols.items():
            s, _ = self.index[name]
            v = v.reshape(n, -1)
            x[:, s:s + v.shape[1]] = v
        return torch.from_numpy(x)

    def step(self, b: dict[str, np.ndarray]) -> float:
        import torch.nn.functional as F

        m = self.model
        m.train()
        y_pred = m(self._x(b)).squeeze(-1)
        loss = F.binary_cross_entropy(y_pred, torch.from_numpy(b["label"]), reduction="sum")
        total = loss + m.get_regularization_loss() + m.aux_loss
        self.opt.zero_grad()
        total.backward()
        self.opt.step()
        return float(loss.detach()) / len(y_pred)

    @torch.no_grad()
    def predict(self, b: dict[str, np.ndarray]) -> np.ndarray:
        self.model.eval()
        return self.model(self._x(b)).reshape(-1).numpy()


class RecHub(Peer):
    """torch-rechub 0.9.0 DIN: one ActivationUnit per history feature (item, category: 18
    wide each), softmax over *all* positions (it has no padding mask), MLP with Dice and
    BatchNorm in every layer; its CTRTrainer's loop (BCE, Adam with weight decay 1e-5)."""

    def __init__(self, model: str, meta: dict, a: argparse.Namespace) -> None:
        from torch_rechub.basic.features import SequenceFeature, SparseFeature
        from torch_rechub.models.ranking import DIN

        if model != "din":
            raise SystemExit("torch-rechub: only DIN is run")
        e = a.emb
        item = SparseFeature("item", meta["n_items"], embed_dim=e, padding_idx=0)
        cat = SparseFeature("cat", meta["n_cats"], embed_dim=e, padding_idx=0)
        hist = [SequenceFeature("hist_items", meta["n_items"], embed_dim=e, pooling="concat",
                                shared_with="item", padding_idx=0),
                SequenceFeature("hist_cats", meta["n_cats"], embed_dim=e, pooling="concat",
                                shared_with="cat", padding_idx=0)]
        self.model = DIN([SparseFeature("user", meta["n_users"], embed_dim=e, padding_idx=0)], hist,
                         [item, cat], mlp_params={"dims": [200, 80]},
                         attention_mlp_params={"dims": [80, 40], "activation": "dice",
                                               "use_softmax": True})
        self.opt = torch.optim.Adam(self.model.parameters(), lr=a.lr, weight_decay=1e-5)

    @staticmethod
    def _x(b: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(b[k]))
                for k in ("user", "item", "cat", "hist_items", "hist_cats")}

    def step(self, b: dict[str, np.ndarray]) -> float:
        self.model.train()
        loss = nn.functional.binary_cross_entropy(self.model(self._x(b)), torch.from_numpy(b["label"]))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, b: dict[str, np.ndarray]) -> np.ndarray:
        self.model.eval()
        return self.model(self._x(b)).reshape(-1).numpy()


PEERS = {"fuxictr": FuxiCTR, "deepctr": DeepCTR, "rechub": RecHub}


# --------------------------------------------------------------------------- loop
def predict(peer: Peer, data: Data, split: str, bs: int = 1024) -> np.ndarray:
    n = len(data.splits[split])
    out = [peer.predict(data.batch(split, np.arange(i, min(n, i + bs)), peer.pad_to)) for i in range(0, n, bs)]
    return np.concatenate(out)


def train(peer: Peer, data: Data, a: argparse.Namespace) -> dict:
    rng = np.random.default_rng(a.seed)
    n = len(data.splits["train"])
    per_epoch = n // a.batch_size  # full batches, as dinrec (drop_last)
    total = a.max_steps or per_epoch * a.epochs
    every = a.eval_every or per_epoch
    best, best_state, bad, step, seconds, vals = -1.0, None, 0, 0, 0.0, []
    valid = data.splits["valid"]
    while step < total:
        perm = rng.permutation(n)
        for i in range(per_epoch):
            if step >= total:
                break
            t0 = time.perf_counter()
            peer.step(data.batch("train", perm[i * a.batch_size:(i + 1) * a.batch_size], peer.pad_to))
            seconds += time.perf_counter() - t0
            step += 1
            if step % every == 0 or step == total:
                v = auc(valid.label, predict(peer, data, "valid"))
                vals.append((step, v))
                if v > best:
                    best, bad, best_state = v, 0, copy.deepcopy(peer.model.state_dict())
                else:
                    bad += 1
                if a.patience and bad >= a.patience:
                    total = step
                    break
    if best_state is not None:
        peer.model.load_state_dict(best_state)
    return {"steps": step, "train_seconds": seconds,
            "train_samples_per_s": step * a.batch_size / max(seconds, 1e-9),
            "valid_auc": vals, "best_valid_auc": best}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", choices=sorted(PEERS), required=True)
    p.add_argument("--model", choices=["din", "dien"], required=True)
    p.add_argument("--data", required=True, help="export folder")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preds", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--emb", type=int, default=18)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    os.makedirs(a.workdir, exist_ok=True)
    data = Data(Path(a.data))
    peer = PEERS[a.peer](a.model, data.meta, a)
    res = train(peer, data, a)
    test = data.splits["test"]
    probs = predict(peer, data, "test")
    np.savez(a.preds, labels=test.label, probs=probs.astype(np.float32), users=test.group)
    res.update(peer=a.peer, model=a.model, seed=a.seed, threads=a.threads)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
