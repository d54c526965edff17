"""``events``: a generic interaction log in CSV, TSV or Parquet, columns chosen by name.

Text files need a header line; the separator is ``sep`` or sniffed from the header (tab,
then comma, then semicolon, then ``|``); comma-separated files may quote values. Parquet is
recognised by its magic bytes (for Parquet, "line" in messages is the 1-based row). The
time column holds integer (or decimal) seconds; the label column 0/1. Categories come from
``cat_col`` or from an ``item_cats`` table (first two columns, or ``item_cats_cols``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dinrec.data.formats import Format, ReadOptions, ReadResult
from dinrec.data.formats.common import (
    ErrorLog,
    Parsed,
    check_nonempty,
    decode,
    finish_events,
    lookup_cats,
    parse_float,
    parse_int,
    read_bytes,
    read_delimited,
    unescape,
)
from dinrec.errors import DataFormatError, DinrecError


def _is_parquet(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def read_table(path: Path, sep: str | None, options: ReadOptions, errors: ErrorLog) -> Parsed:
    """All columns of a CSV/TSV/Parquet file as strings, with line (row) numbers."""
    if _is_parquet(path):
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(str(path), None, None, f"cannot read Parquet: {exc}") from None
        cols = {}
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            if pa.types.is_timestamp(col.type):
                col = pc.cast(col, pa.timestamp("s")).cast(pa.int64())
            elif pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            cols[name] = pc.fill_null(col.cast(pa.string()), "")
        n = table.num_rows
        if n == 0:
            raise DataFormatError(str(path), None, None, "empty file")
        return Parsed(pa.table(cols), np.arange(1, n + 1, dtype=np.int64), np.ones(n, bool))
    text, bad_lines = decode(read_bytes(path, options.progress), path, errors)
    header = next((ln for ln in text.split("\n", 1)), "").rstrip("\r")
    if sep is None:
        sep = next((s for s in ("\t", ",", ";", "|") if s in header), ",")
    names = [h.strip().strip('"') for h in header.split(sep)]
    if len(set(names)) != len(names) or "" in names:
        raise DataFormatError(str(path), 1, None, f"bad header: columns {names}")
    return read_delimited(text, path, errors, names, sep, header=True, quoting=sep == ",",
                          bad_lines=bad_lines)


def _column(parsed: Parsed, path: Path, name: str, role: str) -> pa.Array:
    if name not in parsed.table.column_names:
        raise DataFormatError(str(path), 1, name, f"no such column for the {role} "
                              f"(columns: {', '.join(parsed.table.column_names)})")
    return pc.utf8_trim_whitespace(parsed.column(name))


def read_item_cats(path: Path, options: ReadOptions, errors: ErrorLog) -> pa.Table:
    """Table (item, cat) from an item -> category file."""
    parsed = read_table(path, None, options, errors)
    names = parsed.table.column_names
    item_col, cat_col = options.item_cats_cols or (names[0], names[1] if len(names) > 1 else "")
    item = _column(parsed, path, item_col, "item")
    cat = _column(parsed, path, cat_col, "category")
    check_nonempty(parsed, item, path, errors, item_col)
    errors.raise_pending()
    return parsed.filtered({"item": item, "cat": cat})


def read(inputs: Sequence[Path], options: ReadOptions, errors: ErrorLog) -> ReadResult:
    if options.cat_col and options.item_cats:
        raise DinrecError("give --cat-col or --item-cats, not both")
    sep = unescape(options.sep) if options.sep else None
    tables = []
    records = 0
    for path in map(Path, inputs):
        parsed = read_table(path, sep, options, errors)
        records += len(parsed.line_no)
        cols = {"user": _column(parsed, path, options.user_col, "user"),
                "item": _column(parsed, path, options.item_col, "item")}
        if options.cat_col:
            cols["cat"] = _column(parsed, path, options.cat_col, "category")
        if options.time_col:
            raw = _column(parsed, path, options.time_col, "time")
            ints = pc.match_substring_regex(raw, r"^[+-]?[0-9]+$")
            if pc.all(ints).as_py() is False:
                seconds = parse_float(parsed, raw, path, errors, options.time_col)
                cols["ts"] = pc.cast(pc.floor(seconds), pa.int64())
            else:
                cols["ts"] = parse_int(parsed, raw, path, errors, options.time_col)
        if options.label_col:
            raw = _column(parsed, path, options.label_col, "label")
            cols["label"] = parse_int(parsed, raw, path, errors, options.label_col,
                                      pa.int8(), (0, 1))
        check_nonempty(parsed, cols["user"], path, errors, options.user_col)
        check_nonempty(parsed, cols["item"], path, errors, options.item_col)
        errors.raise_pending()
        tables.append(parsed.filtered(cols))
    table = pa.concat_tables(tables)
    notes = []
    columns = {k: table.column(k).combine_chunks() for k in table.column_names}
    if options.item_cats:
        item_cats = read_item_cats(Path(options.item_cats), options, errors)
        columns["cat"] = lookup_cats(columns["item"], item_cats)
        notes.append(f"item categories: {item_cats.num_rows} items from {options.item_cats}")
    return ReadResult(events=finish_events(", ".join(map(str, inputs)), columns),
                      records=records, notes=notes)


FORMAT = Format(
    name="events",
    read=read,
    summary="generic CSV/TSV/Parquet interaction log, columns named by --user-col etc.",
    inputs="FILE...",
)
