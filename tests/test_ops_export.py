"""Export of the nn building blocks DIEN is made of (attention, masked GRU, AUGRU / AGRU /
AIGRU): ``torch.export`` with the fast operators inside, and the ONNX (dynamo) and
TorchScript exporters through ``dinrec.nn.backend("reference")``, each within 1e-5 of eager."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from dinrec.nn import _ops, backend
from dinrec.nn.attention import DinFcnAttention
from dinrec.nn.rnn import AGRU, AIGRU, AUGRU, InterestExtractor

B, T, E, H = 5, 8, 6, 36
TOL = dict(rtol=1e-5, atol=1e-5)


class Evolution(nn.Module):
    """DIEN's interest path at the nn level: extractor -> attention (per step) -> attention GRU."""

    def __init__(self, gru: nn.Module) -> None:
        super().__init__()
        self.extractor = InterestExtractor(E, H)
        self.attention = DinFcnAttention(E, H, 16, mode="LIST", return_alphas=True)
        self.gru = gru

    def forward(self, target: Tensor, behaviours: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        states, _ = self.extractor(behaviours, mask)  # (B, T, H)
        _, scores = self.attention(target, states, mask)  # (B, T)
        outputs, final = self.gru(states, scores, mask)  # (B, T, H), (B, H)
        return outputs, final


class Pooling(nn.Module):
    """DIN's attention pooling (SUM mode) of a behaviour sequence by a target."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = DinFcnAttention(E, E, 16)

    def forward(self, target: Tensor, behaviours: Tensor, mask: Tensor) -> Tensor:
        return self.attention(target, behaviours, mask)  # (B, 1, E)


UNITS = {
    "augru": lambda: Evolution(AUGRU(H, H)),
    "augru_paper": lambda: Evolution(AUGRU(H, H, gate="paper")),
    "agru": lambda: Evolution(AGRU(H, H)),
    "aigru": lambda: Evolution(AIGRU(H, H)),
    "din_pooling": Pooling,
}


def _inputs(seed: int = 0, b: int = B) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (b,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None] < lengths[:, None]  # (B, T) bool
    return torch.randn(b, E, generator=g), torch.randn(b, T, E, generator=g), mask


def _unit(name: str) -> nn.Module:
    torch.manual_seed(0)
    return UNITS[name]().eval()


def _close(got, want) -> None:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.as_tensor(g), w, **TOL)


@pytest.mark.parametrize("name", list(UNITS))
def test_torch_export_with_the_fast_operators(name):
    unit = _unit(name)
    args = _inputs()
    with torch.no_grad():
        want = unit(*args)
        program = torch.export.export(unit, args)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    if name != "din_pooling" and _ops.use("gru_scan"):
        assert any("dinrec.gru_scan" in o for o in ops), ops  # the operator, traced as one node
    with torch.no_grad():
        _close(program.module()(*args), want)
        _close(program.module()(*_inputs(seed=1)), unit(*_inputs(seed=1)))  # other masks, same shapes


@pytest.mark.parametrize("name", ["augru", "agru", "aigru", "din_pooling"])
def test_torchscript_trace_through_the_reference(name):
    unit = _unit(name)
    args = _inputs()
    with torch.no_grad(), backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the shape checks
        traced = torch.jit.trace(unit, args)
    with torch.no_grad():
        for seed, b in ((0, B), (2, B), (3, 3)):  # other data and another batch size
            x = _inputs(seed=seed, b=b)
            _close(traced(*x), unit(*x))  # the fast eager path as the yardstick


onnxruntime = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("name", ["augru", "din_pooling"])
def test_onnx_dynamo_export_through_the_reference(tmp_path, name):
    unit = _unit(name)
    args = _inputs()
    path = tmp_path / f"{name}.onnx"
    with torch.no_grad(), backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(unit, args, str(path), dynamo=True, input_names=["target", "behaviours", "mask"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for seed in (0, 4):
            x = _inputs(seed=seed)
            feed = dict(zip(["target", "behaviours", "mask"], (v.numpy() for v in x), strict=True))
            _close(session.run(None, feed), unit(*x))
