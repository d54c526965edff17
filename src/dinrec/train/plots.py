"""Pictures of a run: training curves and attention heatmaps (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float, float]]]:
    """(step, train loss) rows and (step, valid AUC, valid logloss) rows of a run's log.csv."""
    path = Path(run_dir) / "log.csv"
    if not path.exists():
        return [], []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r["split"] == "train" and r["loss"]]
    valid = [
        (int(r["step"]), float(r["auc"]), float(r["logloss"]))
        for r in rows
        if r["split"] == "valid" and r["auc"]
    ]
    return train, valid


def plot_curves(run_dir: Path, out: Path | None = None, others: Sequence[Path] = ()) -> Path | None:
    """Training loss and validation AUC / logloss against steps, for one run (and ``others``)."""
    runs = [Path(run_dir), *map(Path, others)]
    logs = {r: read_log(r) for r in runs}
    if not any(t or v for t, v in logs.values()):
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (run, (train, valid)) in enumerate(logs.items()):
        label, color = run.name, f"C{i}"  # one colour per run in both panels
        if train:
            ax1.plot(*zip(*train, strict=True), color=color, alpha=0.8, label=f"{label} train loss")
        if valid:
            steps, aucs, losses = zip(*valid, strict=True)
            ax1.plot(steps, losses, "o--", color=color, label=f"{label} valid logloss")
            ax2.plot(steps, aucs, "o-", color=color, label=f"{label} valid AUC")
    ax1.set(xlabel="step", ylabel="loss", title="loss")
    ax2.set(xlabel="step", ylabel="AUC", title="validation AUC")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    out = out or Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_attention(
    weights: np.ndarray,
    history: Sequence[str],
    candidates: Sequence[str],
    out: Path,
    title: str = "attention over the history",
) -> Path:
    """Heatmap of attention weights (N candidates, T history items) -> PNG."""
    weights = np.asarray(weights, dtype=np.float64)
    n, t = weights.shape
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * t + 2), max(2.5, 0.45 * n + 1.5)))
    im = ax.imshow(weights, aspect="auto", cmap="viridis")
    ax.set_yticks(range(n), labels=list(candidates), fontsize=8)
    ax.set_xticks(range(t), labels=list(history), rotation=90, fontsize=7)
    ax.set_xlabel("history item (oldest -> newest)")
    ax.set_ylabel("candidate")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="weight")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
