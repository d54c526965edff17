"""Evaluation on its own: predictions over a loader, CTR metrics, sampled ranking, a run.

- :func:`evaluate`: AUC, GAUC (grouped by :func:`group_key`), logloss, accuracy of a
  model on one loader; with a distributed context over the union of every rank's share.
- :func:`ranking_metrics`: HR@K and NDCG@K, each positive ranked among sampled items that
  are never a positive of that user (in any split), redrawn until they are not.
- :func:`evaluate_run`: both, for a finished run folder, on a split of its own store or
  of another compatible one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from dinrec.data.batches import Batch, BatchLoader
from dinrec.data.schema import Schema
from dinrec.data.store import SampleStore
from dinrec.data.vocab import NUM_SPECIAL, Vocabularies
from dinrec.errors import DinrecError, RunFolderError
from dinrec.models import CTRModel
from dinrec.run import load_run_model
from dinrec.train import distributed as D
from dinrec.train.config import TrainConfig
from dinrec.train.metrics import evaluate_predictions, hr_at_k, ndcg_at_k

EvalLoader = Iterable[Batch]


def group_key(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The GAUC group of each row (B,) int64 and whether it is known (B,) bool.

    Rows are grouped by raw user: ``batch.group`` is the user's key in the store's user
    side table, distinct per raw user token even when the user id is out of the
    vocabulary (every valid and test user under the by-user split), so GAUC never merges
    unknown users into one giant "user". Every row is known.
    """
    assert batch.group is not None, "the loader sets batch.group"
    return batch.group, torch.ones_like(batch.group, dtype=torch.bool)


def device_batches(batches: Iterable[Batch], device: str, ahead: bool = True) -> Iterator[Batch]:
    """Batches on ``device``. On CUDA they are copied from pinned memory, non-blocking;
    with ``ahead`` one batch early, so the copy overlaps the previous batch's kernels
    (not for training: the loader's checkpointed position must be the step's)."""
    if torch.device(device).type != "cuda":
        for batch in batches:
            yield batch.to(device)
        return
    pending = None
    for batch in batches:
        moved = batch.pin_memory().to(device, non_blocking=True)
        if not ahead:
            yield moved
            continue
        if pending is not None:
            yield pending
        pending = moved
    if pending is not None:
        yield pending


@torch.no_grad()
def predict(
    model: CTRModel, loader: EvalLoader, device: str = "cpu", amp: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the model over a loader: (labels, probabilities, group keys, key known), NumPy,
    in loader order. Only these arrays are kept (never the batches)."""
    model.eval()
    labels, probs, keys, known = [], [], [], []
    for batch in device_batches(loader, device):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            logits = model(batch).logits
        key, ok = group_key(batch)
        labels.append(batch.label.cpu())
        probs.append(torch.sigmoid(logits.float()).cpu())
        keys.append(key.cpu())
        known.append(ok.cpu())
    if not labels:
        empty = np.zeros(0, np.float32)
        return empty, empty.copy(), np.zeros(0, np.int64), np.zeros(0, bool)
    return (torch.cat(labels).numpy(), torch.cat(probs).numpy(), torch.cat(keys).numpy(),
            torch.cat(known).numpy())


def evaluate(
    model: CTRModel,
    loader: EvalLoader,
    device: str = "cpu",
    amp: bool = False,
    ctx: D.DistContext | None = None,
) -> dict[str, Any]:
    """AUC, GAUC, logloss, accuracy (and rows / seconds) of a model on one loader.

    With a distributed ``ctx`` the loader is this rank's share (see :class:`RankShare`):
    the predictions of all ranks are gathered and every rank computes the metrics of their
    union (AUC is not an average of per-rank AUCs).
    """
    start = time.perf_counter()
    labels, probs, keys, known = predict(model, loader, device, amp)
    if ctx is not None and ctx.enabled:
        labels, probs, keys, known = D.all_gather_arrays(ctx, labels, probs, keys, known)
    if len(labels) == 0:
        raise DinrecError(f"split {getattr(loader, 'split', '?')!r} has no rows to evaluate")
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = dict(evaluate_predictions(labels, probs, keys, known=known))
    metrics["eval_seconds"] = seconds
    metrics["eval_samples_per_s"] = len(labels) / seconds if seconds > 0 else float("nan")
    return metrics


# --------------------------------------------------------------------------- loaders
def eval_loader(
    cfg: TrainConfig, store: SampleStore, split: str, rank: int = 0, world_size: int = 1
) -> BatchLoader:
    """The batches of ``split`` in store order (no shuffling), this rank's share."""
    if split not in store.splits:
        raise DinrecError(f"{store.path}: the store has no {split!r} split (has {', '.join(store.splits)})")
    return BatchLoader(store, split, batch_size=cfg.eval_batch_size, max_len=cfg.max_len,
                       shuffle=False, bucket=cfg.bucket, rank=rank, world_size=world_size)


class RankShare:
    """This rank's share of an evaluation split: every row is evaluated by exactly one rank.

    ``BatchLoader(rank=, world_size=)`` gives every rank the same number of batches (the
    smallest rank's), which is right for training steps in lockstep but would drop rows of
    an evaluation. When the per-rank loaders cover every row they are used (each rank reads
    only its shards); otherwise each rank reads the whole split and evaluates every
    ``world_size``-th batch.
    """

    def __init__(self, make_loader: Callable[[int, int], BatchLoader], ctx: D.DistContext):
        self.ctx = ctx
        sharded = [make_loader(r, ctx.world_size) for r in range(ctx.world_size)]
        if all(len(ld) * ld.batch_size >= ld.num_rows for ld in sharded):
            self.loader, self.stride = sharded[ctx.rank], 1
        else:
            self.loader, self.stride = make_loader(0, 1), ctx.world_size
        self.split = self.loader.split

    def __iter__(self) -> Iterator[Batch]:
        for i, batch in enumerate(self.loader):
            if i % self.stride == self.ctx.rank % self.stride:
                yield batch


def rank_eval_loader(
    cfg: TrainConfig, store: SampleStore, split: str, ctx: D.DistContext
) -> EvalLoader:
    """The loader of ``split`` for this process: the whole split, or this rank's share."""
    if not ctx.enabled:
        return eval_loader(cfg, store, split)
    return RankShare(lambda r, w: eval_loader(cfg, store, split, r, w), ctx)


# --------------------------------------------------------------------------- a run
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
    if Schema.load(run_dir) != store.schema:
        raise RunFolderError(f"{store.path}: its feature schema differs from the run's ({run_dir}/schema.json)")
    run_vocabs = Vocabularies.load(run_dir / "vocab")
    for name, vocab in store.vocabs.tables.items():
        if run_vocabs.tables.get(name) != vocab:
            raise RunFolderError(
                f"{store.path}: its {name} vocabulary differs from the run's ({run_dir}/vocab): "
                "ids would mean other tokens; prepare the data with the run's vocabulary"
            )
    cfg = TrainConfig.from_dict(saved["train"])
    loader = eval_loader(cfg, store, split)
    metrics = evaluate(model, loader, cfg.device, cfg.amp)
    if ranking_negatives:
        metrics.update(ranking_metrics(model, loader, store, ranking_negatives, ks))
    return {"run": str(run_dir), "model": saved["model"]["name"], "split": split,
            "store": str(store.path), **metrics}


# --------------------------------------------------------------------------- ranking
def user_positives(store: SampleStore) -> np.ndarray:
    """Sorted ``user key * n_item_keys + item key`` codes of every (user, positive item)
    pair of the store, in any split. Keys name raw users and items (see
    :mod:`dinrec.data.sides`), so users out of the vocabulary are told apart too."""
    n_keys = len(store.items)
    codes = []
    for split in store.splits:
        for path in store.files(split):
            t = pq.read_table(path, columns=["label", "user", "item"])
            keep = t.column("label").to_numpy() == 1
            user = t.column("user").to_numpy().astype(np.int64)[keep]
            item = t.column("item").to_numpy().astype(np.int64)[keep]
            codes.append(user * n_keys + item)
    return np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)


def draw_negatives(
    rng: np.random.Generator,
    cdf: np.ndarray,
    users: np.ndarray,
    forbidden_rows: np.ndarray,
    positives: np.ndarray,
    negatives: int,
    max_rounds: int = 1000,
) -> np.ndarray:
    """(b, negatives) item keys drawn from ``cdf`` (over item keys), none of them a positive
    of its row's user: neither in ``forbidden_rows`` ((b, F) the row's target and history,
    0-padded) nor a ``user key * n_item_keys + item key`` code in ``positives`` (sorted).
    Clashes are redrawn."""
    n_items = len(cdf)
    b = len(users)
    neg = np.searchsorted(cdf, rng.random((b, negatives)), side="right")  # (b, negatives)
    for _ in range(max_rounds):
        bad = (neg[:, :, None] == forbidden_rows[:, None, :]).any(-1)  # (b, negatives)
        if len(positives):
            codes = users[:, None] * n_items + neg  # (b, negatives)
            at = np.minimum(np.searchsorted(positives, codes), len(positives) - 1)
            bad |= positives[at] == codes
        if not bad.any():
            return neg
        neg[bad] = np.searchsorted(cdf, rng.random(int(bad.sum())), side="right")
    raise DinrecError(
        f"--ranking: could not draw {negatives} items that are not positives of the user "
        f"in {max_rounds} rounds; use fewer negatives")


@torch.no_grad()
def ranking_metrics(
    model: CTRModel,
    loader: BatchLoader,
    store: SampleStore,
    negatives: int = 100,
    ks: tuple[int, ...] = (10,),
    seed: int = 0,
) -> dict[str, float]:
    """HR@K and NDCG@K: each positive row of the loader ranked among ``negatives`` items.

    The negatives are items of the training vocabulary drawn by training popularity
    (seeded) and redrawn while they are a positive of that user: the row's target or main
    history, or a positive of the same user in any split of the store. Each is scored
    with the positive's user, context and histories. Ties count against the positive
    (pessimistic).
    """
    model.eval()
    rng = np.random.default_rng(seed)
    side = store.items
    counts = side.counts.astype(np.float64).copy()
    counts[:NUM_SPECIAL] = 0
    counts[side.n_known:] = 0  # only items the model has an id for
    cdf = np.cumsum(counts) / counts.sum()
    positives = user_positives(store)
    key = store.schema.item_key.name
    main = store.schema.main_sequence.name
    scores = []
    for batch in loader:
        pos = batch.label == 1
        if not bool(pos.any()):
            continue
        b, n = int(pos.sum()), 1 + negatives
        targets = batch.item[key][pos]  # (b,) ids; an id is its key for known items
        forbidden = torch.cat([targets[:, None], batch.sequences[main].items[key][pos]], 1)
        assert batch.group is not None, "the loader sets batch.group"
        neg = draw_negatives(rng, cdf, batch.group[pos].numpy(), forbidden.numpy(),
                             positives, negatives)  # (b, negatives) item keys
        rows = batch.apply(lambda t, pos=pos, n=n: t[pos].repeat_interleave(n, 0))  # (b * n, ...)
        cand = loader.item_features(neg)  # (b, negatives[, M])
        rows.item = {k: torch.cat([v[pos][:, None], cand[k]], 1).flatten(0, 1)
                     for k, v in batch.item.items()}  # (b * n[, M]) positive first
        scores.append(model(rows).logits.float().reshape(b, n))
    if not scores:
        return {}
    all_scores = torch.cat(scores).numpy()  # (positives, 1 + negatives)
    out: dict[str, float] = {"ranking_rows": float(len(all_scores)), "ranking_negatives": float(negatives)}
    for k in ks:
        out[f"hr@{k}"] = hr_at_k(all_scores, k)
        out[f"ndcg@{k}"] = ndcg_at_k(all_scores, k)
    return out
