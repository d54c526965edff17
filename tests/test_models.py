"""The CTR models over the schema: today's results on the default schema, every feature
kind, padding invariance, one attention per sequence, candidate scoring, learning."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinrec.data.batch import Batch
from dinrec.data.schema import Feature, Schema, SequenceSpec
from dinrec.errors import DinrecError
from dinrec.models import MODELS, create_model
from dinrec.models.din import DIN, DINCandidateScorer
from dinrec.train.config import REFERENCE_MODEL_OPTIONS
from model_inputs import (
    DEFAULT_SIZES,
    RICH,
    RICH_SIZES,
    history_row,
    random_batch,
    random_candidates,
    repeat_row,
    with_garbage,
)

ALL = ["base", "wide_deep", "pnn", "din", "dien", "gru_att", "aigru", "agru", "augru"]
SCHEMAS = {"default": (Schema.default(max_len=9), DEFAULT_SIZES), "rich": (RICH, RICH_SIZES)}
FIXTURE = Path(__file__).parent / "fixtures" / "models_default_schema.pt"


def _model(name: str, schema: str = "default", **config) -> torch.nn.Module:
    s, sizes = SCHEMAS[schema]
    return create_model(name, s, sizes, **config)


def _batch(schema: str = "default", **kw) -> Batch:
    s, sizes = SCHEMAS[schema]
    return random_batch(s, sizes, **kw)


# --------------------------------------------------------------------------- today's results
_fixture = torch.load(FIXTURE) if FIXTURE.exists() else {"cases": {}}


@pytest.mark.parametrize("case", sorted(_fixture["cases"]))
def test_default_schema_reproduces_the_pre_schema_models(case):
    """Same seed -> same weights (created in the same order, same init) and the same
    logits, attention weights, auxiliary loss and gradients as before the schema
    (recorded by tests/fixtures/make_models_default_schema.py from commit 8cc926c)."""
    c, x = _fixture["cases"][case], _fixture["inputs"]
    sizes = {"user": _fixture["sizes"]["n_users"], "item": _fixture["sizes"]["n_items"],
             "cat": _fixture["sizes"]["n_cats"]}
    torch.manual_seed(0)
    # recorded with the model defaults of then: the DIEN reference's (DIN: din_fcn_attention)
    config = {**REFERENCE_MODEL_OPTIONS.get(c["name"], {}), **c["config"]}
    model = create_model(c["name"], Schema.default(), sizes, **config)
    params = [p.detach().double() for p in model.parameters()]
    assert [tuple(p.shape) for p in params] == c["param_shapes"]
    torch.testing.assert_close(torch.stack([p.sum() for p in params]), c["param_sums"])
    torch.testing.assert_close(torch.stack([p.square().sum() for p in params]), c["param_sq_sums"])
    batch = Batch.from_ids(x["user"], x["item"], x["cat"], x["hist_items"], x["hist_cats"], x["mask"],
                           x["label"], x["neg_items"], x["neg_cats"])
    model.train()
    out = model(batch)
    (out.logits.sin().sum() + (out.aux_loss if out.aux_loss is not None else 0.0)).backward()
    torch.testing.assert_close(out.logits.detach(), c["train_logits"], rtol=1e-5, atol=1e-6)
    if c["aux_loss"] is None:
        assert out.aux_loss is None
    else:
        torch.testing.assert_close(out.aux_loss.detach(), c["aux_loss"], rtol=1e-5, atol=1e-6)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.double() for p in model.parameters()]
    # atol 1e-5: the fixture came from the former C loops; the GRU operator sums the same
    # float32 products in another order (a gradient sum near 0 moves by ~3e-6)
    torch.testing.assert_close(torch.stack([g.sum() for g in grads]), c["grad_sums"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack([g.square().sum() for g in grads]), c["grad_sq_sums"],
                               rtol=1e-4, atol=1e-9)
    model.eval()
    with torch.no_grad():
        ev = model(batch, return_alphas=True)
    torch.testing.assert_close(ev.logits, c["eval_logits"], rtol=1e-5, atol=1e-6)
    if c["eval_alphas"] is None:
        assert ev.alphas is None
    else:
        assert list(ev.alphas) == ["hist"]
        torch.testing.assert_close(ev.alphas["hist"], c["eval_alphas"], rtol=1e-5, atol=1e-6)


def test_the_fixture_is_there():
    assert len(_fixture["cases"]) == 12, "tests/fixtures/models_default_schema.pt is missing"


# --------------------------------------------------------------------------- every feature kind
@pytest.mark.parametrize("name", ALL)
def test_every_feature_kind_forward_and_backward(name):
    """The rich schema (every kind in every role, two sequences, per-event features):
    finite logits, and a gradient reaches every table and every numeric input."""
    torch.manual_seed(0)
    model = _model(name, "rich").train()
    batch = _batch("rich", k=2)
    for role in (batch.user, batch.item, batch.context):
        for f, v in role.items():
            if v.is_floating_point():
                role[f] = v.clone().requires_grad_()
    for seq in batch.sequences.values():
        for d in (seq.items, seq.events):
            for f, v in d.items():
                if v.is_floating_point():
                    d[f] = v.clone().requires_grad_()
    out = model(batch)
    assert out.logits.shape == (16,) and torch.isfinite(out.logits).all()
    assert (out.aux_loss is not None) == model.needs_neg_history
    (out.logits.sum() + (out.aux_loss if out.aux_loss is not None else 0.0)).backward()
    for table, emb in model.embedding.tables.items():
        assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0, table
        assert (emb.weight.grad[0] == 0).all(), f"{table}: the padding row learned"
    floats = [v for r in (batch.user, batch.item, batch.context) for v in r.values() if v.requires_grad]
    floats += [v for s in batch.sequences.values() for d in (s.items, s.events) for v in d.values()
               if v.requires_grad]
    assert len(floats) == 6  # age, price, weekday, price of each event (2 sequences), dwell
    for v in floats:
        assert v.grad is not None and v.grad.abs().sum() > 0


@pytest.mark.parametrize("schema", ["default", "rich"])
@pytest.mark.parametrize("name", ALL)
def test_padding_never_changes_a_logit(name, schema):
    """Garbage at padded sequence positions (ids, values, per-event features), extra
    padding columns on multi-valued features, and rows with an empty sequence."""
    torch.manual_seed(0)
    s, sizes = SCHEMAS[schema]
    model = _model(name, schema).eval()
    batch = random_batch(s, sizes, empty_rows=True, seed=3)
    noisy = with_garbage(batch, s, sizes)
    assert any(not torch.equal(a, b) for a, b in zip(
        noisy.sequences[s.main_sequence.name].items.values(),
        batch.sequences[s.main_sequence.name].items.values(), strict=True))
    with torch.no_grad():
        want = model(batch, return_alphas=True)
        got = model(noisy, return_alphas=True)
    torch.testing.assert_close(got.logits, want.logits)
    if want.alphas is not None:
        for k in want.alphas:
            torch.testing.assert_close(got.alphas[k], want.alphas[k])


# --------------------------------------------------------------------------- sequences
@pytest.mark.parametrize("name", ["din", "dien", "gru_att", "aigru"])
def test_two_sequences_give_two_attentions_with_their_own_masks(name):
    torch.manual_seed(0)
    model = _model(name, "rich").eval()
    batch = _batch("rich", empty_rows=True, seed=1)
    with torch.no_grad():
        out = model(batch, return_alphas=True)
    assert list(out.alphas) == ["liked", "disliked"]
    for s, a in out.alphas.items():
        mask = batch.sequences[s].mask
        assert a.shape == mask.shape
        some = mask.any(1)  # (B,)
        assert (~some).any() and some.any()
        assert (a[~mask & some[:, None]] == 0).all(), s
        torch.testing.assert_close(a[some].sum(1), torch.ones(int(some.sum())))
        # an empty sequence: the reference's uniform weights (over padding read as zeros)
        torch.testing.assert_close(a[~some], torch.full_like(a[~some], 1 / mask.shape[1]))
    # Each sequence has its own attention unit ...
    units = model.attentions if name == "din" else {"liked": model.attention, **model.attentions}
    assert set(units) == {"liked", "disliked"} and units["liked"] is not units["disliked"]
    # ... and reads only its own events: changing "disliked" leaves the "liked" weights.
    other = batch.apply(lambda t: t.clone())
    other.sequences["disliked"].items["item"] = torch.where(
        other.sequences["disliked"].mask, (other.sequences["disliked"].items["item"] + 7) % 48 + 2, 0)
    with torch.no_grad():
        out2 = model(other, return_alphas=True)
    torch.testing.assert_close(out2.alphas["liked"], out.alphas["liked"])
    changed = batch.sequences["disliked"].mask.any(1)
    assert not torch.allclose(out2.alphas["disliked"][changed], out.alphas["disliked"][changed])
    assert not torch.allclose(out2.logits, out.logits)


def test_din_alphas_and_attention_variants():
    torch.manual_seed(0)
    batch = _batch()
    for attention in ("fcn", "din"):
        model = _model("din", attention=attention).eval()
        out = model(batch, return_alphas=True)
        a, mask = out.alphas["hist"], batch.sequences["hist"].mask
        assert a.shape == mask.shape
        torch.testing.assert_close(a.sum(1), torch.ones(16))
        assert (a[~mask] == 0).all()
        assert model(batch).alphas is None
    assert _model("din", attention="din").attention.query_proj is None
    with pytest.raises(DinrecError, match="attention"):
        _model("din", attention="bogus")
    plain = Schema(item=[Feature("item"), Feature("genres", kind="multi")], sequences=[SequenceSpec("a"), SequenceSpec("b")])
    model = create_model("din", plain, {"user": 5, "item": 9, "genres": 4}, attention="din")
    assert model.attentions["b"].query_proj is None


def test_plain_attention_pads_the_target_to_the_events_width():
    """attention="din" (the default) with per-event features: the query is the target
    zero-padded to the events' width, so the per-event values move the weights."""
    torch.manual_seed(0)
    model = _model("din", "rich").eval()
    assert model.config.attention == "din"
    d, ds = model.behaviour_dim, model.sequence_dim("liked")
    unit = model.unit("liked")
    assert ds > d and unit.query_size == ds and unit.query_proj is None
    target = torch.randn(3, d)
    q = model.query("liked", target)  # (3, D_s)
    assert q.shape == (3, ds) and (q[:, d:] == 0).all()
    torch.testing.assert_close(q[:, :d], target)
    assert model.query("disliked", target) is target  # events as wide as the target
    assert _model("din", "rich", attention="fcn").query("liked", target) is target  # fcn projects
    batch = _batch("rich", seed=3)
    with torch.no_grad():
        out = model(batch, return_alphas=True)
        e = model.embedding(batch)
        seq = e.sequences["liked"]
        _, a = unit(F.pad(e.target, (0, ds - d)), seq.history, seq.mask, return_alphas=True)
    torch.testing.assert_close(out.alphas["liked"], a.squeeze(1))
    # a per-event feature (the rating) changes the weights, the candidate's part unchanged
    other = batch.apply(lambda t: t.clone())
    liked = other.sequences["liked"]
    liked.events["rating"] = torch.where(liked.mask, (liked.events["rating"] + 1) % 5 + 2, 0)
    with torch.no_grad():
        out2 = model(other, return_alphas=True)
    several = liked.mask.sum(1) > 1
    assert not torch.allclose(out2.alphas["liked"][several], out.alphas["liked"][several])
    torch.testing.assert_close(out2.alphas["disliked"], out.alphas["disliked"])


# --------------------------------------------------------------------------- candidates
def _check_candidates(model, s, sizes, seed=0, compute_dtype=None):
    batch = random_batch(s, sizes, b=4, seed=seed, k=0)
    cands = random_candidates(s, sizes, 11, seed=seed + 7)
    for row in (0, 3):
        out = model.score_candidates(history_row(batch, row), cands, return_alphas=True,
                                     compute_dtype=compute_dtype)
        want = model(repeat_row(batch, row, cands), return_alphas=True)
        torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-6)
        if model.has_attention:
            assert list(out.alphas) == [q.name for q in s.sequences]
            for k, a in want.alphas.items():
                torch.testing.assert_close(out.alphas[k], a, rtol=1e-5, atol=1e-6)
        else:
            assert out.alphas is None


@pytest.mark.parametrize("schema", ["default", "rich"])
@pytest.mark.parametrize("name", ALL)
def test_score_candidates_equals_forward_on_the_same_rows(name, schema):
    torch.manual_seed(1)
    s, sizes = SCHEMAS[schema]
    model = _model(name, schema)
    model.train()  # warm BatchNorm's running statistics a little, then evaluate
    model(random_batch(s, sizes, b=32, seed=9))
    model.eval()
    _check_candidates(model, s, sizes)
    scorer = model.candidate_scorer()
    batch = random_batch(s, sizes, b=2, seed=4, k=0)
    cands = random_candidates(s, sizes, 6)
    torch.testing.assert_close(scorer(history_row(batch, 1), cands).logits,
                               model(repeat_row(batch, 1, cands)).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schema", ["default", "rich"])
def test_din_candidates_in_training_mode_and_with_either_attention(schema):
    """The autograd path (training mode; BatchNorm on batch statistics over the N rows
    on both sides) of the default (plain) attention, and din_fcn_attention's prepared scorer."""
    torch.manual_seed(2)
    s, sizes = SCHEMAS[schema]
    model = _model("din", schema).train()
    batch = random_batch(s, sizes, b=2, seed=0, k=0)
    cands = random_candidates(s, sizes, 9)
    out = model.score_candidates(history_row(batch, 0), cands, return_alphas=True)
    want = model(repeat_row(batch, 0, cands), return_alphas=True)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-6)
    for k in want.alphas:
        torch.testing.assert_close(out.alphas[k], want.alphas[k])
    out.logits.sum().backward()
    assert model.attention.att1.weight.grad.abs().sum() > 0
    _check_candidates(_model("din", schema, attention="fcn").eval(), s, sizes)


@pytest.mark.parametrize("name", ["din", "dien"])
def test_candidates_in_bfloat16_products_stay_close(name):
    """``compute_dtype=torch.bfloat16`` (the server's --precision) on the rich schema."""
    torch.manual_seed(3)
    s, sizes = SCHEMAS["rich"]
    model = _model(name, "rich").eval()
    history = history_row(random_batch(s, sizes, b=1, k=0), 0)
    cands = random_candidates(s, sizes, 300)
    with torch.no_grad():  # as a server runs it (bfloat16 products need no autograd)
        want = model.candidate_scorer()(history, cands, return_alphas=True)
        got = model.candidate_scorer()(history, cands, return_alphas=True, compute_dtype=torch.bfloat16)
    assert got.logits.dtype == torch.float32
    assert not torch.equal(got.alphas["disliked"], want.alphas["disliked"])  # the bfloat16 path ran
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=2e-2)
    for k in want.alphas:
        torch.testing.assert_close(got.alphas[k].float(), want.alphas[k], rtol=0, atol=2e-2)


def test_din_candidate_scorer_is_a_snapshot_of_eval_mode():
    torch.manual_seed(2)
    s, sizes = SCHEMAS["rich"]
    model = _model("din", "rich", embedding_dim=4, hidden=[8, 4])
    with pytest.raises(DinrecError, match="eval mode"):
        model.candidate_scorer()
    model.eval()
    history, cands = history_row(random_batch(s, sizes, b=1), 0), random_candidates(s, sizes, 20)
    scorer = model.candidate_scorer()
    assert isinstance(scorer, DINCandidateScorer)
    before = scorer(history, cands, return_alphas=True)
    want = model.score_candidates(history, cands, return_alphas=True)
    torch.testing.assert_close(before.logits, want.logits)
    with torch.no_grad():  # in place: the MLP (copied) and its folded first layer
        model.mlp.out.bias += 1.0
        model.mlp.hidden_layers[0].weight *= 1.5
    unit = model.attentions["disliked"]  # new values (the attention's snapshot aliases its weights)
    unit.att2.bias.data = unit.att2.bias.data + 0.5
    torch.testing.assert_close(scorer(history, cands).logits, before.logits)  # the snapshot
    fresh = model.candidate_scorer()(history, cands, return_alphas=True)
    torch.testing.assert_close(fresh.logits, model.score_candidates(history, cands).logits)
    assert not torch.allclose(fresh.logits, before.logits)
    assert not torch.allclose(fresh.alphas["disliked"], before.alphas["disliked"])
    torch.testing.assert_close(fresh.alphas["liked"], before.alphas["liked"])


def test_candidate_input_errors():
    batch = _batch(b=2)
    cands = {"item": torch.tensor([3]), "cat": torch.tensor([2])}
    for name in ("base", "din", "dien"):
        model = _model(name).eval()
        with pytest.raises(DinrecError, match="1 row"):
            model.score_candidates(batch, cands)
        with pytest.raises(DinrecError, match="missing feature 'cat'"):
            model.score_candidates(history_row(batch, 0), {"item": torch.tensor([3, 4])})


# --------------------------------------------------------------------------- fast paths
@pytest.mark.parametrize("name", ["din", "dien", "gru_att"])
def test_fast_paths_equal_the_literal_ones_for_any_behaviour_width(name):
    """A training step (logits, auxiliary loss, every gradient) on the rich schema
    (behaviour width 6+6+6+3+5+1 = 27, events 27+6+6+1 = 40, two sequences) with the fast
    attention and fused GRU loops equals the reference attention + literal loops, float64."""
    torch.manual_seed(0)
    model = _model(name, "rich").double().train()
    batch = _batch("rich", k=2).apply(lambda t: t.double() if t.is_floating_point() else t)
    assert model.behaviour_dim == 27 and model.sequence_dim("liked") == 40
    units = [m for m in model.modules() if hasattr(m, "att1")]
    assert len(units) == 2
    results = []
    for fast in (True, False):
        for unit in units:
            unit.impl = "fast" if fast else "reference"
        if name != "din":
            model.extractor.impl = "fused" if fast else "padded"
        if hasattr(model, "evolution"):
            model.evolution.config = dataclasses.replace(model.evolution.config,
                                                         impl="fused" if fast else "autograd")
        model.zero_grad()
        out = model(batch)
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), dtype=torch.float64)
        (out.logits.sin().sum() + aux).backward()
        results.append([out.logits, aux, *(p.grad for p in model.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gru", ["fused", "fused_script"])
def test_dien_fused_paths_equal_the_literal_ones(gru):
    torch.manual_seed(0)
    model = _model("dien").double().train()
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


# --------------------------------------------------------------------------- DIEN specifics
def test_dien_auxiliary_loss_and_gradient_paths():
    torch.manual_seed(0)
    model = _model("dien", "rich")
    batch = _batch("rich", k=2)
    out = model(batch)
    assert out.aux_loss is not None and out.aux_loss.ndim == 0 and out.aux_loss > 0
    out.logits.sum().backward()
    # Gradients reach the main attention through the AUGRU (its only path to the output).
    assert model.attention.att1.weight.grad.abs().sum() > 0
    assert model.evolution.weight_hh.grad.abs().sum() > 0
    assert model.attentions["disliked"].att1.weight.grad.abs().sum() > 0
    assert model.extractor.input_size == model.sequence_dim("liked") == 40
    # Padded negatives change nothing in the auxiliary loss.
    noisy = batch.apply(lambda t: t.clone())
    neg, mask = noisy.sequences["liked"].neg, batch.sequences["liked"].mask
    neg["item"] = torch.where(mask[..., None], neg["item"], torch.randint(2, 50, neg["item"].shape))
    torch.testing.assert_close(model(noisy).aux_loss, model(batch).aux_loss)
    # The negatives matter where they are valid.
    neg["item"] = torch.where(mask[..., None], (neg["item"] + 5) % 48 + 2, neg["item"])
    assert not torch.allclose(model(noisy).aux_loss, model(batch).aux_loss)
    # No auxiliary loss at evaluation; a clear error when training without negatives.
    model.eval()
    assert model(batch).aux_loss is None
    model.train()
    batch.sequences["liked"].neg = None
    with pytest.raises(DinrecError, match="--neg-history"):
        model(batch)
    assert not _model("augru").needs_neg_history
    with pytest.raises(DinrecError, match="evolution"):
        _model("dien", evolution="lstm")


def test_dien_negatives_without_a_feature_read_it_as_padding():
    """Negatives carrying only some item features (the pre-schema ``neg_cats=None``)."""
    torch.manual_seed(0)
    model = _model("dien")
    batch = _batch()
    neg = batch.sequences["hist"].neg
    explicit = model(batch).aux_loss
    batch.sequences["hist"].neg = {"item": neg["item"], "cat": torch.zeros_like(neg["cat"])}
    zeros = model(batch).aux_loss
    batch.sequences["hist"].neg = {"item": neg["item"]}
    torch.testing.assert_close(model(batch).aux_loss, zeros)
    assert not torch.allclose(zeros, explicit)


# --------------------------------------------------------------------------- registry, config
def test_registry_and_config():
    assert set(ALL) <= set(MODELS)
    with pytest.raises(DinrecError, match="unknown model 'nope'"):
        _model("nope")
    model = _model("din", embedding_dim=4, hidden=[8, 4], activation="dice")
    assert isinstance(model, DIN) and model.behaviour_dim == 8
    again = create_model("din", model.schema, model.table_sizes, **model.config.to_dict())
    assert again.config == model.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(DinrecError, match="unknown fields"):
        _model("base", attention_size=3)
    with pytest.raises(DinrecError, match="unknown fields.*n_users"):
        _model("base", n_users=3)
    with pytest.raises(DinrecError, match="no size for table 'cat'"):
        create_model("din", Schema.default(), {"user": 3, "item": 4})


def test_embedding_dim_comes_from_the_config_else_the_schema():
    s = Schema(item=[Feature("item"), Feature("cat", embedding_dim=3)], embedding_dim=5)
    sizes = DEFAULT_SIZES
    assert create_model("base", s, sizes).behaviour_dim == 5 + 3
    assert create_model("base", s, sizes, embedding_dim=7).behaviour_dim == 7 + 3


# --------------------------------------------------------------------------- learning
@pytest.mark.parametrize(("name", "schema"), [
    *((m, "default") for m in ("base", "wide_deep", "pnn", "din", "dien")),
    *((m, "rich") for m in ("base", "din", "dien")),
])
def test_models_learn_a_planted_rule(name, schema):
    """A label that depends on whether the target's category is in the (main) history."""
    torch.manual_seed(0)
    s, sizes = SCHEMAS[schema]
    model = create_model(name, s, sizes, embedding_dim=8, hidden=[32, 16])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    main = s.main_sequence.name
    batches = [random_batch(s, sizes, b=64, seed=i) for i in range(20)]
    for b in batches:
        seq = b.sequences[main]
        b.label = ((seq.items["cat"] == b.item["cat"][:, None]) & seq.mask).any(1).float()

    def mean_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [F.binary_cross_entropy_with_logits(model(b).logits, b.label) for b in batches]
        model.train()
        return float(torch.stack(losses).mean())

    before = mean_loss()
    for _ in range(15 if schema == "default" else 30):  # more features: more noise to ignore
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


# --------------------------------------------------------------------------- a prepared store
@pytest.fixture(scope="module")
def rich_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic preset with side features, prepared with the data layer's rich
    schema (user gender + bucketed age, item brand + genres + price, hour, liked/disliked
    with rating and time gap per event)."""
    from dinrec.data import PrepareConfig, generate, prepare_events, preset
    from dinrec.data.synthetic import rich_schema, side_features

    events, truth = generate(preset("tiny", seed=3))
    events, items, users = side_features(events, truth)
    path = tmp_path_factory.mktemp("rich") / "store"
    prepare_events(events, path, PrepareConfig(seed=3), schema=rich_schema(max_len=20), items=items, users=users)
    return path


@pytest.mark.parametrize("name", ALL)
def test_every_model_on_a_prepared_rich_store(name, rich_store):
    """The loader's batches (every feature kind, two sequences, negatives) through each
    model: forward, backward, and candidates equal to rows."""
    from dinrec.data import BatchLoader, SampleStore

    store = SampleStore(rich_store)
    batch = next(iter(BatchLoader(store, "train", batch_size=32, shuffle=True, seed=0, neg_history=1)))
    torch.manual_seed(0)
    model = create_model(name, store.schema, store.table_sizes())
    out = model(batch)
    (out.logits.sum() + (out.aux_loss if out.aux_loss is not None else 0.0)).backward()
    assert out.logits.shape == (32,) and all(p.grad is not None for p in model.embedding.parameters())
    model.eval()
    cands = {k: v[:7] for k, v in batch.item.items()}
    got = model.score_candidates(history_row(batch, 2), cands, return_alphas=True)
    want = model(repeat_row(batch, 2, cands), return_alphas=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    if model.has_attention:
        assert {k: v.shape for k, v in got.alphas.items()} == {
            s: (7, q.mask.shape[1]) for s, q in batch.sequences.items()}
        assert list(got.alphas) == ["liked", "disliked"]


def test_train_and_reload_a_rich_schema_run(rich_store, tmp_path):
    """The trainer builds the model from the store's schema and table sizes, and a run
    folder rebuilds it (schema.json + config.json's table sizes)."""
    from dinrec.data.schema import Schema
    from dinrec.run import load_run_model
    from dinrec.train.trainer import TrainConfig, train

    res = train(TrainConfig(model="dien", max_steps=4, batch_size=64, max_len=20, progress=False),
                rich_store, tmp_path / "run")
    assert np.isfinite(res.metrics["test"]["logloss"])
    model, saved = load_run_model(tmp_path / "run")
    assert Schema.load(tmp_path / "run") == model.schema and model.schema.sequences[1].name == "disliked"
    assert saved["vocab_sizes"] == model.table_sizes and model.extractor.input_size == model.sequence_dim("liked")


def test_the_default_config_trains_ranks_and_explains_a_rich_schema_run(rich_store, tmp_path, capsys):
    """The default training configuration (shuffled, Dice, DIN's plain attention) on a
    schema with per-event features: it trains, reloads, and `recommend --explain` works."""
    import json

    from dinrec.cli import main
    from dinrec.data.vocab import Vocabularies
    from dinrec.run import load_run_model
    from dinrec.train.trainer import TrainConfig, train

    cfg = TrainConfig(model="din", max_steps=6, batch_size=64, max_len=20, progress=False, threads=1)
    assert (cfg.bucket, cfg.activation, cfg.model_options) == (False, "dice", {})
    train(cfg, rich_store, tmp_path / "run")
    model, saved = load_run_model(tmp_path / "run")
    assert saved["model"]["config"]["attention"] == "din" and saved["train"]["bucket"] is False
    assert model.unit("liked").query_proj is None and model.unit("liked").query_size > model.behaviour_dim
    user = Vocabularies.load(tmp_path / "run" / "vocab").user.tokens.to_pylist()[2]
    assert main(["recommend", str(tmp_path / "run"), "--user", user, "--sample", "12", "-k", "4",
                 "--explain", "3", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["ranked"]) == 4
    for r in rec["ranked"]:
        weights = [e["weight"] for e in r["explanation"]]
        assert r["explanation"] and weights == sorted(weights, reverse=True)
        assert {e["sequence"] for e in r["explanation"]} <= {"liked", "disliked"}


# --------------------------------------------------------------------------- DIN's packed path
def _din_step(model: DIN, batch: Batch, packed: bool, monkeypatch) -> tuple[list, list]:
    """Logits, alphas and the gradients of every parameter and float input, one side forced."""
    monkeypatch.setattr(DIN, "packs", lambda self, b: packed)
    calls = []
    original = model.embedding.packed
    monkeypatch.setattr(model.embedding, "packed", lambda b: calls.append(1) or original(b))
    model.zero_grad()
    b = batch.apply(lambda t: t.clone().requires_grad_() if t.is_floating_point() else t.clone())
    out = model(b, return_alphas=True)
    w = torch.linspace(-1, 2, out.logits.numel(), dtype=out.logits.dtype)
    alphas = [out.alphas[s] for s in model.sequence_names]
    (F.binary_cross_entropy_with_logits(out.logits, b.label) + (out.logits * w).sum()
     + sum((a * torch.linspace(-1, 1, a.numel(), dtype=a.dtype).view(a.shape)).sum() for a in alphas)
     ).backward()
    assert calls == ([1] if packed else [])
    floats = [v for r in (b.user, b.item, b.context) for v in r.values() if v.requires_grad]
    floats += [v for s in b.sequences.values() for d in (s.items, s.events) for v in d.values() if v.requires_grad]
    grads = [p.grad for p in model.parameters()] + [v.grad for v in floats]
    return [out.logits.detach(), *(a.detach() for a in alphas)], grads


@pytest.mark.parametrize("schema", ["default", "rich"])
@pytest.mark.parametrize("attention", ["din", "fcn"])
@pytest.mark.parametrize("garbage", [False, True])
def test_din_packed_forward_equals_the_dense_one(schema, attention, garbage, monkeypatch):
    """Only the valid events looked up and attended: logits, alphas and every gradient
    (parameters, numeric inputs) equal the dense path's, with empty, length-1 and full rows,
    two sequences and per-event features, whatever padded positions hold."""
    s, sizes = SCHEMAS[schema]
    torch.manual_seed(0)
    model = _model("din", schema, activation="dice", attention=attention).double().train()
    batch = random_batch(s, sizes, b=24, seed=4, empty_rows=True)  # row 0 full, row 1 empty
    for seq in batch.sequences.values():  # and a length-1 row
        seq.mask[2] = False
        seq.mask[2, 0] = True
    if garbage:
        batch = with_garbage(batch, s, sizes)
    batch = batch.apply(lambda t: t.double() if t.is_floating_point() else t)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = _din_step(model, batch, False, monkeypatch)
    model.load_state_dict(state)  # the batch statistics moved once
    packed = _din_step(model, batch, True, monkeypatch)
    for a, b in zip(packed[0], dense[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len(packed[1]) == len(dense[1]) > 10
    for a, b in zip(packed[1], dense[1], strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_din_packs_only_sparse_eager_fast_cpu_batches():
    from dinrec.nn import backend

    torch.manual_seed(0)
    model = _model("din", "default", activation="dice").train()
    batch = _batch("default", b=32, seed=2)  # lengths 1..9 of 9: ~55% valid
    full = batch.apply(lambda t: t.clone())
    full.sequences["hist"].mask[:] = True
    assert model.packs(batch) and not model.packs(full)
    with backend("reference"):
        assert not model.packs(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not model.packs(batch)
    assert not model.packs(batch.to("meta"))
