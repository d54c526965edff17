"""What a run reports while it trains: log.csv, TensorBoard scalars, the tqdm bar, and
the clock that tells training time from time spent validating and checkpointing."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FIELDS = ["step", "epoch", "samples", "split", "loss", "lr", "samples_per_s", "auc", "gauc", "logloss"]


class RunLog:
    """log.csv + TensorBoard scalars (rank 0 only)."""

    def __init__(self, run_dir: Path, resume: bool):
        self.path = run_dir / "log.csv"
        new = not (resume and self.path.exists())
        self.file = open(self.path, "w" if new else "a", newline="")  # noqa: SIM115 - closed in close()
        self.writer = csv.DictWriter(self.file, fieldnames=FIELDS)
        if new:
            self.writer.writeheader()
        self.tb: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboard is a declared dependency
            log.warning("tensorboard is not installed: no TensorBoard scalars")

    def row(self, **row: Any) -> None:
        self.writer.writerow({k: row.get(k, "") for k in FIELDS})
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


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(r for r in rows if int(r["step"]) <= step)


class Clock:
    """Training seconds (wall time less validation and checkpoints) and the samples/s of
    the current log interval."""

    def __init__(self, seconds_before: float):
        self.seconds_before = seconds_before
        self.start = time.perf_counter()
        self.overhead = 0.0  # seconds spent validating and checkpointing, not training
        self.interval_start, self.interval_overhead, self.interval_samples = self.start, 0.0, 0

    def train_seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self.start - self.overhead)

    def add_overhead(self, seconds: float) -> None:
        self.overhead += seconds
        self.interval_overhead += seconds

    def interval_rate(self) -> float:
        """Samples/s since the last call (or the start), then a new interval begins."""
        now = time.perf_counter()
        rate = self.interval_samples / max(now - self.interval_start - self.interval_overhead, 1e-9)
        self.interval_start, self.interval_overhead, self.interval_samples = now, 0.0, 0
        return rate


class Bar:
    """The tqdm progress bar (or nothing), with the latest loss, speed and val AUC."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar: Any = None
        self.loss, self.rate = float("nan"), 0.0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                            dynamic_ncols=True, disable=None)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def train(self, loss: float, rate: float) -> None:
        self.loss, self.rate = loss, rate
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} | {rate:,.0f} samples/s")

    def valid(self, auc: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"loss {self.loss:.4f} | {self.rate:,.0f} samples/s | val AUC {auc:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
