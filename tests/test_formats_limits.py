"""Numbers at and past every limit: one-line errors naming file:line:field, never a traceback."""

from __future__ import annotations

import pytest

from dinrec.data.prepare import prepare
from dinrec.errors import DataFormatError
from test_formats_common import read_with, write

HEAD = "user\titem\ttime\tlabel\n"
GOOD = "u1\ti1\t100\t1\nu1\ti2\t200\t1\nu1\ti4\t300\t1\nu2\ti1\t150\t1\nu2\ti3\t250\t1\nu2\ti4\t350\t1\n"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("1e309", "time: out of range"),  # the fuzz find of issue 12: float overflow to inf
        ("-1e309", "time: out of range"),
        ("1e19", "time: out of range"),
        ("9223372036854775808", "time: out of range"),  # int64 max + 1
        ("99999999999999999999999", "time: out of range"),
        ("-9223372036854775809", "time: out of range"),
        ("nan", "time: not a number"),
        ("inf", "time: not a number"),
        ("0x10", "time: not a number"),
        ("", "time: not a number"),
    ],
)
def test_time_past_the_limits_is_a_bad_line(tmp_path, value, reason):
    path = write(tmp_path / "log.tsv", HEAD + GOOD + f"u3\ti1\t{value}\t1\n")
    with pytest.raises(DataFormatError) as exc:
        prepare("events", [path], tmp_path / "out",
                options=_opts(time_col="time", label_col="label"))
    assert str(exc.value).startswith(f"{path}:8: {reason}")
    assert not (tmp_path / "out").exists()  # nothing written
    result, errors = read_with("events", [path], on_error="skip", time_col="time",
                               label_col="label")
    assert result.events.num_rows == 6 and errors.skipped == 1


@pytest.mark.parametrize("value", ["999999999999999999", "-999999999999999999", "1e18",
                                   "-5", "0", "1.5e9", "000000000000000000000042",
                                   "+42", " 7 "])
def test_time_at_the_limits_is_read(tmp_path, value):
    path = write(tmp_path / "log.tsv", HEAD + GOOD + f"u3\ti1\t{value}\t1\n")
    result, _ = read_with("events", [path], time_col="time", label_col="label")
    expected = int(value) if value.strip().lstrip("+-").isdigit() else int(float(value))
    assert result.events.column("ts").to_pylist()[-1] == expected
    prepare("events", [path], tmp_path / "out", options=_opts(time_col="time"))
    assert (tmp_path / "out" / "stats.json").exists()


@pytest.mark.parametrize("value", ["2", "-1", "1.0", "99999999999999999999"])
def test_label_outside_0_1(tmp_path, value):
    path = write(tmp_path / "log.tsv", HEAD + GOOD + f"u3\ti1\t5\t{value}\n")
    with pytest.raises(DataFormatError, match=rf"^{path}:8: label: "):
        read_with("events", [path], time_col="time", label_col="label")


@pytest.mark.parametrize("value", ["1e309", "nan", "-inf", "x"])
def test_movielens_rating_not_finite(tmp_path, value):
    path = write(tmp_path / "u.data", f"1\t10\t5\t100\n1\t11\t{value}\t200\n")
    with pytest.raises(DataFormatError, match=rf"^{path}:2: rating: "):
        read_with("movielens", [path])


@pytest.mark.parametrize("ts", ["1e309", "NaN", "Infinity", "-Infinity", "1.5",
                                "10000000000000000000", "true"])
def test_amazon_time_not_an_integer(tmp_path, ts):
    good = '{"reviewerID": "U1", "asin": "P1", "unixReviewTime": 5, "overall": 5}\n'
    path = write(tmp_path / "r.json", good + '{"reviewerID": "U1", "asin": "P2", '
                 f'"unixReviewTime": {ts}, "overall": 5}}\n')
    with pytest.raises(DataFormatError, match=rf"^{path}:2: unixReviewTime: "):
        read_with("amazon", [path])


@pytest.mark.parametrize("rating", ["NaN", "Infinity", "1e309"])
def test_amazon_rating_not_finite(tmp_path, rating):
    good = '{"reviewerID": "U1", "asin": "P1", "unixReviewTime": 5, "overall": 5}\n'
    path = write(tmp_path / "r.json", good + '{"reviewerID": "U1", "asin": "P2", '
                 f'"unixReviewTime": 6, "overall": {rating}}}\n')
    with pytest.raises(DataFormatError, match=rf"^{path}:2: overall: "):
        read_with("amazon", [path])


def _opts(**kw):
    from dinrec.data.formats import ReadOptions

    return ReadOptions(**kw)
