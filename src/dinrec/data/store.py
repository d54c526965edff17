"""The sample store: write it atomically, open it, and describe it.

Layout of a store directory ``DIR`` (store version 3)::

    DIR/schema.json                    the feature schema (dinrec.data.schema.Schema)
    DIR/features.json                  table sizes, numeric features' train mean/std
    DIR/sequences.arrow                behaviour sequences, one row per owner (user): per
                                       sequence ``<name>.items`` large_list<int64> item keys
                                       (oldest first) and ``<name>.<event feature>`` values
                                       (``<name>.ts`` for the built-in time gap); Arrow IPC
    DIR/items.arrow, DIR/users.arrow   side tables, one row per key: token, count, then one
                                       column per feature (ids; fixed-size lists for multi;
                                       float64 raw numeric values); Arrow IPC
    DIR/train/part-00000.parquet ...   rows: label int8, user, item (keys), seq int64,
    DIR/valid/part-00000.parquet ...         end.<sequence> int32, ts int64 when the input
    DIR/test/part-00000.parquet  ...         had times, ctx.<feature> context features
    DIR/vocab/<table>.arrow            vocabularies (Arrow IPC: token, count)
    DIR/vocab/item_cat.arrow           category id of every item id (when there is a ``cat``)
    DIR/stats.json                     counts, history lengths, label balance, shard rows
    DIR/prepare.json                   the PrepareConfig used

A row's history in sequence ``s`` is ``sequences[s][seq][max(0, end.s - max_len) :
end.s]``, ``max_len`` from ``prepare.json``: every sequence is stored once (one per user
for event inputs, one per distinct history for ready-made samples) instead of a copy per
sample row. Rows and histories hold *keys* (rows of the side tables, see
:mod:`dinrec.data.sides`); the loader looks ids and attributes up there. Stores of an
earlier version (no ``schema.json``) are refused with a message to prepare again.

Why Arrow IPC for the sequences, not Parquet: the file is written uncompressed, so opening
it is a memory map and the offsets and values are NumPy views of it with no decoding.
Measured with 10M events (two columns of 10M ids): the IPC file (162 MB) opens in ~1 ms;
the same table as lz4 + byte-stream-split Parquet (41 MB) takes 0.7-1.1 s to decode, into
private memory, on every open in every process. Batch assembly gathers from the mapped
values directly, and processes on one machine (ranks) share its pages. Sample shards stay
Parquet: they are read one at a time (the store may be larger than memory), by row ranges.

Every split has at least one shard (possibly with zero rows), at most ``shard_rows`` rows
each. Training rows are shuffled (seeded) when written, so streaming readers with a
bounded shuffle buffer still see well-mixed batches.

A store is written into a temporary sibling directory and renamed into place at the end:
an interrupted run leaves nothing at ``DIR``, and an existing store at ``DIR`` is
replaced only on success. A non-empty directory that is not a store is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dinrec.data.samples import (
    SPLITS,
    BuiltSamples,
    PrepareConfig,
    SampleSet,
    Sequences,
    build_event_samples,
    build_ready_samples,
)
from dinrec.data.schema import SCHEMA_FILE, Schema, SchemaError
from dinrec.data.sides import SideTable
from dinrec.data.vocab import Vocabularies
from dinrec.errors import DinrecError

log = logging.getLogger(__name__)

STORE_FORMAT = "dinrec-sample-store"
STORE_VERSION = 3  # 3: the feature schema, keys into side tables; 2: (seq, hist_end)

SEQUENCES_FILE = "sequences.arrow"
ITEMS_FILE = "items.arrow"
USERS_FILE = "users.arrow"
FEATURES_FILE = "features.json"


def _is_store(path: Path) -> bool:
    try:
        stats = json.loads((path / "stats.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stats, dict) and stats.get("format") == STORE_FORMAT


def _check_target(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise DinrecError(f"{out} exists and is not a directory; refusing to overwrite it")
        if any(out.iterdir()) and not _is_store(out):
            raise DinrecError(
                f"{out} exists and is not a dinrec sample store; refusing to overwrite it "
                "(choose another output directory or remove it yourself)"
            )


def _length_stats(lens: np.ndarray) -> dict[str, float]:
    if len(lens) == 0:
        return {"min": 0, "mean": 0.0, "median": 0.0, "p90": 0.0, "max": 0}
    return {
        "min": int(lens.min()),
        "mean": round(float(lens.mean()), 4),
        "median": float(np.median(lens)),
        "p90": float(np.percentile(lens, 90)),
        "max": int(lens.max()),
    }


# Sample shards hold only scalar columns (histories live in sequences.arrow). Measured on a
# 500k-row training shard of the "medium" synthetic store (benchmarks/data.py), median of 5:
# BYTE_STREAM_SPLIT + lz4 on the integer columns writes in 30 ms and 6.1 MB, dictionary
# encoding of user / item / cat + lz4 in 50 ms and 8.4 MB, plain lz4 in 105 ms and 11 MB;
# all read in ~11 ms. BYTE_STREAM_SPLIT puts the 8 bytes of each id in 8 streams, so the
# mostly-zero high bytes compress to almost nothing. Any Parquet reader decodes it.
PARQUET_OPTIONS: dict[str, Any] = {"compression": "lz4", "use_dictionary": False}


def _parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """BYTE_STREAM_SPLIT on the integer and float columns, statistics on the scalar ones."""
    split = [f.name for f in schema if pa.types.is_integer(f.type) and f.name != "label"
             or pa.types.is_floating(f.type)]
    stats = [f.name for f in schema if f.name in ("label", "user", "item", "ts")]
    return {**PARQUET_OPTIONS, "use_byte_stream_split": split, "write_statistics": stats}


# Parquet encoding releases the GIL, so shards are encoded on writer threads while the main
# thread gathers the next shard's rows: one thread per core in all.
WRITE_THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))


def _ipc_write(table: pa.Table | pa.RecordBatch, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write(table)


def _ipc_read(path: Path) -> pa.Table:
    """Memory-map an Arrow IPC file (the arrays are read-only views of the mapping)."""
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (OSError, pa.ArrowException) as exc:
        raise DinrecError(f"{path} is missing or corrupt ({exc}); prepare the store again") from exc


def write_sequences(seqs: dict[str, Sequences], path: Path) -> None:
    """Write every sequence as list columns of one uncompressed Arrow IPC record batch."""
    cols = {}
    for name, q in seqs.items():
        off = pa.array(q.offsets.astype(np.int64, copy=False))
        cols[f"{name}.items"] = pa.LargeListArray.from_arrays(off, pa.array(q.items, pa.int64()))
        for k, v in q.events.items():
            cols[f"{name}.{k}"] = pa.LargeListArray.from_arrays(off, pa.array(v))
    _ipc_write(pa.record_batch(cols), path)


def read_sequences(path: Path, schema: Schema) -> dict[str, Sequences]:
    """Memory-map a sequences file: offsets and values are views of the mapping."""
    table = _ipc_read(path)
    out = {}
    try:
        for s in schema.sequences:
            items = table.column(f"{s.name}.items").chunk(0)
            offsets = items.offsets.to_numpy()
            events = {}
            for c in table.column_names:
                if c.startswith(f"{s.name}.") and c != f"{s.name}.items":
                    col = table.column(c).chunk(0)
                    if not np.array_equal(col.offsets.to_numpy(), offsets):
                        raise DinrecError(f"{path} is corrupt ({c}); prepare the store again")
                    events[c[len(s.name) + 1 :]] = col.values.to_numpy()
            vals = items.values.to_numpy()
            if not (len(offsets) >= 1 and offsets[0] == 0 and offsets[-1] == len(vals)):
                raise DinrecError(f"{path} is corrupt ({s.name}); prepare the store again")
            out[s.name] = Sequences(offsets, vals, events)
    except (KeyError, IndexError, pa.ArrowException) as exc:
        raise DinrecError(f"{path} is missing or corrupt ({exc}); prepare the store again") from exc
    return out


def _write_splits(built: BuiltSamples, root: Path, shard_rows: int) -> dict[str, list[int]]:
    """Write every split's shards: ``WRITE_THREADS`` threads encode shards while the main
    thread assembles the next one; at most ``WRITE_THREADS + 1`` shards are in memory."""
    jobs: list[tuple[SampleSet, int, int, Path, pa.Schema]] = []
    rows: dict[str, list[int]] = {}
    for name in SPLITS:
        ss = built.splits[name]
        (root / name).mkdir(parents=True)
        schema = ss.to_table(0, 0).schema
        n = len(ss)
        rows[name] = []
        for i, start in enumerate(range(0, max(n, 1), shard_rows)):
            stop = min(start + shard_rows, n)
            jobs.append((ss, start, stop, root / name / f"part-{i:05d}.parquet", schema))
            rows[name].append(stop - start)
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
        try:
            pending.append(pool.submit(write_sequences, built.sequences, root / SEQUENCES_FILE))
            for ss, start, stop, path, schema in jobs:
                table = ss.to_table(start, stop).cast(schema)
                while len(pending) >= WRITE_THREADS:
                    pending.popleft().result()
                pending.append(pool.submit(pq.write_table, table, path, **_parquet_options(schema)))
                del table
            while pending:
                pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
    return rows


def _distinct(ids: np.ndarray) -> int:
    if len(ids) == 0:
        return 0
    if ids.min() >= 0 and ids.max() < 4 * len(ids) + 1024:
        return int(np.count_nonzero(np.bincount(ids)))
    return len(np.unique(ids))


def compute_stats(built: BuiltSamples, shard_rows: dict[str, list[int]]) -> dict[str, Any]:
    """The ``stats.json`` content for built samples."""
    sizes = built.encoded.sizes
    main = built.schema.main_sequence.name
    splits: dict[str, Any] = {}
    for name, ss in built.splits.items():
        n_pos = int((ss.label == 1).sum())
        splits[name] = {
            "rows": len(ss),
            "positives": n_pos,
            "negatives": len(ss) - n_pos,
            "positive_rate": round(n_pos / len(ss), 6) if len(ss) else 0.0,
            "users": _distinct(ss.user),
            "history_length": _length_stats(np.minimum(ss.ends[main], built.max_len)),
            "history_lengths": {
                q: _length_stats(np.minimum(e, built.schema.sequence(q).max_len))
                for q, e in ss.ends.items()},
        }
    return {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": {k: s["rows"] for k, s in splits.items()},
        "users": sizes.get(built.schema.user_key.table_name, 0),
        "items": sizes.get(built.schema.item_key.table_name, 0),
        "categories": sizes.get("cat", 0),
        "vocab_sizes_include_pad_and_oov": True,
        "table_sizes": sizes,
        "keys": {"users": len(built.users), "items": len(built.items)},
        "sequences": {q: {"count": len(v), "ids": int(v.offsets[-1])}
                      for q, v in built.sequences.items()},
        "splits": splits,
        "shards": shard_rows,
        "has_ts": built.splits["train"].ts is not None,
        "input": built.info,
    }


def write_store(built: BuiltSamples, out_dir: str | Path, cfg: PrepareConfig) -> dict[str, Any]:
    """Write built samples as a store at ``out_dir`` atomically; returns the stats dict."""
    out = Path(out_dir).absolute()
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        shard_rows = _write_splits(built, tmp, cfg.shard_rows)
        built.vocabs.save(tmp / "vocab")
        _ipc_write(built.items.to_table(), tmp / ITEMS_FILE)
        _ipc_write(built.users.to_table(), tmp / USERS_FILE)
        built.schema.save(tmp)
        features = {"table_sizes": built.encoded.sizes, "numeric": built.encoded.numeric}
        (tmp / FEATURES_FILE).write_text(json.dumps(features, indent=2) + "\n")
        stats = compute_stats(built, shard_rows)
        (tmp / "prepare.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        _check_target(out)  # it may have appeared meanwhile
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote sample store %s: %s", out, stats["rows"])
    return stats


def prepare_events(
    events: pa.Table, out_dir: str | Path, cfg: PrepareConfig, schema: Schema | None = None,
    items: pa.Table | None = None, users: pa.Table | None = None,
) -> dict:
    """Build samples from an events table (and side tables) and write them as a store;
    returns the stats."""
    _check_target(Path(out_dir).absolute())  # fail before the work, not after
    built = build_event_samples(events, cfg, schema, items=items, users=users)
    return write_store(built, out_dir, cfg)


def prepare_samples(
    splits: dict[str, pa.Table], out_dir: str | Path, cfg: PrepareConfig,
    schema: Schema | None = None,
) -> dict:
    """Encode ready-made string samples and write them as a store; returns the stats."""
    _check_target(Path(out_dir).absolute())
    return write_store(build_ready_samples(splits, cfg, schema), out_dir, cfg)


class SampleStore:
    """A sample store opened for reading (``SampleStore(dir)`` or ``SampleStore.open(dir)``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DinrecError(f"sample store {self.path} does not exist; run `dinrec prepare`")
        stats_file = self.path / "stats.json"
        if not stats_file.is_file():
            raise DinrecError(
                f"{self.path} is not a complete sample store (no stats.json); prepare it again"
            )
        try:
            self.stats: dict[str, Any] = json.loads(stats_file.read_text())
        except ValueError as exc:
            raise DinrecError(f"{stats_file} is corrupt: {exc}") from exc
        if self.stats.get("format") != STORE_FORMAT:
            raise DinrecError(f"{self.path} is not a dinrec sample store")
        version = self.stats.get("version", 0)
        if version > STORE_VERSION:
            raise DinrecError(
                f"{self.path} was written by a newer dinrec (store version "
                f"{self.stats['version']}); upgrade dinrec"
            )
        if version < STORE_VERSION:
            raise DinrecError(
                f"sample store {self.path} was written by an older dinrec (store version "
                f"{version}, this dinrec reads version {STORE_VERSION}); run `dinrec prepare` "
                "again"
            )
        try:
            self.config = PrepareConfig.from_dict(
                json.loads((self.path / "prepare.json").read_text())
            )
        except (OSError, ValueError) as exc:
            raise DinrecError(f"{self.path}: prepare.json is missing or corrupt") from exc
        if not (self.path / SCHEMA_FILE).is_file():
            raise DinrecError(f"sample store {self.path} has no {SCHEMA_FILE} (written by an older "
                              "dinrec); run `dinrec prepare` again")
        try:
            self.schema: Schema = Schema.load(self.path)
            self.features: dict[str, Any] = json.loads((self.path / FEATURES_FILE).read_text())
        except (SchemaError, OSError, ValueError) as exc:
            raise DinrecError(f"{self.path}: {exc}; prepare the store again") from exc
        self._vocabs: Vocabularies | None = None
        self._sequences: dict[str, Sequences] | None = None
        self._sides: dict[str, SideTable] = {}

    @classmethod
    def open(cls, path: str | Path) -> SampleStore:
        return cls(path)

    def __repr__(self) -> str:
        return f"SampleStore({str(self.path)!r}, rows={self.stats.get('rows')})"

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.stats.get("shards", {}))

    @property
    def vocabs(self) -> Vocabularies:
        if self._vocabs is None:
            self._vocabs = Vocabularies.load(self.path / "vocab")
        return self._vocabs

    @property
    def max_len(self) -> int:
        """Histories keep their most recent ``max_len`` entries (from ``prepare.json``)."""
        return int(self.config.max_len)

    @property
    def sequences(self) -> dict[str, Sequences]:
        """The store's behaviour sequences by name, memory-mapped on first use (read-only)."""
        if self._sequences is None:
            self._sequences = read_sequences(self.path / SEQUENCES_FILE, self.schema)
        return self._sequences

    def _side(self, name: str) -> SideTable:
        if name not in self._sides:
            self._sides[name] = SideTable.from_table(_ipc_read(self.path / name))
        return self._sides[name]

    @property
    def items(self) -> SideTable:
        """The item side table (keys -> token, count, item features)."""
        return self._side(ITEMS_FILE)

    @property
    def users(self) -> SideTable:
        """The user side table (keys -> token, count, user features)."""
        return self._side(USERS_FILE)

    def table_sizes(self) -> dict[str, int]:
        """Table name -> ids incl. 0 (padding) and 1 (OOV); hashed: hash_buckets + 2."""
        return {k: int(v) for k, v in self.features["table_sizes"].items()}

    @property
    def numeric_stats(self) -> dict[str, dict[str, float]]:
        """Numeric feature -> its training ``mean`` and ``std`` (after ``log1p`` if asked)."""
        return dict(self.features.get("numeric", {}))

    @property
    def item_cat(self) -> np.ndarray:
        """Category id of every item id, ``(len(vocabs.item),)`` int64 (schemas with ``cat``)."""
        ic = self.vocabs.item_cat
        if ic is None:
            raise DinrecError(f"{self.path}: the schema has no item feature 'cat'")
        return ic

    def shard_rows(self, split: str) -> list[int]:
        """Rows of each shard of ``split`` (in file order)."""
        self._check_split(split)
        return [int(r) for r in self.stats["shards"][split]]

    def files(self, split: str) -> list[Path]:
        """The Parquet shards of ``split`` in order; raises when any is missing."""
        self._check_split(split)
        n = len(self.stats["shards"][split])
        files = [self.path / split / f"part-{i:05d}.parquet" for i in range(n)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DinrecError(
                f"sample store {self.path}: split {split!r} is incomplete "
                f"(missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})"
            )
        return files

    def num_rows(self, split: str) -> int:
        return sum(self.shard_rows(split))

    def _check_split(self, split: str) -> None:
        shards = self.stats.get("shards", {})
        if split not in shards:
            raise DinrecError(
                f"sample store {self.path} has no split {split!r} "
                f"(it has: {', '.join(shards) or 'none'})"
            )
