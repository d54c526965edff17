"""The readers' side of the feature schema: type the columns a schema names, check they exist.

:func:`column_kinds` says, for every input column a schema reads, whether it must be
numeric (a ``numeric`` feature, or a sequence filter with ``">=4"``-style bounds) or
multi-valued (a ``multi`` feature, with its separator). :func:`type_column` converts one
string column of a parsed file accordingly, reporting bad values as ``file:line: column:``.
:func:`check_columns` runs after a reader: every column the schema names must be in the
events or the side table of its role, with a usable type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinrec.data.encode import split_multi
from dinrec.data.formats.common import ErrorLog, Parsed, parse_float
from dinrec.errors import DataFormatError

if TYPE_CHECKING:
    from dinrec.data.formats import ReadOptions, ReadResult
    from dinrec.data.schema import Feature, Schema

#: per-event features the data core computes itself (never read from a column)
BUILTIN = frozenset({"time_gap"})
#: split-sample formats carry only these columns
SAMPLE_COLUMNS = frozenset({"user", "item", "cat", "label"})


@dataclass(frozen=True)
class ColumnKind:
    """How a reader must type one input column."""

    kind: str  # "numeric" | "multi" | "categorical"
    sep: str = "|"
    feature: str = ""  # the (first) feature that reads it, for messages


def _bounded(values: list[str] | None) -> bool:
    return bool(values) and all(str(v).lstrip()[:1] in "<>=!" for v in values or [])


def column_kinds(schema: Schema | None) -> dict[str, ColumnKind]:
    """Input column -> how to type it; numeric wins over multi over categorical."""
    if schema is None:
        return {}
    rank = {"categorical": 0, "multi": 1, "numeric": 2}
    out: dict[str, ColumnKind] = {}

    def add(col: str, kind: ColumnKind) -> None:
        if col not in out or rank[kind.kind] > rank[out[col].kind]:
            out[col] = kind

    for _, f in schema.features():
        kind = "numeric" if f.kind == "numeric" else f.kind
        add(f.source, ColumnKind(kind, f.sep, f.name))
    for s in schema.sequences:
        if s.filter_column and _bounded(s.values):
            add(s.filter_column, ColumnKind("numeric", feature=f"sequences.{s.name}"))
    return out


def first_values(lists: pa.Array) -> pa.Array:
    """The first value of each list as a string (null for a null or empty list)."""
    flat = lists.flatten().cast(pa.string())
    rows, first = np.unique(np.asarray(pc.list_parent_indices(lists)), return_index=True)
    take = np.full(len(lists), -1, dtype=np.int64)
    take[rows] = first
    return flat.take(pa.array(take, mask=take < 0))


def type_column(parsed: Parsed, name: str, col: pa.Array, path: str | Path,
                errors: ErrorLog, kinds: dict[str, ColumnKind]) -> pa.Array:
    """``col`` (strings or lists of strings) typed as the schema reads column ``name``.

    Numeric: float64, empty = null, a non-number or an overflow is a bad line; a list
    holding more than one value is a bad line. Multi: a string column split on ``sep``.
    """
    spec = kinds.get(name)
    if spec is None:
        return col
    is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
    if spec.kind == "numeric":
        if is_list:  # e.g. a JSON field: one number in a list is fine, more is not
            n_values = np.asarray(pc.list_value_length(col).fill_null(0))
            errors.bad_rows(path, parsed.line_no, n_values > 1, parsed.keep, name,
                            f"a list, not one number (numeric feature {spec.feature!r})")
            col = first_values(col)
        col = pc.utf8_trim_whitespace(pc.fill_null(col.cast(pa.string()), ""))
        empty = pc.equal(pc.utf8_length(col), 0)
        values = parse_float(parsed, pc.if_else(empty, "0", col), path, errors, name)
        return pc.if_else(empty, pa.scalar(None, pa.float64()), values)
    if spec.kind == "multi" and not is_list:
        return split_multi(col, spec.sep)
    return col


# ------------------------------------------------------------------------- checks
def _where(result: ReadResult, table: str, inputs: Sequence[Path]) -> str:
    return result.sources.get(table) or ", ".join(map(str, inputs)) or "(no input)"


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _check_type(where: str, col: str, t: pa.DataType, f: Feature | None, numeric: bool) -> None:
    if numeric and not (pa.types.is_floating(t) or pa.types.is_integer(t)):
        raise DataFormatError(where, None, col, f"is {t}, not numbers "
                              f"(numeric {'feature ' + repr(f.name) if f else 'filter'})")
    if f is not None and f.kind == "categorical" and _is_list(t):
        raise DataFormatError(where, None, col, f"holds lists: declare feature {f.name!r} "
                              "with kind \"multi\"")
    if f is None and _is_list(t):
        raise DataFormatError(where, None, col, "holds lists (a multi-valued feature reads it): "
                              "a sequence filter needs one value per event")


def check_columns(result: ReadResult, schema: Schema, fmt: str, inputs: Sequence[Path],
                  options: ReadOptions) -> None:
    """Every column ``schema`` reads exists where its role looks for it, with a usable type.

    User features: the users table or the events; item features: the items table or the
    events; context, per-event features and sequence filters: the events. ``user``,
    ``item``, ``cat`` and built-in per-event features are always available (``cat`` is
    still type-checked where a reader gives it).
    """
    if result.splits is not None:
        tables = {"events": next(iter(result.splits.values()))}
    else:
        tables = {"events": result.events}
    if result.items is not None:
        tables["items"] = result.items
    if result.users is not None:
        tables["users"] = result.users
    wanted: list[tuple[tuple[str, ...], str, Feature | None, bool]] = []
    for role, feat in schema.features():
        if feat is schema.user_key or feat is schema.item_key or feat.source in BUILTIN:
            continue
        look: tuple[str, ...] = {"user": ("users", "events"),
                                 "item": ("items", "events")}.get(role, ("events",))
        wanted.append((look, feat.source, feat, feat.is_numeric))
    for s in schema.sequences:
        if s.filter_column:
            wanted.append((("events",), s.filter_column, None, _bounded(s.values)))
    for look, col, f, numeric in wanted:
        found = [t for t in look if t in tables and col in tables[t].column_names]
        if not found and col == "cat":
            continue  # always there: the core gives every item "unknown"
        if not found:
            role = f"feature {f.name!r}" if f is not None else "sequence filter"
            avail = sorted({c for t in look if t in tables for c in tables[t].column_names})
            hint = " (split-sample formats carry only user, item, cat)" \
                if result.splits is not None else ""
            raise DataFormatError(_where(result, look[0] if look[0] in tables else "events",
                                         inputs), None, col,
                                  f"no such column for {role}{hint}; columns: {', '.join(avail)}")
        table = found[0]
        _check_type(_where(result, table, inputs), col, tables[table].schema.field(col).type,
                    f, numeric)
