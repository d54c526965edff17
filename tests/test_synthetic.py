"""Tests of dinrec.data.synthetic: speed, seeding, and the planted ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from dinrec.data.samples import PrepareConfig, build_event_samples
from dinrec.data.synthetic import (
    SOURCE_RECENT,
    SyntheticConfig,
    generate,
    preset,
)
from dinrec.errors import DinrecError


def test_tiny_is_seeded():  # its speed is measured by benchmarks/data.py, not asserted here
    events, truth = generate(preset("tiny"))
    assert 2000 <= events.num_rows <= 10_000
    assert events.column_names == ["user", "item", "cat", "ts"]
    again, _ = generate(preset("tiny"))
    assert events.equals(again)
    other, _ = generate(preset("tiny", seed=1))
    assert not events.equals(other)
    ts = events.column("ts").to_numpy()
    assert (np.diff(ts) >= 0).all()  # a log in time order
    assert len(truth.event_source) == events.num_rows


def test_small_preset_size():
    events, _ = generate(preset("small"))
    assert 80_000 <= events.num_rows <= 120_000


def test_truth_matches_events():
    events, truth = generate(preset("tiny"))
    items = np.asarray(events.column("item").to_pylist())
    cats = np.asarray(events.column("cat").to_pylist())
    assert np.array_equal(truth.category_of(items), np.char.lstrip(cats, "c").astype(int))
    assert truth.category_of(["nope", "i999999"]).tolist() == [-1, -1]
    rel = truth.relevant(items[:2], np.stack([items[:3], items[1:4]]))
    assert rel.shape == (2, 3) and rel[0, 0] and rel[1, 0]
    share = np.bincount(truth.event_source, minlength=4) / len(truth.event_source)
    cfg = truth.config
    assert abs(share[SOURCE_RECENT] - cfg.p_recent) < 0.05
    assert abs(share[3] - cfg.p_random) < 0.05


def test_next_category_follows_recent_history():
    events, _ = generate(preset("tiny"))
    users = np.asarray(events.column("user").to_pylist())
    cats = np.asarray(events.column("cat").to_pylist())
    hits = total = 0
    for u in np.unique(users)[:100]:
        seq = cats[users == u]
        for t in range(3, len(seq)):
            hits += seq[t] in seq[t - 3 : t]
            total += 1
    assert hits / total > 0.6  # vs ~1/12 * 3 by chance


def test_relevance_via_store_ids():
    events, truth = generate(preset("tiny"))
    built = build_event_samples(events, PrepareConfig(neg_per_pos=0))
    table = truth.item_id_to_cat(built.vocabs.item.tokens)
    assert table[0] == table[1] == -1
    tr = built.splits["train"]
    item_cat = built.vocabs.item_cat
    ids = built.items.features["item"][tr.item]  # rows hold item keys
    known = ids >= 2
    assert known.mean() > 0.99
    cat_tokens = built.vocabs.cat.decode(item_cat[ids[known]])
    assert [f"c{c}" for c in table[ids[known]]] == cat_tokens


def test_invalid_config():
    with pytest.raises(DinrecError):
        generate(SyntheticConfig(p_recent=0.9, p_interest=0.5))
    with pytest.raises(DinrecError):
        preset("huge")
