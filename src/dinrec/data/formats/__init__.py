"""Readers for real recommendation log formats, by name.

Each reader turns its input files into either an **events** table or a dict of **split
sample** tables (``label``, ``user``, ``item``, ``cat``, ``hist_items``, ``hist_cats``: see
:func:`dinrec.data.prepare_samples`), plus optional **side tables**. :mod:`dinrec.data.prepare`
glues a reader to the sample store. See ``docs/formats.md`` for every format's fields.

What a :class:`ReadResult` holds (the contract with the data core):

* ``events``: ``user``, ``item`` (string), optional ``cat`` (string), ``ts`` (int64 seconds),
  ``label`` (int8 0/1), exactly as before the schema (so the default schema reproduces
  earlier stores), **plus** every other column the input has (user-, item-, context- or
  event-level: a ``rating``, a behaviour ``type``, an ``hour``...), under its input name.
* ``items``: the item side table, one row per item: ``item`` (string, unique) + attribute
  columns; ``users``: the user side table, ``user`` (string, unique) + attributes.

Column types everywhere (events extras and side tables):

* ``string``: a categorical value (null: missing);
* ``list<string>``: a multi-valued feature (genres, category lists, S3-Rec attributes), in
  input order, without empty entries (null or ``[]``: none). Readers that know a column is
  multi-valued (``genres``, ``categories``, ``attrs``) give lists; a generic text column
  stays a string unless the schema declares it ``multi``, in which case it is split on the
  feature's ``sep`` (so the data core may receive either and splits strings on ``sep``);
* ``float64``: a numeric value (finite; null: missing). Columns the schema declares
  ``numeric`` (or that a sequence filters with ``">=4"``-style bounds) are parsed by the
  reader, so a non-number is reported as ``file:line: column: not a number``.

With ``ReadOptions.schema`` set, :meth:`Format.read` also checks that every column the
schema names exists (``file:1: column: no such column ...``) before anything is written.

    >>> from dinrec.data.formats import FORMATS, ReadOptions, ErrorLog
    >>> result = FORMATS["movielens"].read(["ml-100k/u.data"], ReadOptions(), ErrorLog())
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from dinrec.data.formats.common import UNKNOWN_CAT, ErrorLog, OnError

if TYPE_CHECKING:
    from dinrec.data.schema import Schema


@dataclass
class ReadOptions:
    """Options of the readers; each field names the formats that use it."""

    progress: bool = False  # all: tqdm bar on stderr while reading big files
    hist_sep: str = "\x02"  # dien-text: history separator
    min_rating: float | None = None  # movielens, amazon: keep ratings >= this (None: all)
    user_col: str = "user"  # events
    item_col: str = "item"  # events
    cat_col: str | None = None  # events
    time_col: str | None = None  # events
    label_col: str | None = None  # events
    sep: str | None = None  # events: field separator (None: sniffed from the header)
    item_cats: Path | None = None  # events: item -> category table
    item_cats_cols: tuple[str, str] | None = None  # events: its (item, category) columns
    item_attrs: Path | None = None  # sequences: item -> [attributes] JSON map
    item_table: Path | None = None  # events: item side table (CSV/TSV/Parquet/JSON lines)
    item_key: str | None = None  # events: its item column (default: item_col, else the first)
    user_table: Path | None = None  # events: user side table (CSV/TSV/Parquet/JSON lines)
    user_key: str | None = None  # events: its user column (default: user_col, else the first)
    preset: str = "small"  # synthetic
    schema: Schema | None = None  # all: type the columns it names, check they exist


@dataclass
class ReadResult:
    """What a reader returns: exactly one of ``events`` or ``splits``."""

    events: pa.Table | None = None
    splits: dict[str, pa.Table] | None = None
    items: pa.Table | None = None  # item side table: "item" + attribute columns
    users: pa.Table | None = None  # user side table: "user" + attribute columns
    sources: dict[str, str] = field(default_factory=dict)  # "events"/"items"/"users" -> file(s)
    records: int = 0  # input records read (lines, rows or samples), before any filter
    notes: list[str] = field(default_factory=list)  # facts worth printing in the summary


Reader = Callable[[Sequence[Path], ReadOptions, ErrorLog], ReadResult]


@dataclass(frozen=True)
class Format:
    """A registered input format."""

    name: str
    reader: Reader
    summary: str
    inputs: str  # how the positional inputs are read, for --help
    min_inputs: int = 1

    def read(self, inputs: Sequence[Path], options: ReadOptions, errors: ErrorLog) -> ReadResult:
        """Run the reader; with ``options.schema``, check every column it names exists."""
        result = self.reader([Path(p) for p in inputs], options, errors)
        if options.schema is not None:
            from dinrec.data.formats.features import check_columns

            check_columns(result, options.schema, self.name, inputs, options)
        return result


def _registry() -> dict[str, Format]:
    from dinrec.data.formats import (
        amazon,
        dien_text,
        din_csv,
        events,
        movielens,
        sequences,
        synthetic,
    )

    mods = [dien_text, din_csv, amazon, movielens, events, sequences, synthetic]
    return {m.FORMAT.name: m.FORMAT for m in mods}


FORMATS: dict[str, Format] = _registry()

__all__ = [
    "FORMATS",
    "UNKNOWN_CAT",
    "ErrorLog",
    "Format",
    "OnError",
    "ReadOptions",
    "ReadResult",
    "Reader",
]
