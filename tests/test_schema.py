"""The feature schema through the data layer: round trip, today's results under the default
schema, every feature kind end to end (prepare -> store -> batch), hashing, several
sequences, leak checks with several sequences, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dinrec.data import BatchLoader, PrepareConfig, SampleStore, prepare_events, prepare_samples
from dinrec.data.encode import hash_ids
from dinrec.data.schema import Feature, Schema, SchemaError, SequenceSpec
from dinrec.errors import DinrecError

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_data_default_schema as today  # noqa: E402

# ---------------------------------------------------------------------------- a rich log
EVENTS = [  # user, item, ts, rating, hour, label
    ("a", "m1", 10, 5.0, "h9", 1), ("a", "m2", 20, 2.0, "h9", 1), ("a", "m3", 30, 4.0, "h10", 1),
    ("a", "m4", 40, 1.0, "h11", 0), ("a", "m5", 50, 5.0, "h11", 1), ("a", "m6", 60, 3.0, "h12", 1),
    ("a", "m7", 70, 4.5, "h9", 1), ("b", "m2", 15, 4.0, "h9", 1), ("b", "m1", 25, 1.0, "h10", 1),
    ("b", "m3", 35, 5.0, "h10", 1), ("b", "m8", 45, 2.0, "h10", 1), ("b", "m5", 55, 4.0, "h9", 1),
    ("b", "m9", 65, 5.0, "h12", 1), ("c", "m1", 5, 4.0, "h9", 1), ("c", "m4", 6, 3.0, "h9", 1),
    ("c", "m2", 7, 5.0, "h10", 1), ("c", "m6", 8, 4.0, "h10", 1), ("c", "m7", 9, 1.0, "h11", 1),
    ("c", "m10", 10, 4.0, "h11", 1), ("d", "m3", 100, 4.0, "h9", 1), ("d", "m11", 200, 2.0, "h9", 1),
    ("d", "m1", 300, 5.0, "h9", 1), ("e", "m2", 1, 1.0, "h9", 1), ("e", "m5", 2, 2.0, "h9", 1),
    ("e", "m8", 3, 1.0, "h10", 1), ("e", "m9", 4, 2.0, "h10", 1), ("e", "m1", 5, 5.0, "h9", 1),
    ("e", "m3", 6, 4.0, "h9", 1), ("e", "m6", 7, 3.0, "h12", 1), ("e", "m7", 8, 5.0, "h9", 1),
]
ITEMS = [  # item, brand, genres, price
    ("m1", "sony", "Drama|Comedy|War", 10.0), ("m2", "fox", "Comedy", 3.0),
    ("m3", "sony", "", 100.0), ("m4", "wb", "Drama|Horror", None), ("m5", "fox", "Horror", 7.0),
    ("m6", "wb", "War|Drama", 1.0), ("m7", "sony", "Comedy|Drama", 20.0),
    ("m8", "mgm", "Horror", 5.0), ("m9", "mgm", "Drama", 8.0), ("m10", "fox", "War", 2.0),
    ("m11", "zzz", "Sci|Fi", 6.0), ("m12", "sony", "Drama", 9.0),
]
USERS = [("a", "F", 25.0), ("b", "M", 40.0), ("c", "F", 17.0), ("d", None, 60.0),
         ("e", "M", 33.0)]
RICH = {
    "user": ["user", "gender", {"name": "age", "kind": "numeric", "boundaries": [18, 30, 50]}],
    "item": ["item", "brand", {"name": "genres", "kind": "multi", "max_values": 2},
             {"name": "price", "kind": "numeric", "log": True}],
    "context": ["hour"],
    "sequences": [
        {"name": "liked", "max_len": 3, "filter_column": "rating", "values": [">=4"],
         "event_features": [{"name": "rating", "kind": "numeric"},
                            {"name": "time_gap", "kind": "numeric", "boundaries": [5, 50]}]},
        {"name": "disliked", "max_len": 2, "filter_column": "rating", "values": ["<4"]},
    ],
    "embedding_dim": 8,
}


def rich_tables() -> tuple[pa.Table, pa.Table, pa.Table]:
    u, i, t, r, h, lab = zip(*EVENTS, strict=True)
    events = pa.table({"user": list(u), "item": list(i), "ts": pa.array(t, pa.int64()),
                       "rating": pa.array(r, pa.float64()), "hour": list(h),
                       "label": pa.array(lab, pa.int8())})
    it, br, g, p = zip(*ITEMS, strict=True)
    items = pa.table({"item": list(it), "brand": list(br), "genres": list(g),
                      "price": pa.array(p, pa.float64())})
    uu, gg, aa = zip(*USERS, strict=True)
    users = pa.table({"user": list(uu), "gender": pa.array(gg, pa.string()),
                      "age": pa.array(aa, pa.float64())})
    return events, items, users


@pytest.fixture(scope="module")
def rich_store(tmp_path_factory) -> SampleStore:
    events, items, users = rich_tables()
    out = tmp_path_factory.mktemp("rich") / "s"
    prepare_events(events, out, PrepareConfig(neg_per_pos=0, max_len=3), Schema.from_dict(RICH),
                   items=items, users=users)
    return SampleStore(out)


def read_rows(store: SampleStore, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in store.files(split)])


def all_batches(store: SampleStore, split: str, **kw) -> list:
    return list(BatchLoader(store, split, batch_size=5, shuffle=False, **kw))


# ---------------------------------------------------------------------------- round trip
def test_schema_round_trip_and_store_keeps_it(rich_store):
    s = Schema.from_dict(RICH)
    assert Schema.from_json(s.to_json()) == s
    assert rich_store.schema == s
    assert json.loads((rich_store.path / "schema.json").read_text()) == s.to_dict()
    d = Schema.default(7)
    assert Schema.from_json(d.to_json()) == d and d.is_default()


# ---------------------------------------------------------------------------- today's results
def _old_rows(store: SampleStore) -> dict[str, np.ndarray]:
    """The store in the flat form of the fixture (ids, histories as padded id lists)."""
    out: dict[str, np.ndarray] = {}
    items, users, seq = store.items, store.users, store.sequences["hist"]
    item_id, cat_id = items.features["item"], items.features["cat"]
    for split in ("train", "valid", "test"):
        t = read_rows(store, split)
        ik, uk = t.column("item").to_numpy(), t.column("user").to_numpy()
        out[f"{split}.label"] = t.column("label").to_numpy()
        out[f"{split}.user"] = users.features["user"][uk]
        out[f"{split}.item"], out[f"{split}.cat"] = item_id[ik], cat_id[ik]
        if "ts" in t.column_names:
            out[f"{split}.ts"] = t.column("ts").to_numpy()
        hists = [seq.history(q, e, store.max_len) for q, e in
                 zip(t.column("seq").to_numpy(), t.column("end.hist").to_numpy(), strict=True)]
        out[f"{split}.hist_items"] = today.padded([item_id[h].tolist() for h in hists])
        out[f"{split}.hist_cats"] = today.padded([cat_id[h].tolist() for h in hists])
    for name in ("user", "item", "cat"):
        voc = getattr(store.vocabs, name)
        out[f"vocab.{name}.tokens"] = np.array(voc.tokens.to_pylist(), dtype=object).astype(str)
        out[f"vocab.{name}.counts"] = voc.counts
    out["vocab.item_cat"] = store.item_cat
    return {k: v.astype(np.int64) if v.dtype.kind == "i" else v for k, v in out.items()}


def _flat(b) -> dict[str, np.ndarray]:
    h = b.sequences["hist"]
    out = {"label": b.label, "user": b.user["user"], "item": b.item["item"],
           "cat": b.item["cat"], "hist_items": h.items["item"], "hist_cats": h.items["cat"],
           "mask": h.mask}
    if h.neg is not None:
        out["neg_items"], out["neg_cats"] = h.neg["item"], h.neg["cat"]
    return {k: v.numpy() for k, v in out.items()}


@pytest.fixture(scope="module")
def recorded() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "data_default_schema.npz"))


@pytest.mark.parametrize("case", ["tiny_llo", "tiny_user", "tiny_time", "hand", "ready"])
def test_default_schema_reproduces_todays_rows_and_batches(tmp_path, recorded, case):
    """Rows, histories, vocabularies and batches equal those of the code before the schema
    (``tests/fixtures/make_data_default_schema.py``, run on commit 8cc926c)."""
    name, kind, data, cfg = next(c for c in today.cases() if c[0] == case)
    (prepare_events if kind == "events" else prepare_samples)(data, tmp_path / "s", cfg)
    store = SampleStore(tmp_path / "s")
    assert store.schema == Schema.default(cfg.max_len)
    for k, v in _old_rows(store).items():
        want = recorded[f"{name}/{k}"]
        assert want.shape == v.shape and (want == v).all(), k
    n = 0
    for lname, (split, kw, count) in today.LOADERS.items():
        for j, b in enumerate(BatchLoader(store, split, **kw)):
            if j >= count:
                break
            for k, v in _flat(b).items():
                want = recorded[f"{name}/batch.{lname}.{j}.{k}"]
                assert want.shape == v.shape and (want == v).all(), (lname, j, k)
                n += 1
    assert n == sum(k.startswith(f"{name}/batch.") for k in recorded) > 10  # all compared


def test_default_schema_reproduces_the_demo_store_and_batches(tmp_path, recorded):
    """The demo's store and every batch of its loaders hash as before (digests)."""
    got = today.demo_digests(tmp_path, rows=_old_rows, batch=_flat)
    for k, v in got.items():
        assert str(recorded[f"demo/{k}"]) == v, k


# ---------------------------------------------------------------------------- rich schema
def _reference(max_len: int = 3) -> dict[str, list[tuple]]:
    """Slow leave-last-out reference of the rich log in tokens: per sample (label, user,
    item, hour, liked items, liked ratings, liked gap buckets, disliked items)."""
    by_user: dict[str, list] = {}
    for n, e in enumerate(EVENTS):
        by_user.setdefault(e[0], []).append((e[2], n, e))
    out: dict[str, list[tuple]] = {"train": [], "valid": [], "test": []}
    for user, evs in by_user.items():
        evs.sort(key=lambda x: (x[0], x[1]))
        pos = [e for _, _, e in evs if e[5] == 1]
        k = 0
        for _, _, e in evs:
            split = "test" if k >= len(pos) - 1 else "valid" if k == len(pos) - 2 else "train"
            if k >= 1:
                before = pos[:k]
                liked = [p for p in before if p[3] >= 4][-max_len:]
                disliked = [p for p in before if p[3] < 4][-2:]
                gaps = tuple(int(np.searchsorted([5, 50], e[2] - p[2], side="right")) for p in liked)
                out[split].append((e[5], user, e[1], e[4], tuple(p[1] for p in liked),
                                   tuple(p[3] for p in liked), gaps, tuple(p[1] for p in disliked)))
            k += e[5] == 1
    return out


def test_rich_schema_rows_and_sequences_match_a_slow_reference(rich_store):
    store = rich_store
    items, users = store.items, store.users
    tok_i = np.array(items.tokens.to_pylist(), dtype=object)
    tok_u = np.array(users.tokens.to_pylist(), dtype=object)
    hour = store.vocabs.hour
    train_hours = {e[4] for e in _train_events()}
    assert set(hour.tokens.to_pylist()) == train_hours  # the vocabulary: training events only
    ref = {k: [(*r[:3], r[3] if r[3] in train_hours else "<oov>", *r[4:]) for r in v]
           for k, v in _reference().items()}
    st = store.numeric_stats["rating"]
    for split in ("train", "valid", "test"):
        rows = read_rows(store, split)
        got = []
        at = 0
        for b in all_batches(store, split):
            liked, disliked = b.sequences["liked"], b.sequences["disliked"]
            for r in range(len(b)):
                row = {k: rows.column(k)[at + r].as_py() for k in rows.column_names}
                m1 = liked.mask[r].numpy()
                rating = liked.events["rating"][r].numpy()[m1] * st["std"] + st["mean"]
                got.append((
                    int(b.label[r]), tok_u[int(b.group[r])], tok_i[row["item"]],
                    hour.id_to_token(int(b.context["hour"][r])),
                    _history(store, row, "liked", liked, r, tok_i),
                    tuple(float(round(x, 6)) for x in rating),
                    tuple(int(g) - 2 for g in liked.events["time_gap"][r].numpy()[m1]),
                    _history(store, row, "disliked", disliked, r, tok_i),
                ))  # fmt: skip
            at += len(b)
        assert sorted(got) == sorted(ref[split]), split


def _history(store: SampleStore, row: dict, name: str, seq, r: int, tok_i) -> tuple[str, ...]:
    """Item tokens of one row's history, by the keys the store holds; the batch's item ids
    and mask must be those of the same keys."""
    keys = store.sequences[name].history(row["seq"], row[f"end.{name}"], store.max_len)
    keys = keys[-store.schema.sequence(name).max_len :]
    m = seq.mask[r].numpy()
    assert m.sum() == len(keys) and not m[len(keys) :].any()
    assert seq.items["item"][r].numpy()[m].tolist() == store.items.features["item"][keys].tolist()
    return tuple(tok_i[keys])


def test_rich_item_and_user_features_are_encoded_from_the_side_tables(rich_store):
    store = rich_store
    v, stats = store.vocabs, store.numeric_stats
    attrs = {i: (b, g, p) for i, b, g, p in ITEMS}
    seen = 0
    for split in ("train", "valid", "test"):
        rows = read_rows(store, split)
        keys = rows.column("item").to_numpy()
        at = 0
        for b in all_batches(store, split):
            for r in range(len(b)):
                tok = store.items.tokens[int(keys[at + r])].as_py()
                brand, genres, price = attrs[tok]
                assert int(b.item["brand"][r]) == v.brand.token_to_id(brand)
                want_g = [v.genres.token_to_id(x) for x in genres.split("|") if x][:2]
                assert b.item["genres"][r].tolist() == want_g + [0] * (2 - len(want_g))
                want_p = 0.0 if price is None else (math.log1p(price) - stats["price"]["mean"]) / stats["price"]["std"]
                assert float(b.item["price"][r]) == pytest.approx(want_p, abs=1e-5)
                utok = store.users.tokens[int(b.group[r])].as_py()
                _, gender, age = next(x for x in USERS if x[0] == utok)
                assert int(b.user["gender"][r]) == (v.gender.token_to_id(gender) if gender else 1)
                assert int(b.user["age"][r]) == 2 + int(np.searchsorted([18, 30, 50], age, side="right"))
                seen += 1
            at += len(b)
    assert seen == sum(store.num_rows(s) for s in ("train", "valid", "test")) > 10


def test_items_unseen_in_train_keep_their_attributes(rich_store):
    """m10 is only c's test target: its item id is OOV, but it keeps its brand 'fox' (known
    from training items); m12 is only in the item side table and keeps its genre."""
    store = rich_store
    items = store.items
    k10 = int(items.keys_of(["m10"])[0])
    assert k10 >= items.n_known  # not a training item
    assert items.features["item"][k10] == 1  # OOV id ...
    assert items.features["brand"][k10] == store.vocabs.brand.token_to_id("fox")  # ... known brand
    k12 = int(items.keys_of(["m12"])[0])  # only in the side table
    assert items.features["genres"][k12].tolist() == [store.vocabs.genres.token_to_id("Drama"), 0]


def test_numeric_statistics_come_from_training_events(rich_store):
    tr = [e for e in _train_events()]
    r = np.array([e[3] for e in tr])
    st = rich_store.numeric_stats["rating"]
    assert st["mean"] == pytest.approx(r.mean()) and st["std"] == pytest.approx(r.std())
    prices = dict((i, p) for i, _, _, p in ITEMS)
    lp = np.array([math.log1p(prices[e[1]]) for e in tr if prices[e[1]] is not None])
    assert rich_store.numeric_stats["price"]["mean"] == pytest.approx(lp.mean())


def _train_events() -> list[tuple]:
    """Events in leave-last-out's train split (before each user's second last positive)."""
    out = []
    for user in {e[0] for e in EVENTS}:
        evs = sorted((e for e in EVENTS if e[0] == user), key=lambda e: e[2])
        n_pos = sum(e[5] for e in evs)
        k = 0
        for e in evs:
            if k < n_pos - 2:
                out.append(e)
            k += e[5]
    return out


def test_two_sequences_have_their_own_masks_and_lengths(rich_store):
    for b in all_batches(rich_store, "train") + all_batches(rich_store, "test"):
        liked, disliked = b.sequences["liked"], b.sequences["disliked"]
        for s, cap in ((liked, 3), (disliked, 2)):
            assert s.mask.shape[1] <= cap and s.mask.sum(1).max() <= cap
            assert ((s.items["item"] != 0) == s.mask).all()  # every history item is known here
            assert (s.items["genres"][~s.mask] == 0).all() and (s.items["price"][~s.mask] == 0).all()
        assert not torch_equal(liked.mask.sum(1), disliked.mask.sum(1)) or len(b) == 0


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_neg_history_gives_item_features_of_negatives(rich_store):
    for b in BatchLoader(rich_store, "train", batch_size=4, neg_history=3, seed=1):
        s = b.sequences["liked"]
        assert b.sequences["disliked"].neg is None
        neg = s.neg
        assert neg["item"].shape == (*s.mask.shape, 3) and neg["genres"].shape == (*s.mask.shape, 3, 2)
        assert ((neg["item"] >= 2) == s.mask[..., None]).all()
        assert (neg["item"] != s.items["item"][..., None])[s.mask].all()
        ik = neg["item"][s.mask].reshape(-1).numpy()  # keys == ids for known items
        assert (neg["brand"][s.mask].reshape(-1).numpy() == rich_store.items.features["brand"][ik]).all()


def test_group_is_the_raw_user_even_when_the_user_id_is_oov(tmp_path):
    from dinrec.data import generate, preset

    events, _ = generate(preset("tiny", seed=1))
    prepare_events(events, tmp_path / "s", PrepareConfig(split="by-user"))
    store = SampleStore(tmp_path / "s")
    groups, toks = [], store.users.tokens
    for b in BatchLoader(store, "test", batch_size=64, shuffle=False):
        assert (b.user["user"] == 1).all()  # every test user is unseen in train
        groups.append(b.group.numpy())
    g = np.concatenate(groups)
    rows = read_rows(store, "test")
    assert len(np.unique(g)) == store.stats["splits"]["test"]["users"] > 5
    assert set(toks.take(pa.array(g)).to_pylist()) <= set(events.column("user").to_pylist())
    assert (g == rows.column("user").to_numpy()).all()


# ---------------------------------------------------------------------------- hashing
def test_hashing_is_deterministic_across_processes():
    tokens = ["a", "b", "", "ünï", "x" * 300, "a|b"]
    here = hash_ids(pa.array(tokens), 1000).tolist()
    code = ("import pyarrow as pa, json; from dinrec.data.encode import hash_ids; "
            f"print(json.dumps(hash_ids(pa.array({tokens!r}), 1000).tolist()))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert json.loads(other) == here
    assert all(2 <= x <= 1001 for x in here) and len(set(here)) == len(tokens)
    # sliced and chunked inputs hash the same as whole ones
    assert hash_ids(pa.array(["q", *tokens])[1:], 1000).tolist() == here


def test_hashed_features_end_to_end(tmp_path):
    events, items, users = rich_tables()
    schema = Schema.from_dict({**RICH, "item": ["item", {"name": "brand", "hash_buckets": 7}],
                               "user": [{"name": "user", "hash_buckets": 50}]})
    prepare_events(events, tmp_path / "s", PrepareConfig(neg_per_pos=1), schema, items=items)
    store = SampleStore(tmp_path / "s")
    assert store.table_sizes()["brand"] == 9 and store.table_sizes()["user"] == 52
    assert "brand" not in store.vocabs
    want = hash_ids(pa.array([b for _, b, _, _ in ITEMS]), 7)
    keys = store.items.keys_of([i for i, _, _, _ in ITEMS])
    assert store.items.features["brand"][keys].tolist() == want.tolist()
    ukeys = store.users.keys_of(["a", "b", "c", "d"])
    assert store.users.features["user"][ukeys].tolist() == hash_ids(pa.array(["a", "b", "c", "d"]), 50).tolist()
    b = next(iter(BatchLoader(store, "train", batch_size=8)))
    assert (b.item["brand"] >= 2).all() and (b.item["brand"] <= 8).all()


def test_shared_table_and_event_columns_as_item_features(tmp_path):
    """Item features read from event columns (an item's first training event), and a
    sequence-level feature sharing the item table's vocabulary."""
    events, _, _ = rich_tables()
    events = events.append_column("maker", pa.array([f"mk{e[1][1:]}" for e in EVENTS]))
    schema = Schema(item=[Feature("item"), Feature("maker")],
                    context=[Feature("same_item", column="item", table="item")],
                    sequences=[SequenceSpec("hist", 5)])
    prepare_events(events, tmp_path / "s", PrepareConfig(neg_per_pos=0), schema)
    store = SampleStore(tmp_path / "s")
    assert "same_item" not in store.vocabs and store.table_sizes()["item"] == len(store.vocabs.item)
    for b in all_batches(store, "train"):
        assert (b.context["same_item"] == b.item["item"]).all()
        makers = store.vocabs.maker.decode(b.item["maker"].numpy())
        items = store.vocabs.item.decode(b.item["item"].numpy())
        assert all(m == "mk" + i[1:] for m, i in zip(makers, items, strict=True) if i != "<oov>")


# ---------------------------------------------------------------------------- leaks
def test_leak_checks_hold_with_several_sequences(rich_store):
    """Each history of each sequence is strictly before its target in the user's order, and
    a valid/test target is never earlier than any train target of that user."""
    store = rich_store
    ts_of = {(e[0], e[1]): e[2] for e in EVENTS}
    tok_i = np.array(store.items.tokens.to_pylist(), dtype=object)
    last_train: dict[str, int] = {}
    n_hist = 0
    for split in ("train", "valid", "test"):
        for row in read_rows(store, split).to_pylist():
            user = store.users.tokens[row["user"]].as_py()
            for s in store.schema.sequences:
                keys = store.sequences[s.name].history(row["seq"], row[f"end.{s.name}"], 99)
                for it in tok_i[keys]:
                    assert not ts_of[(user, it)] > row["ts"]  # strictly-later check
                    assert it != tok_i[row["item"]] or row["label"] == 0
                    n_hist += 1
            if split == "train":
                last_train[user] = max(last_train.get(user, -1), row["ts"])
            else:
                assert not row["ts"] < last_train.get(user, -1), (split, user)
    assert set(last_train) == {"a", "b", "c", "e"} and n_hist > 20  # d has no train target


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("change", "message"), [
    ({"context": ["platform"]}, "no column 'platform' for context feature 'platform'"),
    ({"item": ["item", {"name": "price", "kind": "numeric", "column": "brand"}]},
     "'sony' is not a number (numeric feature 'price')"),
    ({"item": ["item", "genres_list"]}, "holds lists; declare feature 'genres_list' with kind"),
    ({"sequences": [{"name": "x", "filter_column": "rating", "values": ["good"]}]},
     "are not numbers but column 'rating' is numeric"),
    ({"sequences": [{"name": "x", "event_features": [{"name": "time_gap"}]}]},
     "time_gap: the built-in time gap needs boundaries"),
])
def test_bad_schema_input_is_one_line_and_writes_nothing(tmp_path, change, message):
    events, items, users = rich_tables()
    items = items.append_column("genres_list", pa.array([[g] for g in items.column("genres").to_pylist()]))
    schema = Schema.from_dict({**RICH, **change})
    with pytest.raises(DinrecError) as e:
        prepare_events(events, tmp_path / "s", PrepareConfig(), schema, items=items, users=users)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())


def test_schema_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "schema.json"
    bad.write_text('{"item": ["item", {"name": "price", "kind": "numerc"}]}')
    with pytest.raises(SchemaError, match=r"item\.price\.kind: expected one of"):
        Schema.load(bad)
    bad.write_text('{"user": ["user"],\n "item": [1]}')
    with pytest.raises(SchemaError, match=r"item\[0\]: expected an object or a name, got int"):
        Schema.load(bad)


def test_old_store_without_schema_is_refused(tmp_path, rich_store):
    import shutil

    shutil.copytree(rich_store.path, tmp_path / "old")
    (tmp_path / "old" / "schema.json").unlink()
    with pytest.raises(DinrecError, match="prepare` again"):
        SampleStore(tmp_path / "old")


def test_a_feature_missing_everywhere_is_oov_not_a_crash(tmp_path):
    """An item table whose ``brand`` is null for every item (found by the formats fuzzer)."""
    events, items, _ = rich_tables()
    items = items.set_column(1, "brand", pa.array([None] * items.num_rows, pa.string()))
    items = items.set_column(2, "genres", pa.array([None] * items.num_rows, pa.string()))
    schema = Schema.from_dict({"item": ["item", "brand", {"name": "genres", "kind": "multi"}]})
    prepare_events(events, tmp_path / "s", PrepareConfig(), schema, items=items)
    store = SampleStore(tmp_path / "s")
    assert store.table_sizes()["brand"] == 2 and store.table_sizes()["genres"] == 2
    b = next(iter(BatchLoader(store, "train", batch_size=8)))
    assert (b.item["brand"] == 1).all() and (b.item["genres"] == 0).all()


def test_context_features_of_every_kind_reach_the_batch(tmp_path):
    """Context: categorical, multi (a text column split on '|') and numeric, per sample; a
    sampled negative shares its positive's context."""
    events, _, _ = rich_tables()
    n = events.num_rows
    tags = [("x|y" if k % 2 else "z") for k in range(n)]
    events = events.append_column("tags", pa.array(tags)).append_column(
        "paid", pa.array([float(k) for k in range(n)]))
    schema = Schema.from_dict({"context": ["hour", {"name": "tags", "kind": "multi", "max_values": 3},
                                           {"name": "paid", "kind": "numeric"}]})
    prepare_events(events, tmp_path / "s", PrepareConfig(neg_per_pos=1), schema)
    store = SampleStore(tmp_path / "s")
    st = store.numeric_stats["paid"]
    tags_v = store.vocabs.tags
    by_ts = {(e[0], e[2]): k for k, e in enumerate(EVENTS)}  # (user, ts) names an event
    for split in ("train", "test"):
        rows = read_rows(store, split)
        ts, users = rows.column("ts").to_numpy(), rows.column("user").to_numpy()
        at = 0
        for b in all_batches(store, split):
            assert b.context["tags"].shape == (len(b), 3) and b.context["paid"].dtype == torch.float32
            for r in range(len(b)):
                k = by_ts[(store.users.tokens[int(users[at + r])].as_py(), int(ts[at + r]))]
                want = [tags_v.token_to_id(t) for t in tags[k].split("|")]
                assert b.context["tags"][r].tolist() == want + [0] * (3 - len(want))
                assert float(b.context["paid"][r]) == pytest.approx((k - st["mean"]) / st["std"], abs=1e-5)
            at += len(b)
