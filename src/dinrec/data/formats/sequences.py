"""``sequences``: one line per user, ``user item1 item2 ...`` (whitespace-separated, oldest first).

The S3-Rec / ICLRec sequential data (Amazon Beauty, Toys, Last.fm) look like this. There
are no timestamps: file order is time order, so the events carry no ``ts`` column. An
optional ``{"item": [attr, ...]}`` JSON map (an input whose content starts with ``{``, or
``item_attrs``) gives the item side table: ``attrs`` (list<string>, **every** attribute, one
multi-valued item feature) and ``cat``, the **first** attribute (for the S3-Rec Amazon files
usually the brand id; the category of the default schema). Items missing from it, or with
no attributes, get the category ``unknown``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinrec.data.formats import Format, ReadOptions, ReadResult
from dinrec.data.formats.common import (
    UNKNOWN_CAT,
    ErrorLog,
    check_unicode,
    decode,
    finish_events,
    lookup_cats,
    read_bytes,
)
from dinrec.data.formats.features import first_values
from dinrec.errors import DataFormatError


def read_attrs(path: Path, text: str, errors: ErrorLog) -> dict[str, list[str]]:
    """item -> every attribute (as strings, in order), from a JSON object of lists."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(str(path), exc.lineno, None, f"invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise DataFormatError(str(path), None, None, "invalid JSON: nested too deeply") from None
    check_unicode(text, obj, path, None)
    if not isinstance(obj, dict):
        raise DataFormatError(str(path), 1, None, "expected a JSON object {item: [attributes]}")
    fast = _plain_attrs(obj)
    if fast is not None:
        return fast
    out: dict[str, list[str]] = {}
    for item, attrs in obj.items():
        if not isinstance(attrs, list):
            errors.bad(path, 1, str(item)[:40], "attributes must be a list")
            continue
        if any(isinstance(a, list | dict) or a is None or isinstance(a, bool) for a in attrs):
            errors.bad(path, 1, str(item)[:40], "attribute must be a string or number")
            continue
        values = [str(a) for a in attrs]
        if any(not v for v in values):
            errors.bad(path, 1, str(item)[:40], "empty attribute")
            continue
        out[str(item)] = values
    return out


def _plain_attrs(obj: dict) -> dict[str, list[str]] | None:
    """The map when every value is a list of non-empty strings or of int64s (the S3-Rec
    files), converted by Arrow in one go; None when anything needs the checked loop."""
    try:
        lists = pa.array(list(obj.values()))
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None
    t = lists.type
    if not (pa.types.is_list(t) and (pa.types.is_int64(t.value_type)
                                     or pa.types.is_string(t.value_type))):
        return None
    flat = lists.flatten()
    if lists.null_count or flat.null_count:
        return None
    flat = flat.cast(pa.string())
    if len(flat) and pc.any(pc.equal(pc.utf8_length(flat), 0)).as_py():
        return None
    values = pa.ListArray.from_arrays(lists.offsets, flat).to_pylist()
    return dict(zip(map(str, obj.keys()), values, strict=True))


def items_table(attrs: dict[str, list[str]]) -> pa.Table:
    """Items side table: ``item``, ``cat`` (first attribute, or ``unknown``), ``attrs`` (all)."""
    lists = pa.array(list(attrs.values()), pa.list_(pa.string()))
    return pa.table({"item": pa.array(list(attrs.keys()), pa.string()),
                     "cat": pc.fill_null(first_values(lists), UNKNOWN_CAT), "attrs": lists})


def read_sequences(path: Path, text: str, bad_lines: np.ndarray,
                   errors: ErrorLog) -> tuple[pa.Array, pa.Array, int]:
    """(user, item) columns of a sequence file, and its number of non-blank lines."""
    lines = pc.split_pattern(pa.array([text], pa.large_string()), "\n").flatten()
    lines = pc.utf8_trim_whitespace(lines)
    tokens = pc.utf8_split_whitespace(lines)
    n_tok = np.asarray(pc.list_value_length(tokens))
    line_no = np.arange(1, len(n_tok) + 1, dtype=np.int64)
    keep = np.asarray(pc.utf8_length(lines)) > 0  # blank lines: ignored
    n_lines = int(keep.sum())
    if len(bad_lines):
        keep &= ~np.isin(line_no, bad_lines)
    errors.bad_rows(path, line_no, n_tok == 1, keep, "items", "a user with no items")
    errors.raise_pending()
    tokens = tokens.filter(pa.array(keep))
    n_items = n_tok[keep] - 1
    users = pc.list_element(tokens, 0) if len(tokens) else pa.array([], pa.large_string())
    user = pc.take(users, pa.array(np.repeat(np.arange(len(n_items)), n_items)))
    item = pc.list_slice(tokens, 1).flatten() if len(tokens) else pa.array([], pa.large_string())
    return user, item, n_lines


def read(inputs: Sequence[Path], options: ReadOptions, errors: ErrorLog) -> ReadResult:
    users, items = [], []
    attrs: dict[str, list[str]] | None = None
    seq_paths = []
    records = 0
    attr_paths = [Path(options.item_attrs)] if options.item_attrs else []
    for path in map(Path, inputs):
        data = read_bytes(path, options.progress)
        if data.lstrip()[:1] == b"{":
            attr_paths.append(path)
            continue
        text, bad_lines = decode(data, path, errors)
        user, item, n = read_sequences(path, text, bad_lines, errors)
        seq_paths.append(path)
        users.append(user)
        items.append(item)
        records += n
    if not users:
        raise DataFormatError(", ".join(map(str, inputs)), None, None, "no sequence file among the inputs")
    for path in attr_paths:
        text, _ = decode(read_bytes(path, options.progress), path, errors)
        errors.raise_pending()
        attrs = {**read_attrs(path, text, errors), **(attrs or {})}
    item = pa.concat_arrays([i.cast(pa.string()) for i in items])
    src = ", ".join(map(str, seq_paths))
    result = ReadResult(records=records, sources={"events": src})
    if attrs is not None:
        result.items = items_table(attrs)
        result.sources["items"] = ", ".join(map(str, attr_paths))
        n_attr = len({a for v in attrs.values() for a in v})
        n_first = len({v[0] for v in attrs.values() if v})
        result.notes.append(f"attributes: {len(attrs)} items, {n_attr} distinct attributes "
                            f"(item feature attrs), {n_first} distinct first ones (cat)")
    cat = lookup_cats(item, {k: v[0] for k, v in (attrs or {}).items() if v}
                      if attrs is not None else None)
    result.events = finish_events(", ".join(map(str, inputs)), {
        "user": pa.concat_arrays([u.cast(pa.string()) for u in users]), "item": item,
        "cat": cat})
    return result


FORMAT = Format(
    name="sequences",
    reader=read,
    summary="one line per user 'user item1 item2 ...' + optional item->attributes JSON",
    inputs="SEQUENCES... [ITEM2ATTRIBUTES.json]",
)
