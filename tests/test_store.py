"""Tests of dinrec.data.store: layout, stats, atomic writes, opening errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dinrec.data import store as store_mod
from dinrec.data.samples import PrepareConfig, Sequences
from dinrec.data.schema import Schema
from dinrec.data.store import SampleStore, prepare_events, prepare_samples
from dinrec.data.synthetic import generate, preset
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
        assert schema.names == ["label", "user", "item", "seq", "end.hist", "ts"]
        assert schema.field("seq").type == pa.int64() and schema.field("end.hist").type == pa.int32()
        assert schema.field("label").type == pa.int8() and schema.field("ts").type == pa.int64()
        h = stats["splits"][split]["history_length"]
        assert 1 <= h["min"] <= h["median"] <= h["p90"] <= h["max"] <= 8
    assert len(s.files("train")) > 1
    assert stats["items"] == len(s.vocabs.item) and stats["users"] == len(s.vocabs.user)
    assert s.table_sizes() == {"user": stats["users"], "item": stats["items"],
                               "cat": stats["categories"]}
    assert s.item_cat.shape == (len(s.vocabs.item),)
    assert s.schema == Schema.default(8) == Schema.load(out / "schema.json")
    assert len(s.items) == stats["keys"]["items"] >= len(s.vocabs.item)
    assert len(s.users) == stats["keys"]["users"] == len(set(events.column("user").to_pylist())) + 2
    seqs = pa.ipc.open_file(out / "sequences.arrow").read_all()
    assert seqs.schema.field("hist.items").type == pa.large_list(pa.int64())
    assert seqs.num_rows == stats["sequences"]["hist"]["count"] == len(s.sequences["hist"])
    assert stats["sequences"]["hist"]["ids"] == int(s.sequences["hist"].offsets[-1])
    tr = stats["splits"]["train"]
    assert tr["positives"] == tr["negatives"]  # neg_per_pos=1
    assert not list(tmp_path.glob(".store.*"))  # no temporary left behind


def test_item_cat_table_is_consistent(tmp_path):
    events, truth = generate(preset("tiny"))
    prepare_events(events, tmp_path / "s", PrepareConfig())
    s = SampleStore(tmp_path / "s")
    items = s.items
    keys = np.arange(2, len(items))  # every item of the input, in train or not
    toks = items.tokens.take(pa.array(keys)).to_pylist()
    cats = s.vocabs.cat.decode(items.features["cat"][keys])
    assert cats == [f"c{c}" for c in truth.item_cat[[int(t[1:]) for t in toks]]]
    ids = items.features["item"][keys]
    known = ids >= 2
    assert np.array_equal(s.item_cat[ids[known]], items.features["cat"][keys[known]])


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


def test_int64_values_beyond_2_53_survive(tmp_path):
    big = 2**53 + np.arange(1, 7, dtype=np.int64) * 2**40  # not representable as float64 steps
    t = pa.table({"user": ["a", "a", "a", "b", "b", "b"], "item": ["x", "y", "z", "x", "y", "z"],
                  "ts": pa.array(big, pa.int64())})
    prepare_events(t, tmp_path / "s", PrepareConfig(neg_per_pos=0, min_history=0))
    s = SampleStore(tmp_path / "s")
    got = sorted(r["ts"] for split in ("train", "valid", "test")
                 for r in pq.read_table(s.files(split)).to_pylist())
    assert got == big.tolist()


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


def test_old_format_store_is_refused(tmp_path, events):
    from dinrec.data import BatchLoader

    out = tmp_path / "s"
    prepare_events(events, out, PrepareConfig())
    stats = json.loads((out / "stats.json").read_text())
    for old in (1, 2, None):  # 1: per-row history lists, 2: no schema; or no version at all
        if old is None:
            del stats["version"]
        else:
            stats["version"] = old
        (out / "stats.json").write_text(json.dumps(stats))
        with pytest.raises(DinrecError, match=r"older dinrec.*run `dinrec prepare` again"):
            SampleStore(out)
        with pytest.raises(DinrecError, match="older dinrec"):
            BatchLoader(out, "train")
    prepare_events(events, out, PrepareConfig())  # an old store is replaced
    assert SampleStore(out).stats["version"] == store_mod.STORE_VERSION


def test_missing_or_corrupt_sequences_is_a_clear_error(tmp_path, events):
    from dinrec.data import BatchLoader

    out = tmp_path / "s"
    prepare_events(events, out, PrepareConfig())
    (out / "sequences.arrow").write_bytes(b"not arrow")
    with pytest.raises(DinrecError, match="sequences.arrow is missing or corrupt"):
        BatchLoader(out, "train")
    (out / "sequences.arrow").unlink()
    with pytest.raises(DinrecError, match="prepare the store again"):
        _ = SampleStore(out).sequences
    store_mod.write_sequences({"hist": Sequences(np.array([0, 1]), np.array([5]))},
                              out / "sequences.arrow")  # fewer sequences than the rows use
    with pytest.raises(DinrecError, match="points outside the store's sequences"):
        next(iter(BatchLoader(out, "train")))


def _store_rows(out) -> dict[str, list[dict]]:
    """Every row of a store with its history resolved in plain Python from the files: item
    tokens (``hist``) and category ids (``hist_cats``) by key from the item side table."""
    seqs = pa.ipc.open_file(out / "sequences.arrow").read_all().to_pylist()
    items = pa.ipc.open_file(out / "items.arrow").read_all().to_pydict()
    cut = json.loads((out / "prepare.json").read_text())["max_len"]
    s = SampleStore(out)
    rows = {}
    for split in ("train", "valid", "test"):
        rows[split] = pq.read_table(s.files(split)).to_pylist()
        for r in rows[split]:
            end = r["end.hist"]
            keys = seqs[r["seq"]]["hist.items"][max(0, end - cut) : end]
            r["hist"] = [items["token"][k] for k in keys]
            r["hist_cats"] = [items["cat"][k] for k in keys]
    return rows


def test_histories_are_exactly_the_previous_positives(tmp_path):
    # three users, explicit negatives, out-of-order timestamps, histories longer than max_len
    rng = np.random.default_rng(0)
    n = 90
    users = rng.choice(["u0", "u1", "u2"], n)
    ts = rng.permutation(n)  # distinct times: each (user, ts) names one event
    items = [f"i{k}" for k in rng.integers(0, 12, n)]
    labels = (rng.random(n) < 0.8).astype(np.int8)
    t = pa.table({"user": users, "item": items, "cat": [i[:2] for i in items],
                  "ts": pa.array(ts, pa.int64()), "label": labels})
    out = tmp_path / "s"
    prepare_events(t, out, PrepareConfig(max_len=4, neg_per_pos=2))
    store = SampleStore(out)
    v = store.vocabs
    rows = _store_rows(out)
    n_rows = 0
    for split, split_rows in rows.items():
        for r in split_rows:
            user = store.users.tokens[r["user"]].as_py()
            before = sorted((int(ts[e]), items[e]) for e in range(n)
                            if users[e] == user and labels[e] == 1 and ts[e] < r["ts"])
            want = [i for _, i in before][-4:]
            assert r["hist"] == want, (split, r)
            assert r["hist_cats"] == v.cat.encode([w[:2] for w in want]).tolist()
            n_rows += 1
    assert n_rows == sum(SampleStore(out).stats["rows"].values())
    # one sequence per user: all of their positives in time order
    seqs = pa.ipc.open_file(out / "sequences.arrow").read_all().to_pylist()
    lens = sorted(len(q["hist.items"]) for q in seqs)
    assert lens == sorted(int(((users == u) & (labels == 1)).sum()) for u in ("u0", "u1", "u2"))


def test_ready_samples_dedupe_identical_histories(tmp_path):
    hist = [["a", "b", "c"], ["a", "b", "c"], ["x"], ["x"], ["a", "b", "c"], [], [],
            ["z", "b", "c"], ["q", "a", "b", "c"]]  # the last is ["a", "b", "c"] after the cut
    n = len(hist)
    t = pa.table({
        "label": pa.array([1, 0] * (n // 2) + [1], pa.int8()),
        "user": [f"u{k // 2}" for k in range(n)],
        "item": ["a"] * n,
        "cat": ["ka"] * n,
        "hist_items": pa.array(hist, pa.list_(pa.string())),
        "hist_cats": pa.array([["k" + h for h in x] for x in hist], pa.list_(pa.string())),
    })
    cfg = PrepareConfig(max_len=3)
    stats = prepare_samples({"train": t, "valid": t, "test": t}, tmp_path / "s", cfg)
    # distinct histories after the cut: abc, x, [], zbc (the same in every split)
    assert stats["sequences"]["hist"] == {"count": 4, "ids": 3 + 1 + 0 + 3}
    s = SampleStore(tmp_path / "s")
    rows = _store_rows(tmp_path / "s")
    assert [r["hist"] for r in rows["test"]] == [h[-3:] for h in hist]
    assert [s.vocabs.cat.decode(r["hist_cats"]) for r in rows["test"]] == [
        ["k" + x for x in h[-3:]] for h in hist]
    assert sorted(tuple(r["hist"]) for r in rows["train"]) == sorted(tuple(h[-3:]) for h in hist)
