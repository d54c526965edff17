"""dien-text and din-csv readers: ready-made DIN/DIEN samples."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinrec.data.prepare import prepare
from dinrec.data.store import SampleStore
from dinrec.errors import DataFormatError
from test_formats_common import FIX, read_split, read_with, rows_with_histories, write

DIEN = [FIX / "dien" / "local_train", FIX / "dien" / "local_test"]
DIN = FIX / "din"


def test_dien_text_reads_samples():
    result, errors = read_with("dien-text", DIEN)
    train, test = result.splits["train"], result.splits["test"]
    assert set(result.splits) == {"train", "test"} and errors.skipped == 0
    assert train.num_rows == 8 and test.num_rows == 3
    first = train.slice(0, 1).to_pylist()[0]
    assert first == {"label": 1, "user": "A1", "item": "B10", "cat": "Books",
                     "hist_items": ["B01", "B02"], "hist_cats": ["Books", "Music"]}
    assert test.column("hist_items").to_pylist()[2] == []


def test_dien_text_third_file_is_valid(tmp_path):
    result, _ = read_with("dien-text", DIEN + [DIEN[1]])
    assert result.splits["valid"].num_rows == 3


def test_dien_text_prepare_stats(tmp_path):
    report = prepare("dien-text", DIEN, tmp_path / "s")
    rows = report.stats["rows"]
    assert rows["test"] == 3 and rows["train"] + rows["valid"] == 8
    assert report.stats["categories"] == 2 + 3  # pad, oov + Books, Music, Toys
    test = read_split(tmp_path / "s", "test")
    store = SampleStore(tmp_path / "s")
    cat_of_item = store.items.features["cat"]  # (N,) category id per item key
    assert cat_of_item[test.column("item").to_numpy()[1]] == 1  # "Garden" not in train: <oov>


@pytest.mark.parametrize(("fmt", "inputs"), [("dien-text", DIEN), ("din-csv", [DIN])])
def test_prepared_histories_round_trip(tmp_path, fmt, inputs):
    """A stored history is exactly the input's (as ids); a positive and its negative with
    the same history share one stored sequence."""
    result, _ = read_with(fmt, inputs)
    report = prepare(fmt, inputs, tmp_path / "s")
    v = SampleStore(tmp_path / "s").vocabs
    want = result.splits["test"].to_pylist()  # the test split keeps the input order
    got = rows_with_histories(tmp_path / "s", "test")
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["hist_items"] == [v.item.token_to_id(t) for t in w["hist_items"]]
        assert g["hist_cats"] == [v.cat.token_to_id(t) for t in w["hist_cats"]]
        assert g["item"] == v.item.token_to_id(w["item"]) and g["label"] == w["label"]
    distinct = {(tuple(r["hist_items"]), tuple(r["hist_cats"]))
                for t in result.splits.values() for r in t.to_pylist()}
    assert report.stats["sequences"]["hist"]["count"] == len(distinct)
    assert len(distinct) <= sum(report.stats["rows"].values()) * 0.6


@pytest.mark.parametrize(
    ("line", "where"),
    [
        ("1\tA\tB\tC\tx\x02y\tc\n", "2: hist_cats: not as many categories as history items"),
        ("yes\tA\tB\tC\tx\tc\n", "2: label: not an integer"),
        ("2\tA\tB\tC\tx\tc\n", "2: label: must be one of 0, 1"),
        ("1\tA\tB\tC\tx\n", "2: expected 6 fields, got 5"),
        ("1\t\tB\tC\tx\tc\n", "2: user: empty"),
        ("1\tA\tB\tC\tx\x02\x02y\tc\x02d\x02e\n", "2: hist_items: empty entry"),
    ],
)
def test_dien_text_bad_lines(tmp_path, line, where):
    good = DIEN[0].read_text().splitlines(keepends=True)[0]
    bad = write(tmp_path / "train", good + line + good)
    with pytest.raises(DataFormatError) as exc:
        read_with("dien-text", [bad, DIEN[1]])
    assert str(exc.value).startswith(f"{bad}:{where}")
    result, errors = read_with("dien-text", [bad, DIEN[1]], on_error="skip")
    assert result.splits["train"].num_rows == 2 and errors.skipped == 1


def test_dien_text_needs_two_or_three_files():
    with pytest.raises(DataFormatError, match="TRAIN TEST"):
        read_with("dien-text", DIEN[:1])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1]),
                          *[st.text("abcXYZ09_-é", min_size=1, max_size=5)] * 3,
                          st.lists(st.tuples(st.text("abc19", min_size=1, max_size=4),
                                             st.text("xyz", min_size=1, max_size=3)),
                                   max_size=4)),
                min_size=1, max_size=6))
def test_dien_text_round_trip(tmp_path_factory, rows):
    d = tmp_path_factory.mktemp("rt")
    text = "".join(
        f"{lab}\t{u}\t{i}\t{c}\t{chr(2).join(h for h, _ in hist)}\t{chr(2).join(c for _, c in hist)}\n"
        for lab, u, i, c, hist in rows)
    p = write(d / "t", text)
    result, _ = read_with("dien-text", [p, p])
    got = result.splits["train"].to_pylist()
    want = [{"label": lab, "user": u, "item": i, "cat": c, "hist_items": [h for h, _ in hist],
             "hist_cats": [c2 for _, c2 in hist]} for lab, u, i, c, hist in rows]
    assert got == want


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from("01ab\t\n\x02 \r\u00e9"), max_size=120))
def test_dien_text_fuzz(tmp_path_factory, text):
    p = write(tmp_path_factory.mktemp("fz") / "t", text)
    for mode in ("fail", "skip"):
        try:
            read_with("dien-text", [p, p], on_error=mode)
        except DataFormatError:
            pass


# ------------------------------------------------------------------------- din-csv
def test_din_csv_reads_train_test_and_categories():
    result, errors = read_with("din-csv", [DIN])
    train, test = result.splits["train"], result.splits["test"]
    assert train.num_rows == 6 and test.num_rows == 4 and errors.skipped == 0
    assert train.slice(0, 1).to_pylist()[0] == {
        "label": 1, "user": "0", "item": "3", "cat": "1",
        "hist_items": ["1", "2"], "hist_cats": ["0", "1"]}
    assert test.column("label").to_pylist() == [1, 0, 1, 0]
    assert test.column("item").to_pylist() == ["4", "0", "1", "5"]
    assert test.column("cat").to_pylist() == ["2", "0", "0", "2"]
    # files given one by one, in any order, are recognised by name
    again, _ = read_with("din-csv", [DIN / "cate_list.csv", DIN / "test_set.csv",
                                     DIN / "train_set.csv"])
    assert again.splits["test"].equals(test)


def test_din_csv_prepare(tmp_path):
    report = prepare("din-csv", [DIN], tmp_path / "s")
    assert report.stats["rows"]["test"] == 4
    assert sum(report.stats["rows"].values()) == 10


@pytest.mark.parametrize(
    ("name", "line", "where"),
    [
        ("train_set.csv", '0,"[1, x]",3,1', "train_set.csv:2: hist: not a list"),
        ("train_set.csv", '0,"[1, 99]",3,1', "train_set.csv:2: hist: item id not in cate_list"),
        ("train_set.csv", '0,"[1]",3', "train_set.csv:2: expected 4 fields, got 3"),
        ("train_set.csv", '0,"[1]",3,7', "train_set.csv:2: label: must be one of 0, 1"),
        ("test_set.csv", '0,"[1]","(4 0)"', "test_set.csv:2: pair: not a (positive, negative)"),
        ("test_set.csv", '0,"[1]","(4, 60)"', "test_set.csv:2: item: item id not in cate_list"),
    ],
)
def test_din_csv_bad_lines(tmp_path, name, line, where):
    for f in DIN.iterdir():
        write(tmp_path / f.name, f.read_bytes())
    lines = (DIN / name).read_text().splitlines()
    write(tmp_path / name, "\n".join([lines[0], line, *lines[1:]]) + "\n")
    with pytest.raises(DataFormatError) as exc:
        read_with("din-csv", [tmp_path])
    assert str(exc.value).startswith(f"{tmp_path / where.split(':')[0]}:{where.split(':', 1)[1]}")
    _, errors = read_with("din-csv", [tmp_path], on_error="skip")
    assert errors.skipped == 1


def test_din_csv_bad_cate_list(tmp_path):
    for f in DIN.iterdir():
        write(tmp_path / f.name, f.read_bytes())
    write(tmp_path / "cate_list.csv", "0\n1\nx\n")
    with pytest.raises(DataFormatError, match=r"cate_list.csv:3: cat: not an integer"):
        read_with("din-csv", [tmp_path], on_error="skip")  # fatal even when skipping
    # a line with two fields would shift every later item id: fatal too (a fuzz find)
    write(tmp_path / "cate_list.csv", "0\n1\t2\n1\n")
    with pytest.raises(DataFormatError, match=r"cate_list.csv:2: expected 1 fields, got 2"):
        read_with("din-csv", [tmp_path], on_error="skip")
    write(tmp_path / "cate_list.csv", "\t\"\n")
    with pytest.raises(DataFormatError, match=r"cate_list.csv:1: "):
        read_with("din-csv", [tmp_path], on_error="skip")


def test_din_csv_needs_three_files():
    with pytest.raises(DataFormatError, match="TRAIN TEST CATE_LIST"):
        read_with("din-csv", [DIN / "train_set.csv"])


