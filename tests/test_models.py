"""The CTR models: shapes, registry, padding invariance, candidate scoring, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinrec.data.batches import Batch
from dinrec.errors import DinrecError
from dinrec.models import MODELS, build_model
from dinrec.models.din import DIN

SIZES = dict(n_users=30, n_items=50, n_cats=8)


def _batch(b=16, t=9, seed=0, k=1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
    hist_items = torch.randint(2, SIZES["n_items"], (b, t), generator=g) * mask
    hist_cats = torch.randint(2, SIZES["n_cats"], (b, t), generator=g) * mask
    return Batch(
        user=torch.randint(2, SIZES["n_users"], (b,), generator=g),
        item=torch.randint(2, SIZES["n_items"], (b,), generator=g),
        cat=torch.randint(2, SIZES["n_cats"], (b,), generator=g),
        hist_items=hist_items,
        hist_cats=hist_cats,
        mask=mask,
        label=torch.randint(0, 2, (b,), generator=g).float(),
        neg_items=torch.randint(2, SIZES["n_items"], (b, t, k), generator=g) * mask[..., None],
        neg_cats=torch.randint(2, SIZES["n_cats"], (b, t, k), generator=g) * mask[..., None],
    )


ALL = ["base", "wide_deep", "pnn", "din", "dien", "gru_att", "aigru", "agru", "augru"]


@pytest.mark.parametrize("name", ALL)
def test_forward_shapes_and_padding_invariance(name):
    torch.manual_seed(0)
    model = build_model(name, **SIZES).eval()
    batch = _batch()
    out = model(batch)
    assert out.logits.shape == (16,)
    assert torch.isfinite(out.logits).all()
    # Garbage ids at padded positions change nothing.
    noisy = _batch()
    noisy.hist_items = torch.where(batch.mask, batch.hist_items, torch.randint(2, 50, batch.mask.shape))
    noisy.hist_cats = torch.where(batch.mask, batch.hist_cats, torch.randint(2, 8, batch.mask.shape))
    torch.testing.assert_close(model(noisy).logits, out.logits)


def test_din_alphas_and_attention_variants():
    torch.manual_seed(0)
    batch = _batch()
    for attention in ("fcn", "din"):
        model = build_model("din", attention=attention, **SIZES).eval()
        out = model(batch, return_alphas=True)
        assert out.alphas.shape == batch.mask.shape
        torch.testing.assert_close(out.alphas.sum(1), torch.ones(16))
        assert (out.alphas[~batch.mask] == 0).all()
    assert build_model("din", attention="din", **SIZES).attention.query_proj is None
    with pytest.raises(DinrecError, match="attention"):
        build_model("din", attention="bogus", **SIZES)


@pytest.mark.parametrize("name", ["din", "base", "pnn", "dien"])
def test_score_candidates_equals_repeated_rows(name):
    torch.manual_seed(1)
    model = build_model(name, **SIZES).eval()
    t, n = 7, 11
    hist_items = torch.tensor([5, 9, 9, 13, 2, 0, 0])
    hist_cats = torch.tensor([3, 4, 4, 5, 2, 0, 0])
    items = torch.randint(2, 50, (n,))
    cats = torch.randint(2, 8, (n,))
    user = torch.tensor(4)
    out = model.score_candidates(user, hist_items, hist_cats, items, cats, return_alphas=True)
    rows = Batch(
        user=user.repeat(n), item=items, cat=cats,
        hist_items=hist_items.repeat(n, 1), hist_cats=hist_cats.repeat(n, 1),
        mask=(hist_items != 0).repeat(n, 1), label=torch.zeros(n),
    )
    want = model(rows, return_alphas=True)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-6)
    if name in ("din", "dien"):
        assert out.alphas.shape == (n, t)
        torch.testing.assert_close(out.alphas, want.alphas, rtol=1e-5, atol=1e-6)


def test_registry():
    assert {"base", "wide_deep", "pnn", "din"} <= set(MODELS)
    with pytest.raises(DinrecError, match="unknown model 'nope'"):
        build_model("nope", **SIZES)
    model = build_model("din", embedding_dim=4, hidden=[8, 4], activation="dice", **SIZES)
    assert isinstance(model, DIN)
    again = type(model)(type(model.config).from_dict(model.config.to_dict()))
    assert again.config == model.config
    with pytest.raises(DinrecError, match="unknown fields"):
        build_model("base", attention_size=3, **SIZES)


@pytest.mark.parametrize("name", ["base", "wide_deep", "pnn", "din", "dien"])
def test_models_learn_a_planted_rule(name):
    """A label that depends on whether the target's category is in the history is learnable."""
    torch.manual_seed(0)
    model = build_model(name, embedding_dim=8, hidden=[32, 16], **SIZES)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = [_batch(b=64, seed=s) for s in range(20)]
    for b in batches:
        b.label = (b.hist_cats == b.cat[:, None]).any(1).float()

    def mean_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [F.binary_cross_entropy_with_logits(model(b).logits, b.label) for b in batches]
        model.train()
        return float(torch.stack(losses).mean())

    before = mean_loss()
    for _ in range(15):
        for b in batches:
            out = model(b)
            loss = F.binary_cross_entropy_with_logits(out.logits, b.label)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = mean_loss()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("gru", ["fused", "fused_script"])
def test_dien_fused_paths_equal_the_literal_ones(gru):
    """A DIEN training step (logits, auxiliary loss, every gradient) with the fused GRU
    loops and the fast attention equals nn.GRU + the literal AUGRU cell + the reference
    attention, in float64."""
    import dataclasses

    torch.manual_seed(0)
    model = build_model("dien", **SIZES).double().train()
    batch = _batch()
    results = []
    for fast in (True, False):
        model.extractor.impl = gru if fast else "padded"
        model.evolution.config = dataclasses.replace(model.evolution.config, impl=gru if fast else "autograd")
        model.attention.impl = "fast" if fast else "reference"
        model.zero_grad()
        out = model(batch)
        (out.logits.sin().sum() + out.aux_loss).backward()
        results.append([out.logits, out.aux_loss, *(p.grad for p in model.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_dien_auxiliary_loss_and_gradient_paths():
    torch.manual_seed(0)
    model = build_model("dien", **SIZES)
    batch = _batch()
    out = model(batch)
    assert out.aux_loss is not None and out.aux_loss.ndim == 0 and out.aux_loss > 0
    # Gradients reach the attention through the AUGRU (its only path to the output).
    out.logits.sum().backward()
    assert model.attention.att1.weight.grad.abs().sum() > 0
    assert model.evolution.weight_hh.grad.abs().sum() > 0
    # Padded negatives change nothing in the auxiliary loss.
    noisy = _batch()
    noisy.neg_items = torch.where(batch.mask[..., None], batch.neg_items, torch.randint(2, 50, batch.neg_items.shape))
    torch.manual_seed(0)
    torch.testing.assert_close(model(noisy).aux_loss, model(batch).aux_loss)
    # No auxiliary loss at evaluation; a clear error when training without negatives.
    model.eval()
    assert model(batch).aux_loss is None
    model.train()
    batch.neg_items = None
    with pytest.raises(DinrecError, match="--neg-history"):
        model(batch)
    assert not build_model("augru", **SIZES).needs_neg_history
    with pytest.raises(DinrecError, match="evolution"):
        build_model("dien", evolution="lstm", **SIZES)
