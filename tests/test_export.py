"""Export: ONNX (ONNX Runtime) and TorchScript give the PyTorch scores at several B and T."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dinrec.cli import main
from dinrec.errors import DinrecError
from dinrec.models import build_model
from dinrec.serve.export import (
    INPUT_NAMES,
    ScoringModule,
    example_inputs,
    export_onnx,
    export_run,
    export_torchscript,
    load_exported,
)
from dinrec.serve.ranker import Ranker

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SHAPES = [(1, 1), (2, 5), (7, 31), (64, 100)]  # (B, T), none equal to the export's (3, 7)
SIZES = {"user": 50, "item": 300, "cat": 12}


@pytest.fixture(autouse=True, scope="module")
def _quiet_exporters():
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, n_users=SIZES["user"], n_items=SIZES["item"], n_cats=SIZES["cat"])
    return model.eval()


def _assert_same_scores(model, path, fmt):
    run = load_exported(path, fmt)
    module = ScoringModule(model).eval()
    for i, (b, t) in enumerate(SHAPES):
        xs = example_inputs(SIZES, b=b, t=t, seed=i)
        with torch.no_grad():
            want = module(*xs).numpy()  # (B,)
        got = np.asarray(run(*(x.numpy() for x in xs)))  # (B,)
        assert got.shape == (b,)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"B={b} T={t}")


@pytest.fixture(scope="module")
def din_onnx(tiny_din_run, tmp_path_factory):
    """The tiny run exported with the default (torch.export-based) exporter, verified."""
    result = export_run(tiny_din_run, "onnx", tmp_path_factory.mktemp("onnx") / "din.onnx")
    assert result.model == "din" and result.max_abs_diff < 1e-5
    return result.path


def test_onnx_din_run_matches_pytorch(din_onnx, tiny_din_run):
    import onnx

    proto = onnx.load(str(din_onnx))
    assert [i.name for i in proto.graph.input] == list(INPUT_NAMES)
    assert proto.opset_import[0].version == 18
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert all(isinstance(d, str) for dd in dims.values() for d in dd)  # every axis dynamic
    model = Ranker(tiny_din_run).model
    run = load_exported(din_onnx, "onnx")
    sizes = {k: n for k, n in zip(("user", "item", "cat"),
                                  (model.config.n_users, model.config.n_items, model.config.n_cats), strict=True)}
    for i, (b, t) in enumerate(SHAPES):
        xs = example_inputs(sizes, b=b, t=t, seed=10 + i)
        with torch.no_grad():
            want = ScoringModule(model)(*xs).numpy()
        np.testing.assert_allclose(run(*(x.numpy() for x in xs)), want, atol=1e-5, rtol=0)


def test_onnx_base_model(tmp_path):
    model = _model("base")
    _assert_same_scores(model, export_onnx(model, tmp_path / "base.onnx"), "onnx")


@pytest.mark.parametrize("name", ["din", "base"])
def test_onnx_legacy_exporter(name, tmp_path):
    model = _model(name)
    _assert_same_scores(model, export_onnx(model, tmp_path / "m.onnx", exporter="legacy"), "onnx")


@pytest.mark.parametrize("name", ["din", "base"])
def test_torchscript(name, tmp_path):
    model = _model(name)
    _assert_same_scores(model, export_torchscript(model, tmp_path / "m.pt"), "torchscript")
    # The model given is untouched (export works on a copy with the reference attention path).
    assert all(getattr(m, "impl", "fast") == "fast" for m in model.modules() if hasattr(m, "impl"))


def test_ranker_on_onnx_equals_pytorch(din_onnx, tiny_din_run):
    torch_ranker, onnx_ranker = Ranker(tiny_din_run), Ranker(tiny_din_run, onnx=din_onnx)
    items = torch_ranker.index["item"].tokens[2:60]
    a = torch_ranker.rank("u?", items[:20], items[20:], k=10, explain=2)
    b = onnx_ranker.rank("u?", items[:20], items[20:], k=10, explain=2)
    assert [s.item for s in a.ranked] == [s.item for s in b.ranked] and a.unknown == b.unknown
    np.testing.assert_allclose([s.score for s in a.ranked], [s.score for s in b.ranked], atol=1e-5)
    assert all(s.explanation == [] for s in b.ranked) and not onnx_ranker.has_attention
    rows = [("u", items[:3], items[9]), ("v", [], items[10])]
    np.testing.assert_allclose(torch_ranker.score(rows).probabilities,
                               onnx_ranker.score(rows).probabilities, atol=1e-5)


def test_cli_export(tiny_din_run, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["export", str(tiny_din_run), "--format", "torchscript", "--out", str(out)]) == 0
    assert out.is_file() and "max |exported - PyTorch|" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx"]) == 2
    with pytest.raises(DinrecError, match="format"):
        export_run(tiny_din_run, "tflite")
    with pytest.raises(DinrecError, match="does not exist"):
        Ranker(tiny_din_run, onnx=tmp_path / "missing.onnx")
