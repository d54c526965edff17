"""Evaluate a finished run on a split of its own store or of another, compatible store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinrec.data.batches import Batch
from dinrec.data.store import SampleStore
from dinrec.data.vocab import NUM_SPECIAL, Vocabularies
from dinrec.errors import RunFolderError
from dinrec.models import CTRModel
from dinrec.train.metrics import hr_at_k, ndcg_at_k
from dinrec.train.trainer import TrainConfig, eval_loader, evaluate, load_run_model


def evaluate_run(
    run_dir: str | Path,
    store_dir: str | Path | None = None,
    split: str = "test",
    ranking_negatives: int = 0,
    ks: tuple[int, ...] = (10,),
) -> dict[str, Any]:
    """Metrics of a run's best model on ``split`` of ``store_dir`` (default: the run's store).

    A store whose vocabularies differ from the run's would feed the model ids that mean
    other items: that is refused with a clear message.
    """
    run_dir = Path(run_dir)
    model, saved = load_run_model(run_dir)
    store = SampleStore(store_dir or saved["store"])
    run_vocabs = Vocabularies.load(run_dir / "vocab")
    for kind in ("user", "item", "cat"):
        if getattr(run_vocabs, kind) != getattr(store.vocabs, kind):
            raise RunFolderError(
                f"{store.path}: its {kind} vocabulary differs from the run's ({run_dir}/vocab): "
                "ids would mean other tokens; prepare the data with the run's vocabulary"
            )
    cfg = TrainConfig.from_dict(saved["train"])
    loader = eval_loader(cfg, store, split)
    metrics = evaluate(model, loader, cfg.device, cfg.amp)
    if ranking_negatives:
        metrics.update(ranking_metrics(model, loader, store, ranking_negatives, ks))
    return {"run": str(run_dir), "model": saved["model"]["name"], "split": split,
            "store": str(store.path), **metrics}


@torch.no_grad()
def ranking_metrics(
    model: CTRModel,
    loader,
    store: SampleStore,
    negatives: int = 100,
    ks: tuple[int, ...] = (10,),
    seed: int = 0,
) -> dict[str, float]:
    """HR@K and NDCG@K: each positive row of the loader ranked among ``negatives`` items.

    The negatives are drawn by training popularity (seeded), never equal to the positive;
    each of them is scored with the positive's user and history. Ties count against the
    positive (pessimistic).
    """
    model.eval()
    rng = np.random.default_rng(seed)
    counts = store.vocabs.item.counts.astype(np.float64).copy()
    counts[:NUM_SPECIAL] = 0
    cdf = np.cumsum(counts) / counts.sum()
    item_cat = torch.tensor(np.asarray(store.item_cat), dtype=torch.int64)
    scores = []
    for batch in loader:
        pos = batch.label == 1
        if not bool(pos.any()):
            continue
        b = int(pos.sum())
        n = 1 + negatives
        neg = np.searchsorted(cdf, rng.random((b, negatives)), side="right")  # (b, negatives)
        targets = batch.item[pos]
        neg_t = torch.as_tensor(neg, dtype=torch.int64)
        clash = neg_t == targets[:, None]
        neg_t[clash] = torch.where(targets[:, None].expand_as(neg_t)[clash] == 2, 3, 2)
        items = torch.cat([targets[:, None], neg_t], 1).reshape(-1)  # (b * n,)
        rows = Batch(
            user=batch.user[pos].repeat_interleave(n),
            item=items,
            cat=item_cat[items],
            hist_items=batch.hist_items[pos].repeat_interleave(n, 0),
            hist_cats=batch.hist_cats[pos].repeat_interleave(n, 0),
            mask=batch.mask[pos].repeat_interleave(n, 0),
            label=torch.zeros(b * n),
        )
        scores.append(model(rows).logits.float().reshape(b, n))
    if not scores:
        return {}
    all_scores = torch.cat(scores).numpy()  # (positives, 1 + negatives)
    out: dict[str, float] = {"ranking_rows": float(len(all_scores)), "ranking_negatives": float(negatives)}
    for k in ks:
        out[f"hr@{k}"] = hr_at_k(all_scores, k)
        out[f"ndcg@{k}"] = ndcg_at_k(all_scores, k)
    return out
