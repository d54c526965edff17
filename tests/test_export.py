"""Export: every registered model over a rich schema, ONNX (ONNX Runtime) and TorchScript, give
the PyTorch scores at several B and T (1e-5); the inputs follow the schema; the Ranker on ONNX."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dinrec.cli import main
from dinrec.errors import DinrecError
from dinrec.models import MODELS, create_model
from dinrec.serve.export import (
    ScoringModule,
    example_inputs,
    export_model,
    flatten,
    input_names,
    load_exported,
    unflatten,
)
from serve_inputs import RICH, RICH_SIZES

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SHAPES = [(1, 1), (2, 5), (7, 31), (33, 60)]  # (B, T), none equal to the export's (3, 7)


@pytest.fixture(autouse=True, scope="module")
def _quiet_exporters():
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, RICH, RICH_SIZES).eval()


def _assert_same_scores(model, path, fmt):
    run = load_exported(path, fmt, input_names(RICH))
    module = ScoringModule(model, RICH).eval()
    for i, (b, t) in enumerate(SHAPES):
        xs = example_inputs(RICH, RICH_SIZES, b=b, t=t, seed=i)
        with torch.no_grad():
            want = module(*xs).numpy()  # (B,)
        got = np.asarray(run(*(x.numpy() for x in xs)))  # (B,)
        assert got.shape == (b,)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"B={b} T={t}")


def test_inputs_follow_the_schema():
    names = input_names(RICH)
    assert names[:4] == ["user.user", "user.gender", "user.age", "context.hour"]
    assert {"item.genres", "hist.mask", "hist.item.price", "hist.event.time_gap", "liked.event.behaviour",
            "liked.item.genres"} <= set(names)
    xs = example_inputs(RICH, RICH_SIZES, b=4, t=6)
    shapes = dict(zip(names, (tuple(x.shape) for x in xs), strict=True))
    assert shapes["item.genres"] == (4, 3) and shapes["hist.item.genres"] == (4, 6, 3)
    assert xs[names.index("hist.mask")].dtype == torch.bool
    assert xs[names.index("user.age")].dtype == torch.float32
    batch = unflatten(xs, RICH)
    assert all(a is b for a, b in zip(flatten(batch, RICH), xs, strict=True))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_exports_with_pytorch_scores(name, fmt, tmp_path):
    model = _model(name)
    result = export_model(model, fmt, tmp_path / f"m.{fmt}", name)
    assert result.max_abs_diff < 1e-5
    _assert_same_scores(model, result.path, fmt)
    if fmt == "onnx":
        import onnx

        proto = onnx.load(str(result.path))
        assert [i.name for i in proto.graph.input] == input_names(RICH)
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                for i in proto.graph.input}
        assert isinstance(dims["hist.mask"][0], str) and isinstance(dims["hist.mask"][1], str)
        assert dims["item.genres"][1] == 3  # M is fixed
    # the model given is untouched (export works on a copy)
    assert all(getattr(m, "impl", "fast") != "reference" for m in model.modules())


def test_sequences_of_different_lengths_and_dien_on_the_legacy_path(tmp_path):
    """Two sequences with different T in one call; the DIEN loop is data-length independent."""
    model = _model("dien")
    path = export_model(model, "onnx", tmp_path / "d.onnx", "dien", verify=False).path
    run = load_exported(path, "onnx", input_names(RICH))
    a = example_inputs(RICH, RICH_SIZES, b=6, t=40, seed=5)
    b = example_inputs(RICH, RICH_SIZES, b=6, t=3, seed=6)
    names = input_names(RICH)
    xs = [x if not n.startswith("liked.") else y for n, x, y in zip(names, a, b, strict=True)]
    with torch.no_grad():
        want = ScoringModule(model, RICH)(*xs).numpy()
    np.testing.assert_allclose(run(*(x.numpy() for x in xs)), want, atol=1e-5)


def test_export_errors(tmp_path):
    model = _model("din")
    with pytest.raises(DinrecError, match="format"):
        export_model(model, "tflite", tmp_path / "m")
    with pytest.raises(DinrecError, match="exporter"):
        export_model(model, "onnx", tmp_path / "m.onnx", exporter="tf2onnx")
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx"]) == 2


@pytest.fixture(scope="module")
def rich_store_path(tmp_path_factory):
    from serve_inputs import rich_store

    return rich_store(tmp_path_factory.mktemp("rich") / "store")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ranker_on_onnx_runs_every_family(name, rich_store_path, tmp_path):
    """What `dinrec serve --onnx` runs: the Ranker on ONNX Runtime gives the PyTorch ranking."""
    from serve_inputs import rich_ranker

    torch_ranker = rich_ranker(rich_store_path, name)
    path = export_model(torch_ranker.model, "onnx", tmp_path / "m.onnx", name, exporter="legacy",
                        verify=False).path
    onnx_ranker = rich_ranker(rich_store_path, name, onnx=path)
    assert onnx_ranker.backend.name == "onnx" and not onnx_ranker.has_attention
    seqs = {"hist": ["i1", {"item": "i4", "rating": 2.0, "time_gap": 90.0}, "i6"], "liked": ["i2"]}
    cands = [f"i{i}" for i in range(10, 40)] + [{"item": "new", "cat": "c1", "price": 3.5}]
    a = torch_ranker.recommend("u1", cands, seqs, {"hour": "3"}, k=10, explain=2)
    b = onnx_ranker.recommend("u1", cands, seqs, {"hour": "3"}, k=10, explain=2)
    np.testing.assert_allclose([s.score for s in b.ranked], [s.score for s in a.ranked], atol=1e-5)
    assert [s.item for s in a.ranked][:3] == [s.item for s in b.ranked][:3] and a.unknown == b.unknown
    assert all(s.explanation == [] for s in b.ranked)
    rows = [{"user": "u2", "sequences": seqs, "item": c} for c in cands[:5]]
    np.testing.assert_allclose(onnx_ranker.score(rows).probabilities, torch_ranker.score(rows).probabilities,
                               atol=1e-5)
