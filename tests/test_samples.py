"""Tests of dinrec.data.samples: histories, splits, negatives, leaks, ready-made samples."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinrec.data.samples import (
    SPLITS,
    BuiltSamples,
    PrepareConfig,
    SampleSet,
    build_event_samples,
    build_ready_samples,
)
from dinrec.data.synthetic import generate, preset
from dinrec.data.vocab import OOV_ID
from dinrec.errors import DinrecError


def ids(built: BuiltSamples, ss: SampleSet, col: str) -> np.ndarray:
    """A split's ``user`` / ``item`` / ``cat`` ids (rows hold keys into the side tables)."""
    if col == "user":
        return built.users.features["user"][ss.user]
    return built.items.features[col][ss.item]


def rows_of(built: BuiltSamples, split: str) -> list[tuple]:
    """(label, user, item, cat, history items, history cats) ids of every row, the history
    cut from its sequence row by row: ``sequence[max(0, end - max_len) : end]``."""
    ss, q = built.splits[split].rows(), built.sequences["hist"]  # columns in row order
    item_id, cat_id = built.items.features["item"], built.items.features["cat"]
    out = []
    for r in range(len(ss["label"])):
        s, end = int(ss["seq"][r]), int(ss["end.hist"][r])
        keys = q.items[q.offsets[s] : q.offsets[s + 1]]
        assert 0 <= end <= len(keys)
        a = max(0, end - built.max_len)
        out.append((int(ss["label"][r]), int(built.users.features["user"][ss["user"][r]]),
                    int(item_id[ss["item"][r]]), int(cat_id[ss["item"][r]]),
                    tuple(item_id[keys[a:end]].tolist()), tuple(cat_id[keys[a:end]].tolist())))
    return out


def reference(events: list[dict], max_len: int, min_history: int) -> dict[str, list[tuple]]:
    """Slow per-user leave-last-out reference in tokens. An item's category is an item
    attribute: its category in its first training event in (user, ts, file) order, else in
    its first event."""
    by_user = defaultdict(list)
    for i, e in enumerate(events):
        by_user[e["user"]].append((e["ts"], i, e))
    out = {"train": [], "valid": [], "test": []}
    first: dict[str, tuple] = {}  # item -> (not train, rank, cat) of its first event
    rank = 0
    for user, evs in by_user.items():  # users in order of first appearance
        evs.sort(key=lambda x: (x[0], x[1]))
        positives = [e for _, _, e in evs if e["label"] == 1]
        P = len(positives)
        k = 0
        for _, _, e in evs:
            split = "test" if k >= P - 1 else "valid" if k == P - 2 else "train"
            first[e["item"]] = min(first.get(e["item"], (2, 0, "")), (split != "train", rank, e["cat"]))
            rank += 1
            if k >= min_history:
                hist = positives[max(0, k - max_len) : k]
                out[split].append((e["label"], user, e["item"], tuple(h["item"] for h in hist)))
            k += e["label"] == 1
    cat = {i: c for i, (_, _, c) in first.items()}
    return {k: [(lab, u, i, cat[i], hi, tuple(cat[h] for h in hi)) for lab, u, i, hi in v]
            for k, v in out.items()}


event_lists = st.lists(
    st.fixed_dictionaries(
        {
            "user": st.sampled_from(["a", "b", "c", "d"]),
            "item": st.sampled_from([f"i{k}" for k in range(8)]),
            "cat": st.sampled_from(["x", "y", "z"]),
            "ts": st.integers(0, 6),
            "label": st.sampled_from([0, 1, 1, 1]),
        }
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(event_lists, st.integers(1, 4), st.integers(0, 2))
def test_histories_match_reference(events, max_len, min_history):
    table = pa.table(
        {
            "user": [e["user"] for e in events],
            "item": [e["item"] for e in events],
            "cat": [e["cat"] for e in events],
            "ts": pa.array([e["ts"] for e in events], pa.int64()),
            "label": pa.array([e["label"] for e in events], pa.int8()),
        }
    )
    if not any(e["label"] for e in events):
        return
    cfg = PrepareConfig(max_len=max_len, min_history=min_history, neg_per_pos=0)
    try:
        built = build_event_samples(table, cfg)
    except DinrecError:  # no training events at all
        return
    v = built.vocabs
    ref = reference(events, max_len, min_history)
    for split in ("train", "valid", "test"):
        want = sorted(
            (lab, int(v.user.encode([u])[0]), int(v.item.encode([i])[0]), int(v.cat.encode([c])[0]),
             tuple(v.item.encode(list(hi)).tolist()) if hi else (),
             tuple(v.cat.encode(list(hc)).tolist()) if hc else ())
            for lab, u, i, c, hi, hc in ref[split]
        )  # fmt: skip
        assert sorted(rows_of(built, split)) == want, split


def test_explicit_negatives_never_enter_history():
    table = pa.table(
        {
            "user": ["u"] * 6,
            "item": ["p1", "n1", "p2", "n2", "p3", "p4"],
            "label": pa.array([1, 0, 1, 0, 1, 1], pa.int8()),
        }
    )
    built = build_event_samples(table, PrepareConfig(neg_per_pos=0))
    v = built.vocabs.item
    negs = set(v.encode(["n1", "n2"]).tolist()) - {OOV_ID}
    for name in built.splits:
        for row in rows_of(built, name):
            assert not negs & set(row[4])
    # n1 (after p1, before p2 the 2nd of 4 positives) -> train; n2 precedes p3 (valid)
    train = rows_of(built, "train")
    assert sorted(r[0] for r in train) == [0, 1]
    assert [r[0] for r in rows_of(built, "valid")] == [0, 1]
    assert [r[0] for r in rows_of(built, "test")] == [1]


@pytest.fixture(scope="module")
def tiny():
    return generate(preset("tiny"))


def _user_tokens(events: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.asarray(events.column("user").to_pylist()),
        np.asarray(events.column("item").to_pylist()),
        events.column("ts").to_numpy(),
    )


def test_leave_last_out_leaks(tiny):
    events, _ = tiny
    built = build_event_samples(events, PrepareConfig(neg_per_pos=3, max_len=10))
    users, items, ts = _user_tokens(events)
    pos_ids = defaultdict(set)  # every positive of every user (keys: one per raw token)
    for u, i in zip(built.users.keys_of(users).tolist(), built.items.keys_of(items).tolist(),
                    strict=True):
        pos_ids[u].add(i)
    last_train_ts = defaultdict(lambda: -1)
    tr = built.splits["train"]
    for u, t in zip(tr.user.tolist(), tr.ts.tolist(), strict=True):
        last_train_ts[u] = max(last_train_ts[u], t)
    seen = {}
    for name, ss in built.splits.items():
        assert len(ss) > 0
        neg = ss.label == 0
        assert (ss.item[neg] >= 2).all()  # sampled from the vocabulary
        for u, i in zip(ss.user[neg].tolist(), ss.item[neg].tolist(), strict=True):
            assert i not in pos_ids[u]  # never one of the user's positives, any split
        # each positive has exactly neg_per_pos negatives sharing its history
        assert neg.sum() == 3 * (~neg).sum()
        if name != "train":
            for u, t in zip(ss.user.tolist(), ss.ts.tolist(), strict=True):
                assert t >= last_train_ts[u]
            pos = ~neg
            keys = set(zip(ss.user[pos].tolist(), ss.ts[pos].tolist(), strict=True))
            seen[name] = keys
            assert len(keys) == pos.sum()  # one positive per user
    assert not seen["valid"] & seen["test"]
    # valid positives come before test positives of the same user
    val = dict(seen["valid"])
    for u, t in seen["test"]:
        if u in val:
            assert t >= val[u]


def test_vocab_from_train_only():
    table = pa.table(
        {
            "user": ["a"] * 4 + ["b"] * 4,
            "item": ["x", "y", "z", "only_test", "x", "z", "only_valid", "y"],
            "ts": pa.array([1, 2, 3, 4, 1, 2, 3, 4], pa.int64()),
        }
    )
    built = build_event_samples(table, PrepareConfig(neg_per_pos=0))
    v = built.vocabs.item
    assert "only_test" not in v and "only_valid" not in v and "z" in v
    assert OOV_ID in set(ids(built, built.splits["test"], "item").tolist())
    assert OOV_ID in set(ids(built, built.splits["valid"], "item").tolist())


def test_min_count_maps_rare_items_to_oov(tiny):
    events, _ = tiny
    built = build_event_samples(events, PrepareConfig(min_count=5, neg_per_pos=0))
    assert (built.vocabs.item.counts[2:] >= 5).all()
    assert OOV_ID in set(ids(built, built.splits["train"], "item").tolist())


def test_by_user_split(tiny):
    events, _ = tiny
    cfg = PrepareConfig(split="by-user", neg_per_pos=1, valid_fraction=0.2, test_fraction=0.1)
    built = build_event_samples(events, cfg)
    n_users = len(set(events.column("user").to_pylist()))
    assert len(built.vocabs.user) - 2 == n_users - round(0.2 * n_users) - round(0.1 * n_users)
    for name in ("valid", "test"):
        assert len(built.splits[name]) > 0
        assert (ids(built, built.splits[name], "user") == OOV_ID).all()
        assert (built.splits[name].user >= len(built.vocabs.user)).all()  # a key per raw user
    assert (ids(built, built.splits["train"], "user") >= 2).all()
    ref = build_event_samples(events, PrepareConfig(neg_per_pos=1))
    assert sum(map(len, built.splits.values())) == sum(map(len, ref.splits.values()))


def test_time_split(tiny):
    events, _ = tiny
    ts = events.column("ts").to_numpy()
    cut = int(np.quantile(ts, 0.8))
    built = build_event_samples(events, PrepareConfig(split="time", time_cut=cut))
    tr, va, te = (built.splits[s] for s in ("train", "valid", "test"))
    assert len(tr) and len(va) and len(te)
    assert (te.ts >= cut).all() and (va.ts < cut).all()
    assert tr.ts.max() < va.ts.min()
    default = build_event_samples(events, PrepareConfig(split="time"))
    assert len(default.splits["test"]) > 0


def test_seeded_and_uniform():
    events, _ = generate(preset("tiny"))
    a = build_event_samples(events, PrepareConfig(seed=3, neg_sampling="uniform"))
    b = build_event_samples(events, PrepareConfig(seed=3, neg_sampling="uniform"))
    c = build_event_samples(events, PrepareConfig(seed=4, neg_sampling="uniform"))
    assert np.array_equal(a.splits["train"].item, b.splits["train"].item)
    assert not np.array_equal(a.splits["train"].item, c.splits["train"].item)


def test_input_errors():
    with pytest.raises(DinrecError, match="'item'"):
        build_event_samples(pa.table({"user": ["a"]}), PrepareConfig())
    bad = pa.table({"user": ["a", "a"], "item": ["x", "y"], "label": pa.array([1, 2], pa.int8())})
    with pytest.raises(DinrecError, match="label"):
        build_event_samples(bad, PrepareConfig())
    with pytest.raises(DinrecError, match="split"):
        build_event_samples(pa.table({"user": ["a"], "item": ["x"]}), PrepareConfig(split="x"))


def _ready(users, items, hists, labels=None):
    n = len(users)
    return pa.table(
        {
            "label": pa.array(labels or [1] * n, pa.int8()),
            "user": users,
            "item": items,
            "cat": ["c"] * n,
            "hist_items": pa.array(hists, pa.list_(pa.string())),
            "hist_cats": pa.array([["c"] * len(h) for h in hists], pa.list_(pa.string())),
        }
    )


def test_ready_samples():
    train = _ready(
        [f"u{k}" for k in range(20)], ["a"] * 20, [["x", "y", "z", "w"]] * 20, [1, 0] * 10
    )
    test = _ready(["u1", "q"], ["only_test", "a"], [["x", "y", "new"], []])
    built = build_ready_samples({"train": train, "test": test}, PrepareConfig(max_len=2))
    v = built.vocabs
    assert len(built.splits["valid"]) == 2  # 10% of 20 users carved from train
    assert len(built.splits["train"]) == 18
    assert "only_test" not in v.item and "new" not in v.item
    rows = sorted(rows_of(built, "test"))
    want_hist = tuple(v.item.encode(["y"]).tolist()) + (OOV_ID,)  # last 2 of x, y, new
    assert any(r[4] == want_hist and r[2] == OOV_ID for r in rows)
    assert any(r[4] == () for r in rows)
    tr = rows_of(built, "train")
    assert all(r[4] == tuple(v.item.encode(["z", "w"]).tolist()) for r in tr)
    with pytest.raises(DinrecError, match="hist_cats"):
        build_ready_samples({"train": train.drop_columns(["hist_cats"])}, PrepareConfig())


@pytest.mark.parametrize("split", ["leave-last-out", "by-user", "time"])
def test_sampled_negatives_follow_their_positive(tiny, split):
    """Unshuffled splits hold each sample event's row, then (for a positive) its sampled
    negatives sharing its user, timestamp and history; every event sample appears once."""
    events, _ = tiny
    lab = (np.random.default_rng(0).random(events.num_rows) < 0.8).astype(np.int8)
    events = events.append_column("label", pa.array(lab))
    plain = build_event_samples(events, PrepareConfig(split=split, neg_per_pos=0))
    built = build_event_samples(events, PrepareConfig(split=split, neg_per_pos=2))
    for name in ("train", "valid", "test"):
        ss = built.splits[name]
        r = ss.take(np.argsort(ss.order)) if name == "train" else ss  # the order as built
        own = np.ones(len(r), dtype=bool)  # the event's own row (label 1, or an explicit 0)
        is_pos = r.label == 1
        starts = np.flatnonzero(is_pos)
        for j in (1, 2):  # the two rows after a positive are its negatives
            at = starts + j
            assert (r.label[at] == 0).all()
            own[at] = False
            for col in ("user", "ts", "seq"):
                assert np.array_equal(getattr(r, col)[at], getattr(r, col)[starts])
            assert np.array_equal(r.ends["hist"][at], r.ends["hist"][starts])
        assert own.sum() + 2 * len(starts) == len(r)
        ref = plain.splits[name]
        ref = ref.take(np.argsort(ref.order)) if name == "train" else ref
        for col in ("label", "user", "item", "ts", "seq"):
            assert np.array_equal(getattr(r, col)[own], getattr(ref, col)), (name, col)
        assert np.array_equal(r.ends["hist"][own], ref.ends["hist"])


def test_distinct_histories_stay_exact_on_hash_collisions(monkeypatch):
    from dinrec.data import samples as samples_mod

    hists = [["x", "y"], ["x", "y"], ["y", "x"], [], ["x"], ["y", "x"], ["x", "y", "z"]]
    train = _ready([f"u{k}" for k in range(len(hists))], ["a"] * len(hists), hists)
    splits = {"train": train, "valid": train.slice(0, 0), "test": train.slice(0, 0)}
    want = build_ready_samples(splits, PrepareConfig())
    assert len(want.sequences["hist"]) == 5  # xy, yx, [], x, xyz
    monkeypatch.setattr(samples_mod, "_window_hash",
                        lambda keys, lens: np.zeros(len(lens), np.uint64))
    got = build_ready_samples(splits, PrepareConfig())  # every history has the same hash
    assert rows_of(got, "train") == rows_of(want, "train")
    assert len(got.sequences["hist"]) >= 5


# ---------------------------------------------------------------------------- tie policy
def test_tied_timestamps_are_ordered_by_file_order():
    """The documented tie policy (dinrec.data.samples): events with the same ``ts`` keep
    their file order, so the later one in the file may have the earlier ones in its history
    (never the reverse), and leave-last-out's test target is the last in the file."""
    table = pa.table({
        "user": ["u"] * 6 + ["w"] * 4,
        "item": ["A", "B", "C", "D", "E", "F", "p", "q", "r", "s"],
        "ts": pa.array([5, 5, 5, 3, 7, 7, 1, 1, 1, 1], pa.int64()),
    })
    built = build_event_samples(table, PrepareConfig(neg_per_pos=0))
    tok = np.array(built.items.tokens.to_pylist(), dtype=object)  # by item key
    got = {}
    for split in SPLITS:
        ss = built.splits[split].rows()
        for r in range(len(ss["label"])):
            hist = built.sequences["hist"].history(int(ss["seq"][r]), int(ss["end.hist"][r]), 9)
            got[tok[ss["item"][r]]] = (split, "".join(tok[hist]))
    assert got == {  # D (ts 3) first; A, B, C tied at 5; E, F tied at 7; p..s all tied
        "A": ("train", "D"), "B": ("train", "DA"), "C": ("train", "DAB"),
        "E": ("valid", "DABC"), "F": ("test", "DABCE"),
        "q": ("train", "p"), "r": ("valid", "pq"), "s": ("test", "pqr"),
    }


@settings(max_examples=60, deadline=None)
@given(event_lists, st.sampled_from(["leave-last-out", "time"]))
def test_targets_and_histories_respect_time_with_ties(events, split):
    """On logs full of tied timestamps: a valid/test target is never earlier than any
    training target of its user, and no history event is later than its target."""
    table = pa.table({
        "user": [e["user"] for e in events], "item": [f"{e['item']}@{n}" for n, e in enumerate(events)],
        "ts": pa.array([e["ts"] for e in events], pa.int64()),
        "label": pa.array([e["label"] for e in events], pa.int8()),
    })  # each item token names its event
    try:
        built = build_event_samples(table, PrepareConfig(neg_per_pos=0, split=split, max_len=100))
    except DinrecError:
        return
    ts_of = {f"{e['item']}@{n}": e["ts"] for n, e in enumerate(events)}
    tok = np.array(built.items.tokens.to_pylist(), dtype=object)
    last_train: dict[int, int] = {}
    for name in SPLITS:
        ss, q = built.splits[name].rows(), built.sequences["hist"]
        for r in range(len(ss["label"])):
            target_ts = int(ss["ts"][r])
            hist = q.history(int(ss["seq"][r]), int(ss["end.hist"][r]), 100)
            for h in tok[hist]:
                assert not ts_of[h] > target_ts  # strictly later would be a leak
            user = int(ss["user"][r])
            if name == "train":
                last_train[user] = max(last_train.get(user, target_ts), target_ts)
            elif user in last_train:
                assert not target_ts < last_train[user], (name, user)
