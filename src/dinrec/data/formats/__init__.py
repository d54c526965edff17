"""Readers for real recommendation log formats, by name.

Each reader turns its input files into either an **events** table (``user``, ``item``,
optional ``cat``, ``ts``, ``label``: see :func:`dinrec.data.prepare_events`) or a dict of
**split sample** tables (``label``, ``user``, ``item``, ``cat``, ``hist_items``,
``hist_cats``: see :func:`dinrec.data.prepare_samples`). :mod:`dinrec.data.prepare` glues a
reader to the sample store. See ``docs/formats.md`` for every format's fields and options.

    >>> from dinrec.data.formats import FORMATS, ReadOptions, ErrorLog
    >>> result = FORMATS["movielens"].read(["ml-100k/u.data"], ReadOptions(), ErrorLog())
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from dinrec.data.formats.common import UNKNOWN_CAT, ErrorLog, OnError


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
    preset: str = "small"  # synthetic


@dataclass
class ReadResult:
    """What a reader returns: exactly one of ``events`` or ``splits``."""

    events: pa.Table | None = None
    splits: dict[str, pa.Table] | None = None
    records: int = 0  # input records read (lines, rows or samples), before any filter
    notes: list[str] = field(default_factory=list)  # facts worth printing in the summary


Reader = Callable[[Sequence[Path], ReadOptions, ErrorLog], ReadResult]


@dataclass(frozen=True)
class Format:
    """A registered input format."""

    name: str
    read: Reader
    summary: str
    inputs: str  # how the positional inputs are read, for --help
    min_inputs: int = 1


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
