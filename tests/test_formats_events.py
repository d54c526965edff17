"""Event-log readers: amazon, movielens, events, sequences, synthetic."""

from __future__ import annotations

import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinrec.data.formats.amazon import parse_record
from dinrec.data.prepare import prepare
from dinrec.errors import DataFormatError
from test_formats_common import FIX, check_no_leaks, read_with, write

AMZ = [FIX / "amazon" / "reviews.json", FIX / "amazon" / "meta.json"]


def _events(result):
    return {c: result.events.column(c).to_pylist() for c in result.events.column_names}


# ------------------------------------------------------------------------- amazon
def test_amazon_reviews_and_python_literal_meta(tmp_path):
    result, _ = read_with("amazon", AMZ)
    ev = _events(result)
    assert ev["user"][:3] == ["U1", "U1", "U1"] and ev["ts"][:2] == [1000, 1100]
    cats = dict(zip(ev["item"], ev["cat"], strict=True))
    assert cats == {"P1": "Mystery", "P2": "Jazz", "P3": "Puzzles", "P4": "unknown",
                    "P5": "unknown"}
    # gzipped inputs (detected by magic bytes, whatever the name) give the same events
    gz = [write(tmp_path / p.name, gzip.compress(p.read_bytes())) for p in AMZ]
    assert read_with("amazon", gz[::-1])[0].events.equals(result.events)
    assert read_with("amazon", AMZ, min_rating=4)[0].events.num_rows == 6


def test_amazon_prepare_and_leaks(tmp_path):
    report = prepare("amazon", AMZ, tmp_path / "s")
    assert report.events == 9
    assert report.stats["splits"]["test"]["positives"] == 3  # one per user
    check_no_leaks(tmp_path / "s")


@pytest.mark.parametrize(
    ("line", "where"),
    [
        ('{"reviewerID": "U9", "asin": "P1", "unixReviewTime": "soon"}', "2: unixReviewTime: not an integer"),
        ('{"reviewerID": "U9", "unixReviewTime": 5}', "2: asin: missing"),
        ('{"reviewerID": "U9", "asin": "P1", "unixReviewTime": 5', "2: neither JSON nor a Python dict literal"),
        ("[1, 2]", "2: expected an object, got list"),
        ("__import__('os').system('echo pwned')", "2: neither JSON nor a Python dict literal"),
    ],
)
def test_amazon_bad_lines(tmp_path, line, where):
    lines = AMZ[0].read_text().splitlines()
    bad = write(tmp_path / "r.json", "\n".join([lines[0], line, *lines[1:]]) + "\n")
    with pytest.raises(DataFormatError) as exc:
        read_with("amazon", [bad])
    assert str(exc.value).startswith(f"{bad}:{where}")
    result, errors = read_with("amazon", [bad], on_error="skip")
    assert result.events.num_rows == 9 and errors.skipped == 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_amazon_parse_record_fuzz(text):
    try:
        assert isinstance(parse_record(text), dict)
    except DataFormatError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=5), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
    max_leaves=8), max_size=4))
def test_amazon_parse_record_round_trip(obj):
    import json

    assert parse_record(json.dumps(obj)) == obj
    assert parse_record(repr(obj)) == obj


# ------------------------------------------------------------------------- movielens
def test_movielens_100k(tmp_path):
    result, _ = read_with("movielens", [FIX / "ml-100k"])
    ev = _events(result)
    assert len(ev["user"]) == 9
    cats = dict(zip(ev["item"], ev["cat"], strict=True))
    assert cats == {"10": "Animation", "20": "Action", "30": "Drama", "40": "unknown"}
    assert read_with("movielens", [FIX / "ml-100k" / "u.data"], min_rating=4)[0].events.num_rows == 6
    report = prepare("movielens", [FIX / "ml-100k"], tmp_path / "s")
    positives = {k: v["positives"] for k, v in report.stats["splits"].items()}
    # 3 users x 3 ratings: the first is history only (min_history 1), then valid, test
    assert positives == {"train": 0, "valid": 3, "test": 3}
    assert report.stats["users"] == 3 + 2
    check_no_leaks(tmp_path / "s")


def test_movielens_1m_gzipped_and_latest(tmp_path):
    ratings = write(tmp_path / "ratings_part.dat.gz",
                    gzip.compress((FIX / "ml-1m" / "ratings.dat").read_bytes()))
    result, _ = read_with("movielens", [ratings, FIX / "ml-1m" / "movies.dat"])
    ev = _events(result)
    assert ev["ts"][0] == 978300760 and len(ev["user"]) == 6
    assert dict(zip(ev["item"], ev["cat"], strict=True)) == {"1": "Animation", "2": "Adventure",
                                                             "3": "Comedy"}
    result, _ = read_with("movielens", [FIX / "ml-latest"])
    ev = _events(result)
    assert dict(zip(ev["item"], ev["cat"], strict=True)) == {"1": "Adventure", "3": "Comedy",
                                                             "6": "unknown"}
    assert read_with("movielens", [FIX / "ml-latest"], min_rating=3.5)[0].events.num_rows == 4


@pytest.mark.parametrize(
    ("name", "line", "where"),
    [
        ("u.data", "1\t10\tfive\t881250949", "2: rating: not a number"),
        ("u.data", "1\t10\t5\t88125x", "2: ts: not an integer"),
        ("u.data", "1\t10\t5", "2: expected 4 fields, got 3"),
    ],
)
def test_movielens_bad_lines(tmp_path, name, line, where):
    lines = (FIX / "ml-100k" / name).read_text().splitlines()
    bad = write(tmp_path / name, "\n".join([lines[0], line, *lines[1:]]) + "\n")
    with pytest.raises(DataFormatError) as exc:
        read_with("movielens", [bad])
    assert str(exc.value).startswith(f"{bad}:{where}")
    assert read_with("movielens", [bad], on_error="skip")[1].skipped == 1


def test_movielens_bad_encoding_in_csv(tmp_path):
    bad = write(tmp_path / "ratings.csv", b"userId,movieId,rating,timestamp\n1,1,4.0,5\n1,\xff,4,6\n")
    with pytest.raises(DataFormatError, match=r"ratings.csv:3: not valid UTF-8"):
        read_with("movielens", [bad])


# ------------------------------------------------------------------------- events
def test_events_tsv_with_item_cats_and_labels(tmp_path):
    opts = dict(user_col="user_id", item_col="item_id", time_col="time", label_col="click",
                item_cats=FIX / "events" / "item_meta.tsv")
    result, _ = read_with("events", [FIX / "events" / "log.tsv"], **opts)
    ev = _events(result)
    assert len(ev["user"]) == 10 and ev["label"][4] == 0
    assert dict(zip(ev["item"], ev["cat"], strict=True)) == {"i1": "0", "i2": "7", "i3": "7",
                                                             "i4": "unknown"}
    report = prepare("events", [FIX / "events" / "log.tsv"], tmp_path / "s",
                     options=read_with.__globals__["ReadOptions"](**opts))
    assert report.stats["splits"]["test"]["positives"] == 3
    check_no_leaks(tmp_path / "s")


def test_events_parquet_and_csv(tmp_path):
    t = pa.table({"u": ["a", "a", "b"], "i": ["x", "y", "x"], "t": [3, 1, 2], "c": ["k", "l", "k"]})
    pq.write_table(t, tmp_path / "log.bin")
    result, _ = read_with("events", [tmp_path / "log.bin"], user_col="u", item_col="i",
                          time_col="t", cat_col="c")
    assert _events(result) == {"user": ["a", "a", "b"], "item": ["x", "y", "x"],
                               "cat": ["k", "l", "k"], "ts": [3, 1, 2]}
    csv = write(tmp_path / "log.csv", 'u,i,t\n"a, b",x,1.5\nc,y,2\n')
    ev = _events(read_with("events", [csv], user_col="u", item_col="i", time_col="t")[0])
    assert ev == {"user": ["a, b", "c"], "item": ["x", "y"], "ts": [1, 2]}


def test_events_errors(tmp_path):
    log = write(tmp_path / "log.csv", "user,item,ts\na,x,1\nb,y,later\n")
    with pytest.raises(DataFormatError, match=r"log.csv:1: item_id: no such column"):
        read_with("events", [log], item_col="item_id")
    with pytest.raises(DataFormatError, match=r"log.csv:3: ts: not an integer|log.csv:3: ts: not a number"):
        read_with("events", [log], time_col="ts")
    with pytest.raises(DataFormatError, match="no such file"):
        read_with("events", [tmp_path / "missing.csv"])
    with pytest.raises(DataFormatError, match="empty file"):
        read_with("events", [write(tmp_path / "e.csv", "")])


# ------------------------------------------------------------------------- sequences
def test_sequences_with_attributes(tmp_path):
    seq, attrs = FIX / "sequences" / "seq.txt", FIX / "sequences" / "attrs.json"
    result, _ = read_with("sequences", [attrs, seq])
    ev = _events(result)
    assert "ts" not in ev and len(ev["user"]) == 13
    assert ev["user"][:4] == ["1"] * 4 and ev["item"][:4] == ["1", "2", "3", "4"]
    assert dict(zip(ev["item"], ev["cat"], strict=True)) == {
        "1": "10", "2": "11", "3": "10", "4": "unknown", "5": "12", "6": "unknown"}
    report = prepare("sequences", [seq, attrs], tmp_path / "s")
    assert report.stats["splits"]["test"]["positives"] == 3
    check_no_leaks(tmp_path / "s")


def test_sequences_errors(tmp_path):
    bad = write(tmp_path / "s.txt", "1 2 3\n\n7\n")
    with pytest.raises(DataFormatError, match=r"s.txt:3: items: a user with no items"):
        read_with("sequences", [bad])
    assert read_with("sequences", [bad], on_error="skip")[0].events.num_rows == 2
    broken = write(tmp_path / "a.json", '{"1": [1],\n "2": [2')
    with pytest.raises(DataFormatError, match=r"a.json:2: invalid JSON"):
        read_with("sequences", [bad, broken], on_error="skip")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.text("abc123", min_size=1, max_size=4), min_size=2, max_size=5),
                min_size=1, max_size=5))
def test_sequences_round_trip(tmp_path_factory, lines):
    p = write(tmp_path_factory.mktemp("sq") / "s.txt", "\n".join(" ".join(x) for x in lines))
    ev = _events(read_with("sequences", [p])[0])
    assert ev["user"] == [x[0] for x in lines for _ in x[1:]]
    assert ev["item"] == [i for x in lines for i in x[1:]]


def test_synthetic(tmp_path):
    report = prepare("synthetic", [], tmp_path / "s",
                     options=read_with.__globals__["ReadOptions"](preset="tiny"))
    assert report.events and report.stats["rows"]["train"] > 0
    check_no_leaks(tmp_path / "s")
