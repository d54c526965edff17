"""``din-csv``: DIN's processed Amazon Electronics CSVs (train / test rows + ``cate_list``).

Train rows ``user,"[hist items]",item,label``; test rows ``user,"[hist items]","(pos, neg)"``
(one test row = a positive and a negative sample with the same history); ``cate_list.csv``
has one category id a line, line k (0-based) being the category of item id k. Inputs:
``TRAIN TEST CATE_LIST`` (recognised by name: ``*train*``, ``*test*``, ``*cate*``) or one
folder holding them. The valid split is a seeded ``valid_fraction`` of the train users
(carved by the data core).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinrec.data.encode import split_multi
from dinrec.data.formats import Format, ReadOptions, ReadResult
from dinrec.data.formats.common import (
    ErrorLog,
    Parsed,
    decode,
    finish_samples,
    parse_int,
    read_bytes,
    read_delimited,
)
from dinrec.errors import DataFormatError

# ids of 1-18 digits (int64-safe); only spaces and tabs around them (they are trimmed)
_ID = r"[ \t]*[0-9]{1,18}[ \t]*"
_LIST_RE = rf"^[ \t]*\[({_ID}(,{_ID})*)?\][ \t]*$"
_PAIR_RE = rf"^[ \t]*\({_ID},{_ID}\)[ \t]*$"


def find_inputs(inputs: Sequence[Path]) -> tuple[Path, Path, Path]:
    """(train, test, cate_list) from three files or one folder."""
    paths = [Path(p) for p in inputs]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        paths = sorted(p for p in folder.iterdir() if p.suffix == ".csv")
    roles: dict[str, Path] = {}
    for p in paths:
        name = p.name.lower()
        role = "cate" if "cate" in name else "test" if "test" in name else (
            "train" if "train" in name else None)
        if role and role not in roles:
            roles[role] = p
    if len(roles) != 3:
        if len(inputs) == 3:
            return Path(inputs[0]), Path(inputs[1]), Path(inputs[2])
        raise DataFormatError(", ".join(map(str, inputs)) or "din-csv", None, None,
                              "expected TRAIN TEST CATE_LIST files (or a folder with "
                              "train*.csv, test*.csv, cate_list.csv)")
    return roles["train"], roles["test"], roles["cate"]


def read_cate_list(path: Path, options: ReadOptions, errors: ErrorLog) -> np.ndarray:
    """Category id (as a string) of each item id: ``cats[item_id]``.

    Every bad line is fatal, whatever ``errors`` says: skipping one would shift the ids
    of every later item."""
    errors = ErrorLog("fail")
    text, bad_lines = decode(read_bytes(path, options.progress), path, errors)
    parsed = read_delimited(text, path, errors, ["cat"], "\t", bad_lines=bad_lines)
    errors.raise_pending()
    if not parsed.keep.all():  # a blank line would shift every following item id
        first = int(parsed.line_no[~parsed.keep].min())
        raise DataFormatError(str(path), first, "cat", "blank or bad line (line k = item k - 1)")
    cats = parse_int(parsed, parsed.column("cat"), path, errors, "cat")
    errors.raise_pending()
    if not parsed.keep.all():
        first = int(parsed.line_no[~parsed.keep].min())
        raise DataFormatError(str(path), first, "cat", "not an integer")
    if len(cats) == 0:
        raise DataFormatError(str(path), None, "cat", "no categories (line k = item k - 1)")
    return np.asarray(cats.cast(pa.string()), dtype=object)


def _int_list(parsed: Parsed, col: pa.Array, path: Path, errors: ErrorLog, field: str):
    """Parse ``"[1, 2, 3]"`` values into (offsets, flat int64 values)."""
    ok = np.asarray(pc.match_substring_regex(col, _LIST_RE).fill_null(False))
    errors.bad_rows(path, parsed.line_no, ~ok, parsed.keep, field,
                    "not a list of item ids like [1, 2, 3]")
    col = pc.if_else(pa.array(ok), col, pa.scalar("[]"))
    inner = pc.utf8_trim(col, characters="[] \t")
    lists = split_multi(inner, ",")  # trimmed entries, empty ones dropped
    offsets = np.asarray(lists.offsets, dtype=np.int32)
    ids = np.asarray(pc.cast(lists.flatten(), pa.int64()))
    return offsets, ids


def _cats_of(ids: np.ndarray, cate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(category strings, in-range mask) of item ids."""
    ok = (ids >= 0) & (ids < len(cate))
    return cate[np.where(ok, ids, 0)], ok


def _samples(path: Path, parsed: Parsed, errors: ErrorLog, cate: np.ndarray,
             label: pa.Array, item: np.ndarray, row: np.ndarray) -> dict[str, pa.Array]:
    """Sample columns for rows ``row`` (parsed row indices), with their label and item ids."""
    offsets, hist = _int_list(parsed, parsed.column("hist"), path, errors, "hist")
    hist_cat, hist_ok = _cats_of(hist, cate)
    row_hist_bad = np.zeros(len(parsed.keep), dtype=bool)
    row_hist_bad[np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))[~hist_ok]] = True
    errors.bad_rows(path, parsed.line_no, row_hist_bad, parsed.keep, "hist",
                    f"item id not in cate_list ({len(cate)} items)")
    item_cat, item_ok = _cats_of(item, cate)
    bad_item = np.zeros(len(parsed.keep), dtype=bool)
    bad_item[row[~item_ok]] = True
    errors.bad_rows(path, parsed.line_no, bad_item, parsed.keep, "item",
                    f"item id not in cate_list ({len(cate)} items)")
    hist_items = pa.ListArray.from_arrays(pa.array(offsets), pa.array(hist.astype(str)))
    hist_cats = pa.ListArray.from_arrays(pa.array(offsets), pa.array(hist_cat, pa.string()))
    take = pa.array(row)
    return {
        "label": label, "user": parsed.column("user").take(take),
        "item": pa.array(item.astype(str)), "cat": pa.array(item_cat, pa.string()),
        "hist_items": hist_items.take(take), "hist_cats": hist_cats.take(take),
    }


def read_train(path: Path, cate: np.ndarray, options: ReadOptions, errors: ErrorLog):
    text, bad_lines = decode(read_bytes(path, options.progress), path, errors)
    parsed = read_delimited(text, path, errors, ["user", "hist", "item", "label"], ",",
                            quoting=True, bad_lines=bad_lines)
    label = parse_int(parsed, parsed.column("label"), path, errors, "label", pa.int8(), (0, 1))
    item = parse_int(parsed, parsed.column("item"), path, errors, "item")
    item_np = np.asarray(item.fill_null(0))
    rows = np.arange(len(parsed.keep))
    cols = _samples(path, parsed, errors, cate, label, item_np, rows)
    errors.raise_pending()
    mask = pa.array(parsed.keep)
    table = finish_samples(str(path), {k: v.filter(mask) for k, v in cols.items()})
    return table, len(parsed.keep)


def read_test(path: Path, cate: np.ndarray, options: ReadOptions, errors: ErrorLog):
    text, bad_lines = decode(read_bytes(path, options.progress), path, errors)
    parsed = read_delimited(text, path, errors, ["user", "hist", "pair"], ",",
                            quoting=True, bad_lines=bad_lines)
    pair = parsed.column("pair")
    ok = np.asarray(pc.match_substring_regex(pair, _PAIR_RE).fill_null(False))
    errors.bad_rows(path, parsed.line_no, ~ok, parsed.keep, "pair",
                    "not a (positive, negative) item pair")
    pair = pc.if_else(pa.array(ok), pair, pa.scalar("(0, 0)"))
    parts = pc.split_pattern(pc.utf8_trim(pair, characters="() \t"), ",")
    pos = np.asarray(pc.cast(pc.utf8_trim_whitespace(pc.list_element(parts, 0)), pa.int64()))
    neg = np.asarray(pc.cast(pc.utf8_trim_whitespace(pc.list_element(parts, 1)), pa.int64()))
    n = len(parsed.keep)
    rows = np.repeat(np.arange(n), 2)  # positive then negative of each test row
    item = np.empty(2 * n, dtype=np.int64)
    item[0::2], item[1::2] = pos, neg
    label = pa.array(np.tile(np.array([1, 0], np.int8), n))
    cols = _samples(path, parsed, errors, cate, label, item, rows)
    errors.raise_pending()
    mask = pa.array(parsed.keep[rows])
    table = finish_samples(str(path), {k: v.filter(mask) for k, v in cols.items()})
    return table, n


def read(inputs: Sequence[Path], options: ReadOptions, errors: ErrorLog) -> ReadResult:
    train_path, test_path, cate_path = find_inputs(inputs)
    cate = read_cate_list(cate_path, options, errors)
    train, n_train = read_train(train_path, cate, options, errors)
    test, n_test = read_test(test_path, cate, options, errors)
    notes = [
        f"cate_list: {len(cate)} items, {len(set(cate.tolist()))} categories",
        f"test: {n_test} rows -> {test.num_rows} samples (a positive and a negative each)",
        "valid = a seeded valid_fraction of the train users (carved by the core)",
    ]
    return ReadResult(splits={"train": train, "test": test},
                      records=n_train + n_test, notes=notes)


FORMAT = Format(
    name="din-csv",
    reader=read,
    summary="DIN's processed Amazon Electronics CSVs (train/test rows + cate_list.csv)",
    inputs="TRAIN TEST CATE_LIST | FOLDER",
)
