"""`dinrec prepare`: summary output, exit codes, bad input handling (in-process and as a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dinrec.cli import main
from test_formats_common import FIX, check_no_leaks, write


def run(argv, capsys):
    code = main(["prepare", *argv, "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def test_prepare_movielens_prints_summary(tmp_path, capsys):
    code, out, err = run(["movielens", str(FIX / "ml-100k"), "--out", str(tmp_path / "s"),
                          "--neg-per-pos", "1", "--seed", "3"], capsys)
    assert code == 0, err
    assert "rows: train" in out and "users: 5" in out and "skipped lines: 0" in out
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert stats["splits"]["test"]["positives"] == 3
    assert json.loads((tmp_path / "s" / "prepare.json").read_text())["seed"] == 3
    check_no_leaks(tmp_path / "s")


def test_prepare_events_grocery_style_command(tmp_path, capsys):
    code, out, err = run(["events", str(FIX / "events" / "log.tsv"), "--sep", "\\t",
                          "--user-col", "user_id", "--item-col", "item_id", "--time-col", "time",
                          "--item-cats", str(FIX / "events" / "item_meta.tsv"),
                          "--item-cats-cols", "item_id,i_category",
                          "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    assert "item categories: 3 items" in out


def test_prepare_bad_line_fails_with_location(tmp_path, capsys):
    bad = write(tmp_path / "u.data", "1\t10\t5\t881250949\n1\t20\tfive\t881250950\n")
    out_dir = tmp_path / "s"
    code, out, err = run(["movielens", str(bad), "--out", str(out_dir)], capsys)
    assert code == 2
    assert err.strip() == f"dinrec prepare: error: {bad}:2: rating: not a number"
    assert "Traceback" not in err and not out_dir.exists()


def test_prepare_skip_reports_counts(tmp_path, capsys):
    bad = write(tmp_path / "u.data", "1\t10\t5\t1\n1\t20\tfive\t2\n1\t30\t4\t3\n1\t40\t4\t4\n"
                "2\t10\t4\n2\t20\t4\t5\n2\t30\t4\t6\n2\t40\t4\t7\n")
    code, out, err = run(["movielens", str(bad), "--out", str(tmp_path / "s"),
                          "--on-error", "skip"], capsys)
    assert code == 0, err
    assert "skipped 2 bad line(s)" in out
    assert f"rating: not a number  (first at {bad}:2)" in out
    assert f"expected 4 fields, got 3  (first at {bad}:5)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["events", "MISSING"], "MISSING: no such file"),
        (["events", "EMPTY"], "EMPTY: empty file"),
        (["events", "LOG", "--user-col", "who"], "LOG:1: who: no such column"),
        (["sequences", "ATTRS"], "no sequence file among the inputs"),
        (["dien-text", "LOG"], "needs inputs: TRAIN TEST [VALID]"),
        (["synthetic", "LOG"], "takes no input files"),
    ],
)
def test_prepare_input_errors(tmp_path, capsys, argv, message):
    paths = {"MISSING": str(tmp_path / "nope.csv"), "EMPTY": str(write(tmp_path / "e.csv", "")),
             "LOG": str(write(tmp_path / "log.csv", "user,item\na,b\n")),
             "ATTRS": str(FIX / "sequences" / "attrs.json")}
    argv = [paths.get(a, a) for a in argv]
    message = message.replace("MISSING", paths["MISSING"]).replace("EMPTY", paths["EMPTY"])
    message = message.replace("LOG", paths["LOG"])
    code, out, err = run([*argv, "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_prepare_subprocess_exit_code_and_no_traceback(tmp_path):
    bad = write(tmp_path / "r.json", '{"reviewerID": "U", "asin": "P", "unixReviewTime": 1}\n{oops\n')
    proc = subprocess.run(
        [sys.executable, "-m", "dinrec", "prepare", "amazon", str(bad), "--out",
         str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"dinrec prepare: error: {bad}:2: neither JSON nor")
    assert "Traceback" not in proc.stderr and not (tmp_path / "s").exists()


def test_prepare_synthetic(tmp_path, capsys):
    code, out, err = run(["synthetic", "--preset", "tiny", "--out", str(tmp_path / "s"),
                          "--split", "by-user"], capsys)
    assert code == 0, err
    assert "synthetic preset 'tiny'" in out


RICH = FIX / "events-rich"


def test_prepare_with_a_schema_file_and_flags(tmp_path, capsys):
    """`--schema` (JSON) plus flags: side tables, a context feature, two behaviour
    sequences split by a column, the built-in time gap; the store keeps the schema."""
    schema = write(tmp_path / "shop.json", json.dumps({
        "user": ["user", {"name": "age", "kind": "numeric", "boundaries": [25, 40]}],
        "item": ["item", "brand", {"name": "categories", "kind": "multi", "max_values": 2}],
    }))
    code, out, err = run(["events", str(RICH / "log.csv"), "--user-col", "user_id",
                          "--item-col", "item_id", "--time-col", "time",
                          "--item-table", str(RICH / "items.jsonl"), "--item-key", "item_id",
                          "--user-table", str(RICH / "users.csv"), "--user-key", "user_id",
                          "--schema", str(schema), "--item-features", "price:numeric:log",
                          "--context-features", "platform",
                          "--sequence", "viewed:behaviour:click",
                          "--sequence", "bought:behaviour:cart|buy", "--time-gap", "3600,86400",
                          "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    assert "sequences: viewed" in out and "brand" in out
    from dinrec.data import BatchLoader, SampleStore
    from dinrec.data.schema import Schema

    store = SampleStore(tmp_path / "s")
    s = store.schema
    assert [f.name for f in s.item] == ["item", "brand", "categories", "price"]
    assert [q.name for q in s.sequences] == ["viewed", "bought"]
    assert [f.name for f in s.sequences[1].event_features] == ["time_gap_bought"]
    assert Schema.load(tmp_path / "s") == s
    b = next(iter(BatchLoader(store, "train", batch_size=64, shuffle=False)))
    assert set(b.sequences) == {"viewed", "bought"} and b.item["categories"].shape[1] == 2
    assert set(b.context) == {"platform"} and b.item["price"].dtype.is_floating_point
    assert "time_gap_bought" in b.sequences["bought"].events


@pytest.mark.parametrize(("flags", "message"), [
    (["--item-features", "nope"], "nope"),
    (["--item-features", "price:numerc"], "unknown option 'numerc'"),
    (["--sequence", "x:behaviour"], "expected NAME or NAME:COLUMN:VALUE"),
    (["--time-gap", "an hour"], "--time-gap: 'an hour': expected seconds"),
])
def test_prepare_schema_flag_errors_are_one_line(tmp_path, capsys, flags, message):
    code, out, err = run(["events", str(RICH / "log.csv"), "--user-col", "user_id",
                          "--item-col", "item_id", "--time-col", "time", *flags,
                          "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()
