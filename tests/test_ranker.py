"""Ranker: token and id scoring, OOV reporting, candidates == rows, explanations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinrec.data.vocab import OOV_ID
from dinrec.errors import DinrecError
from dinrec.serve.ranker import Ranker, TokenIndex


@pytest.fixture(scope="module")
def ranker(tiny_din_run) -> Ranker:
    return Ranker(tiny_din_run)


def _items(ranker: Ranker, n: int, start: int = 2) -> list[str]:
    return ranker.index["item"].tokens[start:start + n]


def test_token_index_matches_vocab(ranker):
    vocab = ranker.vocabs.item
    tokens = [*_items(ranker, 20), "nope", "", "<pad>", "<oov>", *_items(ranker, 5, 40)]
    unknown: list[str] = []
    ids = TokenIndex(vocab).encode(tokens, unknown)
    np.testing.assert_array_equal(ids, vocab.encode(tokens))
    assert unknown == ["nope", "", "<pad>", "<oov>"]
    assert ranker.vocab_sizes == {"user": len(ranker.vocabs.user), "item": len(vocab),
                                  "cat": len(ranker.vocabs.cat)}


def test_rank_sorted_and_equal_to_row_scores(ranker):
    user = ranker.index["user"].tokens[3]
    history, candidates = _items(ranker, 12), _items(ranker, 30, 50)
    rec = ranker.rank(user, history, candidates, k=7)
    scores = [s.score for s in rec.ranked]
    assert len(scores) == 7 and scores == sorted(scores, reverse=True)
    assert rec.unknown == {} and rec.history == history
    # The candidate path (history once) equals scoring each (user, history, item) row.
    rows = ranker.score([(user, history, c) for c in candidates])
    by_item = dict(zip(candidates, rows.probabilities, strict=True))
    for s in rec.ranked:
        assert s.score == pytest.approx(by_item[s.item], abs=1e-5)
    assert max(rows.probabilities) == pytest.approx(scores[0], abs=1e-5)


def test_unknown_tokens_map_to_oov_and_are_reported(ranker):
    history = [*_items(ranker, 5), "h?"]
    rec = ranker.rank("who?", history, ["c?", *_items(ranker, 3, 60)], k=10)
    assert rec.unknown == {"user": ["who?"], "item": ["h?", "c?"]}
    assert len(rec.ranked) == 4  # k is cut to the number of candidates
    # Same scores as the OOV ids.
    hist_ids = [*ranker.index["item"].encode(history[:-1]).tolist(), OOV_ID]
    cand_ids = [OOV_ID, *ranker.index["item"].encode(_items(ranker, 3, 60)).tolist()]
    ids = ranker.score_candidate_ids(OOV_ID, hist_ids, cand_ids)
    got = {s.item: s.score for s in rec.ranked}
    assert got["c?"] == pytest.approx(float(ids.probabilities[0]), abs=1e-6)


def test_id_level_out_of_range_ids(ranker):
    n_items = ranker.vocab_sizes["item"]
    out = ranker.score_candidate_ids(10**9, [2, 3, -5], [4, n_items, 5])
    assert out.unknown == {"user": [10**9], "item": [-5, n_items]}
    ref = ranker.score_candidate_ids(OOV_ID, [2, 3, OOV_ID], [4, OOV_ID, 5])
    np.testing.assert_allclose(out.probabilities, ref.probabilities, atol=1e-7)
    with pytest.raises(DinrecError, match="integers"):
        ranker.score_candidate_ids(2, ["a"], [3])
    with pytest.raises(DinrecError, match="empty"):
        ranker.score_candidate_ids(2, [3], [])


def test_id_rows_match_model_forward(ranker):
    from dinrec.data.batches import Batch

    hists = [[2, 3, 4], [], [5] * 150]  # empty history; one longer than max_len
    probs, unknown = ranker.score_id_rows([2, 3, 4], hists, [7, 8, 9])
    assert unknown == {} and probs.shape == (3,)
    t = ranker.max_len
    hist = torch.zeros(3, t, dtype=torch.int64)
    hist[0, :3] = torch.tensor([2, 3, 4])
    hist[2, :] = 5
    cat = torch.from_numpy(ranker.item_cat)
    with torch.no_grad():
        want = torch.sigmoid(ranker.model(Batch(
            user=torch.tensor([2, 3, 4]), item=torch.tensor([7, 8, 9]), cat=cat[[7, 8, 9]],
            hist_items=hist, hist_cats=cat[hist], mask=hist != 0, label=torch.zeros(3),
        )).logits)
    np.testing.assert_allclose(probs, want.numpy(), atol=1e-5)


def test_explanations(ranker):
    history = _items(ranker, 8)
    rec = ranker.rank(ranker.index["user"].tokens[2], history, _items(ranker, 10, 30), k=3, explain=4)
    for s in rec.ranked:
        assert len(s.explanation) == 4
        weights = [e.weight for e in s.explanation]
        assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1 + 1e-6
        for e in s.explanation:
            assert history[e.position] == e.item
            assert e.category == ranker.vocabs.cat.id_to_token(int(ranker.item_cat[ranker.index["item"].ids[e.item]]))
    assert all(s.explanation == [] for s in ranker.rank("u", [], _items(ranker, 3), explain=3).ranked)


def test_history_is_cut_to_max_len(ranker):
    long = _items(ranker, 150)
    rec = ranker.rank("u", long, _items(ranker, 5, 200), k=5)
    assert rec.history == long[-ranker.max_len:]
    assert [s.score for s in rec.ranked] == [s.score for s in ranker.rank("u", long[-ranker.max_len:], _items(ranker, 5, 200), k=5).ranked]


def test_bad_arguments_and_sampling(ranker):
    with pytest.raises(DinrecError, match="empty"):
        ranker.rank("u", [], [])
    with pytest.raises(DinrecError, match="k must"):
        ranker.rank("u", [], ["x"], k=0)
    exclude = _items(ranker, 20)
    picked = ranker.sample_candidates(15, exclude=exclude, seed=1)
    assert len(set(picked)) == 15 and not set(picked) & set(exclude)


def test_bfloat16_precision_is_close_to_float32(tiny_din_run, ranker):
    fast = Ranker(tiny_din_run, precision="bfloat16")
    assert fast.precision == "bfloat16" and ranker.precision == "float32"
    users = ranker.index["user"].tokens[2:5]
    history, candidates = _items(ranker, 30), _items(ranker, 200, 40)
    for user in users:
        want = ranker.score_candidate_ids(ranker.index["user"].encode([user])[0],
                                          ranker.index["item"].encode(history),
                                          ranker.index["item"].encode(candidates))
        got = fast.score_candidate_ids(ranker.index["user"].encode([user])[0],
                                       ranker.index["item"].encode(history),
                                       ranker.index["item"].encode(candidates))
        np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=0, atol=5e-3)
    with pytest.raises(DinrecError, match="precision"):
        Ranker(tiny_din_run, precision="float8")
    with pytest.raises(DinrecError, match="ONNX"):
        Ranker(tiny_din_run, precision="bfloat16", onnx=tiny_din_run / "model.onnx")
