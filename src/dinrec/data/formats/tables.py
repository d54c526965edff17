"""Tables with a header, whatever their file type: CSV/TSV, Parquet, JSON lines.

:func:`read_table` gives every column of a CSV/TSV/Parquet file as strings (Parquet list
columns as lists of strings) with line (row) numbers; :func:`read_records` does the same
for one JSON object (or Python dict literal) a line. :func:`read_side_table` reads an item
or user side table from any of them: a unique key column + attribute columns, typed as the
schema reads them (see :mod:`dinrec.data.formats.features`).
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dinrec.data.formats.common import (
    ErrorLog,
    Parsed,
    check_nonempty,
    decode,
    parse_record,
    read_bytes,
    read_delimited,
)
from dinrec.data.formats.features import ColumnKind, type_column
from dinrec.errors import DataFormatError

log = logging.getLogger(__name__)


def is_parquet(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def _string_column(col: pa.Array) -> pa.Array | None:
    """A Parquet column as strings (lists as lists of strings); None when unsupported."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_timestamp(t):  # seconds, floored
        unit = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[t.unit]
        secs = np.floor_divide(np.asarray(col.cast(pa.int64()).fill_null(0)), unit)
        return pc.if_else(col.is_valid(), pa.array(secs.astype(str)), "")
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        if not (pa.types.is_primitive(t.value_type) or pa.types.is_string(t.value_type)):
            return None
        return col.cast(pa.list_(pa.string()))
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t) \
            or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
            or pa.types.is_decimal(t) or pa.types.is_date(t):
        return pc.fill_null(col.cast(pa.string()), "")
    return None


def read_parquet(path: Path) -> Parsed:
    """Every column of a Parquet file as strings; "line" = the 1-based row."""
    try:
        table = pq.read_table(path)
        if len(set(table.column_names)) != table.num_columns:
            raise DataFormatError(str(path), None, None,
                                  f"duplicate column names {table.column_names}")
        cols = {}
        for name in table.column_names:
            col = _string_column(table.column(name).combine_chunks())
            if col is None:
                log.warning("%s: column %r of type %s is not supported: ignored", path, name,
                            table.schema.field(name).type)
            else:
                cols[name] = col
    except DataFormatError:
        raise
    except Exception as exc:  # a corrupt file can fail anywhere inside pyarrow
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataFormatError(str(path), None, None, f"cannot read Parquet: {what}") from None
    n = table.num_rows
    if n == 0 or not cols:
        raise DataFormatError(str(path), None, None, "empty file")
    return Parsed(pa.table(cols), np.arange(1, n + 1, dtype=np.int64), np.ones(n, bool))


def read_table(path: Path, sep: str | None, errors: ErrorLog, progress: bool = False) -> Parsed:
    """All columns of a CSV/TSV (header line; ``sep`` or sniffed) or Parquet file."""
    if is_parquet(path):
        return read_parquet(path)
    text, bad_lines = decode(read_bytes(path, progress), path, errors)
    header = text.split("\n", 1)[0].rstrip("\r")
    if sep is None:
        sep = next((s for s in ("\t", ",", ";", "|") if s in header), ",")
    names = [h.strip().strip('"') for h in header.split(sep)]
    if len(set(names)) != len(names) or "" in names:
        raise DataFormatError(str(path), 1, None, f"bad header: columns {names}")
    return read_delimited(text, path, errors, names, sep, header=True, quoting=sep == ",",
                          bad_lines=bad_lines)


# ------------------------------------------------------------------------- JSON lines
def scalars(v: Any) -> Iterable[str]:
    """String values of a JSON value, nested lists flattened (objects ignored)."""
    if isinstance(v, list | tuple):
        for x in v:
            yield from scalars(x)
    elif isinstance(v, bool):
        yield "true" if v else "false"
    elif isinstance(v, str | int | float):
        yield str(v)


def records_to_parsed(records: list[tuple[int, dict[str, Any]]]) -> Parsed:
    """Columns of JSON records: strings, or lists of strings where any record has a list;
    object-valued fields are ignored; a missing field is null."""
    names: dict[str, bool] = {}  # name -> holds a list somewhere
    for _, obj in records:
        for k, v in obj.items():
            if isinstance(v, dict):
                continue
            names[str(k)] = names.get(str(k), False) or isinstance(v, list | tuple)
    cols: dict[str, pa.Array] = {}
    for name, is_list in names.items():
        raw = [obj.get(name) for _, obj in records]
        if is_list:
            lists = [None if v is None or isinstance(v, dict) else list(scalars(v)) for v in raw]
            cols[name] = pa.array(lists, pa.list_(pa.string()))
        else:
            strs = [None if v is None or isinstance(v, dict) else next(iter(scalars(v)), None)
                    for v in raw]
            cols[name] = pa.array(strs, pa.string())
    line_no = np.asarray([n for n, _ in records], np.int64)
    return Parsed(pa.table(cols) if cols else pa.table({}), line_no, np.ones(len(records), bool))


def read_records(path: Path, errors: ErrorLog, progress: bool = False) -> Parsed:
    """One JSON object (or Python dict literal) a line, as columns (see :func:`records_to_parsed`)."""
    text, bad_lines = decode(read_bytes(path, progress), path, errors)
    bad = set(bad_lines.tolist())
    records = []
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or i in bad:
            continue
        try:
            records.append((i, parse_record(line, path, i)))
        except DataFormatError as exc:
            errors.bad(exc.path, exc.line or i, exc.field, exc.reason)
    errors.raise_pending()
    if not records:
        raise DataFormatError(str(path), None, None, "no valid records")
    return records_to_parsed(records)


def _is_json(path: Path) -> bool:
    """Whether the (possibly gzipped) file starts with ``{`` or ``[`` after blanks."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(1 << 16).lstrip()
    except (OSError, EOFError, zlib.error):
        return False  # the real reader reports it
    return head[:1] in (b"{", b"[")


# ------------------------------------------------------------------------- side tables
def read_side_table(path: Path, key: str | None, key_name: str, default_key: str,
                    errors: ErrorLog, kinds: dict[str, ColumnKind],
                    progress: bool = False) -> pa.Table:
    """An item or user side table: ``key_name`` (from column ``key``, else ``default_key`` when
    present, else the first column; unique, non-empty) + every other column, typed."""
    parsed = read_records(path, errors, progress) if _is_json(path) \
        else read_table(path, None, errors, progress)
    names = parsed.table.column_names
    key = key or (default_key if default_key in names else names[0] if names else "")
    if key not in names:
        raise DataFormatError(str(path), 1, key, f"no such column for the {key_name} key "
                              f"(columns: {', '.join(names)})")
    cols = {key_name: finish_key(parsed, key, path, errors)}
    for name in names:
        if name not in (key, key_name):
            cols[name] = type_column(parsed, name, parsed.column(name), path, errors, kinds)
    check_unique(parsed, cols[key_name], path, errors, key)
    errors.raise_pending()
    table = parsed.filtered(cols)
    if table.num_rows == 0:
        raise DataFormatError(str(path), None, None, "no valid records")
    return table


def finish_key(parsed: Parsed, key: str, path: Path, errors: ErrorLog) -> pa.Array:
    """The trimmed, non-empty scalar key column ``key``."""
    col = parsed.column(key)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise DataFormatError(str(path), 1, key, f"a key column must hold single values, not {col.type}")
    col = pc.utf8_trim_whitespace(pc.fill_null(col, ""))
    check_nonempty(parsed, col, path, errors, key)
    return col


def check_unique(parsed: Parsed, key: pa.Array, path: Path, errors: ErrorLog, name: str) -> None:
    """Report kept rows whose key an earlier kept row already has."""
    codes = np.asarray(key.dictionary_encode().indices)
    rows = np.flatnonzero(parsed.keep)
    _, first = np.unique(codes[rows], return_index=True)
    dup = np.zeros(len(codes), dtype=bool)
    dup[rows] = True
    dup[rows[first]] = False
    errors.bad_rows(path, parsed.line_no, dup, parsed.keep, name,
                    "duplicate key (an earlier line has it)")
