"""DIEN's training step on padded batches: the packed GRU scans and the auxiliary loss over
the valid pairs only (negatives looked up there alone) equal the reference paths."""

from __future__ import annotations

import types

import pytest
import torch

from dinrec.data.schema import Schema
from dinrec.models import create_model
from dinrec.nn import _ops, backend
from dinrec.nn.auxiliary import auxiliary_loss
from model_inputs import DEFAULT_SIZES, RICH, RICH_SIZES, random_batch

SCHEMAS = {"default": (Schema.default(max_len=9), DEFAULT_SIZES), "rich": (RICH, RICH_SIZES)}


def _literal_auxiliary(self, batch, states, main):
    """The auxiliary loss as before: every position's negatives embedded, the whole batch
    handed to :func:`auxiliary_loss`."""
    negatives = self.embedding.negatives(self.main, batch.sequences[self.main])  # (B, T, K, D)
    clicked = main.history[..., : self.behaviour_dim]
    return auxiliary_loss(self.aux_net, states, clicked, negatives, main.mask)


def _step(model, batch):
    model.zero_grad()
    out = model(batch)
    (out.logits.sin().sum() + out.aux_loss).backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    return [out.logits, out.aux_loss, *grads]


@pytest.mark.parametrize("schema,k,empty", [("default", 1, False), ("default", 2, True), ("rich", 2, True)])
def test_dien_step_equals_the_reference_paths(monkeypatch, schema, k, empty):
    s, sizes = SCHEMAS[schema]
    torch.manual_seed(0)
    model = create_model("dien", s, sizes).double().train()
    batch = random_batch(s, sizes, b=24, k=k, empty_rows=empty)
    batch = batch.apply(lambda t: t.double() if t.is_floating_point() else t)
    packed = []
    real = _ops.gru_scan_packed
    monkeypatch.setattr(_ops, "gru_scan_packed", lambda *a: packed.append(1) or real(*a))
    fast = _step(model, batch)
    if _ops.use("gru_scan"):
        assert len(packed) == 2  # the extractor and the AUGRU ran packed
    model._auxiliary = types.MethodType(_literal_auxiliary, model)
    with backend("reference"):
        ref = _step(model, batch)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
