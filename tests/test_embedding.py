"""FeatureEmbedding: tables from the schema, each feature kind, pooling, widths, padding."""

from __future__ import annotations

import pytest
import torch

from dinrec.data.batch import Batch, SequenceBatch
from dinrec.data.schema import Feature, Schema, SequenceSpec
from dinrec.errors import DinrecError
from dinrec.models.embedding import INIT_STD, FeatureEmbedding
from model_inputs import DEFAULT_SIZES, RICH, RICH_SIZES, random_batch


def _rich() -> FeatureEmbedding:
    torch.manual_seed(0)
    return FeatureEmbedding(RICH, RICH_SIZES)


def test_default_schema_is_the_former_behaviour_embedding():
    """user / item / cat tables in that order; a behaviour is item ++ cat; the history
    sum is over valid positions."""
    torch.manual_seed(0)
    emb = FeatureEmbedding(Schema.default(), DEFAULT_SIZES)
    assert list(emb.tables) == ["user", "item", "cat"]
    # The former init: three nn.Embedding, then normal(0.05) with row 0 zeroed, in order.
    torch.manual_seed(0)
    old = [torch.nn.Embedding(DEFAULT_SIZES[k], 18, padding_idx=0) for k in ("user", "item", "cat")]
    for t in old:
        torch.nn.init.normal_(t.weight, std=0.05)
        with torch.no_grad():
            t.weight[0].zero_()
    for (name, table), want in zip(emb.tables.items(), old, strict=True):
        torch.testing.assert_close(table.weight, want.weight, rtol=0, atol=0, msg=name)
    batch = random_batch(Schema.default(max_len=9), DEFAULT_SIZES, b=5)
    e = emb(batch)
    seq = batch.sequences["hist"]
    user_t, item_t, cat_t = (t.weight for t in old)
    torch.testing.assert_close(e.user, user_t[batch.user["user"]])
    torch.testing.assert_close(e.context, torch.zeros(5, 0))
    torch.testing.assert_close(e.target, torch.cat([item_t[batch.item["item"]], cat_t[batch.item["cat"]]], -1))
    hist = torch.cat([item_t[seq.items["item"]], cat_t[seq.items["cat"]]], -1)  # (B, T, 36)
    torch.testing.assert_close(e.sequences["hist"].history, hist)
    torch.testing.assert_close(e.sequences["hist"].history_sum, (hist * seq.mask[..., None]).sum(1))
    assert emb.item_dim == 36 and emb.user_dim == 18 and emb.sequence_dim("hist") == 36


def test_init_and_padding_row():
    emb = _rich()
    for name, table in emb.tables.items():
        assert (table.weight[0] == 0).all(), name
        assert table.padding_idx == 0
    big = FeatureEmbedding(Schema.default(), {"user": 4000, "item": 4000, "cat": 4000})
    assert abs(float(big.tables["item"].weight[1:].detach().std()) - INIT_STD) < 0.002
    small = FeatureEmbedding(Schema.default(), {"user": 4000, "item": 4000, "cat": 4000}, init_std=1e-4)
    assert abs(float(small.tables["item"].weight[1:].detach().std()) - 1e-4) < 4e-6
    assert (small.tables["cat"].weight[0] == 0).all()
    with pytest.raises(DinrecError, match="embedding_init_std"):
        FeatureEmbedding(Schema.default(), {"user": 4, "item": 4, "cat": 4}, init_std=0.0)


def test_tables_widths_and_sharing():
    emb = _rich()
    # one table per vocabulary; fav_cat shares cat's; numeric features have none
    assert set(emb.tables) == {"user", "cat", "item", "genres", "tags", "brand", "hour", "rating", "gap"}
    assert emb.tables["brand"].weight.shape == (12, 5) and emb.tables["tags"].weight.shape == (9, 3)
    # user: user 6 + age 1 + fav_cat 6; item: item, cat, genres 6 each + tags 3 + brand 5 + price 1
    assert (emb.user_dim, emb.context_dim, emb.item_dim) == (13, 7, 27)
    assert emb.sequence_dim("liked") == 27 + 6 + 6 + 1 and emb.sequence_dim("disliked") == 27
    batch = random_batch(RICH, RICH_SIZES, b=4)
    e = emb(batch)
    assert e.user.shape == (4, 13) and e.context.shape == (4, 7) and e.target.shape == (4, 27)
    assert e.sequences["liked"].history.shape == (4, 9, 40)
    assert e.sequences["disliked"].history.shape == (4, 5, 27)
    # the shared table: fav_cat's vector is the cat table's row
    cat = emb.tables["cat"].weight
    torch.testing.assert_close(e.user[:, 7:], cat[batch.user["fav_cat"]])
    # numeric features enter as their value (age after the user id)
    torch.testing.assert_close(e.user[:, 6], batch.user["age"])
    torch.testing.assert_close(e.target[:, -1], batch.item["price"])
    torch.testing.assert_close(e.sequences["liked"].history[..., -1],
                               batch.sequences["liked"].events["dwell"])


def test_multi_valued_pooling_ignores_padding():
    emb = _rich()
    ids = torch.tensor([[3, 5, 0], [7, 0, 0], [0, 0, 0], [4, 4, 9]])  # (B, M) 0-padded
    f_mean, f_sum = RICH.feature("genres"), RICH.feature("tags")
    w = emb.tables["genres"].weight
    want = torch.stack([(w[3] + w[5]) / 2, w[7], torch.zeros(6), (2 * w[4] + w[9]) / 3])
    torch.testing.assert_close(emb.feature(f_mean, ids), want)
    wt = emb.tables["tags"].weight
    tag_ids = ids.clamp(max=8)
    want_sum = torch.stack([wt[3] + wt[5], wt[7], torch.zeros(3), 2 * wt[4] + wt[8]])
    torch.testing.assert_close(emb.feature(f_sum, tag_ids), want_sum)
    # Padding anywhere, more padding columns, or another order: the same vector.
    shuffled = torch.tensor([[0, 5, 3, 0, 0], [0, 0, 7, 0, 0], [0, 0, 0, 0, 0], [9, 4, 0, 4, 0]])
    torch.testing.assert_close(emb.feature(f_mean, shuffled), want)
    # A padding row that is not zero (e.g. loaded weights) is still ignored.
    with torch.no_grad():
        emb.tables["genres"].weight[0] = 100.0
    torch.testing.assert_close(emb.feature(f_mean, shuffled), want)
    # Any leading shape: (B, T, M) and (B, T, K, M).
    torch.testing.assert_close(emb.feature(f_mean, ids.view(2, 2, 3)), want.view(2, 2, 6))


def test_padded_positions_are_read_as_padding():
    """Garbage at padded positions never reaches the history or its sum."""
    emb = _rich()
    batch = random_batch(RICH, RICH_SIZES, b=6, seed=2, empty_rows=True)
    noisy = batch.apply(lambda t: t.clone())
    for s in noisy.sequences.values():
        for d in (s.items, s.events):
            for k, v in d.items():
                m = s.mask.reshape(*s.mask.shape, *([1] * (v.dim() - 2)))
                d[k] = torch.where(m, v, 3 if not v.is_floating_point() else 7.5)
    e, n = emb(batch), emb(noisy)
    for s in ("liked", "disliked"):
        torch.testing.assert_close(n.sequences[s].history, e.sequences[s].history)
        torch.testing.assert_close(n.sequences[s].history_sum, e.sequences[s].history_sum)
        mask = batch.sequences[s].mask
        assert (e.sequences[s].history[~mask] == 0).all()
        assert (e.sequences[s].history_sum[~mask.any(1)] == 0).all()


def test_negatives():
    emb = _rich()
    batch = random_batch(RICH, RICH_SIZES, b=3, k=4)
    seq = batch.sequences["liked"]
    neg = emb.negatives("liked", seq)
    assert neg.shape == (3, 9, 4, 27)
    torch.testing.assert_close(neg[..., :6], emb.tables["item"].weight[seq.neg["item"]])
    assert emb.negatives("disliked", batch.sequences["disliked"]) is None
    # A feature the negatives lack reads as padding (the former neg_cats=None).
    seq.neg = {k: v for k, v in seq.neg.items() if k != "genres"}
    assert (emb.negatives("liked", seq)[..., 12:18] == 0).all()


def test_errors_name_the_table_or_feature():
    with pytest.raises(DinrecError, match="no size for table 'brand'"):
        FeatureEmbedding(RICH, {k: v for k, v in RICH_SIZES.items() if k != "brand"})
    # a shared table's width is its first feature's; another width is an error
    clash = Schema(user=[Feature("user"), Feature("fav", table="cat")],
                   item=[Feature("item"), Feature("cat", embedding_dim=5)])
    with pytest.raises(DinrecError, match=r"item\.cat\.embedding_dim: 5, but its table 'cat' is 18 wide"):
        FeatureEmbedding(clash, DEFAULT_SIZES)
    emb = FeatureEmbedding(Schema.default(), DEFAULT_SIZES)
    b = random_batch(Schema.default(max_len=3), DEFAULT_SIZES, b=2)
    with pytest.raises(DinrecError, match="item: missing feature 'cat'"):
        emb(Batch(label=b.label, user=b.user, item={"item": b.item["item"]}, sequences=b.sequences))
    seq = SequenceBatch(items={"item": torch.ones(2, 3, dtype=torch.long)}, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(DinrecError, match="item: missing feature 'cat'"):
        emb(Batch(label=b.label, user=b.user, item=b.item, sequences={"hist": seq}))
    events = Schema(sequences=[SequenceSpec("s", event_features=[Feature("rating")])])
    emb = FeatureEmbedding(events, DEFAULT_SIZES | {"rating": 7})
    b = random_batch(events, DEFAULT_SIZES | {"rating": 7}, b=2)
    b.sequences["s"].events = {}
    with pytest.raises(DinrecError, match=r"sequences\.s\.events: missing feature 'rating'"):
        emb(b)


# --------------------------------------------------------------------------- packed lookups
@pytest.mark.parametrize("schema", ["default", "rich"])
def test_packed_lookups_equal_the_padded_ones(schema):
    """``packed``: the valid rows of every padded history, the same sums, target, user and
    context, and the same table gradients, whatever the padded positions hold."""
    from model_inputs import with_garbage

    s, sizes = (Schema.default(9), DEFAULT_SIZES) if schema == "default" else (RICH, RICH_SIZES)
    torch.manual_seed(0)
    emb = FeatureEmbedding(s, sizes).double()
    batch = random_batch(s, sizes, b=12, seed=3, empty_rows=True)
    noisy = with_garbage(batch, s, sizes)
    dense, packed = emb(batch), emb.packed(noisy)
    for key in ("user", "context", "target"):
        torch.testing.assert_close(getattr(packed, key), getattr(dense, key))
    loss = {"dense": 0.0, "packed": 0.0}
    for name, seq in dense.sequences.items():
        p = packed.sequences[name]
        assert torch.equal(p.mask, seq.mask) and torch.equal(p.index, seq.mask.reshape(-1).nonzero()[:, 0])
        assert torch.equal(p.rows, p.index // seq.mask.shape[1])
        torch.testing.assert_close(p.facts, seq.history[seq.mask])
        torch.testing.assert_close(p.history_sum, seq.history_sum)
        w = torch.randn(p.facts.shape, dtype=p.facts.dtype)
        v = torch.randn(p.history_sum.shape, dtype=p.facts.dtype)
        loss["packed"] = loss["packed"] + (p.facts * w).sum() + (p.history_sum * v).sum()
        loss["dense"] = loss["dense"] + (seq.history[seq.mask] * w).sum() + (seq.history_sum * v).sum()
    for side in ("dense", "packed"):
        emb.zero_grad()
        e = packed if side == "packed" else dense
        (loss[side] + e.target.sum() + e.user.sum() + e.context.sum()).backward(retain_graph=True)
        grads = {n: p.grad.clone() for n, p in emb.named_parameters()}
        if side == "dense":
            want = grads
    for n, g in grads.items():
        torch.testing.assert_close(g, want[n], msg=n)
        assert (g[0] == 0).all(), n


def test_lookup_gradient_is_the_embedding_gradient():
    """``lookup``'s index_add backward: the gradient of F.embedding (repeated ids, the
    padding row kept at zero, any id shape); the module itself where it cannot run."""
    from dinrec.nn.lookup import lookup

    g = torch.Generator().manual_seed(0)
    table = torch.nn.Embedding(11, 5, padding_idx=0).double()
    ids = torch.randint(0, 11, (6, 7, 3), generator=g)
    ids[0, 0] = 0
    w = torch.randn(6, 7, 3, 5, generator=g, dtype=torch.float64)
    out = lookup(table, ids)
    assert out.grad_fn is not None and "Lookup" in type(out.grad_fn).__name__
    (out * w).sum().backward()
    got = table.weight.grad.clone()
    table.zero_grad()
    (table(ids) * w).sum().backward()
    torch.testing.assert_close(got, table.weight.grad)
    assert (got[0] == 0).all() and got.abs().sum() > 0
    torch.testing.assert_close(lookup(table, ids), table(ids))
    for kw in ({"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}):
        other = torch.nn.Embedding(11, 5, padding_idx=0, **kw)
        assert "Lookup" not in type(lookup(other, ids).grad_fn).__name__
    with torch.no_grad():
        assert lookup(table, ids).grad_fn is None
