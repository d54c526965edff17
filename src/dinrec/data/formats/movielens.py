"""``movielens``: GroupLens MovieLens ratings (ml-100k, ml-1m/10m, ml-latest) + movie genres.

Variants, recognised per file from its name or first line (files may be gzipped):

- ml-100k: ``u.data`` (``user \\t item \\t rating \\t ts``) and ``u.item``
  (``id|title|date|video date|url|19 genre flags``, latin-1): category = first genre flagged.
- ml-1m / ml-10m: ``ratings.dat`` (``user::item::rating::ts``) and ``movies.dat``
  (``id::title::Genre1|Genre2``, latin-1): category = first genre listed.
- ml-latest(-small) / ml-20m / ml-25m: ``ratings.csv`` (header
  ``userId,movieId,rating,timestamp``) and ``movies.csv`` (``movieId,title,genres``, quoted
  titles): category = first genre (``(no genres listed)`` -> ``<unk>``).

A folder input stands for the known files in it. Every rating is an event (implicit
positive) unless ``min_rating`` is given.
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
from dinrec.errors import DataFormatError

GENRES_100K = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
_KNOWN = re.compile(r"^(u\.data|u\.item|ratings.*\.(dat|csv)|movies\.(dat|csv))(\.gz)?$")
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
    """``ratings-tab``, ``items-100k``, ``ratings-dat``, ``movies-dat``, ``ratings-csv`` or ``movies-csv``."""
    line = first_line.strip()
    name = path.name.lower()
    if line.lower().startswith("userid,movieid"):
        return "ratings-csv"
    if line.lower().startswith("movieid,title"):
        return "movies-csv"
    if "::" in line:
        return "ratings-dat" if line.count("::") == 3 and "movie" not in name else "movies-dat"
    if line.count("|") >= 5 or name.startswith("u.item"):
        return "items-100k"
    if "\t" in line or name.startswith("u.data"):
        return "ratings-tab"
    raise DataFormatError(str(path), 1, None, "not a known MovieLens file (u.data, u.item, "
                          "ratings.dat, movies.dat, ratings.csv, movies.csv)")


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


def read_items(path: Path, kind: str, text: str, bad_lines, errors: ErrorLog) -> pa.Table:
    """Table (item, cat) of a movies / u.item file."""
    if kind == "items-100k":
        names = ["item", "title", "date", "video_date", "url"] + [f"g{i}" for i in range(19)]
        parsed = read_delimited(text, path, errors, names, "|", bad_lines=bad_lines)
        flags = np.stack([
            np.asarray(pc.equal(parsed.column(f"g{i}"), "1")) for i in range(19)
        ], axis=1)
        bad = ~np.isin(np.stack([np.asarray(parsed.column(f"g{i}")) for i in range(19)], 1),
                       ["0", "1"]).all(axis=1)
        errors.bad_rows(path, parsed.line_no, bad, parsed.keep, "genres", "flags must be 0 or 1")
        genres = np.array(GENRES_100K + [UNKNOWN_CAT], dtype=object)
        first = np.where(flags.any(axis=1), flags.argmax(axis=1), len(GENRES_100K))
        cat = pa.array(genres[first], pa.string())
    else:
        names = ["item", "title", "genres"]
        if kind == "movies-csv":
            parsed = read_delimited(text, path, errors, names, ",", header=True, quoting=True,
                                    bad_lines=bad_lines)
        else:
            # a title may itself hold "::": id = first field, genres = last
            lines = text.split("\n")
            fixed = "\n".join(
                _DSEP.join([ln.split("::", 1)[0], "", ln.rsplit("::", 1)[-1]])
                if ln.count("::") > 2 else ln.replace("::", _DSEP) for ln in lines)
            parsed = read_delimited(fixed, path, errors, names, _DSEP, bad_lines=bad_lines)
        genres = pc.list_element(pc.split_pattern(parsed.column("genres"), "|"), 0)
        genres = pc.utf8_trim_whitespace(genres)
        unknown = pc.or_(pc.equal(genres, ""), pc.equal(genres, "(no genres listed)"))
        cat = pc.if_else(unknown, UNKNOWN_CAT, genres)
    check_nonempty(parsed, parsed.column("item"), path, errors, "item")
    errors.raise_pending()
    return parsed.filtered({"item": pc.utf8_trim_whitespace(parsed.column("item")), "cat": cat})


def read(inputs: Sequence[Path], options: ReadOptions, errors: ErrorLog) -> ReadResult:
    files = expand(inputs)
    ratings, items = [], []
    records = 0
    for path in files:
        encoding = "utf-8" if path.name.lower().endswith((".csv", ".csv.gz")) else "latin-1"
        text, bad_lines = decode(read_bytes(path, options.progress), path, errors, encoding)
        first = next((ln for ln in text.split("\n", 5) if ln.strip()), "")
        kind = detect(path, first)
        if kind.startswith("ratings"):
            table, n = read_ratings(path, kind, text, bad_lines, errors)
            ratings.append(table)
            records += n
        else:
            items.append(read_items(path, kind, text, bad_lines, errors))
    if not ratings:
        raise DataFormatError(", ".join(map(str, inputs)), None, None, "no ratings file among the inputs")
    table = pa.concat_tables(ratings)
    notes = []
    if options.min_rating is not None:
        keep = pc.greater_equal(table.column("rating"), options.min_rating)
        notes.append(f"{table.num_rows - pc.sum(keep).as_py()} ratings below "
                     f"{options.min_rating} dropped")
        table = table.filter(keep)
    if items:
        item_table = pa.concat_tables(items)
        cat = lookup_cats(table.column("item").combine_chunks(), item_table)
        n_unk = pc.sum(pc.equal(cat, UNKNOWN_CAT)).as_py() or 0
        notes.append(f"movies: {item_table.num_rows} items; {n_unk} events without a genre")
    else:
        cat = lookup_cats(table.column("item").combine_chunks(), None)
        notes.append("no movies file: every item in category <unk>")
    events = finish_events(", ".join(map(str, inputs)), {
        "user": pc.utf8_trim_whitespace(table.column("user")),
        "item": pc.utf8_trim_whitespace(table.column("item")), "cat": cat,
        "ts": table.column("ts")})
    return ReadResult(events=events, records=records, notes=notes)


FORMAT = Format(
    name="movielens",
    reader=read,
    summary="MovieLens ml-100k / ml-1m / ml-latest ratings + movie genres (auto-detected)",
    inputs="RATINGS [MOVIES] | FOLDER",
)
