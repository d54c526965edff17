"""The training loop: one run folder per run, evaluation, early stopping, exact resume.

A run folder holds everything a run produces::

    RUN/config.json        the TrainConfig, the model name and config, the store path
    RUN/vocab/             the vocabularies the model's ids refer to (copied from the store)
    RUN/checkpoints/       last.pt (resumable: model, optimiser, scheduler, RNG, data
                           position), prev.pt (the resumable checkpoint before it, the
                           fallback when last.pt is damaged) and best.pt (the model with
                           the best validation AUC)
    RUN/log.csv            one row per log interval and per evaluation
    RUN/tensorboard/       the same scalars for TensorBoard
    RUN/curves.png         training loss and validation curves
    RUN/metrics.json       written last: final validation and test metrics, throughput,
                           wall times. A run folder without it is not complete.

``train(cfg)`` starts a run; ``train(cfg, resume=True)`` continues one from its last
checkpoint and ends with exactly the weights the uninterrupted run would have had
(same seed, same device, deterministic kernels), also after a ``kill -9`` at any point.

Several processes (``torchrun``, or ``dinrec train --nproc N``) train one model with
DistributedDataParallel: each rank reads its own share of the store, rank 0 writes the
run folder, validation metrics are computed on the predictions of all ranks; see
``docs/distributed.md`` and :mod:`dinrec.train.distributed`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
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
from dinrec.train import distributed as D
from dinrec.train.checkpoint import (
    CheckpointError,
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
PREV = "checkpoints/prev.pt"  # the resumable checkpoint before last.pt
BEST = "checkpoints/best.pt"


#: Options that belong to one process, not to the run: a resume takes them from its caller.
RUNTIME_OPTIONS = ("stop_after", "progress", "threads")


class TrainingError(DinrecError):
    """Training cannot go on (NaN loss, ...)."""


#: Model options the defaults add (``model_options`` given by the user win): DIN's plain
#: ``din_attention`` scored more accurate than ``din_fcn_attention`` (docs/results.md, "Peers").
DEFAULT_MODEL_OPTIONS: dict[str, dict[str, Any]] = {"din": {"attention": "din"}}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``)."""

    model: str = "din"
    # e.g. {"attention_size": 36}; None: the model's DEFAULT_MODEL_OPTIONS (a saved config
    # keeps the options it was made with, so older run folders rebuild as they were)
    model_options: dict[str, Any] | None = None
    embedding_dim: int = 18
    hidden: tuple[int, ...] = (200, 80)
    activation: str = "dice"  # MLP activation; the DIEN reference's is "prelu" (see PRESETS)
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
    bucket: bool = False  # length-sorted batches (less padding, the reference's order; less accurate)
    neg_history: int = 0  # negative history items per position (DIEN's auxiliary loss)
    aux_weight: float = 1.0  # weight of the model's auxiliary loss
    log_every: int = 50
    progress: bool = True
    stop_after: int | None = None  # stop after this many steps as if interrupted (resumable)
    shuffle_buffer: int = 200_000  # training rows held in memory for shuffling (per rank)
    # Several processes: "shards" = each rank reads its own share of the store (default);
    # "batches" = every rank reads the whole stream and trains on its slice of each global
    # batch: the data order of one process with batch_size x world_size (reads N x the data).
    data_split: str = "shards"

    def __post_init__(self) -> None:
        if self.model_options is None:
            self.model_options = dict(DEFAULT_MODEL_OPTIONS.get(self.model, {}))

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


#: ``dinrec train --preset NAME``: named configurations. ``reference`` is the DIEN
#: reference's exact configuration: PReLU MLP, DIN with ``din_fcn_attention``, batches
#: sorted by history length inside windows (as its data iterator). The defaults differ
#: from it where they measured more accurate; they are slower (docs/results.md, "Peers").
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "reference": {"activation": "prelu", "bucket": True, "model_options": {"din": {"attention": "fcn"}}},
}


def preset_config(name: str, model: str = "din", **overrides: Any) -> TrainConfig:
    """The TrainConfig of preset ``name`` for ``model``; ``overrides`` win (model_options merged)."""
    if name not in PRESETS:
        raise DinrecError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    preset = dict(PRESETS[name])
    options = {**DEFAULT_MODEL_OPTIONS.get(model, {}),
               **preset.pop("model_options", {}).get(model, {}), **overrides.pop("model_options", {})}
    return TrainConfig(**{"model": model, **preset, **overrides, "model_options": options})


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
        **(cfg.model_options or {}),
    }


def build_model_from(name: str, config: dict[str, Any]) -> CTRModel:
    cls = model_class(name)
    try:
        return cls(cls.config_class.from_dict(config))
    except TypeError as exc:
        raise DinrecError(f"model {name!r}: bad configuration: {exc}") from None


# --------------------------------------------------------------------------- evaluation
def _device_batches(batches, device: str, ahead: bool = True):
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
def predict(model: CTRModel, loader, device: str = "cpu", amp: bool = False):
    """Run the model over a loader: (labels, probabilities, users), NumPy, in loader order.

    Only these three arrays are kept (never the batches): memory grows by 16 bytes a row.
    """
    model.eval()
    labels, probs, users = [], [], []
    for batch in _device_batches(loader, device):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            logits = model(batch).logits
        labels.append(batch.label.cpu())
        probs.append(torch.sigmoid(logits.float()).cpu())
        users.append(batch.user.cpu())
    if not labels:
        return np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, dtype=np.int64)
    return torch.cat(labels).numpy(), torch.cat(probs).numpy(), torch.cat(users).numpy()


def evaluate(
    model: CTRModel,
    loader,
    device: str = "cpu",
    amp: bool = False,
    ctx: D.DistContext | None = None,
) -> dict:
    """AUC, GAUC, logloss, accuracy (and rows / seconds) of a model on one loader.

    With a distributed ``ctx`` the loader is this rank's share (see :class:`_RankShare`):
    the predictions of all ranks are gathered and every rank computes the metrics of their
    union (AUC is not an average of per-rank AUCs).
    """
    start = time.perf_counter()
    labels, probs, users = predict(model, loader, device, amp)
    if ctx is not None and ctx.enabled:
        labels, probs, users = D.all_gather_arrays(ctx, labels, probs, users)
    if len(labels) == 0:
        raise DinrecError(f"split {loader.split!r} has no rows to evaluate")
    seconds = time.perf_counter() - start
    metrics = evaluate_predictions(labels, probs, users)
    metrics["eval_seconds"] = seconds
    metrics["eval_samples_per_s"] = len(labels) / seconds if seconds > 0 else float("nan")
    return metrics


class _RankShare:
    """This rank's share of an evaluation split: every row is evaluated by exactly one rank.

    ``BatchLoader(rank=, world_size=)`` gives every rank the same number of batches (the
    smallest rank's), which is right for training steps in lockstep but would drop rows of
    an evaluation. When the per-rank loaders cover every row they are used (each rank reads
    only its shards); otherwise each rank reads the whole split and evaluates every
    ``world_size``-th batch.
    """

    def __init__(self, make_loader, ctx: D.DistContext):
        self.ctx = ctx
        sharded = [make_loader(r, ctx.world_size) for r in range(ctx.world_size)]
        if all(len(ld) * ld.batch_size >= ld.num_rows for ld in sharded):
            self.loader, self.stride = sharded[ctx.rank], 1
        else:
            self.loader, self.stride = make_loader(0, 1), ctx.world_size
        self.split = self.loader.split

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i % self.stride == self.ctx.rank % self.stride:
                yield batch


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
def _train_loader(cfg: TrainConfig, store: SampleStore, ctx: D.DistContext) -> BatchLoader:
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


def _valid_loader(cfg: TrainConfig, store: SampleStore, ctx: D.DistContext):
    if "valid" not in store.splits or store.num_rows("valid") == 0:
        return None
    return rank_eval_loader(cfg, store, "valid", ctx)


def eval_loader(
    cfg: TrainConfig, store: SampleStore, split: str, rank: int = 0, world_size: int = 1
) -> BatchLoader:
    if split not in store.splits:
        raise DinrecError(f"{store.path}: the store has no {split!r} split (has {', '.join(store.splits)})")
    return BatchLoader(
        store,
        split,
        batch_size=cfg.eval_batch_size,
        max_len=cfg.max_len,
        shuffle=False,
        bucket=cfg.bucket,
        rank=rank,
        world_size=world_size,
    )


def rank_eval_loader(cfg: TrainConfig, store: SampleStore, split: str, ctx: D.DistContext):
    """The loader of ``split`` for this process: the whole split, or this rank's share."""
    if not ctx.enabled:
        return eval_loader(cfg, store, split)
    return _RankShare(lambda r, w: eval_loader(cfg, store, split, r, w), ctx)


def _rank_slice(batch, ctx: D.DistContext):
    """Rows ``[rank * n / W, (rank + 1) * n / W)`` of a global batch (``data_split="batches"``)."""
    n = len(batch)
    a, b = n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size
    return type(batch)(**{
        k: (None if v is None else v[a:b]) for k, v in vars(batch).items()
    })  # fmt: skip


def _unused_parameters(model: CTRModel, loader: BatchLoader, cfg: TrainConfig, device: str) -> list[str]:
    """Parameters a training step leaves without gradient, found on one batch of a spare
    loader; the RNG, buffers (BatchNorm statistics) and gradients are left as they were."""
    batch = next(iter(_device_batches(loader, device, ahead=False)))
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


def _resume_state(run_dir: Path) -> tuple[dict[str, Any], str]:
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
        return ckpt, rel
    if not (run_dir / LAST).exists() and not (run_dir / PREV).exists():
        raise RunFolderError(f"{run_dir}: nothing to resume (no {LAST})")
    raise RunFolderError(
        f"{run_dir}: cannot resume: no intact checkpoint ({'; '.join(errors)}). "
        "Start the run again with --overwrite"
    )


def train(
    cfg: TrainConfig,
    store_dir: str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Train ``cfg.model`` on a sample store into ``run_dir``; see the module docstring.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process calls this;
    the process group is created here (and ended here if it was created here).
    """
    ctx = D.setup(cfg.device)
    try:
        result = _train(cfg, store_dir, Path(run_dir), resume, overwrite, ctx)
        # Rank 0 finishes later (final evaluation, files): no rank may tear its gloo
        # connections down while a peer still uses them (that aborts the process).
        ctx.barrier()
        return result
    finally:
        D.teardown(ctx)


def _train(
    cfg: TrainConfig, store_dir: str | Path, run_dir: Path, resume: bool, overwrite: bool,
    ctx: D.DistContext,
) -> TrainResult:
    main = ctx.is_main
    device = ctx.device
    store = SampleStore(store_dir)
    ckpt: dict[str, Any] | None = None
    if resume:
        # Files are read on rank 0 and sent to the others: no shared file system needed.
        def read_resume() -> tuple[dict[str, Any], dict[str, Any]]:
            saved = read_run_config(run_dir)
            if saved.get("vocab_sizes") != _vocab_sizes(store):
                raise RunFolderError(
                    f"{run_dir}: the run's vocabularies {saved.get('vocab_sizes')} do not match "
                    f"the store {store.path} {_vocab_sizes(store)}"
                )
            return saved, _resume_state(run_dir)[0]

        saved, ckpt = D.rank0_call(ctx, read_resume)
        # The run's own config, except the options about this process (not the model or data).
        runtime = {k: getattr(cfg, k) for k in RUNTIME_OPTIONS}
        cfg = TrainConfig.from_dict({**saved["train"], **runtime})
        saved_world = ckpt["state"].get("world_size", 1)
        if saved_world != ctx.world_size:
            raise RunFolderError(
                f"{run_dir}: the run was trained with {saved_world} process(es); resume it with "
                f"the same number (this is {ctx.world_size})"
            )
    else:
        D.rank0_call(ctx, lambda: _start_run_dir(run_dir, overwrite))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # The same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)  # noqa: NPY002 - libraries may use the global stream

    model_cfg = model_config_for(cfg, store)
    model = build_model_from(cfg.model, model_cfg).to(device)
    if not resume and main:
        _write_json(
            run_dir / CONFIG_FILE,
            {
                "dinrec_version": __version__,
                "model": {"name": cfg.model, "config": model.config.to_dict()},
                "train": cfg.to_dict(),
                "store": str(Path(store_dir).resolve()),
                "vocab_sizes": _vocab_sizes(store),
                "world_size": ctx.world_size,
            },
        )
        shutil.copytree(store.path / "vocab", run_dir / "vocab", dirs_exist_ok=True)
        shutil.copy2(store.path / "stats.json", run_dir / "store_stats.json")

    train_loader = _train_loader(cfg, store, ctx)
    valid_loader = _valid_loader(cfg, store, ctx)
    by_batches = cfg.data_split == "batches" and ctx.enabled
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
             "train_seconds": 0.0, "evals": [], "world_size": ctx.world_size}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        train_loader.load_state_dict(ckpt["loader"])
        ranks_rng = ckpt.get("rng_ranks")
        restore_rng_state(ranks_rng[ctx.rank] if ranks_rng else ckpt["rng"])
        state = ckpt["state"]
        state.setdefault("world_size", 1)
        if main:
            _truncate_log(run_dir / "log.csv", state["step"])
            log.info("resuming %s at step %d", run_dir, state["step"])
        del ckpt
    device_type = torch.device(device).type
    step_model: torch.nn.Module = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP waits for a gradient of every parameter unless told to search the graph for
        # unused ones each step (find_unused_parameters, slower): search only for models
        # that have some. Evaluation runs the bare module, outside DDP.
        unused = _unused_parameters(model, _train_loader(cfg, store, ctx), cfg, device)
        if unused and main:
            log.info("parameters without gradient (DDP find_unused_parameters): %s", unused)
        step_model = DDP(
            model,
            device_ids=[ctx.local_rank] if device_type == "cuda" else None,
            find_unused_parameters=bool(unused),
        )
    if cfg.compile:
        step_model = torch.compile(step_model)

    logger = _Log(run_dir, resume) if main else None
    bar = None
    if cfg.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc=f"train {cfg.model}",
                   unit="step", dynamic_ncols=True, disable=None)

    def save_last() -> None:
        rng = capture_rng_state()
        ranks_rng = D.all_gather_objects(ctx, rng) if ctx.enabled else None
        if not main:
            return
        last, prev = run_dir / LAST, run_dir / PREV
        if last.exists():  # keep the previous resumable checkpoint: the fallback
            os.replace(last, prev)
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loader": train_loader.state_dict(),
            "rng": rng,
            "state": state,
        }
        if ranks_rng is not None:
            payload["rng_ranks"] = ranks_rng
        save_checkpoint(last, payload)

    def validate() -> bool:
        """Evaluate on valid, keep the best model; True if training should stop early."""
        D.sync_buffers(ctx, model)
        if valid_loader is None:
            if main:
                save_checkpoint(run_dir / BEST, {"model": model.state_dict(), "step": state["step"]})
            return False
        if ctx.enabled:
            m = evaluate(model, valid_loader, device, cfg.amp, ctx)
        else:
            m = evaluate(model, valid_loader, device, cfg.amp)
        model.train()
        state["evals"].append({"step": state["step"], **{k: m[k] for k in ("auc", "gauc", "logloss")}})
        if logger is not None:
            logger.row(step=state["step"], epoch=train_loader.epoch, samples=state["samples"],
                       split="valid", auc=m["auc"], gauc=m["gauc"], logloss=m["logloss"])
        if bar is not None:
            bar.set_postfix_str(f"loss {last_loss:.4f} | {last_rate:,.0f} samples/s | val AUC {m['auc']:.4f}")
        # Every rank computed the same metrics from the same gathered predictions, so every
        # rank takes the same decision.
        if m["auc"] > state["best_auc"]:
            state.update(best_auc=m["auc"], best_step=state["step"], bad_evals=0)
            if main:
                save_checkpoint(run_dir / BEST, {"model": model.state_dict(), "step": state["step"]})
            return False
        state["bad_evals"] += 1
        return bool(cfg.patience) and state["bad_evals"] >= cfg.patience

    def batches():
        while True:  # epochs; a resumed loader first finishes its current epoch
            yield from train_loader
            train_loader.set_epoch(train_loader.epoch + 1)

    model.train()
    loss_sum = torch.zeros((), device=device)  # summed on device: no sync per step
    loss_count = 0
    last_loss, last_rate = float("nan"), 0.0
    seconds_before = state["train_seconds"]
    loop_start = time.perf_counter()
    overhead = 0.0  # seconds spent validating and checkpointing, not training
    interval_start, interval_overhead, interval_samples = loop_start, 0.0, 0
    stopped_early, completed = False, True
    try:
        for batch in _device_batches(batches(), device, ahead=False):
            global_rows = len(batch) if by_batches else len(batch) * ctx.world_size
            if by_batches:
                batch = _rank_slice(batch, ctx)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.amp):
                out = step_model(batch)
                logits = out.logits.float()
                if by_batches:
                    # sum / global rows x W: DDP's mean over ranks gives the gradient of the
                    # global batch's mean loss, exactly as one process would compute it.
                    loss = F.binary_cross_entropy_with_logits(logits, batch.label, reduction="sum")
                    loss = loss * (ctx.world_size / global_rows)
                else:
                    loss = F.binary_cross_entropy_with_logits(logits, batch.label)
                if out.aux_loss is not None:
                    loss = loss + cfg.aux_weight * out.aux_loss.float()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            state["samples"] += global_rows
            interval_samples += global_rows
            loss_sum += loss.detach()
            loss_count += 1
            step = state["step"]
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                # The mean over ranks: the same value on every rank (the NaN check agrees).
                last_loss = float(D.all_reduce_sum(ctx, loss_sum)) / (loss_count * ctx.world_size)
                if not math.isfinite(last_loss):
                    raise TrainingError(
                        f"the loss became {last_loss} by step {step} "
                        f"(lr {scheduler.get_last_lr()[0]:g}); try a lower --lr or --grad-clip"
                    )
                now = time.perf_counter()
                last_rate = interval_samples / max(now - interval_start - interval_overhead, 1e-9)
                state["train_seconds"] = seconds_before + (now - loop_start - overhead)
                if logger is not None:
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
                D.sync_buffers(ctx, model)
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
        if logger is not None:
            logger.close()

    if not completed:
        ctx.barrier()  # rank 0's checkpoint is on disk before any rank reports "stopped"
        return TrainResult(run_dir, {}, completed=False)

    D.sync_buffers(ctx, model)
    digests = D.replica_digests(ctx, model) if ctx.enabled else []
    if len(set(digests)) > 1:  # pragma: no cover - a DDP bug or nondeterministic collective
        differ = D.replica_differences(ctx, model)
        raise TrainingError(
            f"the {ctx.world_size} replicas ended with different weights: {', '.join(differ[:10])}"
        )

    # Final metrics with the best model (rank 0 reads it, every rank evaluates its share).
    best = D.rank0_call(ctx, lambda: load_checkpoint(run_dir / BEST))
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
    if ctx.enabled:
        metrics["distributed"] = {
            "world_size": ctx.world_size,
            "backend": ctx.backend,
            "data_split": cfg.data_split,
            "global_batch_size": cfg.batch_size * ctx.world_size,
            "replica_sha256": digests,
        }
    for split in ("valid", "test"):
        if split in store.splits and store.num_rows(split) > 0:
            loader = rank_eval_loader(cfg, store, split, ctx)
            if ctx.enabled:
                metrics[split] = evaluate(model, loader, device, cfg.amp, ctx)
            else:
                metrics[split] = evaluate(model, loader, device, cfg.amp)
    metrics["wall_seconds_this_process"] = time.perf_counter() - loop_start
    if main:
        plot_curves(run_dir)
        _write_json(run_dir / METRICS_FILE, metrics)
    ctx.barrier()  # metrics.json exists before any rank returns
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
