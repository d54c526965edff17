"""torch.compile trains DIN and DIEN like eager (fast operators inside), and torch.export
traces both. The models come from one helper, `_model_and_batches`, so that a change in
how models are built touches one place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinrec.data.batches import Batch
from dinrec.data.schema import Schema
from dinrec.models import create_model
from model_inputs import DEFAULT_SIZES, random_batch

pytestmark = pytest.mark.slow  # inductor compiles for a minute or two on a small CPU

SIZES = DEFAULT_SIZES


def _model_and_batches(name: str, steps: int = 3, b: int = 16, t: int = 9) -> tuple[torch.nn.Module, list]:
    """A float64 model in train mode and ``steps`` batches (the one place models are built)."""
    torch.manual_seed(0)
    model = create_model(name, Schema.default(), SIZES).double().train()
    batches = [random_batch(Schema.default(t), SIZES, b=b, seed=seed) for seed in range(steps)]
    for batch in batches:
        batch.label = batch.label.double()
    return model, batches


def _train(model: torch.nn.Module, batches: list, compiled: bool) -> list[torch.Tensor]:
    run = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for batch in batches:
        out = run(batch)
        loss = F.binary_cross_entropy_with_logits(out.logits, batch.label)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return [*losses, *(p.detach().clone() for p in model.parameters())]


@pytest.mark.parametrize("name", ["din", "dien"])
def test_compiled_training_matches_eager(name):
    torch._dynamo.reset()
    model, batches = _model_and_batches(name)
    eager = _train(model, batches, compiled=False)
    model, batches = _model_and_batches(name)
    compiled = _train(model, batches, compiled=True)
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["din", "dien"])
def test_torch_export_traces_the_model(name):
    model, batches = _model_and_batches(name)
    model.eval()

    class Logits(torch.nn.Module):  # tensors in, tensors out
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, user, item, cat, hist_items, hist_cats, mask):
            batch = Batch.from_ids(user, item, cat, hist_items, hist_cats, mask=mask)
            return self.model(batch).logits

    def flat(b: Batch) -> tuple[torch.Tensor, ...]:
        h = b.sequences["hist"]
        return (b.user["user"], b.item["item"], b.item["cat"], h.items["item"], h.items["cat"], h.mask)

    with torch.no_grad():
        program = torch.export.export(Logits(), flat(batches[0]))
        for other in batches[1:]:
            torch.testing.assert_close(program.module()(*flat(other)), Logits()(*flat(other)))


@pytest.mark.parametrize(("name", "breaks"), [("din", 0), ("dien", 6)])
def test_graph_breaks_do_not_grow(name, breaks):
    """Dynamo's graph breaks, counted: DIN has none; DIEN's six come from the interest
    extractor's ``nn.GRU`` module (Dynamo does not wrap RNN modules) and the auxiliary
    loss's ``nonzero`` (a data-dependent shape), each in the forward and its resume. A
    new break (e.g. a ``torch.get_num_threads()`` call reached by the tracer) fails here."""
    model, batches = _model_and_batches(name)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(batches[0])
    reasons = [str(r.reason).strip().splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == breaks, reasons
