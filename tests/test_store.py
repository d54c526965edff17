"""Tests of dinrec.data.store: layout, stats, atomic writes, opening errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dinrec.data import store as store_mod
from dinrec.data.samples import BuiltSamples, PrepareConfig, SampleSet
from dinrec.data.store import SampleStore, prepare_events, prepare_samples, write_store
from dinrec.data.synthetic import generate, preset
from dinrec.data.vocab import Vocab, Vocabularies
from dinrec.errors import DinrecError


@pytest.fixture(scope="module")
def events():
    return generate(preset("tiny"))[0]


def test_layout_and_stats(tmp_path, events):
    out = tmp_path / "store"
    stats = prepare_events(events, out, PrepareConfig(shard_rows=1000, max_len=8))
    s = SampleStore.open(out)
    assert s.stats == json.loads((out / "stats.json").read_text()) == stats
    assert PrepareConfig.from_dict(json.loads((out / "prepare.json").read_text())).max_len == 8
    for split in ("train", "valid", "test"):
        files = s.files(split)
        assert files and all(f.parent.name == split for f in files)
        rows = [pq.read_metadata(f).num_rows for f in files]
        assert rows == s.shard_rows(split) and max(rows) <= 1000
        assert s.num_rows(split) == stats["rows"][split] == sum(rows)
        schema = pq.read_schema(files[0])
        assert schema.field("hist_items").type == pa.list_(pa.int64())
        assert schema.field("label").type == pa.int8() and schema.field("ts").type == pa.int64()
        h = stats["splits"][split]["history_length"]
        assert 1 <= h["min"] <= h["median"] <= h["p90"] <= h["max"] <= 8
    assert len(s.files("train")) > 1
    assert stats["items"] == len(s.vocabs.item) and stats["users"] == len(s.vocabs.user)
    assert s.item_cat.shape == (len(s.vocabs.item),)
    tr = stats["splits"]["train"]
    assert tr["positives"] == tr["negatives"]  # neg_per_pos=1
    assert not list(tmp_path.glob(".store.*"))  # no temporary left behind


def test_item_cat_table_is_consistent(tmp_path, events):
    prepare_events(events, tmp_path / "s", PrepareConfig())
    s = SampleStore(tmp_path / "s")
    t = pq.read_table(s.files("train"))
    pos = t.filter(pa.compute.equal(t.column("label"), 1))
    item, cat = pos.column("item").to_numpy(), pos.column("cat").to_numpy()
    assert np.array_equal(s.item_cat[item], cat)  # synthetic items have one category


def test_atomic_write_failure_leaves_nothing(tmp_path, events, monkeypatch):
    out = tmp_path / "store"
    calls = {"n": 0}
    real = pq.write_table

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(store_mod.pq, "write_table", failing)
    with pytest.raises(OSError, match="simulated"):
        prepare_events(events, out, PrepareConfig(shard_rows=500))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary sibling is gone too


def test_existing_store_replaced_only_on_success(tmp_path, events, monkeypatch):
    out = tmp_path / "store"
    prepare_events(events, out, PrepareConfig(max_len=3))
    before = (out / "stats.json").read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(store_mod, "compute_stats", boom)
    with pytest.raises(RuntimeError):
        prepare_events(events, out, PrepareConfig(max_len=5))
    assert (out / "stats.json").read_text() == before
    monkeypatch.undo()
    prepare_events(events, out, PrepareConfig(max_len=5))
    assert SampleStore(out).config.max_len == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_refuses_non_store_directory(tmp_path, events):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DinrecError, match="not a dinrec sample store"):
        prepare_events(events, out, PrepareConfig())
    assert (out / "precious.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_events(events, empty, PrepareConfig())  # an empty directory is fine
    SampleStore(empty)


def test_open_errors(tmp_path, events):
    with pytest.raises(DinrecError, match="does not exist"):
        SampleStore(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(DinrecError, match="not a complete sample store"):
        SampleStore(tmp_path / "half")
    prepare_events(events, tmp_path / "s", PrepareConfig())
    s = SampleStore(tmp_path / "s")
    with pytest.raises(DinrecError, match="no split 'dev'"):
        s.files("dev")
    s.files("valid")[0].unlink()
    with pytest.raises(DinrecError, match="incomplete"):
        s.files("valid")


def test_int64_ids_beyond_2_24_survive(tmp_path):
    big = np.array([2**24 + 1, 2**40 + 3, 2**53 + 1], dtype=np.int64)
    ss = SampleSet(
        label=np.array([1, 0, 1], np.int8),
        user=big,
        item=big[::-1].copy(),
        cat=big,
        hist_start=np.array([0, 1, 0]),
        hist_len=np.array([2, 2, 0]),
        hist_item_pool=big,
        hist_cat_pool=big[::-1].copy(),
    )
    v = Vocab.build(["a"])
    built = BuiltSamples({"train": ss, "valid": ss, "test": ss}, Vocabularies(v, v, v))
    write_store(built, tmp_path / "s", PrepareConfig())
    t = pq.read_table(SampleStore(tmp_path / "s").files("train")).to_pylist()
    assert [r["user"] for r in t] == big.tolist()
    assert t[1]["hist_items"] == big[1:3].tolist() and t[0]["hist_cats"] == big[::-1][:2].tolist()


def test_prepare_samples_store(tmp_path):
    n = 30
    t = pa.table(
        {
            "label": pa.array([1, 0] * (n // 2), pa.int8()),
            "user": [f"u{k}" for k in range(n)],
            "item": ["a", "b"] * (n // 2),
            "cat": ["c"] * n,
            "hist_items": pa.array([["a", "b", "a"]] * n, pa.list_(pa.string())),
            "hist_cats": pa.array([["c", "c", "c"]] * n, pa.list_(pa.string())),
        }
    )
    stats = prepare_samples({"train": t, "test": t.slice(0, 4)}, tmp_path / "s", PrepareConfig())
    assert stats["rows"]["test"] == 4 and stats["rows"]["valid"] == 3
    assert stats["rows"]["train"] == 27 and not SampleStore(tmp_path / "s").stats["has_ts"]
