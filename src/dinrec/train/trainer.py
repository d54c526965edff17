"""The training loop: one run folder per run, evaluation, early stopping, exact resume.

A run folder holds everything a run produces::

    RUN/config.json        the TrainConfig, the model name and config, the store path
    RUN/vocab/             the vocabularies the model's ids refer to (copied from the store)
    RUN/checkpoints/       last.pt (resumable: model, optimiser, scheduler, RNG, data
                           position) and best.pt (the model with the best validation AUC)
    RUN/log.csv            one row per log interval and per evaluation
    RUN/tensorboard/       the same scalars for TensorBoard
    RUN/curves.png         training loss and validation curves
    RUN/metrics.json       written last: final validation and test metrics, throughput,
                           wall times. A run folder without it is not complete.

``train(cfg)`` starts a run; ``train(cfg, resume=True)`` continues one from its last
checkpoint and ends with exactly the weights the uninterrupted run would have had
(same seed, same device, deterministic kernels).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinrec import __version__
from dinrec.data.batches import BatchLoader
from dinrec.data.store import SampleStore
from dinrec.errors import DinrecError, RunFolderError
from dinrec.models import CTRModel, model_class
from dinrec.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from dinrec.train.metrics import evaluate_predictions
from dinrec.train.plots import plot_curves

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
LAST = "checkpoints/last.pt"
BEST = "checkpoints/best.pt"


#: Options that belong to one process, not to the run: a resume takes them from its caller.
RUNTIME_OPTIONS = ("stop_after", "progress", "threads")


class TrainingError(DinrecError):
    """Training cannot go on (NaN loss, ...)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``)."""

    model: str = "din"
    model_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"attention_size": 36}
    embedding_dim: int = 18
    hidden: tuple[int, ...] = (200, 80)
    activation: str = "prelu"  # or "dice"
    max_len: int = 100
    batch_size: int = 128
    eval_batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # "constant", "cosine" or "linear" (decay to 0), after warmup
    warmup_steps: int = 0
    grad_clip: float | None = None  # max global gradient norm
    epochs: int = 1
    max_steps: int | None = None  # total optimiser steps (overrides epochs)
    eval_every: int | None = None  # steps between validations; None: once per epoch
    checkpoint_every: int | None = None  # steps between resumable checkpoints; None: at evals
    patience: int = 3  # validations without improvement before stopping; 0 = never stop early
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None: leave as is
    device: str = "cpu"
    amp: bool = False  # bfloat16 autocast (GPU; allowed on CPU)
    compile: bool = False  # torch.compile the model
    bucket: bool = True  # length bucketing: less padding
    neg_history: int = 0  # negative history items per position (DIEN's auxiliary loss)
    aux_weight: float = 1.0  # weight of the model's auxiliary loss
    log_every: int = 50
    progress: bool = True
    stop_after: int | None = None  # stop after this many steps as if interrupted (resumable)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise RunFolderError(f"config.json: unknown training options {sorted(unknown)}")
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    completed: bool  # False when stopped by stop_after (resumable)


# --------------------------------------------------------------------------- model building
def model_config_for(cfg: TrainConfig, store: SampleStore) -> dict[str, Any]:
    vocabs = store.vocabs
    return {
        "n_users": len(vocabs.user),
        "n_items": len(vocabs.item),
        "n_cats": len(vocabs.cat),
        "embedding_dim": cfg.embedding_dim,
        "hidden": list(cfg.hidden),
        "activation": cfg.activation,
        **cfg.model_options,
    }


def build_model_from(name: str, config: dict[str, Any]) -> CTRModel:
    cls = model_class(name)
    try:
        return cls(cls.config_class.from_dict(config))
    except TypeError as exc:
        raise DinrecError(f"model {name!r}: bad configuration: {exc}") from None


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: CTRModel, loader: BatchLoader, device: str = "cpu", amp: bool = False):
    """Run the model over a loader: (labels, probabilities, users), NumPy, in loader order."""
    model.eval()
    labels, probs, users = [], [], []
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            logits = model(batch).logits
        labels.append(batch.label.cpu())
        probs.append(torch.sigmoid(logits.float()).cpu())
        users.append(batch.user.cpu())
    if not labels:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
    return torch.cat(labels).numpy(), torch.cat(probs).numpy(), torch.cat(users).numpy()


def evaluate(model: CTRModel, loader: BatchLoader, device: str = "cpu", amp: bool = False) -> dict:
    """AUC, GAUC, logloss, accuracy (and rows / seconds) of a model on one loader."""
    start = time.perf_counter()
    labels, probs, users = predict(model, loader, device, amp)
    if len(labels) == 0:
        raise DinrecError(f"split {loader.split!r} has no rows to evaluate")
    seconds = time.perf_counter() - start
    metrics = evaluate_predictions(labels, probs, users)
    metrics["eval_seconds"] = seconds
    metrics["eval_samples_per_s"] = len(labels) / seconds if seconds > 0 else float("nan")
    return metrics


# --------------------------------------------------------------------------- schedule
def _lr_lambda(cfg: TrainConfig, total_steps: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        if cfg.lr_schedule == "linear":
            return 1.0 - frac
        raise DinrecError(f"lr_schedule: expected constant, cosine or linear, got {cfg.lr_schedule!r}")

    return f


# --------------------------------------------------------------------------- run folder
def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """config.json of a run folder, with a clear error when it is not one."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: not a dinrec run folder (no {CONFIG_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}: not valid JSON: {exc}") from None


class _Log:
    """log.csv + TensorBoard scalars, rank 0 only."""

    FIELDS = ["step", "epoch", "samples", "split", "loss", "lr", "samples_per_s", "auc", "gauc", "logloss"]

    def __init__(self, run_dir: Path, resume: bool):
        self.path = run_dir / "log.csv"
        new = not (resume and self.path.exists())
        self.file = open(self.path, "w" if new else "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        if new:
            self.writer.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboard is a declared dependency
            log.warning("tensorboard is not installed: no TensorBoard scalars")
            self.tb = None

    def row(self, **row: Any) -> None:
        self.writer.writerow({k: row.get(k, "") for k in self.FIELDS})
        self.file.flush()
        if self.tb is not None:
            split = row.get("split", "train")
            for k in ("loss", "lr", "samples_per_s", "auc", "gauc", "logloss"):
                v = row.get(k)
                if v not in (None, "") and not (isinstance(v, float) and math.isnan(v)):
                    self.tb.add_scalar(f"{split}/{k}", v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_Log.FIELDS)
        w.writeheader()
        w.writerows(r for r in rows if int(r["step"]) <= step)


# --------------------------------------------------------------------------- training
def _loaders(cfg: TrainConfig, store: SampleStore) -> tuple[BatchLoader, BatchLoader | None]:
    neg_history = cfg.neg_history or (1 if model_class(cfg.model).needs_neg_history else 0)
    train = BatchLoader(
        store,
        "train",
        batch_size=cfg.batch_size,
        max_len=cfg.max_len,
        shuffle=True,
        seed=cfg.seed,
        bucket=cfg.bucket,
        neg_history=neg_history,
        drop_last=False,
    )
    valid = None
    if "valid" in store.splits and store.num_rows("valid") > 0:
        valid = eval_loader(cfg, store, "valid")
    return train, valid


def eval_loader(cfg: TrainConfig, store: SampleStore, split: str) -> BatchLoader:
    if split not in store.splits:
        raise DinrecError(f"{store.path}: the store has no {split!r} split (has {', '.join(store.splits)})")
    return BatchLoader(
        store,
        split,
        batch_size=cfg.eval_batch_size,
        max_len=cfg.max_len,
        shuffle=False,
        bucket=cfg.bucket,
    )


def train(
    cfg: TrainConfig,
    store_dir: str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Train ``cfg.model`` on a sample store into ``run_dir``; see the module docstring."""
    run_dir = Path(run_dir)
    store = SampleStore(store_dir)
    if resume:
        saved = read_run_config(run_dir)
        # The run's own config, except the options about this process (not the model or data).
        runtime = {k: getattr(cfg, k) for k in RUNTIME_OPTIONS}
        cfg = TrainConfig.from_dict({**saved["train"], **runtime})
        if not (run_dir / LAST).exists():
            raise RunFolderError(f"{run_dir}: nothing to resume (no {LAST})")
        if saved.get("vocab_sizes") != _vocab_sizes(store):
            raise RunFolderError(
                f"{run_dir}: the run's vocabularies {saved.get('vocab_sizes')} do not match "
                f"the store {store.path} {_vocab_sizes(store)}"
            )
    else:
        _start_run_dir(run_dir, overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)  # noqa: NPY002 - libraries may use the global stream

    model_cfg = model_config_for(cfg, store)
    model = build_model_from(cfg.model, model_cfg).to(cfg.device)
    if not resume:
        _write_json(
            run_dir / CONFIG_FILE,
            {
                "dinrec_version": __version__,
                "model": {"name": cfg.model, "config": model.config.to_dict()},
                "train": cfg.to_dict(),
                "store": str(Path(store_dir).resolve()),
                "vocab_sizes": _vocab_sizes(store),
            },
        )
        shutil.copytree(store.path / "vocab", run_dir / "vocab", dirs_exist_ok=True)
        shutil.copy2(store.path / "stats.json", run_dir / "store_stats.json")

    train_loader, valid_loader = _loaders(cfg, store)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise DinrecError(f"{store.path}: the train split is empty")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    eval_every = cfg.eval_every or steps_per_epoch
    checkpoint_every = cfg.checkpoint_every or eval_every

    # The fused kernel (one pass over all parameters) is several times faster than the
    # per-tensor loop on CPU and GPU alike; it computes the same update.
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    state = {"step": 0, "samples": 0, "best_auc": -1.0, "best_step": 0, "bad_evals": 0,
             "train_seconds": 0.0, "evals": []}
    if resume:
        ckpt = load_checkpoint(run_dir / LAST)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        train_loader.load_state_dict(ckpt["loader"])
        restore_rng_state(ckpt["rng"])
        state = ckpt["state"]
        _truncate_log(run_dir / "log.csv", state["step"])
        log.info("resuming %s at step %d", run_dir, state["step"])
    step_model = torch.compile(model) if cfg.compile else model

    logger = _Log(run_dir, resume)
    device_type = torch.device(cfg.device).type
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc=f"train {cfg.model}",
                   unit="step", dynamic_ncols=True, disable=None)

    def save_last() -> None:
        save_checkpoint(
            run_dir / LAST,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loader": train_loader.state_dict(),
                "rng": capture_rng_state(),
                "state": state,
            },
        )

    def validate() -> bool:
        """Evaluate on valid, keep the best model; True if training should stop early."""
        if valid_loader is None:
            save_checkpoint(run_dir / BEST, {"model": model.state_dict(), "step": state["step"]})
            return False
        m = evaluate(model, valid_loader, cfg.device, cfg.amp)
        model.train()
        state["evals"].append({"step": state["step"], **{k: m[k] for k in ("auc", "gauc", "logloss")}})
        logger.row(step=state["step"], epoch=train_loader.epoch, samples=state["samples"],
                   split="valid", auc=m["auc"], gauc=m["gauc"], logloss=m["logloss"])
        if bar is not None:
            bar.set_postfix_str(f"loss {last_loss:.4f} | {last_rate:,.0f} samples/s | val AUC {m['auc']:.4f}")
        if m["auc"] > state["best_auc"]:
            state.update(best_auc=m["auc"], best_step=state["step"], bad_evals=0)
            save_checkpoint(run_dir / BEST, {"model": model.state_dict(), "step": state["step"]})
            return False
        state["bad_evals"] += 1
        return bool(cfg.patience) and state["bad_evals"] >= cfg.patience

    def batches():
        while True:  # epochs; a resumed loader first finishes its current epoch
            yield from train_loader
            train_loader.set_epoch(train_loader.epoch + 1)

    model.train()
    loss_sum = torch.zeros((), device=cfg.device)  # summed on device: no sync per step
    loss_count = 0
    last_loss, last_rate = float("nan"), 0.0
    seconds_before = state["train_seconds"]
    loop_start = time.perf_counter()
    overhead = 0.0  # seconds spent validating and checkpointing, not training
    interval_start, interval_overhead, interval_samples = loop_start, 0.0, 0
    stopped_early, completed = False, True
    try:
        for batch in batches():
            batch = batch.to(cfg.device, non_blocking=True)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.amp):
                out = step_model(batch)
                loss = F.binary_cross_entropy_with_logits(out.logits.float(), batch.label)
                if out.aux_loss is not None:
                    loss = loss + cfg.aux_weight * out.aux_loss.float()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            state["samples"] += len(batch)
            interval_samples += len(batch)
            loss_sum += loss.detach()
            loss_count += 1
            step = state["step"]
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                last_loss = float(loss_sum) / loss_count
                if not math.isfinite(last_loss):
                    raise TrainingError(
                        f"the loss became {last_loss} by step {step} "
                        f"(lr {scheduler.get_last_lr()[0]:g}); try a lower --lr or --grad-clip"
                    )
                now = time.perf_counter()
                last_rate = interval_samples / max(now - interval_start - interval_overhead, 1e-9)
                state["train_seconds"] = seconds_before + (now - loop_start - overhead)
                logger.row(step=step, epoch=train_loader.epoch, samples=state["samples"],
                           split="train", loss=last_loss, lr=scheduler.get_last_lr()[0],
                           samples_per_s=last_rate)
                if bar is not None:
                    bar.set_postfix_str(f"loss {last_loss:.4f} | {last_rate:,.0f} samples/s")
                loss_sum.zero_()
                loss_count = 0
                interval_start, interval_overhead, interval_samples = now, 0.0, 0
            t0 = time.perf_counter()
            state["train_seconds"] = seconds_before + (t0 - loop_start - overhead)
            if step % eval_every == 0 or step == total_steps:
                stopped_early = validate()
            interrupted = bool(cfg.stop_after) and step >= cfg.stop_after and step < total_steps
            finished = stopped_early or step >= total_steps
            if step % checkpoint_every == 0 or finished or interrupted:
                save_last()
            spent = time.perf_counter() - t0
            overhead += spent
            interval_overhead += spent
            if finished:
                break
            if interrupted:
                completed = False
                break
    finally:
        if bar is not None:
            bar.close()
        logger.close()

    if not completed:
        return TrainResult(run_dir, {}, completed=False)

    # Final metrics with the best model.
    best = load_checkpoint(run_dir / BEST)
    model.load_state_dict(best["model"])
    metrics: dict[str, Any] = {
        "model": cfg.model,
        "best_step": best["step"],
        "steps": state["step"],
        "train_samples": state["samples"],
        "train_seconds": state["train_seconds"],
        "train_samples_per_s": state["samples"] / max(state["train_seconds"], 1e-9),
        "stopped_early": stopped_early,
        "threads": torch.get_num_threads(),
        "device": cfg.device,
        "validations": state["evals"],
    }
    for split in ("valid", "test"):
        if split in store.splits and store.num_rows(split) > 0:
            metrics[split] = evaluate(model, eval_loader(cfg, store, split), cfg.device, cfg.amp)
    metrics["wall_seconds_this_process"] = time.perf_counter() - loop_start
    plot_curves(run_dir)
    _write_json(run_dir / METRICS_FILE, metrics)
    return TrainResult(run_dir, metrics, completed=True)


def _vocab_sizes(store: SampleStore) -> dict[str, int]:
    v = store.vocabs
    return {"user": len(v.user), "item": len(v.item), "cat": len(v.cat)}


def _start_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunFolderError(
                f"{run_dir}: exists and is not empty; use --resume to continue it or --overwrite"
            )
        if not (run_dir / CONFIG_FILE).exists():
            raise RunFolderError(f"{run_dir}: refusing to overwrite a folder that is not a run folder")
        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)


def load_run_model(run_dir: str | Path, which: str = "best") -> tuple[CTRModel, dict[str, Any]]:
    """The trained model of a run folder (``best`` or ``last``) and its config.json."""
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    path = run_dir / (BEST if which == "best" else LAST)
    if not path.exists():
        raise RunFolderError(f"{run_dir}: no {path.relative_to(run_dir)} (is the run finished?)")
    model = build_model_from(saved["model"]["name"], saved["model"]["config"])
    state = load_checkpoint(path)["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RunFolderError(f"{path}: the checkpoint does not fit model {saved['model']['name']!r}: "
                             f"{str(exc).splitlines()[0]}") from None
    model.eval()
    return model, saved
