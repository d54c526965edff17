"""Ranker over a rich schema: request values encoded as the data layer encodes them, candidates
scored like rows, side-table lookups vs inline attributes, OOV reports, explanations."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from dinrec.data.encode import hash_ids
from dinrec.data.store import SampleStore
from dinrec.data.vocab import OOV_ID
from dinrec.errors import DinrecError
from dinrec.models import create_model
from dinrec.serve.features import RequestEncoder, find_serving_folder
from dinrec.serve.ranker import Ranker
from serve_inputs import rich_store, rich_tables


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> SampleStore:
    return SampleStore(rich_store(tmp_path_factory.mktemp("rich") / "store"))


@pytest.fixture(scope="module")
def tables() -> dict[str, pa.Table]:
    return rich_tables()


def make_ranker(store: SampleStore, name: str = "din", seed: int = 0, **kw) -> Ranker:
    torch.manual_seed(seed)
    model = create_model(name, store.schema, store.table_sizes())
    encoder = RequestEncoder.load(find_serving_folder(store.path, None))
    return Ranker.from_parts(model, encoder, {"model": {"name": name, "config": {}}}, **kw)


@pytest.fixture(scope="module")
def ranker(store) -> Ranker:
    return make_ranker(store)


def item_row(tables, i: int) -> dict:
    r = tables["items"].slice(i, 1).to_pylist()[0]
    return {"item": r["item"], "cat": r["cat"], "genres": r["genres"].split("|"), "price": r["price"]}


def test_inline_attributes_encode_like_the_store(ranker, tables):
    """An item given with its raw attributes encodes exactly as the item side table holds it."""
    ids = [f"i{i}" for i in range(0, 60, 3)]
    inline = [item_row(tables, i) for i in range(0, 60, 3)]
    unknown: dict[str, list[str]] = {}
    by_id = ranker.encoder.candidates(ids, unknown)
    by_value = ranker.encoder.candidates(inline, unknown)
    assert set(by_id) == {"item", "cat", "genres", "price"}
    for k in by_id:
        torch.testing.assert_close(by_value[k], by_id[k], rtol=0, atol=1e-6, msg=k)
    assert by_id["genres"].shape == (20, 3) and by_id["price"].dtype == torch.float32
    # users: gender and age from the user table == given inline
    u = tables["users"].slice(4, 1).to_pylist()[0]
    a = ranker.encoder.user_features("u4", unknown)
    b = ranker.encoder.user_features({"user": "u4", "gender": u["gender"], "age": u["age"]}, unknown)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)
    assert not any(unknown.values())


def test_context_and_event_features_encode_like_the_data_layer(ranker, store):
    enc, unknown = ranker.encoder, {}
    ctx = enc.context_features({"hour": "7", "platform": "ios"}, 1, unknown)
    assert ctx["hour"][0] == store.vocabs["hour"].token_to_id("7")
    assert ctx["platform"][0] == hash_ids(pa.array(["ios"]), 16)[0]
    missing = enc.context_features({}, 1, unknown)
    assert missing["hour"][0] == OOV_ID and missing["platform"][0] == OOV_ID
    batch, used = enc.history("u1", None, {"hist": [{"item": "i1", "rating": 5, "time_gap": 30},
                                                    {"item": "i2", "time_gap": 7200}, "i3",
                                                    {"item": "i4", "time_gap": 3600}]}, unknown)
    ev = batch.sequences["hist"].events
    # 2 + the bucket (a boundary opens the next bucket, as in the store); missing -> OOV
    assert ev["time_gap"].tolist() == [[2, 4, 1, 4]]
    st = store.numeric_stats["rating"]
    assert ev["rating"][0, 0].item() == pytest.approx((5 - st["mean"]) / st["std"], abs=1e-6)
    assert ev["rating"][0, 1].item() == 0.0  # missing: the training mean
    assert batch.sequences["liked"].mask.tolist() == [[False]]  # empty sequence: one padded slot
    assert used["hist"][2] == "i3" and not any(unknown.values())


def test_candidates_score_like_rows(ranker, tables):
    history = {"hist": ["i1", {"item": "i5", "rating": 4.0}, "i9"], "liked": [{"item": "i2", "behaviour": "like"}]}
    context = {"hour": "12", "platform": "web"}
    cands = [f"i{i}" for i in range(20, 45)] + [item_row(tables, 50), {"item": "brand-new", "cat": "c2"}]
    rec = ranker.recommend("u3", cands, history, context, k=len(cands))
    rows = ranker.score([{"user": "u3", "context": context, "sequences": history, "item": c} for c in cands])
    want = dict(zip([c if isinstance(c, str) else c["item"] for c in cands], rows.probabilities, strict=True))
    got = {s.item: s.score for s in rec.ranked}
    assert got.keys() == want.keys()
    for k in got:
        assert got[k] == pytest.approx(want[k], abs=1e-5), k
    assert [s.score for s in rec.ranked] == sorted(got.values(), reverse=True)
    assert rec.unknown == {"item": ["brand-new"]} and rows.unknown == {"item": ["brand-new"]}


def test_unknown_item_with_inline_attributes_is_not_the_bare_unknown(ranker):
    p = {s.item: s.score for s in ranker.recommend(
        "u1", [{"item": "x1", "cat": "c3", "genres": ["Drama"], "price": 80.0}, "x2"],
        {"hist": ["i1", "i2"]}, k=2).ranked}
    assert p["x1"] != pytest.approx(p["x2"], abs=1e-7)


def test_explanations_name_events_with_attributes(ranker, tables):
    history = {"hist": ["i1", {"item": "i7", "rating": 2.0}, "i3", "i4"],
               "liked": [{"item": "i8", "behaviour": "like"}, "i2"]}
    rec = ranker.recommend("u2", [f"i{i}" for i in range(30, 40)], history, k=3, explain=2)
    cat7 = tables["items"].column("cat")[7].as_py()
    for s in rec.ranked:
        assert s.attributes["cat"] == tables["items"].column("cat")[int(s.item[1:])].as_py()
        by_seq: dict[str, list] = {}
        for e in s.explanation:
            by_seq.setdefault(e.sequence, []).append(e)
        assert {k: len(v) for k, v in by_seq.items()} == {"hist": 2, "liked": 2}
        for seq, es in by_seq.items():
            weights = [e.weight for e in es]
            assert weights == sorted(weights, reverse=True) and all(0 < w <= 1 for w in weights)
            for e in es:
                entry = history[seq][e.position]
                assert e.event["item"] == (entry if isinstance(entry, str) else entry["item"])
                assert set(e.event) >= {"item", "cat", "genres", "price"}
                if e.event["item"] == "i7":
                    assert e.event["rating"] == 2.0 and e.event["cat"] == cat7
    assert all(s.explanation == [] for s in ranker.recommend("u2", ["i1"], {}, explain=3).ranked)


def test_history_is_cut_to_max_len_and_bad_arguments(ranker):
    long = [f"i{i % 80}" for i in range(100)]
    a = ranker.rank("u1", long, ["i3", "i4"], k=2)
    b = ranker.rank("u1", long[-30:], ["i3", "i4"], k=2)
    assert len(a.history["hist"]) == 30 == ranker.max_len
    assert [s.score for s in a.ranked] == [s.score for s in b.ranked]
    with pytest.raises(DinrecError, match="empty"):
        ranker.rank("u", [], [])
    with pytest.raises(DinrecError, match="k must"):
        ranker.rank("u", [], ["x"], k=0)
    picked = ranker.sample_candidates(15, exclude=["i1", "i2"], seed=1)
    assert len(set(picked)) == 15 and not {"i1", "i2"} & set(picked)


@pytest.mark.parametrize("name", ["base", "pnn", "dien", "aigru"])
def test_every_family_ranks(store, name):
    r = make_ranker(store, name)
    rec = r.recommend("u1", [f"i{i}" for i in range(10)], {"hist": ["i1", "i2", "i3"], "liked": ["i4"]},
                      k=4, explain=1)
    rows = r.score([{"user": "u1", "sequences": {"hist": ["i1", "i2", "i3"], "liked": ["i4"]}, "item": s.item}
                    for s in rec.ranked])
    np.testing.assert_allclose([s.score for s in rec.ranked], rows.probabilities, atol=1e-5)
    assert all((len(s.explanation) > 0) == r.has_attention for s in rec.ranked)


def test_bfloat16_precision_is_close(store, ranker):
    fast = make_ranker(store, precision="bfloat16")
    cands = [f"i{i}" for i in range(2, 80)]
    a = ranker.rank("u1", [f"i{i}" for i in range(30)], cands, k=len(cands))
    b = fast.rank("u1", [f"i{i}" for i in range(30)], cands, k=len(cands))
    pa_, pb = ({s.item: s.score for s in x.ranked} for x in (a, b))
    assert max(abs(pa_[k] - pb[k]) for k in pa_) < 5e-3
    with pytest.raises(DinrecError, match="precision"):
        make_ranker(store, precision="float8")


def test_attributes_read_back_as_given(ranker, tables):
    """Decoded item attributes are the raw values of the item table (log features too)."""
    rec = ranker.recommend("u1", ["i12", "i13"], {"hist": ["i14"]}, k=2, explain=1)
    for s in rec.ranked:
        want = item_row(tables, int(s.item[1:]))
        assert s.attributes["cat"] == want["cat"] and sorted(s.attributes["genres"]) == sorted(want["genres"])
        assert s.attributes["price"] == pytest.approx(want["price"], rel=1e-6)
        assert s.explanation[0].event["price"] == pytest.approx(item_row(tables, 14)["price"], rel=1e-6)
