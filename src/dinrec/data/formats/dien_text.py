"""``dien-text``: the DIEN reference training files (``local_train_splitByUser`` and friends).

One sample a line, tab-separated::

    label \\t user \\t item \\t cat \\t item_history \\t cat_history

with both histories joined by the byte 0x02, oldest first. (The reference
``data_iterator.py`` splits with ``split("")`` whose quotes hold that invisible 0x02
character; copies that lost it show an empty separator.) Inputs: ``TRAIN TEST [VALID]``;
without a VALID file the data core carves a seeded ``valid_fraction`` of the train
*users* (with all their rows) as the valid split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from dinrec.data.formats import Format, ReadOptions, ReadResult
from dinrec.data.formats.common import (
    ErrorLog,
    check_nonempty,
    decode,
    finish_samples,
    parse_int,
    read_bytes,
    read_delimited,
    split_list,
)
from dinrec.errors import DataFormatError

NAMES = ["label", "user", "item", "cat", "hist_items", "hist_cats"]


def read_file(path: Path, options: ReadOptions, errors: ErrorLog) -> tuple[pa.Table, int]:
    """One DIEN text file as a sample table; returns it and the number of lines read."""
    text, bad_lines = decode(read_bytes(path, options.progress), path, errors)
    parsed = read_delimited(text, path, errors, NAMES, "\t", bad_lines=bad_lines)
    label = parse_int(parsed, parsed.column("label"), path, errors, "label", pa.int8(), (0, 1))
    for name in ("user", "item"):
        check_nonempty(parsed, parsed.column(name), path, errors, name)
    sep = options.hist_sep
    if not sep:
        raise DataFormatError(str(path), None, None, "empty history separator")
    hist_items = split_list(parsed, parsed.column("hist_items"), sep, path, errors, "hist_items")
    hist_cats = split_list(parsed, parsed.column("hist_cats"), sep, path, errors, "hist_cats")
    n_items = np.diff(np.asarray(hist_items.offsets))
    n_cats = np.diff(np.asarray(hist_cats.offsets))
    errors.bad_rows(path, parsed.line_no, n_items != n_cats, parsed.keep, "hist_cats",
                    "not as many categories as history items")
    errors.raise_pending()
    table = parsed.filtered({
        "label": label, "user": parsed.column("user"), "item": parsed.column("item"),
        "cat": parsed.column("cat"), "hist_items": hist_items, "hist_cats": hist_cats,
    })
    return finish_samples(str(path), {n: table.column(n) for n in NAMES}), len(parsed.line_no)


def read(inputs: Sequence[Path], options: ReadOptions, errors: ErrorLog) -> ReadResult:
    if len(inputs) not in (2, 3):
        raise DataFormatError(", ".join(map(str, inputs)) or "dien-text", None, None,
                              "expected TRAIN TEST [VALID] files")
    train, n_train = read_file(Path(inputs[0]), options, errors)
    test, n_test = read_file(Path(inputs[1]), options, errors)
    records = n_train + n_test
    splits = {"train": train, "test": test}
    notes = []
    if len(inputs) == 3:
        splits["valid"], n_valid = read_file(Path(inputs[2]), options, errors)
        records += n_valid
    else:
        notes.append("valid = a seeded valid_fraction of the train users (carved by the core)")
    return ReadResult(splits=splits, records=records, notes=notes)


FORMAT = Format(
    name="dien-text",
    reader=read,
    summary="DIEN reference sample files: label, user, item, cat, item/cat histories (0x02-joined)",
    inputs="TRAIN TEST [VALID]",
    min_inputs=2,
)
