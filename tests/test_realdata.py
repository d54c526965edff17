"""Prepare every real dataset in ../shared/data and check its counts against PROVENANCE.md.

Marked ``realdata``; skipped when the data folder is absent. Never copies the data.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from dinrec.data.formats import ReadOptions
from dinrec.data.prepare import prepare
from test_formats_common import check_no_leaks


def _data_root() -> Path | None:
    """``$DINREC_SHARED_DATA``, else ``../shared/data`` beside the repository root."""
    for p in (os.environ.get("DINREC_SHARED_DATA"),
              Path(__file__).resolve().parents[1] / "../shared/data"):
        if p and Path(p).is_dir():
            return Path(p).resolve()
    return None


ROOT = _data_root()
pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(ROOT is None, reason="../shared/data is not present")]

# name: (format, inputs, reader options, (events, users, items) from PROVENANCE.md)
CASES = {
    "ml-100k": ("movielens", ["movielens-100k/u.data", "movielens-100k/u.item"], {},
                (100_000, 943, 1_682)),
    "ml-1m-ts": ("movielens", ["movielens-1m/ratings_users_0001-2999.dat.gz",
                               "movielens-1m/movies.dat"], {}, (487_650, 2_999, 3_615)),
    "grocery": ("events", ["amazon-grocery-5core-rechorus/train.csv"],
                {"sep": "\\t", "user_col": "user_id", "item_col": "item_id", "time_col": "time",
                 "item_cats": "amazon-grocery-5core-rechorus/item_meta.csv",
                 "item_cats_cols": ("item_id", "i_category")}, (121_892, 14_681, 8_687)),
    "beauty": ("sequences", ["amazon-beauty-5core-s3rec/Beauty.txt",
                             "amazon-beauty-5core-s3rec/Beauty_item2attributes.json"], {},
               (198_502, 22_363, 12_101)),
    "toys": ("sequences", ["amazon-toys-games-5core-s3rec/Toys_and_Games.txt",
                           "amazon-toys-games-5core-s3rec/Toys_and_Games_item2attributes.json"],
             {}, (167_597, 19_412, 11_924)),
    "lastfm": ("sequences", ["lastfm-hetrec2k-s3rec/LastFM.txt",
                             "lastfm-hetrec2k-s3rec/LastFM_item2attributes.json"], {},
               (52_551, 1_090, 3_646)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_realdata_event_counts(name, tmp_path):
    fmt, inputs, opts, (n_events, n_users, n_items) = CASES[name]
    if "item_cats" in opts:
        opts = {**opts, "item_cats": ROOT / opts["item_cats"]}
    from dinrec.data.formats import FORMATS
    from dinrec.data.formats.common import ErrorLog

    options = ReadOptions(**opts)
    events = FORMATS[fmt].read([ROOT / p for p in inputs], options, ErrorLog()).events
    assert events.num_rows == n_events
    assert len(pc.unique(events.column("user"))) == n_users
    assert len(pc.unique(events.column("item"))) == n_items
    t0 = time.perf_counter()
    report = prepare(fmt, [ROOT / p for p in inputs], tmp_path / name, options=options)
    print(f"{name}: {report.stats['rows']} in {time.perf_counter() - t0:.2f}s")
    assert report.skipped == {} and report.events == n_events
    # leave-last-out: one test and one valid positive per user with >= 3 events
    assert report.stats["splits"]["test"]["positives"] <= n_users
    if name in ("lastfm", "ml-100k"):  # small enough for the per-row leak check
        check_no_leaks(tmp_path / name)


def test_realdata_din_electronics_mini(tmp_path):
    folder = ROOT / "amazon-electronics-din-mini"
    report = prepare("din-csv", [folder], tmp_path / "din")
    rows = report.stats["rows"]
    assert report.records == 10_000 + 5_000
    assert rows["train"] + rows["valid"] == 10_000 and rows["test"] == 2 * 5_000
    assert "63001 items, 801 categories" in report.notes[0]
    train = report.stats["splits"]["train"]
    valid = report.stats["splits"]["valid"]
    assert train["positives"] + valid["positives"] == 4_980
