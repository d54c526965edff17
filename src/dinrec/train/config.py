"""TrainConfig: everything that defines a training run (saved in the run's ``config.json``).

Two configurations matter (measured in docs/results.md, "Peers"):

* **the default** (``TrainConfig()``, ``dinrec train``): the accurate one. Shuffled batches
  padded to their own longest row (``bucket=False``), Dice in the MLP, Adam at 2e-3,
  embeddings initialised N(0, 1e-4) (``embedding_init_std``, FuxiCTR's), the attention /
  auxiliary MLP's products in bfloat16 where the CPU has a checked, faster bfloat16 kernel
  (``mlp_products="auto"``; float32 accumulation, test AUC unchanged within seed noise), and
  for DIN the reference's plain ``din_attention`` (``DINConfig.attention = "din"``, the
  model's own default). On the synthetic set DIN's test AUC is 0.910 against 0.845 with
  the reference configuration (3 seeds each), with a seed spread of 0.002 against 0.02.
* **the DIEN reference configuration** (:meth:`TrainConfig.reference`, ``dinrec train
  --reference``): the reference code's length-sorted batches (``bucket=True``), the PReLU
  MLP, Adam at 1e-3, embeddings N(0, 0.05), float32 products and DIN's ``din_fcn_attention``
  (``attention="fcn"``): what the reference trains, 2-4x faster per step here, less accurate. Options given with it still
  win (``--reference --no-bucket``). The DIEN family's attention is the reference's in both.

This module imports nothing heavy, so the command line (whose ``dinrec train`` options are
generated from these fields: help from ``metadata["help"]``) and the run folder can read
it without importing torch or the training loop.

Field metadata understood by :mod:`dinrec.cli`: ``help``; ``choices``; ``flag`` (the
option's name when it is not ``--field-name``, e.g. ``--quiet``); ``invert`` (a
boolean option that stores ``False``); ``hidden`` (not shown in ``--help``); ``cli``
(``False``: not an option); ``negatable`` (a boolean option with its ``--no-`` form,
for a default that ``--reference`` turns around).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dinrec.errors import RunFolderError

#: The DIEN reference configuration's training fields (see the module docstring).
REFERENCE: dict[str, Any] = {"bucket": True, "activation": "prelu", "lr": 1e-3, "embedding_init_std": 0.05,
                             "mlp_products": "float32"}
#: Fields added after runs were recorded, with the value those runs used.
RECORDED_BEFORE: dict[str, Any] = {"embedding_init_std": 0.05, "mlp_products": "float32"}
#: ... and its model options, by model (the models not named here have none).
REFERENCE_MODEL_OPTIONS: dict[str, dict[str, Any]] = {"din": {"attention": "fcn"}}

#: Options that belong to one process, not to the run: a resume takes them from its caller.
RUNTIME_OPTIONS = ("stop_after", "progress", "threads")


def _f(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002 - argparse's word
    """A dataclass field with its command-line help."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``)."""

    model: str = _f("din", "model name: din, dien, base, wide_deep, pnn, ... (see docs/models.md)")
    model_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "a model option, e.g. attention_size=80 or attention=din (repeatable)",
                  "flag": "--option"},
    )
    embedding_dim: int = _f(18, "embedding width of every id")
    embedding_init_std: float = _f(1e-4, "std of the initial embedding values (the reference: 0.05)")
    hidden: tuple[int, ...] = _f((200, 80), "MLP widths, e.g. 200,80")
    activation: str = _f("dice", "MLP activation (the reference: prelu)",
                         choices=("prelu", "dice", "relu", "sigmoid"))
    max_len: int = _f(100, "longest history fed to the model")
    batch_size: int = _f(128, "training rows per step (per process)")
    eval_batch_size: int = _f(1024, "rows per evaluation batch")
    lr: float = _f(2e-3, "Adam learning rate (the reference: 1e-3)")
    weight_decay: float = _f(0.0, "Adam weight decay")
    lr_schedule: str = _f("constant", "after warmup: constant, or decay to 0 (cosine, linear)",
                          choices=("constant", "cosine", "linear"))
    warmup_steps: int = _f(0, "linear learning-rate warmup steps")
    grad_clip: float | None = _f(None, "max global gradient norm (default: no clipping)")
    epochs: int = _f(1, "passes over the training split")
    max_steps: int | None = _f(None, "total optimiser steps (overrides --epochs)")
    eval_every: int | None = _f(None, "steps between validations (default: once per epoch)")
    checkpoint_every: int | None = _f(
        None, "steps between resumable checkpoints (default: at validations)")
    patience: int = _f(3, "validations without improvement before stopping; 0: never early")
    seed: int = _f(0, "seed of the weights, the shuffling and the negatives")
    threads: int | None = _f(None, "torch CPU threads (default: leave as is)")
    device: str = _f("cpu", "cpu, cuda or cuda:N")
    amp: bool = _f(False, "bfloat16 autocast (GPU; allowed on CPU)")
    mlp_products: str = _f(
        "auto",
        "matrix products of the fused attention / auxiliary MLP (CPU, float32): auto "
        "(bfloat16 where this CPU has a checked bfloat16 kernel measured faster, else "
        "float32), float32, or bfloat16 with float32 accumulation (dinrec.nn.products)",
        choices=("auto", "float32", "bfloat16"),
    )
    compile: bool = _f(False, "torch.compile the model")
    bucket: bool = _f(
        False,
        "batches of rows of similar history length, sorted inside shuffled windows (the "
        "reference's data order: less padding, faster, less accurate); --no-bucket: "
        "shuffled batches padded to their own longest row",
        negatable=True,
    )
    neg_history: int = _f(0, "negative history items per position (DIEN's auxiliary loss)")
    aux_weight: float = _f(1.0, "weight of the model's auxiliary loss")
    log_every: int = _f(50, "steps between log.csv rows")
    progress: bool = _f(True, "no progress bar", flag="--quiet", invert=True)
    stop_after: int | None = _f(None, "stop after this many steps as if interrupted", hidden=True)
    shuffle_buffer: int = _f(200_000, "training rows held in memory for shuffling, per process")
    # Several processes: "shards" = each rank reads its own share of the store (default);
    # "batches" = every rank reads the whole stream and trains on its slice of each global
    # batch: the data order of one process with batch_size x world_size (reads N x the data).
    data_split: str = _f(
        "shards",
        "several processes: each reads its own shards (default), or each reads all and "
        "takes its slice of every global batch (one process's data order)",
        choices=("shards", "batches"),
    )

    @classmethod
    def reference(cls, model: str = "din", **overrides: Any) -> TrainConfig:
        """The DIEN reference configuration of ``model`` (see the module docstring);
        ``overrides`` win, ``model_options`` merged key by key."""
        options = {**REFERENCE_MODEL_OPTIONS.get(model, {}), **overrides.pop("model_options", {})}
        return cls(**{**REFERENCE, **overrides, "model": model, "model_options": options})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = {**RECORDED_BEFORE, **d}
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise RunFolderError(f"config.json: unknown training options {sorted(unknown)}")
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)
