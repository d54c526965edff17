"""Shared machinery of the format readers: error policy, file opening, fast delimited parsing.

Every reader reports a bad record through an :class:`ErrorLog`. With ``on_error="fail"`` the
*first* bad line of a file (smallest line number, whatever check found it) is raised as a
:class:`~dinrec.errors.DataFormatError` once the file has been scanned; with ``"skip"`` the
line is dropped and counted under its reason (``"field: what"``).

:func:`read_delimited` parses a one-character-separated text file with pyarrow's
multi-threaded CSV reader and still knows the physical line number of every row, so that
vectorised checks (:func:`parse_int`, :func:`parse_float`) can point at ``file:line``.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import re
import sys
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from dinrec.errors import DataFormatError, DinrecError

log = logging.getLogger(__name__)

OnError = Literal["fail", "skip"]

#: category token of items with no known category (the same token the data core uses
#: for a missing / null ``cat``: ``dinrec.data.samples.UNKNOWN_CAT``)
UNKNOWN_CAT = "unknown"

_INT_RE = r"^[+-]?[0-9]+$"
_FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"

#: the largest magnitude of an integer field (time, ids): 18 digits, so that differences
#: of two values (time gaps) never overflow int64
MAX_INT = 10**18


@dataclass
class ErrorLog:
    """Collects bad records: raises the earliest one (``fail``) or counts them (``skip``)."""

    on_error: OnError = "fail"
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    _pending: tuple[int, str, str | None, str] | None = None
    _pending_path: str = ""

    def __post_init__(self) -> None:
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {self.on_error!r}")

    def bad(self, path: str | Path, line: int, field_name: str | None, message: str) -> None:
        """Report one bad line; raises at once in ``fail`` mode (line parsers read in order)."""
        if self.on_error == "fail":
            raise DataFormatError(str(path), line, field_name, message)
        self._count(path, line, field_name, message, 1)

    def bad_rows(
        self,
        path: str | Path,
        line_no: np.ndarray,
        bad: np.ndarray,
        keep: np.ndarray,
        field_name: str | None,
        message: str,
    ) -> None:
        """Vectorised form: rows where ``bad & keep`` are reported and cleared from ``keep``."""
        new = bad & keep
        if not new.any():
            return
        keep &= ~new
        first = int(line_no[new].min())
        if self.on_error == "fail":
            if self._pending is None or first < self._pending[0]:
                self._pending = (first, str(path), field_name, message)
            return
        self._count(path, first, field_name, message, int(new.sum()))

    def raise_pending(self) -> None:
        """In ``fail`` mode, raise the earliest bad line reported by :meth:`bad_rows`."""
        if self._pending is not None:
            line, path, field_name, message = self._pending
            self._pending = None
            raise DataFormatError(path, line, field_name, message)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def _count(self, path, line, field_name, message, n) -> None:
        key = message if field_name is None else f"{field_name}: {message}"
        self.counts[key] += n
        self.examples.setdefault(key, f"{path}:{line}")
        log.debug("skipping %d line(s) at %s:%s: %s", n, path, line, key)


# --------------------------------------------------------------------------- files
def read_bytes(path: str | Path, progress: bool = False) -> bytes:
    """Read a whole file, gunzipping it when it starts with the gzip magic bytes.

    Raises :class:`DataFormatError` for a missing, unreadable, corrupt or empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(str(path), None, None, "no such file")
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
        size = path.stat().st_size
        opener = gzip.open if magic == b"\x1f\x8b" else open
        chunks = []
        with opener(path, "rb") as f, _bar(size if opener is open else None, path, progress) as bar:
            while chunk := f.read(1 << 23):
                chunks.append(chunk)
                bar.update(len(chunk))
        data = b"".join(chunks)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataFormatError(str(path), None, None, f"cannot read: {exc}") from None
    if not data.strip():
        raise DataFormatError(str(path), None, None, "empty file")
    return data


def _bar(total: int | None, path: Path, progress: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"reading {path.name}",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )


def decode(
    data: bytes, path: str | Path, errors: ErrorLog, encoding: str = "utf-8"
) -> tuple[str, np.ndarray]:
    """Decode ``data``; returns the text and the (1-based) numbers of undecodable lines.

    Bad lines are replaced with U+FFFD characters; the caller drops them (via
    :func:`read_delimited`'s ``bad_lines``) and reports them under ``line: not valid UTF-8``.
    """
    try:
        return data.decode(encoding), np.empty(0, np.int64)
    except UnicodeDecodeError:
        pass
    bad: list[int] = []
    start = 0
    while True:
        try:
            data[start:].decode(encoding)
            break
        except UnicodeDecodeError as exc:
            pos = start + exc.start
            line = data.count(b"\n", 0, pos) + 1
            bad.append(line)
            one = np.ones(1, dtype=bool)
            errors.bad_rows(path, np.array([line]), one, one.copy(), None,
                            f"not valid {encoding.upper()}")
            nxt = data.find(b"\n", pos)
            if nxt < 0:
                break
            start = nxt + 1
    return data.decode(encoding, errors="replace"), np.asarray(bad, np.int64)


# --------------------------------------------------------------------------- parsing
_SURROGATE = re.compile(r"\\[uU][dD][89a-fA-F]")


def check_unicode(text: str, obj: Any, path: str | Path, line_no: int | None) -> None:
    """Reject a parsed JSON / Python value holding a lone surrogate (``"\\ud800"``): it
    cannot be stored as UTF-8. Only checked when ``text`` has such an escape."""
    if _SURROGATE.search(text) is None:
        return
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataFormatError(str(path), line_no, None,
                              "a lone surrogate escape (\\ud800-\\udfff) is not text") from None


def parse_record(line: str, path: str | Path = "<line>", line_no: int = 1) -> dict[str, Any]:
    """One JSON object or Python dict literal; anything else raises :class:`DataFormatError`."""
    text = line.strip()
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        try:
            with warnings.catch_warnings():  # e.g. "invalid escape sequence" in a string
                warnings.simplefilter("ignore")
                obj = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            what = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0]
            raise DataFormatError(str(path), line_no, None,
                                  f"neither JSON nor a Python dict literal ({what})") from None
    check_unicode(text, obj, path, line_no)
    if not isinstance(obj, dict):
        raise DataFormatError(str(path), line_no, None,
                              f"expected an object, got {type(obj).__name__}")
    return obj


@dataclass
class Parsed:
    """String columns of a delimited file, with the physical line number of each row."""

    table: pa.Table
    line_no: np.ndarray  # (N,) int64
    keep: np.ndarray  # (N,) bool: rows not (yet) found bad

    def column(self, name: str) -> pa.Array:
        return self.table.column(name).combine_chunks()

    def filtered(self, columns: dict[str, pa.Array]) -> pa.Table:
        """The kept rows of ``columns`` as a table."""
        mask = pa.array(self.keep)
        return pa.table({k: v.filter(mask) for k, v in columns.items()})


def read_delimited(
    text: str,
    path: str | Path,
    errors: ErrorLog,
    names: list[str],
    sep: str,
    header: bool = False,
    quoting: bool = False,
    bad_lines: np.ndarray | None = None,
    min_fields: int | None = None,
) -> Parsed:
    """Parse ``text`` (one record a line, ``sep``-separated) into string columns ``names``.

    Lines with another number of fields are reported as ``line: expected N fields, got K``
    (with ``min_fields``, any count from ``min_fields`` to ``len(names)`` is accepted and
    missing trailing fields are empty); blank lines are ignored. Quoted values must not
    contain newlines (line numbers would drift).
    """
    if "\r" in text:  # CRLF -> LF; a lone CR ends a line too (as for pyarrow)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    n_expected = len(names)
    n_min = n_expected if min_fields is None else min_fields
    invalid: list[tuple[int, int]] = []

    def handler(row) -> str:  # row.number is None only in the threaded pass (re-run below)
        invalid.append((row.number or 0, row.actual_columns))
        return "skip"

    def parse(threads: bool) -> pa.Table:
        invalid.clear()
        return pcsv.read_csv(
            pa.py_buffer(text.encode("utf-8")),
            read_options=pcsv.ReadOptions(
                column_names=names, skip_rows=1 if header else 0, use_threads=threads,
                block_size=1 << 24,
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=sep,
                quote_char='"' if quoting else False,
                ignore_empty_lines=False,
                invalid_row_handler=handler,
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )

    try:
        table = parse(True)
        if invalid:
            table = parse(False)  # single-threaded: the handler learns line numbers
    except pa.ArrowInvalid as exc:
        if header and "skip initial" in str(exc):  # nothing but the header line
            raise DataFormatError(str(path), None, None, "no records after the header") from None
        raise DataFormatError(str(path), None, None, f"cannot parse: {exc}") from None

    first = 2 if header else 1
    if invalid:
        # rows with too few fields: accept when min_fields allows, by re-parsing them apart
        bad_numbers = np.asarray([n for n, _ in invalid], np.int64)
        n_lines = table.num_rows + len(invalid)
        all_lines = np.arange(first, first + n_lines, dtype=np.int64)
        line_no = np.setdiff1d(all_lines, bad_numbers, assume_unique=True)
        short = [(n, k) for n, k in invalid if n_min <= k < n_expected]
        wrong = [(n, k) for n, k in invalid if not (n_min <= k < n_expected)]
        if short:
            table, line_no = _add_short_rows(text, table, line_no, short, names, sep, quoting, first)
        lines = text.split("\n") if wrong else []
        want = f"{n_expected}" if n_min == n_expected else f"{n_min} to {n_expected}"
        for n, k in wrong:
            if k <= 1 and n <= len(lines) and not lines[n - 1].strip():
                continue  # a whitespace-only line: ignore like a blank one
            one = np.ones(1, dtype=bool)
            errors.bad_rows(path, np.array([n]), one, one.copy(), None,
                            f"expected {want} fields, got {k}")
    else:
        line_no = np.arange(first, first + table.num_rows, dtype=np.int64)

    keep = np.ones(table.num_rows, dtype=bool)
    # blank lines come through as rows of empty strings: drop silently
    if table.num_rows:
        blank = np.ones(table.num_rows, dtype=bool)
        for name in names:
            blank &= np.asarray(pc.equal(pc.utf8_length(table.column(name)), 0))
        keep &= ~blank
    if bad_lines is not None and len(bad_lines):
        keep &= ~np.isin(line_no, bad_lines)
    return Parsed(table, line_no, keep)


def _add_short_rows(text, table, line_no, short, names, sep, quoting, first):
    lines = text.split("\n")
    rows: dict[str, list[Any]] = {name: [] for name in names}
    numbers = []
    for n, _ in short:
        parsed = pcsv.read_csv(
            pa.py_buffer(lines[n - 1].encode("utf-8")),
            read_options=pcsv.ReadOptions(autogenerate_column_names=True),
            parse_options=pcsv.ParseOptions(delimiter=sep, quote_char='"' if quoting else False),
            convert_options=pcsv.ConvertOptions(strings_can_be_null=False),
        )
        values = [str(parsed.column(i)[0].as_py()) for i in range(parsed.num_columns)]
        values += [""] * (len(names) - len(values))
        for name, v in zip(names, values, strict=True):
            rows[name].append(v)
        numbers.append(n)
    extra = pa.table({k: pa.array(v, pa.string()) for k, v in rows.items()})
    merged = pa.concat_tables([table, extra])
    all_no = np.concatenate([line_no, np.asarray(numbers, np.int64)])
    order = np.argsort(all_no, kind="stable")
    return merged.take(pa.array(order)), all_no[order]


def _matching(
    parsed: Parsed, col: pa.Array, path: str | Path, errors: ErrorLog, field_name: str,
    pattern: str, what: str,
) -> pa.Array:
    """``col`` trimmed; values not matching ``pattern`` are reported as ``what`` and become null."""
    col = pc.utf8_trim_whitespace(col)
    ok = np.asarray(pc.match_substring_regex(col, pattern).fill_null(False))
    if not ok.all():
        errors.bad_rows(path, parsed.line_no, ~ok, parsed.keep, field_name, what)
        col = pc.if_else(pa.array(ok), col, pa.scalar(None, pa.string()))
    return col


def parse_int(
    parsed: Parsed,
    col: pa.Array,
    path: str | Path,
    errors: ErrorLog,
    field_name: str,
    dtype: pa.DataType | None = None,
    allowed: tuple[int, ...] | None = None,
) -> pa.Array:
    """Cast a string column to integers; non-integers, values beyond ``±MAX_INT`` (and
    values outside ``allowed``) are reported and become null."""
    col = _matching(parsed, col, path, errors, field_name, _INT_RE, "not an integer")
    digits = pc.utf8_length(pc.utf8_ltrim(col, characters="+-0"))
    big = np.asarray(pc.greater(digits, 18).fill_null(False))
    if big.any():
        errors.bad_rows(path, parsed.line_no, big, parsed.keep, field_name,
                        f"out of range (beyond ±{MAX_INT:.0e})")
        col = pc.if_else(pa.array(big), pa.scalar(None, pa.string()), col)
    values = pc.cast(pc.utf8_ltrim(col, characters="+"), pa.int64())  # Arrow rejects "+5"
    if allowed is not None:
        good = np.asarray(pc.is_in(values, pa.array(allowed, pa.int64())).fill_null(True))
        if not good.all():
            errors.bad_rows(path, parsed.line_no, ~good, parsed.keep, field_name,
                            f"must be one of {', '.join(map(str, allowed))}")
            values = pc.if_else(pa.array(good), values, pa.scalar(None, pa.int64()))
    return pc.cast(values, dtype or pa.int64())


def parse_float(
    parsed: Parsed, col: pa.Array, path: str | Path, errors: ErrorLog, field_name: str,
    limit: float | None = None,
) -> pa.Array:
    """Cast a string column to float64; non-numbers, values that overflow float64 (``1e309``)
    and, with ``limit``, values beyond ``±limit`` are reported and become null."""
    col = _matching(parsed, col, path, errors, field_name, _FLOAT_RE, "not a number")
    values = pc.cast(col, pa.float64())
    mag = np.abs(np.asarray(values.fill_null(0.0)))
    big = ~np.isfinite(mag) if limit is None else ~(mag <= limit)
    if big.any():
        what = "out of range" + ("" if limit is None else f" (beyond ±{limit:.0e})")
        errors.bad_rows(path, parsed.line_no, big, parsed.keep, field_name, what)
        values = pc.if_else(pa.array(big), pa.scalar(None, pa.float64()), values)
    return values


def parse_time(
    parsed: Parsed, col: pa.Array, path: str | Path, errors: ErrorLog, field_name: str
) -> pa.Array:
    """Integer seconds from integer or decimal strings (decimals floored), within ``±MAX_INT``."""
    ints = pc.match_substring_regex(pc.utf8_trim_whitespace(col), _INT_RE)
    if pc.all(ints).as_py() is not False:
        return parse_int(parsed, col, path, errors, field_name)
    seconds = parse_float(parsed, col, path, errors, field_name, limit=float(MAX_INT))
    return pc.cast(pc.floor(seconds), pa.int64())


def check_nonempty(
    parsed: Parsed, col: pa.Array, path: str | Path, errors: ErrorLog, field_name: str
) -> None:
    """Report rows whose ``col`` is empty (after trimming)."""
    empty = np.asarray(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0))
    if empty.any():
        errors.bad_rows(path, parsed.line_no, empty, parsed.keep, field_name, "empty")


def lookup_cats(items: pa.Array, cat_map: dict[str, str] | pa.Table | None) -> pa.Array:
    """Category of each item from an item -> category map; unknown items get :data:`UNKNOWN_CAT`."""
    if cat_map is None:
        return pa.array(np.full(len(items), UNKNOWN_CAT, dtype=object), pa.string())
    if isinstance(cat_map, dict):
        keys = pa.array(list(cat_map.keys()), pa.string())
        vals = pa.array(list(cat_map.values()), pa.string())
    else:
        keys = cat_map.column("item").combine_chunks().cast(pa.string())
        vals = cat_map.column("cat").combine_chunks().cast(pa.string())
    idx = pc.index_in(items.cast(pa.string()), value_set=keys)
    cats = pc.take(vals, idx)
    return pc.fill_null(cats, UNKNOWN_CAT)


def finish_events(path_desc: str, columns: dict[str, pa.Array]) -> pa.Table:
    """Assemble an events table: the canonical columns (``user``, ``item``, ``cat``, ``ts``,
    ``label``) cast to their types, every other column as it is."""
    types = {"user": pa.string(), "item": pa.string(), "cat": pa.string(),
             "ts": pa.int64(), "label": pa.int8()}
    out = {}
    for name, arr in columns.items():
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        out[name] = arr.cast(types[name]) if name in types else arr
    table = pa.table(out)
    if table.num_rows == 0:
        raise DataFormatError(path_desc, None, None, "no valid records")
    return table


def unescape(sep: str) -> str:
    """Turn a command-line separator like ``\\t``, ``tab``, ``\\x02`` into the character."""
    named = {"tab": "\t", "comma": ",", "space": " ", "pipe": "|", "semicolon": ";"}
    if sep.lower() in named:
        return named[sep.lower()]
    if "\\" not in sep:
        return sep
    try:
        return sep.encode("utf-8").decode("unicode_escape")
    except UnicodeDecodeError:
        raise DinrecError(f"not a valid separator escape: {sep!r}") from None


# --------------------------------------------------------------------------- samples
SAMPLE_SCHEMA = pa.schema(
    [
        ("label", pa.int8()),
        ("user", pa.string()),
        ("item", pa.string()),
        ("cat", pa.string()),
        ("hist_items", pa.list_(pa.string())),
        ("hist_cats", pa.list_(pa.string())),
    ]
)


def split_list(
    parsed: Parsed, col: pa.Array, sep: str, path: str | Path, errors: ErrorLog, field_name: str
) -> pa.ListArray:
    """Split a string column into lists on ``sep``; an empty value is the empty list.

    An empty entry inside a non-empty value (``a<sep><sep>b``) is reported as bad.
    """
    col = col.cast(pa.string())
    lists = pc.split_pattern(col, sep)
    values = lists.flatten()
    parent = np.asarray(pc.list_parent_indices(lists))
    row_empty = np.asarray(pc.equal(pc.utf8_length(col), 0).fill_null(True))
    tok_empty = np.asarray(pc.equal(pc.utf8_length(values), 0))
    drop = row_empty[parent]
    bad_tok = tok_empty & ~drop
    if bad_tok.any():
        bad_rows = np.zeros(len(col), dtype=bool)
        bad_rows[parent[bad_tok]] = True
        errors.bad_rows(path, parsed.line_no, bad_rows, parsed.keep, field_name,
                        f"empty entry in a {sep!r}-separated list")
    counts = np.bincount(parent[~drop], minlength=len(col))
    offsets = np.zeros(len(col) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values.filter(pa.array(~drop)))


def finish_samples(path_desc: str, columns: dict[str, pa.Array]) -> pa.Table:
    """Assemble a split sample table with :data:`SAMPLE_SCHEMA` types."""
    arrays = []
    for f in SAMPLE_SCHEMA:
        arr = columns[f.name]
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        arrays.append(arr.cast(f.type))
    table = pa.Table.from_arrays(arrays, schema=SAMPLE_SCHEMA)
    if table.num_rows == 0:
        raise DataFormatError(path_desc, None, None, "no valid records")
    return table
