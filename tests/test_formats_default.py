"""The readers' canonical columns are what they were before the schema (issue 11).

``EXPECTED`` are digests of ``user``, ``item``, ``cat``, ``ts``, ``label`` (and the split
formats' histories) of every fixture as the pre-schema readers (commit 8cc926c) gave them;
the schema only adds columns and side tables, so the default schema reproduces earlier
stores. A digest mismatch means a reader changed today's rows or values.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from dinrec.data.formats import FORMATS, ErrorLog, ReadOptions
from test_formats_common import FIX

CASES = {
 "amazon": ("amazon", ["amazon/reviews.json", "amazon/meta.json"], {}),
 "ml-100k": ("movielens", ["ml-100k/u.data", "ml-100k/u.item"], {}),
 "ml-1m": ("movielens", ["ml-1m/ratings.dat", "ml-1m/movies.dat"], {}),
 "ml-latest": ("movielens", ["ml-latest/ratings.csv", "ml-latest/movies.csv"], {"min_rating": 3.5}),
 "events": ("events", ["events/log.tsv"], dict(user_col="user_id", item_col="item_id", time_col="time", label_col="click", item_cats="events/item_meta.tsv")),
 "sequences": ("sequences", ["sequences/seq.txt", "sequences/attrs.json"], {}),
 "dien-text": ("dien-text", ["dien/local_train", "dien/local_test"], {}),
 "din-csv": ("din-csv", ["din/train_set.csv", "din/test_set.csv", "din/cate_list.csv"], {}),
}

EXPECTED = {
    "amazon": "32ab636d1d8518e324425e3819c2b3dab10b4e0a8a2ede16e97bf624901ec4f5",
    "ml-100k": "30b8b899e883d90c36baaa965ef9839bbfbba1deb9d484f38b75a12c787b8b28",
    "ml-1m": "ea37c3452473406882c29a7b39128502f219dae2af258a0ce887f82436dbe6ce",
    "ml-latest": "a168532c786d255537a6500cc1d58314d77b24234520a76fa686e88ad6f20d4c",
    "events": "7418b4b417f833cf977c99a67ee6d86e080b7e019e40600d4366cc151868f7a3",
    "sequences": "c08b5eaa2aa9b75f9fa0172f70669bd38f12438c9f4dbc8b32ce38424ab07066",
    "dien-text": "28c64a66ed4df26adf130c4f0919d1e2de3a4d3d4a96111eaaf7237161ecb7eb",
    "din-csv": "0b9e3c190306199c061d162ee996c02fa5a206e37914934e500fe7c453f4b8d4",
}


def digest(name: str) -> str:
    fmt, inputs, kw = CASES[name]
    kw = {k: (FIX / v if k == "item_cats" else v) for k, v in kw.items()}
    r = FORMATS[fmt].read([FIX / p for p in inputs], ReadOptions(**kw), ErrorLog())
    tables = {"events": r.events} if r.events is not None else r.splits
    assert tables is not None
    cols = {}
    for tname, t in sorted(tables.items()):
        for c in ("user", "item", "cat", "ts", "label", "hist_items", "hist_cats"):
            if c in t.column_names:
                cols[f"{tname}.{c}"] = t.column(c).to_pylist()
    return hashlib.sha256(json.dumps(cols, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("name", list(CASES))
def test_canonical_columns_unchanged(name):
    assert digest(name) == EXPECTED[name]
