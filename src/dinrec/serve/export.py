"""Export a run's model to ONNX or TorchScript with dynamic batch and sequence axes.

The exported graph is :class:`ScoringModule`: six int64/bool tensors in, one click
probability per row out::

    user (B,) item (B,) cat (B,) hist_items (B, T) hist_cats (B, T) mask (B, T) bool
        -> probability (B,) float32

``B`` and ``T`` are dynamic. ONNX goes through ``torch.onnx.export`` (the
``torch.export``-based exporter by default, ``exporter="legacy"`` for the TorchScript-based
one); TorchScript through ``torch.jit.trace``. The attention's fast path is a custom
``autograd.Function``: both ONNX exporters inline its forward, but ``torch.jit.trace``
records it as an opaque Python call that cannot be saved, so for TorchScript the
attention units of a copy of the model run their line-by-line ``"reference"`` path (the
same function; the two paths agree to float rounding).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dinrec.errors import DinrecError

log = logging.getLogger(__name__)

INPUT_NAMES = ("user", "item", "cat", "hist_items", "hist_cats", "mask")
OUTPUT_NAME = "probability"
FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 18


class ScoringModule(nn.Module):
    """A CTR model as a function of plain tensors: the rows' click probabilities (B,)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, user: Tensor, item: Tensor, cat: Tensor, hist_items: Tensor, hist_cats: Tensor, mask: Tensor
    ) -> Tensor:
        from dinrec.data.batches import Batch

        batch = Batch(
            user=user,  # (B,)
            item=item,  # (B,)
            cat=cat,  # (B,)
            hist_items=hist_items,  # (B, T)
            hist_cats=hist_cats,  # (B, T)
            mask=mask,  # (B, T) bool
            label=torch.zeros(user.shape[0], device=user.device),  # unused
        )
        return torch.sigmoid(self.model(batch).logits.float())  # (B,)


def example_inputs(
    sizes: dict[str, int], b: int = 3, t: int = 7, seed: int = 0, full: bool = False
) -> tuple[Tensor, ...]:
    """Random valid inputs for a model with vocabulary ``sizes`` (keys user, item, cat).

    Histories have random lengths 1..T (all T with ``full``), 0-padded at the end.
    """
    g = torch.Generator().manual_seed(seed)

    def ids(n: int, shape: tuple[int, ...]) -> Tensor:
        return torch.randint(1, max(2, n), shape, generator=g)

    lengths = torch.full((b,), t) if full else torch.randint(1, t + 1, (b,), generator=g)  # (B,)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    hist_items = ids(sizes["item"], (b, t)) * mask  # (B, T)
    hist_cats = ids(sizes["cat"], (b, t)) * mask  # (B, T)
    return (ids(sizes["user"], (b,)), ids(sizes["item"], (b,)), ids(sizes["cat"], (b,)),
            hist_items, hist_cats, mask)


def _model_sizes(model: nn.Module) -> dict[str, int]:
    c = model.config
    return {"user": c.n_users, "item": c.n_items, "cat": c.n_cats}


def _reference_attention(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose attention units use the autograd-free reference path."""
    from dinrec.nn.attention import DinFcnAttention

    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, DinFcnAttention):
            m.impl = "reference"
    return model


def export_onnx(
    model: nn.Module, path: str | Path, opset: int = DEFAULT_OPSET, exporter: str = "dynamo"
) -> Path:
    """Write ``model`` (eval mode) as an ONNX graph with dynamic B and T axes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = ScoringModule(model).eval()
    args = example_inputs(_model_sizes(model), b=3, t=7)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, seq = torch.export.Dim("B"), torch.export.Dim("T")
            shapes = {n: {0: batch} for n in INPUT_NAMES[:3]}
            shapes.update({n: {0: batch, 1: seq} for n in INPUT_NAMES[3:]})
            program = torch.onnx.export(
                module, args, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_shapes=shapes, opset_version=opset, dynamo=True, verbose=False,
            )
            program.save(str(path))
        elif exporter == "legacy":
            axes = {n: {0: "B"} for n in (*INPUT_NAMES[:3], OUTPUT_NAME)}
            axes.update({n: {0: "B", 1: "T"} for n in INPUT_NAMES[3:]})
            torch.onnx.export(
                module, args, str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_axes=axes, opset_version=opset, dynamo=False,
            )
        else:
            raise DinrecError(f"exporter: expected 'dynamo' or 'legacy', got {exporter!r}")
    return path


def export_torchscript(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (eval mode) as a traced TorchScript module with dynamic B and T."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = ScoringModule(_reference_attention(model)).eval()
    args = example_inputs(_model_sizes(model), b=3, t=7)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the shape checks
        traced = torch.jit.trace(module, args, check_trace=False)
    traced.save(str(path))
    return path


def load_exported(path: str | Path, fmt: str):
    """A callable ``f(*inputs as NumPy arrays) -> probabilities (B,)`` for an exported file."""
    path = Path(path)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda *xs: session.run(None, dict(zip(INPUT_NAMES, xs, strict=True)))[0]
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in 2.x
            module = torch.jit.load(str(path))

        def run(*xs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(*(torch.from_numpy(np.asarray(x)) for x in xs)).numpy()

        return run
    raise DinrecError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


def max_difference(
    model: nn.Module, path: str | Path, fmt: str, shapes: tuple[tuple[int, int], ...] = ((1, 1), (5, 20), (64, 100))
) -> float:
    """Largest |exported - PyTorch| probability over random inputs of the given (B, T)."""
    run = load_exported(path, fmt)
    module = ScoringModule(model).eval()
    worst = 0.0
    for i, (b, t) in enumerate(shapes):
        xs = example_inputs(_model_sizes(model), b=b, t=t, seed=100 + i)
        with torch.no_grad():
            want = module(*xs).numpy()  # (B,)
        got = run(*(x.numpy() for x in xs))  # (B,)
        worst = max(worst, float(np.abs(np.asarray(got) - want).max()))
    return worst


@dataclass
class ExportResult:
    path: Path
    format: str
    model: str
    max_abs_diff: float | None  # vs the PyTorch model over a few (B, T), when verified


def export_run(
    run_dir: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    *,
    which: str = "best",
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    verify: bool = True,
) -> ExportResult:
    """Export the ``which`` checkpoint of a run folder; default path ``RUN/export/model.{onnx,pt}``."""
    from dinrec.run import load_run_model

    if fmt not in FORMATS:
        raise DinrecError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    model, config = load_run_model(run_dir, which)
    model.eval()
    path = Path(out) if out is not None else Path(run_dir) / "export" / (
        "model.onnx" if fmt == "onnx" else "model.pt"
    )
    try:
        if fmt == "onnx":
            export_onnx(model, path, opset=opset, exporter=exporter)
        else:
            export_torchscript(model, path)
    except DinrecError:
        raise
    except Exception as exc:  # the exporters raise many types; say which model failed
        raise DinrecError(f"{config['model']['name']}: {fmt} export failed: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    diff = max_difference(model, path, fmt) if verify else None
    log.info("exported %s to %s (max |diff| %s)", config["model"]["name"], path, diff)
    return ExportResult(path, fmt, config["model"]["name"], diff)
