"""Tests of dinrec.data.batches: equality with a per-sample reference, seeding, resume."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dinrec.data.batches import Batch, BatchLoader
from dinrec.data.samples import PrepareConfig
from dinrec.data.store import SampleStore, prepare_events
from dinrec.data.synthetic import generate, preset
from dinrec.errors import DinrecError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    events, _ = generate(preset("tiny"))
    out = tmp_path_factory.mktemp("b") / "store"
    prepare_events(events, out, PrepareConfig(max_len=12, shard_rows=1500))
    return SampleStore(out)


class Flat:
    """A default-schema :class:`Batch` read as the flat fields these tests compare."""

    def __init__(self, b: Batch):
        h = b.sequences["hist"]
        self.user, self.item, self.cat = b.user["user"], b.item["item"], b.item["cat"]
        self.label, self.mask, self.group = b.label, h.mask, b.group
        self.hist_items, self.hist_cats = h.items["item"], h.items["cat"]
        self.neg_items = None if h.neg is None else h.neg["item"]
        self.neg_cats = None if h.neg is None else h.neg["cat"]
        self.n = len(b)

    def __len__(self) -> int:
        return self.n


def flat(loader) -> list[Flat]:
    return [Flat(b) for b in loader]


def reference_rows(store: SampleStore, split: str) -> list[dict]:
    """Rows of a split with their histories resolved one by one in plain Python, from the
    files alone: ``sequences[seq][max(0, end - max_len) : end]`` as item keys, ids and
    categories looked up by key in ``items.arrow`` / ``users.arrow``."""
    seqs = pa.ipc.open_file(store.path / "sequences.arrow").read_all().to_pylist()
    items = pa.ipc.open_file(store.path / "items.arrow").read_all().to_pydict()
    users = pa.ipc.open_file(store.path / "users.arrow").read_all().to_pydict()
    cut = json.loads((store.path / "prepare.json").read_text())["max_len"]
    rows = pq.read_table(store.files(split)).to_pylist()
    for r in rows:
        q, end = seqs[r["seq"]]["hist.items"], r["end.hist"]
        assert 0 <= end <= len(q)
        keys = q[max(0, end - cut) : end]
        r["hist_items"] = [items["item"][k] for k in keys]
        r["hist_cats"] = [items["cat"][k] for k in keys]
        r["group"] = r["user"]
        r["user"] = users["user"][r["group"]]
        r["item"], r["cat"] = items["item"][r["item"]], items["cat"][r["item"]]
    return rows


def reference_batch(rows: list[dict], max_len: int) -> dict[str, np.ndarray]:
    """Slow per-sample padding: the reference the vectorised loader must equal."""
    hists = [r["hist_items"][-max_len:] if max_len else [] for r in rows]
    cats = [r["hist_cats"][-max_len:] if max_len else [] for r in rows]
    T = max(1, max(len(h) for h in hists))
    hi = np.zeros((len(rows), T), np.int64)
    hc = np.zeros((len(rows), T), np.int64)
    mask = np.zeros((len(rows), T), bool)
    for b, (h, c) in enumerate(zip(hists, cats, strict=True)):
        hi[b, : len(h)] = h
        hc[b, : len(c)] = c
        mask[b, : len(h)] = True
    return {
        "group": np.array([r["group"] for r in rows]),
        "user": np.array([r["user"] for r in rows]),
        "item": np.array([r["item"] for r in rows]),
        "cat": np.array([r["cat"] for r in rows]),
        "label": np.array([r["label"] for r in rows], np.float32),
        "hist_items": hi,
        "hist_cats": hc,
        "mask": mask,
    }


def as_np(b: Flat) -> dict[str, np.ndarray]:
    return {
        k: getattr(b, k).numpy()
        for k in ("user", "item", "cat", "label", "hist_items", "hist_cats", "mask", "group")
    }


def row_keys(b: Flat) -> list[tuple]:
    out = []
    for i in range(len(b)):
        n = int(b.mask[i].sum())
        out.append(
            (int(b.user[i]), int(b.item[i]), float(b.label[i]), tuple(b.hist_items[i, :n].tolist()))
        )
    return out


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 300), st.integers(1, 15), st.booleans())
def test_unshuffled_batches_equal_reference(store, batch_size, max_len, small_buffer):
    rows = reference_rows(store, "train")
    loader = BatchLoader(
        store, "train", batch_size=batch_size, max_len=max_len, shuffle=False,
        shuffle_buffer=100 if small_buffer else 10**6,
    )  # fmt: skip
    assert len(loader) == -(-len(rows) // batch_size)
    batches = flat(loader)
    assert len(batches) == len(loader)
    for k, b in enumerate(batches):
        want = reference_batch(rows[k * batch_size : (k + 1) * batch_size], max_len)
        got = as_np(b)
        for key, val in want.items():
            assert got[key].dtype == val.dtype, key
            np.testing.assert_array_equal(got[key], val, err_msg=key)
        assert b.hist_items.shape[1] <= max_len
        assert b.mask.dtype == torch.bool and b.label.dtype == torch.float32


@pytest.mark.parametrize("bucket", [False, True])
def test_shuffled_epoch_is_a_permutation_and_seeded(store, bucket):
    rows = reference_rows(store, "train")
    want = sorted(
        (r["user"], r["item"], float(r["label"]), tuple(r["hist_items"][-12:])) for r in rows
    )
    kw = dict(batch_size=64, bucket=bucket, bucket_batches=4, shuffle_buffer=1000)
    a = BatchLoader(store, "train", seed=1, **kw)
    e0 = [row_keys(b) for b in flat(a)]
    e1 = [row_keys(b) for b in flat(a)]  # the loader moves to epoch 1 by itself
    assert sorted(sum(e0, [])) == want and sorted(sum(e1, [])) == want
    assert e0 != e1
    b = BatchLoader(store, "train", seed=1, **kw)
    assert [row_keys(x) for x in flat(b)] == e0  # same seed, same epoch -> same batches
    b.set_epoch(1)
    assert [row_keys(x) for x in flat(b)] == e1
    c = BatchLoader(store, "train", seed=2, **kw)
    assert [row_keys(x) for x in flat(c)] != e0


def test_bucketing_reduces_padding(store):
    def padding(loader):
        return sum(int((~b.mask).sum()) for b in flat(loader))

    plain = BatchLoader(store, "train", batch_size=32, seed=0)
    bucketed = BatchLoader(store, "train", batch_size=32, seed=0, bucket=True)
    assert padding(bucketed) < 0.5 * padding(plain)


@pytest.mark.parametrize("bucket", [False, True])
def test_resume_gives_the_same_remaining_batches(store, bucket):
    kw = dict(
        batch_size=50, seed=5, bucket=bucket, bucket_batches=3, shuffle_buffer=700, neg_history=2
    )
    full = BatchLoader(store, "train", **kw)
    full.set_epoch(2)
    ref = flat(full)
    for stop in (1, 4, 7, len(ref) - 1):
        first = BatchLoader(store, "train", **kw)
        first.set_epoch(2)
        it = iter(first)
        for _ in range(stop):
            next(it)
        state = first.state_dict()
        resumed = BatchLoader(store, "train", **kw)
        resumed.load_state_dict(state)
        rest = flat(resumed)
        assert len(rest) == len(ref) - stop
        for x, y in zip(rest, ref[stop:], strict=True):
            for key in ("user", "item", "hist_items", "mask", "neg_items", "neg_cats", "group"):
                assert torch.equal(getattr(x, key), getattr(y, key))
        assert resumed.epoch == 3 and resumed.position == 0
    with pytest.raises(DinrecError, match="resume"):
        BatchLoader(store, "train", batch_size=51).load_state_dict(full.state_dict())


@pytest.mark.parametrize("sampling", ["popularity", "uniform"])
def test_negative_history(store, sampling):
    loader = BatchLoader(store, "train", batch_size=128, neg_history=3, neg_sampling=sampling)
    item_cat = store.item_cat
    for b in flat(loader):
        B, T = b.hist_items.shape
        assert b.neg_items.shape == (B, T, 3) and b.neg_cats.shape == (B, T, 3)
        valid = b.mask[:, :, None].expand_as(b.neg_items)
        assert not (b.neg_items == b.hist_items[:, :, None])[valid].any()
        assert (b.neg_items[valid] >= 2).all() and (b.neg_items[~valid] == 0).all()
        assert torch.equal(b.neg_cats, torch.from_numpy(item_cat[b.neg_items.numpy()]))


def test_world_size_partitions_rows(store):
    all_rows = Counter(sum((row_keys(b) for b in flat(BatchLoader(store, "train", batch_size=64))),
                           []))
    assert len(store.files("train")) == 5
    for ws in (2, 5, 7):  # round-robin shards for 2 and 5 ranks, row ranges for 7
        loaders = [
            BatchLoader(store, "train", batch_size=8, rank=r, world_size=ws) for r in range(ws)
        ]
        assert len({len(x) for x in loaders}) == 1  # every rank yields as many batches
        seen: Counter = Counter()
        for x in loaders:
            rows = sum((row_keys(b) for b in flat(x)), [])
            assert len(rows) >= 8 * (len(x) - 1)
            seen.update(rows)
        assert not seen - all_rows  # no row read twice or invented
        if ws == 7:  # row ranges: at most a batch per rank is left out
            assert all_rows.total() - seen.total() <= 7 * 8


def test_drop_last_and_empty_history(tmp_path):
    events, _ = generate(preset("tiny"))
    prepare_events(events, tmp_path / "s", PrepareConfig(min_history=0))
    loader = BatchLoader(tmp_path / "s", "train", batch_size=100, drop_last=True, shuffle=False)
    n = loader.num_rows
    sizes = [len(b) for b in loader]
    assert sizes == [100] * (n // 100)
    first = Flat(next(iter(BatchLoader(tmp_path / "s", "train", batch_size=n, shuffle=False))))
    assert (first.mask.sum(1) == 0).any() and first.hist_items.shape[1] >= 1


def test_batch_to_device(store):
    b = next(iter(BatchLoader(store, "valid", batch_size=4, neg_history=1)))
    c = b.to("cpu")
    assert len(c) == 4 and torch.equal(Flat(c).hist_items, Flat(b).hist_items)
    assert torch.equal(Flat(c).neg_cats, Flat(b).neg_cats) and torch.equal(c.group, b.group)


def full_keys(b: Flat) -> list[tuple]:
    """Every field of every row of a batch (history items and cats up to the mask)."""
    out = []
    for i in range(len(b)):
        n = int(b.mask[i].sum())
        assert b.mask[i, :n].all() and not b.mask[i, n:].any()  # left-aligned
        assert not b.hist_items[i, n:].any() and not b.hist_cats[i, n:].any()  # 0-padded
        out.append((int(b.user[i]), int(b.item[i]), int(b.cat[i]), float(b.label[i]),
                    tuple(b.hist_items[i, :n].tolist()), tuple(b.hist_cats[i, :n].tolist())))
    return out


def ref_keys(rows: list[dict], max_len: int) -> list[tuple]:
    return [(r["user"], r["item"], r["cat"], float(r["label"]), tuple(r["hist_items"][-max_len:]),
             tuple(r["hist_cats"][-max_len:])) for r in rows]


@pytest.mark.parametrize("max_len", [5, 40])
def test_unshuffled_bucketed_batches_equal_reference(store, max_len):
    """No shuffle + bucketing: each unit of ``bucket_batches`` batches is the next rows in
    file order, stably sorted by history length and cut into batches in that order."""
    rows = reference_rows(store, "valid")
    B, ub = 16, 3
    loader = BatchLoader(store, "valid", batch_size=B, max_len=max_len, shuffle=False,
                         bucket=True, bucket_batches=ub, neg_history=2)
    got = flat(loader)
    want = []
    for u in range(0, len(rows), B * ub):
        unit = rows[u : u + B * ub]
        unit = [unit[i] for i in np.argsort([min(len(r["hist_items"]), max_len) for r in unit],
                                            kind="stable")]
        want += [unit[k : k + B] for k in range(0, len(unit), B)]
    assert len(got) == len(want)
    for b, w in zip(got, want, strict=True):
        ref = reference_batch(w, max_len)
        for key, val in ref.items():
            np.testing.assert_array_equal(getattr(b, key).numpy(), val, err_msg=key)
        assert b.neg_items.shape == (*ref["hist_items"].shape, 2)


@pytest.mark.parametrize("bucket", [False, True])
def test_shuffled_batches_hold_the_reference_rows(store, bucket):
    """Shuffled, with or without bucketing and with neg_history: the epoch's rows are the
    reference rows (every field, histories cut to max_len), each batch padded to its own
    longest history."""
    rows = reference_rows(store, "train")
    for max_len in (7, 100):
        loader = BatchLoader(store, "train", batch_size=100, max_len=max_len, seed=4,
                             bucket=bucket, bucket_batches=5, shuffle_buffer=2000, neg_history=2)
        got = []
        for b in flat(loader):
            keys = full_keys(b)
            assert b.hist_items.shape[1] == max(1, max(len(k[4]) for k in keys))
            assert b.neg_items.shape == (*b.hist_items.shape, 2)
            assert not (b.neg_items == b.hist_items[:, :, None])[b.mask].any()
            got += keys
        assert Counter(got) == Counter(ref_keys(rows, max_len))
