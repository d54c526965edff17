"""Tests of dinrec.data.vocab: ids, min_count, vectorised encode, save / load."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinrec.data.vocab import OOV_ID, PAD_ID, Vocab, Vocabularies
from dinrec.errors import DinrecError


def test_special_ids_and_min_count():
    v = Vocab.build(pa.array(["a", "b", "a", None, "c", "c", "c"]), min_count=2, name="x")
    assert len(v) == 4  # pad, oov, c, a
    assert v.tokens.to_pylist() == ["c", "a"]  # by count, then token
    assert v.encode(["a", "b", "c", None, "zz"]).tolist() == [3, OOV_ID, 2, OOV_ID, OOV_ID]
    assert v.decode([PAD_ID, OOV_ID, 2, 3]) == ["<pad>", "<oov>", "c", "a"]
    assert v.counts.tolist() == [0, 0, 3, 2]
    assert "a" in v and "b" not in v
    with pytest.raises(DinrecError):
        v.decode([4])


def test_encode_accepts_numpy_chunked_and_dictionary():
    v = Vocab.build(["x", "y", "z"])
    want = v.encode(["z", "q", "x"]).tolist()
    assert v.encode(np.array(["z", "q", "x"])).tolist() == want
    assert v.encode(pa.chunked_array([["z"], ["q", "x"]])).tolist() == want
    assert v.encode(pa.array(["z", "q", "x"]).dictionary_encode()).tolist() == want
    assert v.encode([]).dtype == np.int64


def test_large_vocab_ids_beyond_float32_precision(tmp_path):
    n = 2**24 + 10  # ids above 2**24 would be corrupted by a float32 round trip
    toks = pa.array(np.arange(n)).cast(pa.string())
    v = Vocab(toks, name="big")
    probe = pa.array([str(n - 1), str(n - 2), str(2**24 + 1)])
    ids = v.encode(probe)
    assert ids.dtype == np.int64
    assert ids.tolist() == [n + 1, n, 2**24 + 3]
    v.save(tmp_path / "big.arrow")
    w = Vocab.load(tmp_path / "big.arrow")
    assert w.encode(probe).tolist() == ids.tolist()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=6), min_size=0, max_size=40), st.integers(1, 3))
def test_roundtrip_any_string(tmp_path_factory, tokens, min_count):
    v = Vocab.build(pa.array(tokens, type=pa.string()), min_count=min_count, name="t")
    path = tmp_path_factory.mktemp("v") / "t.arrow"
    v.save(path)
    w = Vocab.load(path)
    assert w == v and w.name == "t"
    ids = w.encode(pa.array(tokens, type=pa.string()))
    counts = {t: tokens.count(t) for t in tokens}
    for tok, i in zip(tokens, ids.tolist(), strict=True):
        if counts[tok] >= min_count:
            assert i >= 2 and w.decode([i]) == [tok]
        else:
            assert i == OOV_ID


def test_vocabularies_save_load(tmp_path):
    vs = Vocabularies(
        user=Vocab.build(["u1", "u2"]),
        item=Vocab.build(["i\n1", "i,2", "ü"]),
        cat=Vocab.build(["c"]),
        item_cat=np.array([0, 1, 2, 2, 2]),
    )
    vs.save(tmp_path / "vocab")
    back = Vocabularies.load(tmp_path / "vocab")
    assert back.user == vs.user and back.item == vs.item and back.cat == vs.cat
    assert back.item_cat.tolist() == [0, 1, 2, 2, 2]
    with pytest.raises(DinrecError, match="missing"):
        Vocabularies.load(tmp_path / "nothing")
