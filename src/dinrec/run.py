"""The run folder: its layout, its config.json, and the trained model it holds.

A run folder holds everything a training run produces::

    RUN/config.json        the TrainConfig, the model name and config, the store path
    RUN/schema.json        the feature schema (copied from the store, with the files a
    RUN/features.json      server needs to encode requests: table sizes and numeric
    RUN/items.arrow        statistics, the item and user side tables)
    RUN/users.arrow
    RUN/vocab/             the vocabularies the model's ids refer to (copied from the store)
    RUN/store_stats.json   the store's statistics
    RUN/checkpoints/       last.pt (resumable: model, optimiser, scheduler, RNG, data
                           position), prev.pt (the resumable checkpoint before it, the
                           fallback when last.pt is damaged) and best.pt (the model with
                           the best validation AUC)
    RUN/log.csv            one row per log interval and per evaluation
    RUN/tensorboard/       the same scalars for TensorBoard
    RUN/curves.png         training loss and validation curves
    RUN/metrics.json       written last: final validation and test metrics, throughput,
                           wall times. A run folder without it is not complete.

The folder appears atomically (:func:`create_run_dir`: filled under a temporary name
beside it, then renamed), so a kill leaves either no run folder or one with its
config.json. Serving and evaluation read a run through this module only
(:func:`load_run_model`); it never imports the training loop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dinrec.errors import RunFolderError

if TYPE_CHECKING:
    from dinrec.data.store import SampleStore
    from dinrec.models import CTRModel

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
LAST = "checkpoints/last.pt"
PREV = "checkpoints/prev.pt"  # the resumable checkpoint before last.pt
BEST = "checkpoints/best.pt"
#: Files of the sample store copied into a run folder, so that serving needs only the run.
SERVING_FILES = ("schema.json", "features.json", "items.arrow", "users.arrow")
#: What a run folder may hold before its config.json exists (a folder made by an older
#: dinrec killed early): such a folder is "half made" and is replaced, not refused.
_EARLY_ENTRIES = {"checkpoints", "vocab", "store_stats.json", "log.csv", "tensorboard",
                  "schema.json", "features.json", "items.arrow", "users.arrow"}


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a temporary file renamed over ``path``)."""
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
        config: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}: not valid JSON: {exc}") from None
    return config


# --------------------------------------------------------------------------- the model
def table_sizes(source: SampleStore | str | Path) -> dict[str, int]:
    """Number of ids (with padding and OOV) of each embedding table: from a sample store
    (when training) or from a run folder's config.json (when loading a trained model)."""
    if isinstance(source, (str, Path)):
        sizes: dict[str, int] = read_run_config(source)["vocab_sizes"]
        return sizes
    return source.table_sizes()


def build_model(name: str, config: dict[str, Any], source: SampleStore | str | Path) -> CTRModel:
    """The one place a model is created: model ``name`` with ``config`` (its config
    dataclass as a dict, or the TrainConfig's model fields), over the feature schema and
    table sizes of ``source`` (a sample store, or a run folder: see :func:`table_sizes`)."""
    from dinrec.data.schema import Schema
    from dinrec.models import create_model

    schema = Schema.load(source) if isinstance(source, (str, Path)) else source.schema
    return create_model(name, schema, table_sizes(source), **config)


def load_run_model(run_dir: str | Path, which: str = "best") -> tuple[CTRModel, dict[str, Any]]:
    """The trained model of a run folder (``best`` or ``last``), in eval mode, and its
    config.json."""
    from dinrec.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    path = run_dir / (BEST if which == "best" else LAST)
    if not path.exists():
        raise RunFolderError(f"{run_dir}: no {path.relative_to(run_dir)} (is the run finished?)")
    model = build_model(saved["model"]["name"], saved["model"]["config"], run_dir)
    state = load_checkpoint(path)["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RunFolderError(f"{path}: the checkpoint does not fit model {saved['model']['name']!r}: "
                             f"{str(exc).splitlines()[0]}") from None
    model.eval()
    return model, saved


# --------------------------------------------------------------------------- creation
def is_resumable(run_dir: Path) -> bool:
    """A run folder with its config.json and a resumable checkpoint (intact or not)."""
    return (run_dir / CONFIG_FILE).is_file() and any(
        (run_dir / rel).exists() for rel in (LAST, PREV))


def is_half_made(run_dir: Path) -> bool:
    """A folder left by a run killed before its config.json was written: no config.json,
    nothing but the early entries of a run folder, and no checkpoint in it."""
    if not run_dir.is_dir() or (run_dir / CONFIG_FILE).exists():
        return False
    names = {p.name for p in run_dir.iterdir()}
    ckpts = run_dir / "checkpoints"
    return names <= _EARLY_ENTRIES and not (ckpts.is_dir() and any(ckpts.glob("*.pt")))


def _remove_leftovers(run_dir: Path) -> None:
    """Temporary siblings of ``run_dir`` left by a killed :func:`create_run_dir`."""
    for p in run_dir.parent.glob(f".{run_dir.name}.*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def check_replaceable(run_dir: Path, overwrite: bool) -> None:
    """Raise unless a new run may be created at ``run_dir`` (see :func:`create_run_dir`)."""
    if not run_dir.exists() or not any(run_dir.iterdir()) or is_half_made(run_dir):
        return
    if not overwrite:
        raise RunFolderError(
            f"{run_dir}: exists and is not empty; use --resume to continue it or --overwrite")
    if not (run_dir / CONFIG_FILE).exists():
        raise RunFolderError(f"{run_dir}: refusing to overwrite a folder that is not a run folder")


def create_run_dir(run_dir: Path, fill: Callable[[Path], None], overwrite: bool) -> None:
    """Create the run folder atomically: ``fill(tmp)`` writes its first files into a
    temporary folder beside it, which is then renamed to ``run_dir``.

    An existing run folder is replaced only with ``overwrite``; an empty or half-made one
    (:func:`is_half_made`) always is, with a warning for the latter.
    """
    check_replaceable(run_dir, overwrite)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(run_dir)
    tmp = run_dir.parent / f".{run_dir.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        (tmp / "checkpoints").mkdir(parents=True)
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if run_dir.exists():
        if any(run_dir.iterdir()) and not (run_dir / CONFIG_FILE).exists():
            log.warning("%s: replacing a half-made run folder (no %s)", run_dir, CONFIG_FILE)
        old = run_dir.parent / f".{run_dir.name}.{uuid.uuid4().hex[:8]}.old.partial"
        os.replace(run_dir, old)
        os.replace(tmp, run_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, run_dir)
