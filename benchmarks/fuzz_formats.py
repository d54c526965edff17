"""Fuzz every input format: mutated real-looking inputs through ``prepare``, in process.

Each case takes a format's base inputs (the test fixtures, ``tests/fixtures/formats``),
mutates one or more of them (bytes, fields, numbers at and past every limit, encodings,
truncation, gzip, lines, header columns, JSON values, Parquet column types) and maybe the
schema (missing columns, wrong kinds), then runs
:func:`dinrec.data.prepare.prepare` with ``on_error`` fail or skip. Outcomes:

* ``ok``: a store was written;
* ``error``: a :class:`~dinrec.errors.DinrecError` with a one-line message, and nothing
  left in the output folder's parent; counted by whether it names ``file:line`` and a field;
* ``FAIL``: any other exception (a traceback), a multi-line message, or a half-written
  output. Each failure is saved (inputs + traceback) under ``--save`` for replay.

    python benchmarks/fuzz_formats.py --cases 10000            # every format
    python benchmarks/fuzz_formats.py --cases 200 --formats events amazon --seed 3

Prints one line per format (cases, seconds, outcomes) and exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import io
import json
import logging
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dinrec.data import PrepareConfig
from dinrec.data.formats import ReadOptions
from dinrec.data.prepare import prepare
from dinrec.data.schema import Schema, SchemaError
from dinrec.errors import DataFormatError, DinrecError

FIX = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "formats"

#: field values at and past every limit, and other hostile strings
SPECIAL = [
    "", " ", "nan", "NaN", "inf", "-inf", "Infinity", "1e309", "-1e309", "1e308", "1e-400",
    "1e18", "-1e18", "1e19", "999999999999999999", "-999999999999999999",
    "9223372036854775807", "9223372036854775808", "-9223372036854775808",
    "-9223372036854775809", "18446744073709551616", "1" * 400, "0", "-0", "+5", " 5 ", "-1",
    "2", "0.5", "1.", ".5", "5e", "0x1F", "1_000", "１２３", "١٢٣", "true", "null", "None",
    "[]", "{}", "[1, 2", "(1, 2)", "\"", "'", "\"\"", "a\tb", "a,b", "a|b", "a::b", "\x02",
    "\x00", "\x1f", "\u2028", "𝔘nicode", "x" * 5000, "<unk>", "unknown", "-", "--",
]
#: JSON values for JSON formats (text, inserted as is)
JSON_SPECIAL = [
    "NaN", "Infinity", "-Infinity", "1e309", "-1e309", "1e18", "1e19", str(2**63),
    str(-(2**63) - 1), str(10**40), "-1", "0", "1.5", "true", "false", "null", "[]", "{}",
    '""', '" "', '"x"', "[[\"a\"]]", "[1, [2, [3]]]", '{"a": 1}', "[" * 3000 + "]" * 3000,
    '"\\u0000"', '"\\ud800"', '"' + "y" * 5000 + '"',
]


@dataclass
class Case:
    """One fuzz case: input files (name -> bytes), how they are passed, options, schema."""

    files: dict[str, bytes]
    inputs: list[str]  # names in ``files`` (or "." for the folder itself)
    options: dict[str, Any] = field(default_factory=dict)  # ReadOptions fields; paths by name
    schema: Schema | None = None
    mutations: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------- base inputs
def _fix(*names: str) -> dict[str, bytes]:
    return {Path(n).name: (FIX / n).read_bytes() for n in names}


def base_cases() -> dict[str, list[Case]]:
    """Real-looking starting points per format (the test fixtures, several variants)."""
    rich = dict(user_col="user_id", item_col="item_id", time_col="time")
    events_rich = _fix("events-rich/log.csv", "events-rich/items.jsonl",
                       "events-rich/items.tsv", "events-rich/users.csv")
    log = pq.read_table(io.BytesIO(_csv_to_parquet(events_rich["log.csv"])))
    return {
        "dien-text": [Case(_fix("dien/local_train", "dien/local_test"),
                           ["local_train", "local_test"]),
                      Case(_fix("dien/local_train", "dien/local_test"),
                           ["local_train", "local_test", "local_test"])],
        "din-csv": [Case(_fix("din/train_set.csv", "din/test_set.csv", "din/cate_list.csv"),
                         ["train_set.csv", "test_set.csv", "cate_list.csv"]),
                    Case(_fix("din/train_set.csv", "din/test_set.csv", "din/cate_list.csv"),
                         ["."])],
        "amazon": [Case(_fix("amazon/reviews.json", "amazon/meta.json"),
                        ["reviews.json", "meta.json"]),
                   Case(_fix("amazon/reviews.json", "amazon/meta2018.json"),
                        ["reviews.json", "meta2018.json"], {"min_rating": 4.0})],
        "movielens": [Case(_fix("ml-100k/u.data", "ml-100k/u.item", "ml-100k/u.user"),
                           ["u.data", "u.item", "u.user"]),
                      Case(_fix("ml-1m/ratings.dat", "ml-1m/movies.dat", "ml-1m/users.dat"),
                           ["."]),
                      Case(_fix("ml-latest/ratings.csv", "ml-latest/movies.csv"),
                           ["ratings.csv", "movies.csv"], {"min_rating": 3.5})],
        "events": [Case(_fix("events/log.tsv", "events/item_meta.tsv"), ["log.tsv"],
                        dict(user_col="user_id", item_col="item_id", time_col="time",
                             label_col="click", item_cats="item_meta.tsv")),
                   Case(events_rich, ["log.csv"], dict(rich, item_table="items.jsonl",
                                                       user_table="users.csv")),
                   Case({**events_rich, "log.parquet": _parquet(log)}, ["log.parquet"],
                        dict(rich, item_table="items.tsv"))],
        "sequences": [Case(_fix("sequences/seq.txt", "sequences/attrs.json"),
                           ["seq.txt", "attrs.json"]),
                      Case(_fix("sequences/seq.txt", "sequences/attrs.json"), ["seq.txt"],
                           {"item_attrs": "attrs.json"})],
        "synthetic": [Case({}, [], {"preset": "tiny"})],
    }


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _csv_to_parquet(data: bytes) -> bytes:
    lines = data.decode().strip().split("\n")
    names = lines[0].split(",")
    rows = [ln.split(",") for ln in lines[1:]]
    cols = {n: [r[i] for r in rows] for i, n in enumerate(names)}
    cols["time"] = [int(v) for v in cols["time"]]
    return _parquet(pa.table(cols))


# ------------------------------------------------------------------------- mutations
Mutation = Callable[[random.Random, bytes, str], bytes]


def _sep_of(data: bytes, name: str) -> bytes:
    first = data.split(b"\n", 1)[0]
    for sep in (b"::", b"\t", b"|", b","):
        if sep in first:
            return sep
    return b" "


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


def m_flip(rng, data, name):
    if not data:
        return b"\xff"
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def m_insert_bytes(rng, data, name):
    junk = rng.choice([b"\x00", b"\xff\xfe", b"\r", b"\n", b"\r\n", b"\x02", b'"', b"'", b",",
                       b"\t", b"|", b"::", b"{", b"}", b"[", b"\xc3", b"\xe2\x80\xa8",
                       bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))])
    i = rng.randint(0, len(data))
    return data[:i] + junk + data[i:]


def m_truncate(rng, data, name):
    return data[: rng.randint(0, len(data))]


def m_delete_range(rng, data, name):
    i = rng.randint(0, len(data))
    return data[:i] + data[i + rng.randint(1, 40):]


def m_duplicate_range(rng, data, name):
    i = rng.randint(0, len(data))
    return data[:i] + data[i: i + rng.randint(1, 200)] * 2 + data[i + 200:]


def m_empty(rng, data, name):
    return rng.choice([b"", b" ", b"\n\n", b"\t\n", b"\xef\xbb\xbf"])


def m_gzip(rng, data, name):
    z = gzip.compress(data)
    return z if rng.random() < 0.5 else z[: rng.randint(2, max(2, len(z) - 1))]


def m_encoding(rng, data, name):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    enc = rng.choice(["latin-1", "utf-16", "utf-8-sig", "cp1252", "utf-32"])
    try:
        return text.encode(enc)
    except UnicodeEncodeError:
        return text.encode(enc, errors="replace")


def m_crlf(rng, data, name):
    return data.replace(b"\n", rng.choice([b"\r\n", b"\r"]))


def m_lines(rng, data, name):
    lines = _lines(data)
    op = rng.choice(["del", "dup", "swap", "blank", "shuffle", "nofinal", "many"])
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    if op == "del":
        del lines[i]
    elif op == "dup":
        lines.insert(i, lines[j])
    elif op == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "blank":
        lines.insert(i, rng.choice([b"", b"   ", b"\t"]))
    elif op == "shuffle":
        rng.shuffle(lines)
    elif op == "nofinal":
        return data.rstrip(b"\n")
    else:
        body = [ln for ln in lines[1:] if ln.strip()] or lines
        lines += [rng.choice(body) for _ in range(rng.randint(10, 300))]
    return b"\n".join(lines)


def m_field(rng, data, name):
    """Replace, drop, add or swap a field of one line (by the file's separator)."""
    lines = _lines(data)
    nonblank = [k for k, ln in enumerate(lines) if ln.strip()]
    if not nonblank:
        return data + rng.choice(SPECIAL).encode()
    k = rng.choice(nonblank)
    sep = _sep_of(data, name)
    fields = lines[k].split(sep)
    i = rng.randrange(len(fields))
    op = rng.choice(["special", "special", "special", "drop", "add", "swap", "dup"])
    if op == "special":
        fields[i] = rng.choice(SPECIAL).encode("utf-8")
    elif op == "drop" and len(fields) > 1:
        del fields[i]
    elif op == "add":
        fields.insert(i, rng.choice(SPECIAL).encode("utf-8"))
    elif op == "swap":
        j = rng.randrange(len(fields))
        fields[i], fields[j] = fields[j], fields[i]
    else:
        fields.insert(i, fields[i])
    lines[k] = sep.join(fields)
    return b"\n".join(lines)


def m_header(rng, data, name):
    """Rename, drop, add or duplicate a header column (headed text files)."""
    lines = _lines(data)
    sep = _sep_of(data, name)
    cols = lines[0].split(sep)
    i = rng.randrange(len(cols))
    op = rng.choice(["rename", "drop", "add", "dup", "remove-header"])
    if op == "rename":
        cols[i] = rng.choice([b"", b"user", b"item", b"ts", b"label", b"cat", b"x y", b'"q"'])
    elif op == "drop":  # drop the whole column
        return b"\n".join(sep.join(c for k, c in enumerate(ln.split(sep)) if k != i)
                          for ln in lines)
    elif op == "add":
        return b"\n".join(ln + sep + (b"extra" if n == 0 else rng.choice(SPECIAL).encode())
                          for n, ln in enumerate(lines))
    elif op == "dup":
        cols.append(cols[i])
    else:
        return b"\n".join(lines[1:])
    lines[0] = sep.join(cols)
    return b"\n".join(lines)


def m_json(rng, data, name):
    """Set a key of one JSON record (object per line, or one big object) to a hostile value."""
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    nonblank = [k for k, ln in enumerate(lines) if ln.strip()]
    if not nonblank:
        return data
    k = rng.choice(nonblank)
    try:
        obj = json.loads(lines[k])
    except (ValueError, RecursionError):
        return m_field(rng, data, name)
    if not isinstance(obj, dict) or not obj:
        return data
    key = rng.choice(list(obj))
    op = rng.choice(["value", "value", "value", "del", "add", "list-elem"])
    value = rng.choice(JSON_SPECIAL)
    if op == "del":
        del obj[key]
        lines[k] = json.dumps(obj)
    elif op == "add":
        lines[k] = json.dumps(obj)[:-1] + f', "{rng.choice(["price", "brand", "x"])}": {value}}}'
    elif op == "list-elem" and isinstance(obj[key], list) and obj[key]:
        rest = json.dumps({kk: v for kk, v in obj.items() if kk != key})[1:-1]
        items = [json.dumps(v) for v in obj[key]]
        items[rng.randrange(len(items))] = value
        lines[k] = "{" + json.dumps(key) + ": [" + ", ".join(items) + "]" + \
            (", " + rest if rest else "") + "}"
    else:
        rest = json.dumps({kk: v for kk, v in obj.items() if kk != key})[1:-1]
        lines[k] = "{" + json.dumps(key) + ": " + value + (", " + rest if rest else "") + "}"
    return "\n".join(lines).encode("utf-8", errors="surrogatepass")


def m_parquet(rng, data, name):
    """Rewrite a Parquet file with a hostile column: types, nulls, limits, lists, structs."""
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception:
        return data
    n = table.num_rows
    col = rng.choice(table.column_names)
    kind = rng.choice(["float", "bigint", "uint", "ts-ns", "null", "list", "struct", "binary",
                       "dict", "bool", "drop", "date", "decimal", "large-string"])
    i = table.column_names.index(col)
    if kind == "drop":
        return _parquet(table.remove_column(i))
    values: pa.Array
    if kind == "float":
        vals = [rng.choice([1.5, float("nan"), float("inf"), -float("inf"), 1e309, 1e19, -1e19,
                            0.0, None]) for _ in range(n)]
        values = pa.array(vals, pa.float64())
    elif kind == "bigint":
        values = pa.array([rng.choice([2**63 - 1, -(2**63), 10**18, 10**18 + 1, -1, 0, None])
                           for _ in range(n)], pa.int64())
    elif kind == "uint":
        values = pa.array([rng.choice([2**64 - 1, 2**63, 5]) for _ in range(n)], pa.uint64())
    elif kind == "ts-ns":
        values = pa.array([rng.choice([1_600_000_000_123_456_789, -1, 2**63 - 1, None])
                           for _ in range(n)], pa.timestamp("ns"))
    elif kind == "null":
        values = pa.nulls(n)
    elif kind == "list":
        values = pa.array([rng.choice([["a"], [], None, ["a", "b"]]) for _ in range(n)])
    elif kind == "struct":
        values = pa.array([{"a": 1}] * n)
    elif kind == "binary":
        values = pa.array([rng.choice([b"\xff\xfe", b"ok", b""]) for _ in range(n)], pa.binary())
    elif kind == "dict":
        values = table.column(col).combine_chunks().cast(pa.string()).dictionary_encode()
    elif kind == "bool":
        values = pa.array([rng.random() < 0.5 for _ in range(n)])
    elif kind == "date":
        values = pa.array([rng.choice([0, 18000, -1]) for _ in range(n)], pa.date32())
    elif kind == "decimal":
        from decimal import Decimal

        values = pa.array([Decimal("1600000000.25")] * n, pa.decimal128(12, 2))
    else:
        values = table.column(col).combine_chunks().cast(pa.large_string())
    return _parquet(table.set_column(i, col, values))


TEXT_MUTATIONS: list[tuple[Mutation, int]] = [
    (m_field, 8), (m_lines, 4), (m_header, 3), (m_flip, 2), (m_insert_bytes, 2),
    (m_truncate, 2), (m_delete_range, 1), (m_duplicate_range, 1), (m_empty, 1), (m_gzip, 1),
    (m_encoding, 2), (m_crlf, 1),
]


def mutate_file(rng: random.Random, data: bytes, name: str) -> tuple[bytes, str]:
    if data[:4] == b"PAR1" and rng.random() < 0.7:
        return m_parquet(rng, data, name), "parquet"
    muts = list(TEXT_MUTATIONS)
    if name.endswith((".json", ".jsonl")):
        muts.append((m_json, 10))
    fns, weights = zip(*muts, strict=True)
    fn = rng.choices(fns, weights)[0]
    return fn(rng, data, name), fn.__name__[2:]


# ------------------------------------------------------------------------- schemas
COLUMNS = {  # columns a schema may name per format (some exist, some do not)
    "dien-text": ["cat", "brand", "label"],
    "din-csv": ["cat", "price"],
    "amazon": ["cat", "categories", "brand", "price", "rating", "main_cat", "title", "salesRank"],
    "movielens": ["cat", "genres", "year", "title", "rating", "gender", "age", "occupation",
                  "zip_prefix", "zip", "nope"],
    "events": ["click", "behaviour", "platform", "hour", "brand", "price", "categories",
               "age", "gender", "segment", "i_category", "r_complement", "missing"],
    "sequences": ["cat", "attrs", "brand"],
    "synthetic": ["cat", "brand"],
}


def random_schema(rng: random.Random, fmt: str) -> Schema | None:
    """None, the default, or a random schema over real and made-up columns."""
    r = rng.random()
    if r < 0.35:
        return None
    if r < 0.5:
        return Schema.default()
    cols = COLUMNS[fmt]
    feats: dict[str, list[dict[str, Any]]] = {"user": [], "item": [], "context": []}
    for col in rng.sample(cols, rng.randint(1, min(4, len(cols)))):
        kind = rng.choice(["categorical", "multi", "numeric"])
        feats[rng.choice(["user", "item", "item", "context"])].append(
            {"name": f"f_{col}", "column": col, "kind": kind})
    seqs: list[dict[str, Any]] = [{"name": "hist", "max_len": rng.choice([1, 5, 100])}]
    if rng.random() < 0.4:
        col = rng.choice(cols)
        values = rng.choice([["1"], [">=4"], ["<4"], ["click", "buy"], [">=1e309"]])
        seqs = [{"name": "a", "filter_column": col, "values": values},
                {"name": "b", "filter_column": col, "values": ["x"]}]
    try:
        return Schema.from_dict({"user": [{"name": "user"}, *feats["user"]],
                                 "item": [{"name": "item"}, {"name": "cat"}, *feats["item"]],
                                 "context": feats["context"], "sequences": seqs})
    except SchemaError:
        return None


def mutate_options(rng: random.Random, fmt: str, options: dict[str, Any]) -> dict[str, Any]:
    opts = dict(options)
    if fmt == "events" and rng.random() < 0.15:
        key = rng.choice(["user_col", "item_col", "time_col", "label_col", "item_key",
                          "user_key", "sep", "cat_col"])
        opts[key] = rng.choice(["", "nope", "item_id", "time", ",", "\t", "user_id", ";"])
    if fmt == "synthetic" and rng.random() < 0.2:
        opts["preset"] = rng.choice(["", "huge", "tiny ", "../tiny", "TINY"])
    if rng.random() < 0.05:
        opts["min_rating"] = rng.choice([float("nan"), float("inf"), -1.0, 4.0])
    return opts


def make_case(rng: random.Random, fmt: str, bases: list[Case]) -> Case:
    base = rng.choice(bases)
    case = replace(base, files=dict(base.files), mutations=[],
                   options=mutate_options(rng, fmt, base.options))
    names = list(case.files)
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3]) if names else 0):
        name = rng.choice(names)
        case.files[name], what = mutate_file(rng, case.files[name], name)
        case.mutations.append(f"{what}({name})")
    case.schema = random_schema(rng, fmt)
    if case.schema is not None and case.schema != Schema.default():
        case.mutations.append("schema")
    return case


# ------------------------------------------------------------------------- running
@dataclass
class Tally:
    cases: int = 0
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


_TAKES_SCHEMA = "schema" in inspect.signature(prepare).parameters


def run_case(fmt: str, case: Case, root: Path) -> tuple[str, str]:
    """(outcome, detail) of one case, run in ``root`` (emptied first)."""
    for p in root.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    data = root / "in"
    data.mkdir()
    for name, content in case.files.items():
        (data / name).write_bytes(content)
    inputs = [data if n == "." else data / n for n in case.inputs]
    opts = {k: (data / v if k in ("item_cats", "item_attrs", "item_table", "user_table")
                else v) for k, v in case.options.items()}
    options = ReadOptions(**opts, schema=case.schema)
    out = root / "out" / "store"
    cfg = PrepareConfig(max_len=20, seed=0)
    kw = {"schema": case.schema} if _TAKES_SCHEMA else {}
    on_error = "skip" if "skip" in case.mutations else "fail"
    try:
        prepare(fmt, inputs, out, cfg, options, on_error, **kw)
    except DinrecError as exc:
        msg = str(exc)
        leftovers = list((root / "out").iterdir()) if (root / "out").exists() else []
        if "\n" in msg or leftovers:
            return "FAIL", f"{'multi-line message' if chr(10) in msg else 'left ' + str(leftovers)}: {msg[:300]}"
        if isinstance(exc, DataFormatError):
            named = exc.path.startswith(str(data)) or exc.path == "(no input)"
            where = "file:line:field" if exc.line is not None and exc.field else \
                "file:line" if exc.line is not None else "file:field" if exc.field else "file"
            if not named:
                return "FAIL", f"error names no input file: {msg[:300]}"
            return f"error {where}", f"{exc.field}: {exc.reason}"[:80]
        return "error (data core / options)", msg.replace(str(root), "")[:80]
    except Exception:  # noqa: BLE001 - this is what we are looking for
        return "FAIL", traceback.format_exc()
    if not (out / "stats.json").exists():
        return "FAIL", "prepare returned but wrote no store"
    return "ok", ""


def save_failure(save: Path, fmt: str, k: int, case: Case, detail: str) -> Path:
    d = save / f"{fmt}-{k:05d}"
    d.mkdir(parents=True, exist_ok=True)
    for name, content in case.files.items():
        (d / name).write_bytes(content)
    meta = {"format": fmt, "inputs": case.inputs, "options": {k: str(v) for k, v in
                                                             case.options.items()},
            "schema": case.schema.to_dict() if case.schema else None,
            "mutations": case.mutations}
    (d / "case.json").write_text(json.dumps(meta, indent=1))
    (d / "traceback.txt").write_text(detail)
    return d


def fuzz(fmt: str, bases: list[Case], cases: int, seed: int, save: Path | None) -> Tally:
    rng = random.Random(f"{seed}-{fmt}")
    tally = Tally()
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="dinrec-fuzz-", dir=shm) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        for k in range(cases):
            case = make_case(rng, fmt, bases)
            if rng.random() < 0.3:
                case.mutations.append("skip")
            outcome, detail = run_case(fmt, case, root)
            tally.outcomes[outcome] += 1
            if outcome == "FAIL":
                where = save_failure(save, fmt, k, case, detail) if save else None
                tally.failures.append(f"{detail.strip().splitlines()[-1]} ({where})")
            elif detail:
                tally.reasons[f"{outcome[6:]}: {detail}"] += 1
        tally.cases = cases
        tally.seconds = time.perf_counter() - t0
    return tally


def main(argv: list[str] | None = None) -> int:
    bases = base_cases()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10_000, help="cases per format")
    p.add_argument("--formats", nargs="*", default=list(bases), choices=list(bases))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, default=Path("fuzz-failures"),
                   help="folder for failing cases (inputs + traceback)")
    p.add_argument("--reasons", type=int, default=0, help="print the N most common errors")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    print(f"fuzz_formats: {args.cases} cases per format, seed {args.seed}")
    failed = 0
    for fmt in args.formats:
        t = fuzz(fmt, bases[fmt], args.cases, args.seed, args.save)
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(t.outcomes.items()))
        print(f"{fmt:<10} {t.cases:>6} cases {t.seconds:7.1f}s  {outcomes}", flush=True)
        for reason, n in t.reasons.most_common(args.reasons):
            print(f"    {n:>6}  {reason}")
        for f in t.failures[:5]:
            print(f"    FAIL {f}")
        failed += len(t.failures)
    print("zero tracebacks" if not failed else f"{failed} FAILURES", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
