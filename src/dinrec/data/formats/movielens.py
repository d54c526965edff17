"""``movielens``: GroupLens MovieLens ratings (ml-100k, ml-1m/10m, ml-latest) + movie genres.

Variants, recognised per file from its name or first line (files may be gzipped):

- ml-100k: ``u.data`` (``user \\t item \\t rating \\t ts``), ``u.item``
  (``id|title|date|video date|url|19 genre flags``, latin-1): category = first genre flagged,
  and ``u.user`` (``user|age|gender|occupation|zip``).
- ml-1m / ml-10m: ``ratings.dat`` (``user::item::rating::ts``), ``movies.dat``
  (``id::title::Genre1|Genre2``, latin-1): category = first genre listed, and ``users.dat``
  (``user::gender::age::occupation::zip``; ml-1m codes age and occupation).
- ml-latest(-small) / ml-20m / ml-25m: ``ratings.csv`` (header
  ``userId,movieId,rating,timestamp``) and ``movies.csv`` (``movieId,title,genres``, quoted
  titles): category = first genre (``(no genres listed)`` -> ``unknown``).

A folder input stands for the known files in it. Every rating is an event (implicit
positive) unless ``min_rating`` is given; the events keep the ``rating`` (float64), so a
schema can split them into liked / disliked sequences. Side tables: ``items`` = ``item``,
``cat`` (the first genre), ``genres`` (list<string>, every genre), ``title``, ``year``;
``users`` = ``user``, ``gender``, ``age``, ``occupation``, ``zip``, ``zip_prefix`` (its
first 3 characters).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinrec.data.formats import Format, ReadOptions, ReadResult
from dinrec.data.formats.common import (
    UNKNOWN_CAT,
    ErrorLog,
    check_nonempty,
    decode,
    finish_events,
    lookup_cats,
    parse_float,
    parse_int,
    read_bytes,
    read_delimited,
)
from dinrec.data.formats.features import (
    ColumnKind,
    column_kinds,
    first_values,
    split_multi,
    type_column,
)
from dinrec.data.formats.tables import check_unique, finish_key
from dinrec.errors import DataFormatError

GENRES_100K = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
_KNOWN = re.compile(
    r"^(u\.data|u\.item|u\.user|users\.dat|ratings.*\.(dat|csv)|movies\.(dat|csv))(\.gz)?$")
USER_COLUMNS = ("gender", "age", "occupation", "zip")
_DSEP = "\x1f"  # "::" is rewritten to this one-character separator before parsing


def expand(inputs: Sequence[Path]) -> list[Path]:
    """Files of the inputs, a folder standing for its known MovieLens files."""
    out: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if _KNOWN.match(f.name))
        else:
            out.append(p)
    return out


def detect(path: Path, first_line: str) -> str:
    """``ratings-tab|dat|csv``, ``items-100k``, ``movies-dat|csv`` or ``users-100k|dat``."""
    line = first_line.strip()
    name = path.name.lower()
    if line.lower().startswith("userid,movieid"):
        return "ratings-csv"
    if line.lower().startswith("movieid,title"):
        return "movies-csv"
    if name.startswith("users") or (line.count("::") == 4 and "movie" not in name):
        return "users-dat"
    if "::" in line:
        return "ratings-dat" if line.count("::") == 3 and "movie" not in name else "movies-dat"
    if name.startswith("u.user") or (line.count("|") == 4 and not name.startswith("u.item")):
        return "users-100k"
    if line.count("|") >= 5 or name.startswith("u.item"):
        return "items-100k"
    if "\t" in line or name.startswith("u.data"):
        return "ratings-tab"
    raise DataFormatError(str(path), 1, None, "not a known MovieLens file (u.data, u.item, "
                          "u.user, ratings.dat, movies.dat, users.dat, ratings.csv, movies.csv)")


def read_ratings(path: Path, kind: str, text: str, bad_lines, errors: ErrorLog):
    names = ["user", "item", "rating", "ts"]
    if kind == "ratings-csv":
        parsed = read_delimited(text, path, errors, names, ",", header=True, bad_lines=bad_lines)
    elif kind == "ratings-dat":
        parsed = read_delimited(text.replace("::", _DSEP), path, errors, names, _DSEP,
                                bad_lines=bad_lines)
    else:
        parsed = read_delimited(text, path, errors, names, "\t", bad_lines=bad_lines)
    for name in ("user", "item"):
        check_nonempty(parsed, parsed.column(name), path, errors, name)
    rating = parse_float(parsed, parsed.column("rating"), path, errors, "rating")
    ts = parse_int(parsed, parsed.column("ts"), path, errors, "ts")
    errors.raise_pending()
    cols = {"user": parsed.column("user"), "item": parsed.column("item"),
            "rating": rating, "ts": ts}
    return parsed.filtered(cols), len(parsed.line_no)


def read_items(path: Path, kind: str, text: str, bad_lines, errors: ErrorLog,
               kinds: dict[str, ColumnKind]) -> pa.Table:
    """Items table (item, cat, genres, title, year) of a movies / u.item file."""
    if kind == "items-100k":
        names = ["item", "title", "date", "video_date", "url"] + [f"g{i}" for i in range(19)]
        parsed = read_delimited(text, path, errors, names, "|", bad_lines=bad_lines)
        flags = np.stack([
            np.asarray(pc.equal(parsed.column(f"g{i}"), "1")) for i in range(19)
        ], axis=1)
        bad = np.asarray(~np.isin(np.stack([np.asarray(parsed.column(f"g{i}"))
                                            for i in range(19)], 1), ["0", "1"]).all(axis=1))
        errors.bad_rows(path, parsed.line_no, bad, parsed.keep, "genres", "flags must be 0 or 1")
        offsets = np.zeros(len(flags) + 1, dtype=np.int32)
        np.cumsum(flags.sum(axis=1), out=offsets[1:])
        names_of = np.array(GENRES_100K, dtype=object)[np.nonzero(flags)[1]]
        genres = pa.ListArray.from_arrays(pa.array(offsets), pa.array(names_of, pa.string()))
    else:
        names = ["item", "title", "genres"]
        if kind == "movies-csv":
            parsed = read_delimited(text, path, errors, names, ",", header=True, quoting=True,
                                    bad_lines=bad_lines)
        else:
            # a title may itself hold "::": id = first field, genres = last
            lines = text.split("\n")
            fixed = "\n".join(
                _DSEP.join([ln.split("::", 1)[0], ln.split("::", 1)[1].rsplit("::", 1)[0],
                            ln.rsplit("::", 1)[-1]])
                if ln.count("::") > 2 else ln.replace("::", _DSEP) for ln in lines)
            parsed = read_delimited(fixed, path, errors, names, _DSEP, bad_lines=bad_lines)
        genres = split_multi(pc.if_else(
            pc.equal(pc.utf8_trim_whitespace(parsed.column("genres")), "(no genres listed)"),
            "", parsed.column("genres")), "|")
    cat = pc.fill_null(first_values(genres), UNKNOWN_CAT)
    item = finish_key(parsed, "item", path, errors)
    check_unique(parsed, item, path, errors, "item")
    title = pc.utf8_trim_whitespace(parsed.column("title"))
    year = pc.extract_regex(title, r"\((?P<year>[0-9]{4})\)\s*$").field("year") \
        if len(title) else pa.array([], pa.string())
    cols = {"item": item, "cat": cat, "genres": genres, "title": title, "year": year}
    for name in ("title", "year"):
        cols[name] = type_column(parsed, name, cols[name], path, errors, kinds)
    errors.raise_pending()
    return parsed.filtered(cols)


def read_users(path: Path, kind: str, text: str, bad_lines, errors: ErrorLog,
               kinds: dict[str, ColumnKind]) -> pa.Table:
    """Users table (user, gender, age, occupation, zip, zip_prefix) of a users.dat / u.user."""
    if kind == "users-100k":
        names = ["user", "age", "gender", "occupation", "zip"]
        parsed = read_delimited(text, path, errors, names, "|", bad_lines=bad_lines)
    else:
        names = ["user", "gender", "age", "occupation", "zip"]
        parsed = read_delimited(text.replace("::", _DSEP), path, errors, names, _DSEP,
                                bad_lines=bad_lines)
    user = finish_key(parsed, "user", path, errors)
    check_unique(parsed, user, path, errors, "user")
    cols: dict[str, pa.Array] = {"user": user}
    for name in USER_COLUMNS:  # the same order for every variant
        cols[name] = pc.utf8_trim_whitespace(parsed.column(name))
    cols["zip_prefix"] = pc.utf8_slice_codeunits(cols["zip"], 0, 3)
    for name in [*USER_COLUMNS, "zip_prefix"]:
        cols[name] = type_column(parsed, name, cols[name], path, errors, kinds)
    errors.raise_pending()
    return parsed.filtered(cols)


def read(inputs: Sequence[Path], options: ReadOptions, errors: ErrorLog) -> ReadResult:
    kinds = column_kinds(options.schema)
    ratings, items, users = [], [], []
    records = 0
    result = ReadResult(sources={})
    for path in expand(inputs):
        encoding = "utf-8" if path.name.lower().endswith((".csv", ".csv.gz")) else "latin-1"
        text, bad_lines = decode(read_bytes(path, options.progress), path, errors, encoding)
        first = next((ln for ln in text.split("\n", 5) if ln.strip()), "")
        kind = detect(path, first)
        role = "events" if kind.startswith("ratings") else \
            "users" if kind.startswith("users") else "items"
        result.sources[role] = ", ".join(filter(None, [result.sources.get(role), str(path)]))
        if role == "events":
            table, n = read_ratings(path, kind, text, bad_lines, errors)
            ratings.append(table)
            records += n
        elif role == "users":
            users.append(read_users(path, kind, text, bad_lines, errors, kinds))
        else:
            items.append(read_items(path, kind, text, bad_lines, errors, kinds))
    if not ratings:
        raise DataFormatError(", ".join(map(str, inputs)), None, None, "no ratings file among the inputs")
    table = pa.concat_tables(ratings)
    notes = []
    if options.min_rating is not None:
        keep = pc.greater_equal(table.column("rating"), options.min_rating)
        notes.append(f"{table.num_rows - (pc.sum(keep).as_py() or 0)} ratings below "
                     f"{options.min_rating} dropped")
        table = table.filter(keep)
    item = pc.utf8_trim_whitespace(table.column("item")).combine_chunks()
    if items:
        result.items = _first_wins(pa.concat_tables(items), "item")
        cat = lookup_cats(item, result.items)
        n_unk = pc.sum(pc.equal(cat, UNKNOWN_CAT)).as_py() or 0
        notes.append(f"movies: {result.items.num_rows} items; {n_unk} events without a genre")
    else:
        cat = lookup_cats(item, None)
        notes.append("no movies file: every item in category unknown")
    if users:
        result.users = _first_wins(pa.concat_tables(users), "user")
        notes.append(f"users: {result.users.num_rows} profiles (gender, age, occupation, zip)")
    result.events = finish_events(", ".join(map(str, inputs)), {
        "user": pc.utf8_trim_whitespace(table.column("user")), "item": item, "cat": cat,
        "ts": table.column("ts"), "rating": table.column("rating")})
    result.records, result.notes = records, notes
    return result


def _first_wins(table: pa.Table, key: str) -> pa.Table:
    """Rows of ``table`` whose ``key`` no earlier row has (several files may repeat a key)."""
    codes = np.asarray(table.column(key).combine_chunks().dictionary_encode().indices)
    _, first = np.unique(codes, return_index=True)
    return table.take(pa.array(np.sort(first))).combine_chunks()


FORMAT = Format(
    name="movielens",
    reader=read,
    summary="MovieLens ml-100k / ml-1m / ml-latest ratings + movie genres + user profiles",
    inputs="RATINGS [MOVIES] [USERS] | FOLDER",
)
