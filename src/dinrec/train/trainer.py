"""The training loop: a :class:`Trainer` in small steps, early stopping, exact resume.

``train(cfg, store, run)`` starts a run in a run folder (layout: :mod:`dinrec.run`);
``train(cfg, store, run, resume=True)`` continues one from its last checkpoint and ends
with exactly the weights the uninterrupted run would have had (same seed, same device,
deterministic kernels), also after a ``kill -9`` at any moment. When there is nothing to
resume (the run was killed before its first checkpoint, or never started) a resume
starts the run afresh and says so, so one command can be re-run until the run is done.

Several processes (``torchrun``, or ``dinrec train --nproc N``) train one model with
DistributedDataParallel: each rank reads its own share of the store, rank 0 writes the
run folder, validation metrics are computed on the predictions of all ranks; see
``docs/distributed.md`` and :mod:`dinrec.train.distributed`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinrec import __version__
from dinrec.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from dinrec.data.batches import Batch
from dinrec.data.store import SampleStore
from dinrec.errors import DinrecError, RunFolderError
from dinrec.nn import prepare_fast_paths, products
from dinrec.run import (
    BEST,
    CONFIG_FILE,
    LAST,
    METRICS_FILE,
    PREV,
    SERVING_FILES,
    build_model,
    check_replaceable,
    create_run_dir,
    is_resumable,
    read_run_config,
    table_sizes,
    write_json,
)
from dinrec.train import distributed as D
from dinrec.train.config import RUNTIME_OPTIONS, TrainConfig
from dinrec.train.evaluate import device_batches, evaluate, rank_eval_loader
from dinrec.train.parts import (
    lr_lambda,
    model_options,
    rank_slice,
    resume_checkpoint,
    train_loader,
    unused_parameters,
)
from dinrec.train.plots import plot_curves
from dinrec.train.progress import Bar, Clock, RunLog, truncate_log

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainingError", "train"]


class TrainingError(DinrecError):
    """Training cannot go on (NaN loss, ...)."""


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    completed: bool  # False when stopped by stop_after (resumable)


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
        result = Trainer(cfg, store_dir, Path(run_dir), ctx, resume, overwrite).fit()
        # Rank 0 finishes later (final evaluation, files): no rank may tear its gloo
        # connections down while a peer still uses them (that aborts the process).
        ctx.barrier()
        return result
    finally:
        D.teardown(ctx)


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """One training run: set up (fresh or resumed) in ``__init__``, then :meth:`fit`.

    :meth:`fit` loops over :meth:`step`, and every so often :meth:`log_interval`,
    :meth:`validate` and :meth:`checkpoint`; :meth:`finish` evaluates the best model and
    writes metrics.json. ``self.state`` is everything about progress that a checkpoint
    saves (with the model, optimiser, scheduler, loader position and RNG).
    """

    def __init__(self, cfg: TrainConfig, store_dir: str | Path, run_dir: Path,
                 ctx: D.DistContext, resume: bool = False, overwrite: bool = False):
        self.ctx, self.main, self.device = ctx, ctx.is_main, ctx.device
        self.store_dir, self.run_dir = store_dir, run_dir
        self.store = SampleStore(store_dir)
        self.cfg = cfg
        ckpt = self._resume_or_none() if resume else None
        self.resumed = ckpt is not None
        if ckpt is None:  # fail before any work when the folder may not be replaced
            D.rank0_call(ctx, lambda: check_replaceable(run_dir, overwrite or resume))
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        # The same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(self.cfg.seed)
        np.random.seed(self.cfg.seed % 2**32)  # noqa: NPY002 - libraries may use the global stream
        self.model = build_model(self.cfg.model, model_options(self.cfg), self.store).to(self.device)
        if ckpt is None:
            D.rank0_call(ctx, lambda: create_run_dir(run_dir, self._fill_run_dir, overwrite or resume))
        self._setup_training()
        if ckpt is not None:
            self._restore(ckpt)
        self.step_model = self._wrap_model()

    # ----------------------------------------------------------------- set-up
    def _resume_or_none(self) -> dict[str, Any] | None:
        """The checkpoint to resume from (its run config replaces ``self.cfg``), or None
        when there is nothing to resume: then the run starts afresh, saying so."""
        run_dir = self.run_dir

        def read() -> tuple[dict[str, Any], dict[str, Any]] | None:
            if not is_resumable(run_dir):
                log.warning("%s: nothing to resume (no %s): starting the run afresh", run_dir, LAST)
                return None
            saved = read_run_config(run_dir)
            if saved.get("vocab_sizes") != table_sizes(self.store):
                raise RunFolderError(
                    f"{run_dir}: the run's vocabularies {saved.get('vocab_sizes')} do not match "
                    f"the store {self.store.path} {table_sizes(self.store)}"
                )
            return saved, resume_checkpoint(run_dir)

        found = D.rank0_call(self.ctx, read)
        if found is None:
            return None
        saved, ckpt = found
        # The run's own config, except the options about this process (not the model or data).
        runtime = {k: getattr(self.cfg, k) for k in RUNTIME_OPTIONS}
        self.cfg = TrainConfig.from_dict({**saved["train"], **runtime})
        saved_world = ckpt["state"].get("world_size", 1)
        if saved_world != self.ctx.world_size:
            raise RunFolderError(
                f"{run_dir}: the run was trained with {saved_world} process(es); resume it with "
                f"the same number (this is {self.ctx.world_size})"
            )
        return ckpt

    def _fill_run_dir(self, tmp: Path) -> None:
        """The first files of a new run folder (written before it appears under its name)."""
        write_json(tmp / CONFIG_FILE, {
            "dinrec_version": __version__,
            "model": {"name": self.cfg.model, "config": self.model.config.to_dict()},
            "train": self.cfg.to_dict(),
            "store": str(Path(self.store_dir).resolve()),
            "vocab_sizes": table_sizes(self.store),
            "world_size": self.ctx.world_size,
        })  # fmt: skip
        shutil.copytree(self.store.path / "vocab", tmp / "vocab", dirs_exist_ok=True)
        shutil.copy2(self.store.path / "stats.json", tmp / "store_stats.json")
        for name in SERVING_FILES:  # what a server needs to encode requests
            if (self.store.path / name).exists():
                shutil.copy2(self.store.path / name, tmp / name)

    def _setup_training(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.train_loader = train_loader(cfg, self.store, ctx)
        has_valid = "valid" in self.store.splits and self.store.num_rows("valid") > 0
        self.valid_loader = rank_eval_loader(cfg, self.store, "valid", ctx) if has_valid else None
        self.by_batches = cfg.data_split == "batches" and ctx.enabled
        steps_per_epoch = len(self.train_loader)
        if steps_per_epoch == 0:
            raise DinrecError(f"{self.store.path}: the train split is empty")
        self.total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        self.eval_every = cfg.eval_every or steps_per_epoch
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every
        if torch.device(self.device).type == "cpu":  # before the clock, not in the first step
            prepare_fast_paths(cfg.mlp_products)
        # The fused kernel (one pass over all parameters) is several times faster than the
        # per-tensor loop on CPU and GPU alike; it computes the same update.
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, self.total_steps))
        self.state: dict[str, Any] = {
            "step": 0, "samples": 0, "best_auc": -1.0, "best_step": 0, "bad_evals": 0,
            "train_seconds": 0.0, "evals": [], "world_size": ctx.world_size,
            "finished": False, "stopped_early": False,
        }  # fmt: skip

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.train_loader.load_state_dict(ckpt["loader"])
        ranks_rng = ckpt.get("rng_ranks")
        restore_rng_state(ranks_rng[self.ctx.rank] if ranks_rng else ckpt["rng"])
        self.state.update(ckpt["state"])
        if self.main:
            truncate_log(self.run_dir / "log.csv", self.state["step"])
            log.info("resuming %s at step %d", self.run_dir, self.state["step"])

    def _wrap_model(self) -> torch.nn.Module:
        """The module a training step runs: the model, in DDP and/or compiled."""
        step_model: torch.nn.Module = self.model
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # DDP waits for a gradient of every parameter unless told to search the graph
            # for unused ones each step (find_unused_parameters, slower): search only for
            # models that have some. Evaluation runs the bare module, outside DDP.
            spare = train_loader(self.cfg, self.store, self.ctx)
            unused = unused_parameters(self.model, spare, self.device)
            if unused and self.main:
                log.info("parameters without gradient (DDP find_unused_parameters): %s", unused)
            cuda = torch.device(self.device).type == "cuda"
            step_model = DDP(self.model, device_ids=[self.ctx.local_rank] if cuda else None,
                             find_unused_parameters=bool(unused))
        if self.cfg.compile:
            step_model = torch.compile(step_model)  # type: ignore[assignment]
        return step_model

    # ----------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        """Train until the step budget, early stopping or ``stop_after``; then finish."""
        self.run_log = RunLog(self.run_dir, self.resumed) if self.main else None
        self.bar = Bar(self.cfg.progress and self.main, self.total_steps, self.state["step"],
                       f"train {self.cfg.model}")
        self.clock = Clock(self.state["train_seconds"])
        self.loss_sum = torch.zeros((), device=self.device)  # summed on device: no sync per step
        self.loss_count = 0
        completed = True
        try:
            if not self.state["finished"]:  # a resumed run may have ended before its kill
                completed = self._loop()
        finally:
            self.bar.close()
            if self.run_log is not None:
                self.run_log.close()
        if not completed:
            self.ctx.barrier()  # rank 0's checkpoint is on disk before any rank reports "stopped"
            return TrainResult(self.run_dir, {}, completed=False)
        return self.finish()

    def _batches(self) -> Iterator[Batch]:
        while True:  # epochs; a resumed loader first finishes its current epoch
            yield from self.train_loader
            self.train_loader.set_epoch(self.train_loader.epoch + 1)

    def _loop(self) -> bool:
        """Steps until the run ends (True) or ``stop_after`` interrupts it (False)."""
        self.model.train()
        for batch in device_batches(self._batches(), self.device, ahead=False):
            self.step(batch)
            step = self.state["step"]
            if step % self.cfg.log_every == 0 or step == self.total_steps:
                self.log_interval()
            t0 = time.perf_counter()
            self.state["train_seconds"] = self.clock.train_seconds()
            if step % self.eval_every == 0 or step == self.total_steps:
                self.state["stopped_early"] = self.validate()
            stop_after = self.cfg.stop_after
            interrupted = bool(stop_after) and step >= stop_after and step < self.total_steps
            finished = self.state["stopped_early"] or step >= self.total_steps
            self.state["finished"] = finished
            if step % self.checkpoint_every == 0 or finished or interrupted:
                D.sync_buffers(self.ctx, self.model)
                self.checkpoint()
            self.clock.add_overhead(time.perf_counter() - t0)
            if finished:
                return True
            if interrupted:
                return False
        raise AssertionError("unreachable: the batch stream is endless")  # pragma: no cover

    def step(self, batch: Batch) -> None:
        """One optimiser step on one batch (this rank's slice of it with data_split=batches)."""
        cfg, ctx = self.cfg, self.ctx
        global_rows = len(batch) if self.by_batches else len(batch) * ctx.world_size
        if self.by_batches:
            batch = rank_slice(batch, ctx)
        with (torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=cfg.amp),
              products(cfg.mlp_products)):  # type: ignore[arg-type]  # checked: the config's choices
            out = self.step_model(batch)
            logits = out.logits.float()
            if self.by_batches:
                # sum / global rows x W: DDP's mean over ranks gives the gradient of the
                # global batch's mean loss, exactly as one process would compute it.
                loss = F.binary_cross_entropy_with_logits(logits, batch.label, reduction="sum")
                loss = loss * (ctx.world_size / global_rows)
            else:
                loss = F.binary_cross_entropy_with_logits(logits, batch.label)
            if out.aux_loss is not None:
                loss = loss + cfg.aux_weight * out.aux_loss.float()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.state["step"] += 1
        self.state["samples"] += global_rows
        self.clock.interval_samples += global_rows
        self.loss_sum += loss.detach()
        self.loss_count += 1
        self.bar.update()

    def log_interval(self) -> None:
        """The mean loss since the last call (over ranks: the NaN check agrees) to log.csv,
        TensorBoard and the bar; a non-finite loss stops the run."""
        step = self.state["step"]
        loss = float(D.all_reduce_sum(self.ctx, self.loss_sum)) / (self.loss_count * self.ctx.world_size)
        lr = self.scheduler.get_last_lr()[0]
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss} by step {step} (lr {lr:g}); try a lower --lr or --grad-clip")
        rate = self.clock.interval_rate()
        self.state["train_seconds"] = self.clock.train_seconds()
        if self.run_log is not None:
            self.run_log.row(step=step, epoch=self.train_loader.epoch, samples=self.state["samples"],
                             split="train", loss=loss, lr=lr, samples_per_s=rate)
        self.bar.train(loss, rate)
        self.loss_sum.zero_()
        self.loss_count = 0

    def validate(self) -> bool:
        """Evaluate on valid, keep the best model; True if training should stop early."""
        D.sync_buffers(self.ctx, self.model)
        state = self.state
        if self.valid_loader is None:
            self._save_best()
            return False
        m = evaluate(self.model, self.valid_loader, self.device, self.cfg.amp,
                     self.ctx if self.ctx.enabled else None)
        self.model.train()
        state["evals"].append({"step": state["step"], **{k: m[k] for k in ("auc", "gauc", "logloss")}})
        if self.run_log is not None:
            self.run_log.row(step=state["step"], epoch=self.train_loader.epoch,
                             samples=state["samples"], split="valid", auc=m["auc"],
                             gauc=m["gauc"], logloss=m["logloss"])
        self.bar.valid(m["auc"])
        # Every rank computed the same metrics from the same gathered predictions, so every
        # rank takes the same decision.
        if m["auc"] > state["best_auc"]:
            state.update(best_auc=m["auc"], best_step=state["step"], bad_evals=0)
            self._save_best()
            return False
        state["bad_evals"] += 1
        return bool(self.cfg.patience) and state["bad_evals"] >= self.cfg.patience

    def _save_best(self) -> None:
        if self.main:
            save_checkpoint(self.run_dir / BEST, {"model": self.model.state_dict(),
                                                  "step": self.state["step"]})

    def checkpoint(self) -> None:
        """Save the resumable checkpoint last.pt (the one before it becomes prev.pt)."""
        rng = capture_rng_state()
        ranks_rng = D.all_gather_objects(self.ctx, rng) if self.ctx.enabled else None
        if not self.main:
            return
        last, prev = self.run_dir / LAST, self.run_dir / PREV
        if last.exists():  # keep the previous resumable checkpoint: the fallback
            os.replace(last, prev)
        payload: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "rng": rng,
            "state": self.state,
        }
        if ranks_rng is not None:
            payload["rng_ranks"] = ranks_rng
        save_checkpoint(last, payload)

    # ----------------------------------------------------------------- the end
    def finish(self) -> TrainResult:
        """Check the replicas agree, evaluate the best model on valid and test, write
        curves.png and metrics.json (last: its presence marks a complete run)."""
        ctx, state = self.ctx, self.state
        D.sync_buffers(ctx, self.model)
        digests = D.replica_digests(ctx, self.model) if ctx.enabled else []
        if len(set(digests)) > 1:  # pragma: no cover - a DDP bug or nondeterministic collective
            differ = D.replica_differences(ctx, self.model)
            raise TrainingError(
                f"the {ctx.world_size} replicas ended with different weights: {', '.join(differ[:10])}"
            )
        # Final metrics with the best model (rank 0 reads it, every rank evaluates its share).
        best = D.rank0_call(ctx, lambda: load_checkpoint(self.run_dir / BEST))
        self.model.load_state_dict(best["model"])
        metrics: dict[str, Any] = {
            "model": self.cfg.model,
            "best_step": best["step"],
            "steps": state["step"],
            "train_samples": state["samples"],
            "train_seconds": state["train_seconds"],
            "train_samples_per_s": state["samples"] / max(state["train_seconds"], 1e-9),
            "stopped_early": state["stopped_early"],
            "threads": torch.get_num_threads(),
            "device": self.cfg.device,
            "validations": state["evals"],
        }
        if ctx.enabled:
            metrics["distributed"] = {
                "world_size": ctx.world_size, "backend": ctx.backend,
                "data_split": self.cfg.data_split,
                "global_batch_size": self.cfg.batch_size * ctx.world_size,
                "replica_sha256": digests,
            }  # fmt: skip
        for split in ("valid", "test"):
            if split in self.store.splits and self.store.num_rows(split) > 0:
                loader = rank_eval_loader(self.cfg, self.store, split, ctx)
                metrics[split] = evaluate(self.model, loader, self.device, self.cfg.amp,
                                          ctx if ctx.enabled else None)
        metrics["wall_seconds_this_process"] = time.perf_counter() - self.clock.start
        if self.main:
            plot_curves(self.run_dir)
            write_json(self.run_dir / METRICS_FILE, metrics)
        ctx.barrier()  # metrics.json exists before any rank returns
        return TrainResult(self.run_dir, metrics, completed=True)
