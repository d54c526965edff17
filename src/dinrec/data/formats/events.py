"""``events``: a generic interaction log in CSV, TSV or Parquet, columns chosen by name.

Text files need a header line; the separator is ``sep`` or sniffed from the header (tab,
then comma, then semicolon, then ``|``); comma-separated files may quote values. Parquet is
recognised by its magic bytes (for Parquet, "line" in messages is the 1-based row). The
time column holds integer (or decimal, floored) seconds within ±1e18; the label column 0/1.
Categories come from ``cat_col`` or from an ``item_cats`` table (first two columns, or
``item_cats_cols``). Every other column of the log is kept in the events under its own name
(several files: missing columns are null). ``item_table`` / ``user_table`` give side tables
(CSV/TSV/Parquet/JSON lines, keyed by ``item_key`` / ``user_key``): see
:func:`dinrec.data.formats.tables.read_side_table`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from dinrec.data.formats import Format, ReadOptions, ReadResult
from dinrec.data.formats.common import (
    ErrorLog,
    Parsed,
    check_nonempty,
    finish_events,
    lookup_cats,
    parse_int,
    parse_time,
    unescape,
)
from dinrec.data.formats.features import ColumnKind, column_kinds, type_column
from dinrec.data.formats.tables import read_side_table, read_table
from dinrec.errors import DataFormatError, DinrecError

CANONICAL = ("user", "item", "cat", "ts", "label")


def _column(parsed: Parsed, path: Path, name: str, role: str) -> pa.Array:
    if name not in parsed.table.column_names:
        raise DataFormatError(str(path), 1, name, f"no such column for the {role} "
                              f"(columns: {', '.join(parsed.table.column_names)})")
    col = parsed.column(name)
    if not pa.types.is_string(col.type):
        raise DataFormatError(str(path), 1, name, f"the {role} column holds {col.type}, "
                              "not single values")
    return pc.utf8_trim_whitespace(col)


def _compatible(a: pa.Table, b: pa.Table) -> bool:
    """Columns present in both files have the same type (others are filled with nulls)."""
    return all(a.schema.field(n).type == b.schema.field(n).type
               for n in set(a.column_names) & set(b.column_names))


def read_item_cats(path: Path, options: ReadOptions, errors: ErrorLog) -> pa.Table:
    """Table (item, cat) from an item -> category file."""
    parsed = read_table(path, None, errors, options.progress)
    names = parsed.table.column_names
    item_col, cat_col = options.item_cats_cols or (names[0], names[1] if len(names) > 1 else "")
    item = _column(parsed, path, item_col, "item")
    cat = _column(parsed, path, cat_col, "category")
    check_nonempty(parsed, item, path, errors, item_col)
    errors.raise_pending()
    return parsed.filtered({"item": item, "cat": cat})


def read_log(path: Path, sep: str | None, options: ReadOptions, errors: ErrorLog,
             kinds: dict[str, ColumnKind]) -> tuple[pa.Table, int, list[str]]:
    """One events file: the canonical columns + every other column (typed by ``kinds``)."""
    parsed = read_table(path, sep, errors, options.progress)
    cols = {"user": _column(parsed, path, options.user_col, "user"),
            "item": _column(parsed, path, options.item_col, "item")}
    used = {options.user_col, options.item_col}
    if options.cat_col:
        cols["cat"] = _column(parsed, path, options.cat_col, "category")
        used.add(options.cat_col)
    if options.time_col:
        raw = _column(parsed, path, options.time_col, "time")
        cols["ts"] = parse_time(parsed, raw, path, errors, options.time_col)
        used.add(options.time_col)
    if options.label_col:
        raw = _column(parsed, path, options.label_col, "label")
        cols["label"] = parse_int(parsed, raw, path, errors, options.label_col,
                                  pa.int8(), (0, 1))
        used.add(options.label_col)
    check_nonempty(parsed, cols["user"], path, errors, options.user_col)
    check_nonempty(parsed, cols["item"], path, errors, options.item_col)
    dropped = []
    for name in parsed.table.column_names:
        if name in used:
            continue
        if name in CANONICAL:  # e.g. a "user" column beside --user-col uid
            dropped.append(name)
            continue
        col = parsed.column(name)
        if pa.types.is_string(col.type):
            col = pc.utf8_trim_whitespace(col)
        cols[name] = type_column(parsed, name, col, path, errors, kinds)
    errors.raise_pending()
    return parsed.filtered(cols), len(parsed.line_no), dropped


def read(inputs: Sequence[Path], options: ReadOptions, errors: ErrorLog) -> ReadResult:
    if options.cat_col and options.item_cats:
        raise DinrecError("give --cat-col or --item-cats, not both")
    sep = unescape(options.sep) if options.sep else None
    if sep is not None and (len(sep) != 1 or sep in '\n\r"'):
        raise DinrecError(f"--sep must be one character other than a quote or a line end, "
                          f"not {sep!r}")
    kinds = column_kinds(options.schema)
    tables: list[pa.Table] = []
    records, notes = 0, []
    for path in map(Path, inputs):
        table, n, dropped = read_log(path, sep, options, errors, kinds)
        if tables and not _compatible(tables[0], table):
            raise DataFormatError(str(path), 1, None, "its columns do not match those of "
                                  f"{inputs[0]} ({', '.join(tables[0].column_names)})")
        tables.append(table)
        records += n
        if dropped:
            notes.append(f"{path}: column(s) {', '.join(dropped)} ignored (name taken by "
                         "--user-col/--item-col/...)")
    table = pa.concat_tables(tables, promote_options="default")  # missing columns: null
    columns = {k: table.column(k).combine_chunks() for k in table.column_names}
    src = ", ".join(map(str, inputs))
    result = ReadResult(records=records, notes=notes, sources={"events": src})
    if options.item_cats:
        item_cats = read_item_cats(Path(options.item_cats), options, errors)
        columns["cat"] = lookup_cats(columns["item"], item_cats)
        notes.append(f"item categories: {item_cats.num_rows} items from {options.item_cats}")
    for role, side_path, key, default in (("item", options.item_table, options.item_key,
                                      options.item_col),
                                     ("user", options.user_table, options.user_key,
                                      options.user_col)):
        if side_path is None:
            continue
        side = read_side_table(Path(side_path), key, role, default, errors, kinds, options.progress)
        setattr(result, f"{role}s", side)
        result.sources[f"{role}s"] = str(side_path)
        notes.append(f"{role} table: {side.num_rows} {role}s, columns "
                     f"{', '.join(side.column_names[1:]) or '(none)'} from {side_path}")
    result.events = finish_events(src, columns)
    return result
FORMAT = Format(
    name="events",
    reader=read,
    summary="generic CSV/TSV/Parquet interaction log, columns named by --user-col etc.",
    inputs="FILE...",
)
