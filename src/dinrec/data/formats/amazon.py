"""``amazon``: raw Amazon review dumps (McAuley, UCSD; 2014 and 2018 releases).

Reviews: one JSON object a line with ``reviewerID``, ``asin``, ``unixReviewTime`` (and
``overall``, used by ``--min-rating``). Metadata: one object a line with ``asin`` and
``categories`` (2014: list of category paths, e.g. ``[["Beauty", "Skin Care", "Face"]]``)
or ``category`` (2018: one flat path). The item category is the last entry of the last
path, as DIN's reference pipeline does (``categories[-1][-1]``); items without metadata
get ``<unk>``. The 2014 metadata files are Python dict literals, not JSON: they are read
with :func:`ast.literal_eval` (never ``eval``). Files may be gzipped (detected by magic
bytes); whether a file is reviews or metadata is detected from its first record.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pjson

from dinrec.data.formats import Format, ReadOptions, ReadResult
from dinrec.data.formats.common import (
    MAX_INT,
    UNKNOWN_CAT,
    ErrorLog,
    decode,
    finish_events,
    lookup_cats,
    parse_record,
    read_bytes,
)
from dinrec.data.formats.features import ColumnKind, column_kinds, type_column
from dinrec.data.formats.tables import records_to_parsed, scalars
from dinrec.errors import DataFormatError

log = logging.getLogger(__name__)

_REVIEW_SCHEMA = pa.schema([("reviewerID", pa.string()), ("asin", pa.string()),
                            ("overall", pa.float64()), ("unixReviewTime", pa.int64())])


def review_fields(obj: dict[str, Any], path: str | Path, line_no: int):
    """(user, item, ts, rating or None) of a review record."""
    out = []
    for key in ("reviewerID", "asin"):
        v = obj.get(key)
        if not isinstance(v, str | int) or isinstance(v, bool) or str(v) == "":
            raise DataFormatError(str(path), line_no, key, "missing" if v is None else "not a string")
        out.append(str(v))
    ts = obj.get("unixReviewTime")
    if isinstance(ts, str) and ts.strip().lstrip("+-").isdigit():
        ts = int(ts)
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise DataFormatError(str(path), line_no, "unixReviewTime",
                              "missing" if ts is None else "not an integer")
    if abs(ts) > MAX_INT:
        raise DataFormatError(str(path), line_no, "unixReviewTime",
                              f"out of range (beyond ±{MAX_INT:.0e})")
    rating = obj.get("overall")
    if rating is not None:
        try:
            rating = float(rating)
        except (TypeError, ValueError, OverflowError):
            raise DataFormatError(str(path), line_no, "overall", "not a number") from None
        if not math.isfinite(rating):
            raise DataFormatError(str(path), line_no, "overall", "not a finite number")
    return out[0], out[1], ts, rating


def meta_category(obj: dict[str, Any], path: str | Path, line_no: int) -> tuple[str, str | None]:
    """(asin, category or None) of a metadata record."""
    asin = obj.get("asin")
    if not isinstance(asin, str) or not asin:
        raise DataFormatError(str(path), line_no, "asin", "missing" if asin is None else "not a string")
    cats = obj.get("categories", obj.get("category"))
    if cats is None or cats == []:
        return asin, None
    if not isinstance(cats, list):
        raise DataFormatError(str(path), line_no, "categories", "not a list")
    last = cats[-1]
    if isinstance(last, list):
        if not last:
            return asin, None
        last = last[-1]
    if not isinstance(last, str):
        raise DataFormatError(str(path), line_no, "categories", "not a list of string lists")
    return asin, last or None


def meta_attributes(obj: dict[str, Any], extra: Iterable[str] = ()) -> dict[str, Any]:
    """``categories`` (every distinct entry of every path, in order), ``brand``, ``price``
    (a finite number >= 0, from 9.99 or "$1,299.00"; anything else, e.g. a range, is None)
    and the ``extra`` fields as they are, of a metadata record."""
    cats = obj.get("categories", obj.get("category"))
    flat = dict.fromkeys(s.strip() for s in scalars(cats) if s.strip())
    brand = obj.get("brand")
    brand = (brand.strip() or None) if isinstance(brand, str) else None
    out = {"categories": list(flat), "brand": brand, "price": _price(obj.get("price"))}
    for name in extra:
        if name not in out and name in obj:
            out[name] = obj[name]
    return out


def _price(v: Any) -> float | None:
    if isinstance(v, str):
        v = v.strip().lstrip("$").replace(",", "")
        try:
            v = float(v) if re.fullmatch(r"[0-9]+(\.[0-9]*)?", v) else None
        except OverflowError:
            v = None
    if not isinstance(v, int | float) or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except OverflowError:
        return None
    return v if math.isfinite(v) and v >= 0 else None


def _lines(text: str, progress: bool, name: str) -> Iterator[tuple[int, str]]:
    from tqdm import tqdm

    lines = text.split("\n")
    for i, line in enumerate(tqdm(lines, desc=f"parsing {name}", unit=" lines",
                                  disable=not progress, leave=False), start=1):
        if line.strip():
            yield i, line


def _kind(text: str, path: Path) -> str:
    for line_no, line in _lines(text, False, ""):
        obj = parse_record(line, path, line_no)
        if "reviewerID" in obj:
            return "reviews"
        if "asin" in obj:
            return "meta"
        raise DataFormatError(str(path), line_no, None,
                              "neither a review (reviewerID) nor a metadata record (asin)")
    raise DataFormatError(str(path), None, None, "empty file")


def read_reviews(path: Path, text: str, data: bytes, bad_lines: np.ndarray,
                 options: ReadOptions, errors: ErrorLog) -> tuple[dict[str, pa.Array], int]:
    """Columns user, item, ts, rating of one reviews file."""
    if not len(bad_lines):
        try:  # fast path: strict JSON lines with the right types and nothing missing
            table = pjson.read_json(
                pa.py_buffer(data),
                parse_options=pjson.ParseOptions(explicit_schema=_REVIEW_SCHEMA,
                                                 unexpected_field_behavior="ignore"),
            )
            needed = ["reviewerID", "asin", "unixReviewTime"]
            if all(table.column(c).null_count == 0 for c in needed) and (
                options.min_rating is None or table.column("overall").null_count == 0
            ) and table.num_rows == text.count("\n") + (not text.endswith("\n")):
                cols = {"user": table.column("reviewerID"), "item": table.column("asin"),
                        "ts": table.column("unixReviewTime"), "rating": table.column("overall")}
                empty = pc.any(pc.equal(pc.utf8_length(table.column("reviewerID")), 0)).as_py()
                empty = empty or pc.any(pc.equal(pc.utf8_length(table.column("asin")), 0)).as_py()
                ts_max = pc.max(pc.abs(table.column("unixReviewTime"))).as_py() or 0
                rating = table.column("overall")
                finite = pc.all(pc.is_finite(rating.filter(pc.is_valid(rating)))).as_py()
                if not empty and ts_max <= MAX_INT and finite is not False:
                    return cols, table.num_rows
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            pass
        log.debug("%s: not plain JSON lines, using the line parser", path)
    users, items, tss, ratings = [], [], [], []
    n = 0
    bad = set(bad_lines.tolist())
    for line_no, line in _lines(text, options.progress, path.name):
        n += 1
        if line_no in bad:
            continue
        try:
            user, item, ts, rating = review_fields(parse_record(line, path, line_no), path, line_no)
            if options.min_rating is not None and rating is None:
                raise DataFormatError(str(path), line_no, "overall", "missing")
        except DataFormatError as exc:
            errors.bad(exc.path, exc.line or line_no, exc.field, exc.reason)
            continue
        users.append(user)
        items.append(item)
        tss.append(ts)
        ratings.append(rating)
    return {"user": pa.array(users, pa.string()), "item": pa.array(items, pa.string()),
            "ts": pa.array(tss, pa.int64()), "rating": pa.array(ratings, pa.float64())}, n


def read_meta(path: Path, text: str, bad_lines: np.ndarray, options: ReadOptions,
              errors: ErrorLog, extra: Iterable[str]) -> list[tuple[int, dict[str, Any]]]:
    """Item records (``item``, ``cat``, attributes) of one metadata file, first of an asin."""
    out: list[tuple[int, dict[str, Any]]] = []
    seen: set[str] = set()
    bad = set(bad_lines.tolist())
    for line_no, line in _lines(text, options.progress, path.name):
        if line_no in bad:
            continue
        try:
            obj = parse_record(line, path, line_no)
            asin, cat = meta_category(obj, path, line_no)
        except DataFormatError as exc:
            errors.bad(exc.path, exc.line or line_no, exc.field, exc.reason)
            continue
        if asin not in seen:
            seen.add(asin)
            out.append((line_no, {"item": asin, "cat": cat or UNKNOWN_CAT,
                                  **meta_attributes(obj, extra)}))
    return out


def items_table(records: list[tuple[int, dict[str, Any]]], path: str,
                errors: ErrorLog, kinds: dict[str, ColumnKind]) -> pa.Table:
    """The items side table of metadata records; schema-named fields typed (``path`` may
    name several files: line numbers then refer to the first)."""
    price = pa.array([r.get("price") for _, r in records], pa.float64())
    parsed = records_to_parsed([(n, {k: v for k, v in r.items() if k != "price"})
                                for n, r in records])
    cols = {}
    for name in parsed.table.column_names:
        col = parsed.column(name)
        if name == "categories" and not pa.types.is_list(col.type):
            col = col.cast(pa.list_(pa.string())) if col.null_count == len(col) else col
        cols[name] = col if name in ("item", "cat", "categories") else \
            type_column(parsed, name, col, path, errors, kinds)
    cols["price"] = price
    errors.raise_pending()
    return parsed.filtered(cols)


def read(inputs: Sequence[Path], options: ReadOptions, errors: ErrorLog) -> ReadResult:
    reviews: list[dict[str, pa.Array]] = []
    kinds = column_kinds(options.schema)
    meta: list[tuple[int, dict[str, Any]]] = []
    seen: set[str] = set()
    records = 0
    result = ReadResult(sources={})
    for path in map(Path, inputs):
        data = read_bytes(path, options.progress)
        text, bad_lines = decode(data, path, errors)
        errors.raise_pending()
        role = "events" if _kind(text, path) == "reviews" else "items"
        result.sources[role] = ", ".join(filter(None, [result.sources.get(role), str(path)]))
        if role == "events":
            cols, n = read_reviews(path, text, data, bad_lines, options, errors)
            reviews.append(cols)
            records += n
        else:
            for rec in read_meta(path, text, bad_lines, options, errors, kinds):
                if rec[1]["item"] not in seen:
                    seen.add(rec[1]["item"])
                    meta.append(rec)
    if not reviews:
        raise DataFormatError(", ".join(map(str, inputs)), None, None,
                              "no reviews file among the inputs (records with reviewerID)")
    cols = {k: pa.chunked_array([c[k] for c in reviews]).combine_chunks() for k in reviews[0]}
    notes = result.notes
    if options.min_rating is not None:
        keep = pc.greater_equal(cols["rating"], options.min_rating).fill_null(False)
        dropped = len(keep) - (pc.sum(keep).as_py() or 0)
        cols = {k: v.filter(keep) for k, v in cols.items()}
        notes.append(f"{dropped} reviews rated below {options.min_rating} dropped")
    if "items" in result.sources:
        cat_map = {r["item"]: r["cat"] for _, r in meta if r["cat"] != UNKNOWN_CAT}
        cat = lookup_cats(cols["item"], cat_map)
        notes.append(f"metadata: {len(meta)} items, {len(set(cat_map.values()))} categories")
        if meta:
            result.items = items_table(meta, result.sources["items"], errors, kinds)
    else:
        cat = lookup_cats(cols["item"], None)
        notes.append("no metadata file: every item in category unknown")
    result.events = finish_events(", ".join(map(str, inputs)),
                                  {"user": cols["user"], "item": cols["item"], "cat": cat,
                                   "ts": cols["ts"], "rating": cols["rating"]})
    result.records = records
    return result


FORMAT = Format(
    name="amazon",
    reader=read,
    summary="raw Amazon review dumps: reviews JSON lines + metadata (JSON or Python literals)",
    inputs="REVIEWS... [META...]",
)
