"""Shared reader machinery (error log, delimited parsing, decoding) + helpers for format tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinrec.data.formats import FORMATS, ReadOptions
from dinrec.data.formats.common import (
    ErrorLog,
    decode,
    parse_int,
    read_bytes,
    read_delimited,
    unescape,
)
from dinrec.errors import DataFormatError

FIX = Path(__file__).parent / "fixtures" / "formats"


# --------------------------------------------------------------------------- helpers
def read_split(store: Path, split: str) -> pa.Table:
    """All shards of one split of a store as one table."""
    files = sorted((Path(store) / split).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def rows_with_histories(store: Path, split: str) -> list[dict]:
    """Rows of one split, each with ``hist_items`` / ``hist_cats`` id lists resolved in plain
    Python from ``sequences.arrow``: ``sequence[max(0, hist_end - max_len) : hist_end]``."""
    import json

    seqs = pa.ipc.open_file(Path(store) / "sequences.arrow").read_all().to_pylist()
    cut = json.loads((Path(store) / "prepare.json").read_text())["max_len"]
    rows = read_split(store, split).to_pylist()
    for r in rows:
        q, end = seqs[r["seq"]], r["hist_end"]
        r["hist_items"] = q["items"][max(0, end - cut) : end]
        r["hist_cats"] = q["cats"][max(0, end - cut) : end]
    return rows


def check_no_leaks(store: Path, time_order: bool = True) -> None:
    """No sampled negative of a user is one of their positives; in leave-last-out every
    valid/test positive is not earlier than that user's training positives."""
    tables = {s: read_split(store, s) for s in ("train", "valid", "test")}
    pos: dict[int, set[int]] = {}
    for t in tables.values():
        for u, i, lab in zip(t["user"].to_numpy(), t["item"].to_numpy(), t["label"].to_numpy(),
                             strict=True):
            if lab == 1:
                pos.setdefault(int(u), set()).add(int(i))
    oov = 1
    for t in tables.values():
        for u, i, lab in zip(t["user"].to_numpy(), t["item"].to_numpy(), t["label"].to_numpy(),
                             strict=True):
            if lab == 0 and i != oov:
                assert int(i) not in pos.get(int(u), set()), (u, i)
    if time_order and "ts" in tables["train"].column_names:
        last_train: dict[int, int] = {}
        tr = tables["train"]
        for u, ts in zip(tr["user"].to_numpy(), tr["ts"].to_numpy(), strict=True):
            last_train[int(u)] = max(last_train.get(int(u), ts), ts)
        for s in ("valid", "test"):
            t = tables[s]
            for u, ts in zip(t["user"].to_numpy(), t["ts"].to_numpy(), strict=True):
                assert ts >= last_train.get(int(u), ts), (s, u, ts)


def read_with(fmt: str, inputs: list[Path], on_error: str = "fail", **opts):
    errors = ErrorLog(on_error)
    return FORMATS[fmt].read(inputs, ReadOptions(**opts), errors), errors


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# --------------------------------------------------------------------------- tests
def test_registry_has_every_format():
    assert set(FORMATS) == {"dien-text", "din-csv", "amazon", "movielens", "events",
                            "sequences", "synthetic"}


def test_error_log_fail_raises_the_earliest_line():
    log = ErrorLog("fail")
    line_no = np.array([2, 3, 4])
    keep = np.ones(3, bool)
    log.bad_rows("f", line_no, np.array([False, False, True]), keep, "b", "late")
    log.bad_rows("f", line_no, np.array([False, True, False]), keep, "a", "early")
    with pytest.raises(DataFormatError, match=r"^f:3: a: early$"):
        log.raise_pending()


def test_error_log_skip_counts_once_per_line():
    log = ErrorLog("skip")
    keep = np.ones(3, bool)
    bad = np.array([True, False, True])
    log.bad_rows("f", np.array([1, 2, 3]), bad, keep, "x", "bad")
    log.bad_rows("f", np.array([1, 2, 3]), bad, keep, "y", "worse")  # already dropped
    assert log.counts == {"x: bad": 2} and log.examples == {"x: bad": "f:1"}
    assert keep.tolist() == [False, True, False]
    with pytest.raises(ValueError):
        ErrorLog("ignore")  # type: ignore[arg-type]


def test_read_delimited_line_numbers_with_blank_and_bad_lines():
    text = "h1\th2\n1\ta\n\n2\tb\textra\n3\tc\nx\n4\td\n"
    log = ErrorLog("skip")
    parsed = read_delimited(text, "f.tsv", log, ["n", "s"], "\t", header=True)
    kept = parsed.line_no[parsed.keep].tolist()
    assert kept == [2, 5, 7]
    assert parsed.column("s").filter(pa.array(parsed.keep)).to_pylist() == ["a", "c", "d"]
    assert log.counts == {"expected 2 fields, got 3": 1, "expected 2 fields, got 1": 1}
    assert log.examples["expected 2 fields, got 3"] == "f.tsv:4"
    log = ErrorLog("fail")
    read_delimited(text, "f.tsv", log, ["n", "s"], "\t", header=True)
    with pytest.raises(DataFormatError, match=r"^f.tsv:4: expected 2 fields, got 3$"):
        log.raise_pending()


def test_read_delimited_fail_mode_via_pending():
    log = ErrorLog("fail")
    read_delimited("1\t2\n3\n", "g", log, ["a", "b"], "\t")
    with pytest.raises(DataFormatError, match=r"^g:2: expected 2 fields, got 1$"):
        log.raise_pending()


def test_parse_int_locates_the_bad_value():
    log = ErrorLog("fail")
    parsed = read_delimited("1\n2\nthree\n4\n", "n.txt", log, ["v"], "\t")
    values = parse_int(parsed, parsed.column("v"), "n.txt", log, "v")
    assert values.to_pylist() == [1, 2, None, 4]
    with pytest.raises(DataFormatError, match=r"^n.txt:3: v: not an integer$"):
        log.raise_pending()


def test_decode_reports_bad_utf8_lines():
    log = ErrorLog("skip")
    text, bad = decode(b"ok\nbad \xff\xfe\nok\nalso \xc3\n", "e.txt", log)
    assert bad.tolist() == [2, 4] and log.counts == {"not valid UTF-8": 2}
    assert text.startswith("ok\n")
    log = ErrorLog("fail")
    decode(b"ok\n\xff\n", "e.txt", log)
    with pytest.raises(DataFormatError, match=r"^e.txt:2: not valid UTF-8$"):
        log.raise_pending()


def test_read_bytes_gzip_missing_empty(tmp_path):
    p = write(tmp_path / "a.txt.whatever", gzip.compress(b"hello\n"))
    assert read_bytes(p) == b"hello\n"
    with pytest.raises(DataFormatError, match="no such file"):
        read_bytes(tmp_path / "nope")
    with pytest.raises(DataFormatError, match="empty file"):
        read_bytes(write(tmp_path / "e", "\n  \n"))
    with pytest.raises(DataFormatError, match="cannot read"):
        read_bytes(write(tmp_path / "broken.gz", gzip.compress(b"x" * 100)[:20]))


def test_unescape():
    assert unescape("\\t") == "\t" and unescape("tab") == "\t" and unescape("\\x02") == "\x02"
    assert unescape("::") == "::" and unescape(",") == ","


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200), st.sampled_from(["fail", "skip"]))
def test_fuzz_read_delimited_never_raises_other_errors(text, mode):
    log = ErrorLog(mode)
    try:
        parsed = read_delimited(text, "fz", log, ["a", "b", "c"], "\t")
        parse_int(parsed, parsed.column("a"), "fz", log, "a")
        log.raise_pending()
    except DataFormatError:
        pass
