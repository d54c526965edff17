"""The readers' side tables and extra columns on the real datasets in ../shared/data.

Marked ``realdata``; skipped when the data folder is absent (set ``DINREC_SHARED_DATA`` to
point elsewhere). Counts come from each folder's PROVENANCE.md.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pytest

from dinrec.data.formats import ReadOptions
from dinrec.data.prepare import prepare
from dinrec.data.schema import Schema
from test_formats_common import read_with
from test_formats_docs import doc_schemas


def _data_root() -> Path | None:
    here = Path(__file__).resolve().parents[1]  # the checkout
    for p in (os.environ.get("DINREC_SHARED_DATA"), here / ".." / "shared" / "data"):
        if p and Path(p).is_dir():
            return Path(p)
    return None


ROOT = _data_root()
pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(ROOT is None, reason="../shared/data is not present")]


def _d(*parts: str) -> Path:
    assert ROOT is not None
    return ROOT.joinpath(*parts)


def test_ml1m_users_genres_ratings():
    ml = "movielens-1m"
    result, _ = read_with("movielens", [_d(ml, "ratings_users_0001-2999.dat.gz"),
                                        _d(ml, "movies.dat"), _d(ml, "users.dat")])
    assert result.users.num_rows == 6_040 and result.items.num_rows == 3_883
    users = {r["user"]: r for r in result.users.to_pylist()}
    assert users["1"] == {"user": "1", "gender": "F", "age": "1", "occupation": "10",
                          "zip": "48067", "zip_prefix": "480"}
    assert set(pc.unique(result.users.column("age")).to_pylist()) == {
        "1", "18", "25", "35", "45", "50", "56"}  # ml-1m's age groups
    genres = result.items.column("genres").to_pylist()
    assert all(1 <= len(g) <= 6 for g in genres)
    assert sum(map(len, genres)) > result.items.num_rows * 1.5  # multi-valued for real
    ev = result.events
    assert ev.num_rows == 487_650
    assert Counter(ev.column("rating").to_pylist()).keys() == {1.0, 2.0, 3.0, 4.0, 5.0}
    first = dict(zip(result.items.column("item").to_pylist(),
                     result.items.column("cat").to_pylist(), strict=True))
    assert [first[i] for i in ev.column("item").to_pylist()[:1000]] == \
        ev.column("cat").to_pylist()[:1000]  # cat = first genre, as before the schema


def test_ml100k_users_with_numeric_age():
    ml = "movielens-100k"
    schema = Schema.from_dict({"user": ["user", {"name": "age", "kind": "numeric"},
                                        "occupation"]})
    result, _ = read_with("movielens", [_d(ml, "u.data"), _d(ml, "u.item"), _d(ml, "u.user")],
                          schema=schema)
    assert result.users.num_rows == 943 and result.items.num_rows == 1_682
    ages = result.users.column("age").to_pylist()
    assert min(ages) == 7.0 and max(ages) == 73.0
    assert len(set(result.users.column("occupation").to_pylist())) == 21


@pytest.mark.parametrize(("folder", "name", "items"), [
    ("amazon-beauty-5core-s3rec", "Beauty", 12_101),
    ("amazon-toys-games-5core-s3rec", "Toys_and_Games", None),
    ("lastfm-hetrec2k-s3rec", "LastFM", None),
])
def test_s3rec_every_attribute(folder, name, items):
    result, _ = read_with("sequences", [_d(folder, f"{name}.txt"),
                                        _d(folder, f"{name}_item2attributes.json")])
    t = result.items
    if items is not None:
        assert t.num_rows == items
    attrs = t.column("attrs").to_pylist()
    cats = t.column("cat").to_pylist()
    assert all(c == (a[0] if a else "unknown") for a, c in zip(attrs, cats, strict=True))
    if name == "Beauty":  # PROVENANCE: 637 distinct attribute ids, avg 3.72 per item
        assert len({x for a in attrs for x in a}) == 637
        assert abs(sum(map(len, attrs)) / len(attrs) - 3.72) < 0.01


def test_grocery_item_meta_as_an_item_table():
    g = "amazon-grocery-5core-rechorus"
    schema = Schema.from_dict({"item": ["item", {"name": "cat", "column": "i_category"}]})
    result, _ = read_with("events", [_d(g, "train.csv")], sep="\t", user_col="user_id",
                          item_col="item_id", time_col="time", item_table=_d(g, "item_meta.csv"),
                          schema=schema)
    assert result.items.num_rows == 8_713
    assert result.items.column_names == ["item", "i_category", "r_complement", "r_substitute"]
    assert result.events.num_rows == 121_892


@pytest.mark.parametrize("title", ["ML-1M", "Amazon Beauty"])
def test_doc_examples_prepare_the_real_data(tmp_path, title):
    """The docs' ML-1M and Beauty schemas prepare the real files (the commands in the docs)."""
    schema = next(s for t, s in doc_schemas().items() if t.startswith(title))
    if title == "ML-1M":
        ml = "movielens-1m"
        inputs = [_d(ml, "ratings_users_0001-2999.dat.gz"), _d(ml, "movies.dat"),
                  _d(ml, "users.dat")]
        fmt = "movielens"
    else:
        b = "amazon-beauty-5core-s3rec"
        inputs = [_d(b, "Beauty.txt"), _d(b, "Beauty_item2attributes.json")]
        fmt = "sequences"
    report = prepare(fmt, inputs, tmp_path / "s", options=ReadOptions(), schema=schema)
    assert Schema.load(tmp_path / "s") == schema
    assert sum(report.stats["rows"].values()) > 0
