"""Evaluate a finished run on a split of its own store or of another, compatible store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dinrec.data.store import SampleStore
from dinrec.data.vocab import Vocabularies
from dinrec.errors import RunFolderError
from dinrec.train.trainer import TrainConfig, eval_loader, evaluate, load_run_model


def evaluate_run(run_dir: str | Path, store_dir: str | Path | None = None, split: str = "test") -> dict[str, Any]:
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
    metrics = evaluate(model, eval_loader(cfg, store, split), cfg.device, cfg.amp)
    return {"run": str(run_dir), "model": saved["model"]["name"], "split": split,
            "store": str(store.path), **metrics}
