"""The parts of a training run that are not the loop: the learning-rate schedule, the
model's options, this rank's training loader and batch slice, DDP's unused parameters,
and the checkpoint a resume starts from."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dinrec.checkpoint import CheckpointError, load_checkpoint
from dinrec.data.batches import Batch, BatchLoader
from dinrec.data.store import SampleStore
from dinrec.errors import DinrecError, RunFolderError
from dinrec.models import CTRModel, model_class
from dinrec.run import LAST, PREV
from dinrec.train import distributed as D
from dinrec.train.config import TrainConfig
from dinrec.train.evaluate import device_batches

log = logging.getLogger(__name__)


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of each step: warmup, then constant, cosine or linear."""
    if cfg.lr_schedule not in ("constant", "cosine", "linear"):
        raise DinrecError(f"lr_schedule: expected constant, cosine or linear, got {cfg.lr_schedule!r}")

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0 - frac

    return f


def model_options(cfg: TrainConfig) -> dict[str, Any]:
    """The model's configuration fields a TrainConfig sets (sizes come from the store)."""
    return {"embedding_dim": cfg.embedding_dim, "hidden": list(cfg.hidden),
            "activation": cfg.activation, "embedding_init_std": cfg.embedding_init_std,
            **cfg.model_options}


def train_loader(cfg: TrainConfig, store: SampleStore, ctx: D.DistContext) -> BatchLoader:
    """This rank's training loader (see ``TrainConfig.data_split``)."""
    neg_history = cfg.neg_history or (1 if model_class(cfg.model).needs_neg_history else 0)
    if cfg.data_split not in ("shards", "batches"):
        raise DinrecError(f"data_split: expected 'shards' or 'batches', got {cfg.data_split!r}")
    by_batches = cfg.data_split == "batches" and ctx.enabled
    return BatchLoader(
        store,
        "train",
        # "batches": the global batch, of which this rank takes its slice
        batch_size=cfg.batch_size * (ctx.world_size if by_batches else 1),
        max_len=cfg.max_len,
        shuffle=True,
        seed=cfg.seed,
        bucket=cfg.bucket,
        neg_history=neg_history,
        drop_last=False,
        rank=0 if by_batches else ctx.rank,
        world_size=1 if by_batches else ctx.world_size,
        shuffle_buffer=cfg.shuffle_buffer,
    )


def rank_slice(batch: Batch, ctx: D.DistContext) -> Batch:
    """Rows ``[rank * n / W, (rank + 1) * n / W)`` of a global batch (``data_split="batches"``)."""
    n = len(batch)
    a, b = n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size
    return batch.apply(lambda t: t[a:b])


def unused_parameters(model: CTRModel, loader: BatchLoader, device: str) -> list[str]:
    """Parameters a training step leaves without gradient, found on one batch of a spare
    loader; the RNG, buffers (BatchNorm statistics) and gradients are left as they were."""
    batch = next(iter(device_batches(loader, device, ahead=False)))
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        model.train()
        out = model(batch)
        loss = out.logits.float().sum() + (0 if out.aux_loss is None else out.aux_loss.float())
        loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return unused


def resume_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The newest intact resumable checkpoint: last.pt, else prev.pt (with a warning)."""
    errors = []
    for rel in (LAST, PREV):
        path = run_dir / rel
        if not path.exists():
            errors.append(f"{rel}: missing")
            continue
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("cannot resume from %s: %s", rel, exc)
            errors.append(str(exc))
            continue
        if rel != LAST:
            log.warning(
                "resuming from the previous checkpoint %s (step %d) because %s; the steps "
                "after it are trained again", rel, ckpt["state"]["step"], errors[0],
            )
            # Never rotate a damaged last.pt over the good prev.pt at the next save.
            bad = run_dir / LAST
            if bad.exists():
                os.replace(bad, bad.with_name(bad.name + ".corrupt"))
        return ckpt
    raise RunFolderError(
        f"{run_dir}: cannot resume: no intact checkpoint ({'; '.join(errors)}). "
        "Start the run again with --overwrite"
    )
