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
    """Rows of one split as ids (``user``, ``item``, ``cat``), each with ``hist_items`` /
    ``hist_cats`` id lists resolved in plain Python from the store's files: item keys
    ``sequence[max(0, end - max_len) : end]`` of ``sequences.arrow``, ids by key from
    ``items.arrow`` / ``users.arrow``."""
    import json

    store = Path(store)
    seqs = pa.ipc.open_file(store / "sequences.arrow").read_all().to_pylist()
    items = pa.ipc.open_file(store / "items.arrow").read_all().to_pydict()
    users = pa.ipc.open_file(store / "users.arrow").read_all().to_pydict()
    cut = json.loads((store / "prepare.json").read_text())["max_len"]
    rows = read_split(store, split).to_pylist()
    for r in rows:
        end = r["end.hist"]
        keys = seqs[r["seq"]]["hist.items"][max(0, end - cut) : end]
        r["hist_items"] = [items["item"][k] for k in keys]
        r["hist_cats"] = [items["cat"][k] for k in keys]
        r["cat"] = items["cat"][r["item"]]
        r["item"], r["user"] = items["item"][r["item"]], users["user"][r["user"]]
    return rows


def check_no_leaks(store: Path, time_order: bool = True) -> int:
    """Leak checks of a store made from events (main sequence), by raw user and raw item
    (keys: OOV users and items stay distinct); returns the number of checks that bit.

    * no negative row's item is a positive of that user in any split, the user's first
      positive (which is never a target) included: every positive is in the user's
      sequence, read whole;
    * with ``time_order``: no valid/test target is earlier than a training target of that
      user, and no history event is later than its target (the event at sequence position
      ``p`` is the positive row with ``end == p``).
    """
    import json

    store = Path(store)
    seqs = pa.ipc.open_file(store / "sequences.arrow").read_all().column("hist.items").to_pylist()
    tables = {s: read_split(store, s).to_pylist() for s in ("train", "valid", "test")}
    checks = 0
    pos: dict[int, set[int]] = {}  # user key -> every positive item key
    pos_ts: dict[tuple[int, int], int] = {}  # (seq, position) -> time of that event
    for rows in tables.values():
        for r in rows:
            pos.setdefault(r["user"], set()).update(seqs[r["seq"]])
            if r["label"] == 1:
                pos[r["user"]].add(r["item"])
                if "ts" in r:
                    pos_ts[(r["seq"], r["end.hist"])] = r["ts"]
    for rows in tables.values():
        for r in rows:
            if r["label"] == 0 and r["item"] not in seqs[r["seq"]][r["end.hist"]:]:
                assert r["item"] not in pos[r["user"]], (r["user"], r["item"])
                checks += 1
    assert checks > 0, "no negative row was checked: use a fixture with negatives"
    cut = json.loads((store / "prepare.json").read_text())["max_len"]
    if time_order and tables["train"] and "ts" in tables["train"][0]:
        n_split = 0
        last_train: dict[int, int] = {}
        for r in tables["train"]:
            last_train[r["user"]] = max(last_train.get(r["user"], r["ts"]), r["ts"])
        for s in ("valid", "test"):
            for r in tables[s]:
                if r["user"] in last_train:
                    assert not r["ts"] < last_train[r["user"]], (s, r)
                    n_split += 1
        for rows in tables.values():
            for r in rows:
                for p in range(max(0, r["end.hist"] - cut), r["end.hist"]):
                    if (r["seq"], p) in pos_ts:
                        assert not pos_ts[(r["seq"], p)] > r["ts"], r  # strictly later: a leak
                        checks += 1
        assert n_split > 0, "no valid/test user has training targets: the time order check " \
            "saw nothing; use a fixture whose users have training positives"
        checks += n_split
    return checks


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
