"""Export a run's model to ONNX or TorchScript, inputs derived from its schema.

The exported graph is :class:`ScoringModule`: one tensor per feature of the schema (the
names of :func:`input_names`), one click probability per row out::

    user.<f>           (B,) int64 | (B, M) int64 | (B,) float32      per user feature
    context.<f>        the same, per context feature
    item.<f>           the same, per item feature of the candidate
    <seq>.mask         (B, T_seq) bool, True on valid events (left-aligned, oldest first)
    <seq>.item.<f>     (B, T_seq) | (B, T_seq, M) | (B, T_seq) float32, per item feature
    <seq>.event.<f>    (B, T_seq) | (B, T_seq) float32, per per-event feature
        -> probability (B,) float32

``B`` and each sequence's ``T_seq`` are dynamic (``M``, a multi feature's ``max_values``,
is fixed). Values are the encoded ones (ids, normalised numbers) that
:class:`dinrec.serve.features.RequestEncoder` builds; :func:`flatten` turns a
:class:`~dinrec.data.batch.Batch` into this tuple.

Export runs on a copy of the model whose parts have export-friendly forms (same math,
tested at 1e-5): the attention units run their line-by-line ``"reference"`` path (the
fast path is an ``autograd.Function`` that ``torch.jit.trace`` cannot save), and DIEN's
GRUs (interest extractor, AUGRU / AGRU / AIGRU) run :func:`gru_loop`, a TorchScript loop
over the steps, instead of the C / fused kernels (opaque calls with a data-dependent
length). The loop keeps T dynamic in TorchScript and becomes an ONNX ``Loop`` with the
TorchScript-based ONNX exporter, which is therefore the one used for the DIEN family
(``exporter="auto"``); models without recurrences use the ``torch.export``-based one.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinrec.data.batch import Batch, SequenceBatch
from dinrec.data.schema import Feature, Schema
from dinrec.errors import DinrecError

if TYPE_CHECKING:
    from dinrec.models.base import CTRModel
    from dinrec.nn.rnn import AttentionGRU, InterestExtractor

log = logging.getLogger(__name__)

OUTPUT_NAME = "probability"
FORMATS = ("onnx", "torchscript")
EXPORTERS = ("auto", "dynamo", "legacy")
DEFAULT_OPSET = 18


# --------------------------------------------------------------------------- inputs
def _layout(schema: Schema) -> list[tuple[str, str, str | None, Feature | None]]:
    """(input name, role, sequence, feature) in input order; the mask has no feature."""
    out: list[tuple[str, str, str | None, Feature | None]] = []
    for role in ("user", "context", "item"):
        out += [(f"{role}.{f.name}", role, None, f) for f in getattr(schema, role)]
    for s in schema.sequences:
        out.append((f"{s.name}.mask", "mask", s.name, None))
        out += [(f"{s.name}.item.{f.name}", "seq_item", s.name, f) for f in schema.item]
        out += [(f"{s.name}.event.{f.name}", "seq_event", s.name, f) for f in s.event_features]
    return out


def input_names(schema: Schema) -> list[str]:
    return [name for name, *_ in _layout(schema)]


def flatten(batch: Batch, schema: Schema) -> list[Tensor]:
    """A batch as the exported graph's inputs, in :func:`input_names` order."""
    out = []
    for _, role, seq, f in _layout(schema):
        if role in ("user", "context", "item"):
            assert f is not None  # a profile or candidate input is a feature's
            out.append(getattr(batch, role)[f.name])
            continue
        assert seq is not None  # the rest belong to a sequence
        if role == "mask":
            out.append(batch.sequences[seq].mask)
        else:
            assert f is not None
            s = batch.sequences[seq]
            out.append((s.items if role == "seq_item" else s.events)[f.name])
    return out


def unflatten(inputs: tuple[Tensor, ...] | list[Tensor], schema: Schema) -> Batch:
    """The inverse of :func:`flatten`."""
    parts: dict[str, dict[str, Tensor]] = {"user": {}, "context": {}, "item": {}}
    seqs: dict[str, SequenceBatch] = {}
    for (_, role, seq, f), x in zip(_layout(schema), inputs, strict=True):
        if role in parts:
            assert f is not None  # a profile or candidate input is a feature's
            parts[role][f.name] = x
            continue
        assert seq is not None  # the rest belong to a sequence
        if role == "mask":
            seqs[seq] = SequenceBatch(items={}, mask=x, events={})
        else:
            assert f is not None
            (seqs[seq].items if role == "seq_item" else seqs[seq].events)[f.name] = x
    b = inputs[0].shape[0]
    return Batch(label=torch.zeros(b), user=parts["user"], item=parts["item"], sequences=seqs,
                 context=parts["context"])


class ScoringModule(nn.Module):
    """A CTR model as a function of plain tensors (:func:`input_names`): probabilities (B,)."""

    def __init__(self, model: nn.Module, schema: Schema) -> None:
        super().__init__()
        self.model = model
        self.schema = schema

    def forward(self, *inputs: Tensor) -> Tensor:
        return torch.sigmoid(self.model(unflatten(inputs, self.schema)).logits.float())  # (B,)


def _values(f: Feature, shape: tuple[int, ...], sizes: dict[str, int], g: torch.Generator) -> Tensor:
    if f.is_numeric:
        return torch.randn(shape, generator=g)
    n = sizes[f.table_name]
    if f.kind == "multi":
        ids = torch.randint(1, max(2, n), (*shape, f.max_values), generator=g)
        keep = torch.rand((*shape, f.max_values), generator=g) < 0.6
        keep[..., 0] = True
        return ids * keep  # (..., M), some padding
    return torch.randint(1, max(2, n), shape, generator=g)


def example_inputs(schema: Schema, sizes: dict[str, int], b: int = 3, t: int = 7, seed: int = 0,
                   full: bool = False) -> tuple[Tensor, ...]:
    """Random valid inputs: ids in each table, numbers ~N(0, 1), histories of random
    lengths 1..T (all T with ``full``) per sequence, zero past their length."""
    g = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    mask: Tensor | None = None
    for _, role, _seq, f in _layout(schema):
        if role == "mask":
            lengths = torch.full((b,), t) if full else torch.randint(1, t + 1, (b,), generator=g)
            mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
            out.append(mask)
            continue
        assert f is not None  # every input but a mask is a feature's
        if role in ("user", "context", "item"):
            out.append(_values(f, (b,), sizes, g))
        else:
            assert mask is not None  # a sequence's mask comes before its features
            v = _values(f, (b, t), sizes, g)
            m = mask if v.dim() == 2 else mask.unsqueeze(-1)
            out.append(v * m.to(v.dtype) if v.is_floating_point() else v * m)
    return tuple(out)


# --------------------------------------------------------------------------- export forms
@torch.jit.script
def gru_loop(xi: Tensor, h: Tensor, scores: Tensor, lengths: Tensor, w_hh: Tensor, b_hh: Tensor,
             kind: str, gate: str, reset_after: bool) -> tuple[Tensor, Tensor]:
    """The GRU / attention-GRU recurrence step by step (``dinrec.nn.rnn._cell``): xi (B, T, 3H)
    = W_ih x + b_ih, h (B, H), scores (B, T) (unused for ``gru``), lengths (B,) ->
    outputs (B, T, H) (zero at padding), final (B, H). Padding never updates the state."""
    hid = h.size(1)
    outs: list[Tensor] = []
    for step in range(xi.size(1)):
        x_r, x_z, x_n = xi[:, step].split(hid, 1)
        if reset_after:
            h_r, h_z, h_n = F.linear(h, w_hh, b_hh).split(hid, 1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            cand = torch.tanh(x_n + r * h_n)
        else:
            hh = F.linear(h, w_hh[: 2 * hid], b_hh[: 2 * hid])
            r = torch.sigmoid(x_r + hh[:, :hid])
            z = torch.sigmoid(x_z + hh[:, hid:])
            cand = torch.tanh(x_n + F.linear(r * h, w_hh[2 * hid:], b_hh[2 * hid:]))
        a = scores[:, step: step + 1]  # (B, 1)
        if kind == "gru" or kind == "aigru":
            h_new = z * h + (1.0 - z) * cand
        elif kind == "agru":
            h_new = (1.0 - a) * h + a * cand
        elif gate == "reference":
            u = (1.0 - a) * z
            h_new = u * h + (1.0 - u) * cand
        else:
            u = a * (1.0 - z)
            h_new = (1.0 - u) * h + u * cand
        valid = (lengths > step).unsqueeze(1)  # (B, 1)
        h = torch.where(valid, h_new, h)
        outs.append(torch.where(valid, h, torch.zeros_like(h)))
    return torch.stack(outs, 1), h


class _ExportGRU(nn.Module):
    """An :class:`~dinrec.nn.rnn.InterestExtractor` or :class:`~dinrec.nn.rnn.AttentionGRU`
    running :func:`gru_loop` (same weights, same outputs)."""

    def __init__(self, module: InterestExtractor | AttentionGRU, kind: str, gate: str, reset_after: bool,
                 scored: bool) -> None:
        super().__init__()
        self.inner = module  # its parameters, registered here
        self.kind, self.gate, self.reset_after = kind, gate, reset_after
        self.scored = scored  # forward(inputs, scores, mask[, h0]) (else (inputs, mask[, h0]))

    def forward(self, inputs: Tensor, *rest: Any) -> tuple[Tensor, Tensor]:
        w = self.inner.weights()
        scores, mask = (rest[0], rest[1]) if self.scored else (None, rest[0])
        h0 = rest[-1] if len(rest) == (3 if self.scored else 2) else None
        pad = ~mask.bool()  # (B, T) left-aligned
        lengths = mask.bool().sum(1)  # (B,)
        x = inputs.masked_fill(pad.unsqueeze(-1), 0.0)  # (B, T, E)
        a = torch.zeros_like(mask, dtype=inputs.dtype) if scores is None else scores.masked_fill(pad, 0.0)
        if self.kind == "aigru":
            x = x * a.unsqueeze(-1)
        xi = F.linear(x, w.weight_ih, w.bias_ih)  # (B, T, 3H)
        h = inputs.new_zeros(inputs.shape[0], w.weight_hh.shape[1]) if h0 is None else h0
        return gru_loop(xi, h, a, lengths, w.weight_hh, w.bias_hh, self.kind, self.gate,
                        self.reset_after)


def exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in export-friendly form (see the module docstring)."""
    from dinrec.nn.attention import DinFcnAttention
    from dinrec.nn.rnn import AttentionGRU, InterestExtractor

    model = copy.deepcopy(model).eval()
    for name, m in list(model.named_modules()):
        if isinstance(m, DinFcnAttention):
            m.impl = "reference"
        new = None
        if isinstance(m, InterestExtractor):
            new = _ExportGRU(m, "gru", "reference", True, scored=False)
        elif isinstance(m, AttentionGRU):
            c = m.config
            new = _ExportGRU(m, c.kind, c.gate, c.reset_after, scored=True)
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def _recurrent(model: nn.Module) -> bool:
    return any(isinstance(m, _ExportGRU) for m in model.modules())


# --------------------------------------------------------------------------- export
def export_onnx(model: CTRModel, path: str | Path, opset: int = DEFAULT_OPSET, exporter: str = "auto") -> Path:
    """Write ``model`` as an ONNX graph with dynamic B and T axes (``exporter``: ``auto`` =
    ``legacy`` for recurrent models, else ``dynamo``)."""
    if exporter not in EXPORTERS:
        raise DinrecError(f"exporter: expected one of {', '.join(EXPORTERS)}, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = model.schema
    ready = exportable(model)
    if exporter == "auto":
        exporter = "legacy" if _recurrent(ready) else "dynamo"
    module = ScoringModule(ready, schema).eval()
    args = example_inputs(schema, model.table_sizes, b=3, t=7)
    names = input_names(schema)
    layout = _layout(schema)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("B")
            seq_dims = {s.name: torch.export.Dim(f"T_{s.name}") for s in schema.sequences}
            shapes = tuple({0: batch} if seq is None else {0: batch, 1: seq_dims[seq]}
                           for _, _, seq, _ in layout)
            program = torch.onnx.export(
                module, args, input_names=names, output_names=[OUTPUT_NAME],
                dynamic_shapes=(shapes,), opset_version=opset, dynamo=True, verbose=False,
            )
            assert program is not None  # dynamo=True returns the program
            program.save(str(path))
        else:
            axes = {n: ({0: "B"} if seq is None else {0: "B", 1: f"T_{seq}"})
                    for n, (_, _, seq, _) in zip(names, layout, strict=True)}
            axes[OUTPUT_NAME] = {0: "B"}
            torch.onnx.export(module, args, str(path), input_names=names, output_names=[OUTPUT_NAME],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
    return path


def export_torchscript(model: CTRModel, path: str | Path) -> Path:
    """Write ``model`` as a traced TorchScript module with dynamic B and T."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = ScoringModule(exportable(model), model.schema).eval()
    args = example_inputs(model.schema, model.table_sizes, b=3, t=7)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the shape checks
        traced = torch.jit.trace(module, args, check_trace=False)
    traced.save(str(path))
    return path


def load_exported(path: str | Path, fmt: str, names: list[str] | None = None):
    """A callable ``f(*inputs as NumPy arrays) -> probabilities (B,)`` for an exported file."""
    path = Path(path)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = names or [i.name for i in session.get_inputs()]
        return lambda *xs: session.run(None, dict(zip(names, xs, strict=True)))[0]
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in 2.x
            module = torch.jit.load(str(path))

        def run(*xs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(*(torch.from_numpy(np.asarray(x)) for x in xs)).numpy()

        return run
    raise DinrecError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


#: (B, T) of the verification inputs, none equal to the export's example (3, 7).
VERIFY_SHAPES = ((1, 1), (5, 20), (64, 100))


def max_difference(model: CTRModel, path: str | Path, fmt: str,
                   shapes: tuple[tuple[int, int], ...] = VERIFY_SHAPES) -> float:
    """Largest |exported - PyTorch| probability over random inputs of the given (B, T)."""
    run = load_exported(path, fmt, input_names(model.schema))
    module = ScoringModule(model, model.schema).eval()
    worst = 0.0
    for i, (b, t) in enumerate(shapes):
        xs = example_inputs(model.schema, model.table_sizes, b=b, t=t, seed=100 + i)
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


def export_model(model: CTRModel, fmt: str, path: str | Path, name: str = "", *, opset: int = DEFAULT_OPSET,
                 exporter: str = "auto", verify: bool = True) -> ExportResult:
    """Export a model (eval mode) to ``path`` and compare it with PyTorch."""
    if fmt not in FORMATS:
        raise DinrecError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    model.eval()
    name = name or getattr(model, "name", "") or type(model).__name__
    try:
        if fmt == "onnx":
            export_onnx(model, path, opset=opset, exporter=exporter)
        else:
            export_torchscript(model, path)
    except DinrecError:
        raise
    except Exception as exc:  # the exporters raise many types; say which model failed
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DinrecError(f"{name}: {fmt} export failed: {type(exc).__name__}: {first}") from exc
    diff = max_difference(model, path, fmt) if verify else None
    log.info("exported %s to %s (max |diff| %s)", name, path, diff)
    return ExportResult(Path(path), fmt, name, diff)


def export_run(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None, *,
               which: str = "best", opset: int = DEFAULT_OPSET, exporter: str = "auto",
               verify: bool = True) -> ExportResult:
    """Export the ``which`` checkpoint of a run folder; default path ``RUN/export/model.{onnx,pt}``."""
    from dinrec.run import load_run_model

    if fmt not in FORMATS:
        raise DinrecError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    model, config = load_run_model(run_dir, which)
    path = Path(out) if out is not None else Path(run_dir) / "export" / (
        "model.onnx" if fmt == "onnx" else "model.pt")
    return export_model(model, fmt, path, config["model"]["name"], opset=opset, exporter=exporter,
                        verify=verify)
