"""The sample store: write it atomically, open it, and describe it.

Layout of a store directory ``DIR`` (store version 2)::

    DIR/sequences.arrow                behaviour sequences, one row each: items, cats
                                       large_list<int64> (oldest first); Arrow IPC file
    DIR/train/part-00000.parquet ...   rows: label int8, user, item, cat int64,
    DIR/valid/part-00000.parquet ...         seq int64, hist_end int32,
    DIR/test/part-00000.parquet  ...         ts int64 when the input had times
    DIR/vocab/{user,item,cat}.arrow    vocabularies (Arrow IPC: token, count)
    DIR/vocab/item_cat.arrow           category id of every item id
    DIR/stats.json                     counts, history lengths, label balance, shard rows
    DIR/prepare.json                   the PrepareConfig used

A row's history is ``sequences[seq][max(0, hist_end - max_len) : hist_end]`` (items and
cats), ``max_len`` from ``prepare.json``: every sequence is stored once (one per user for
event inputs, one per distinct history for ready-made samples) instead of a copy of up to
``max_len`` ids per sample row. Store version 1 (per-row ``hist_items`` / ``hist_cats``
list columns) is refused with a message to prepare again.

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
from dinrec.data.vocab import Vocabularies
from dinrec.errors import DinrecError

log = logging.getLogger(__name__)

STORE_FORMAT = "dinrec-sample-store"
STORE_VERSION = 2  # 2: histories as (seq, hist_end) into sequences.arrow

STORE_SCHEMA = pa.schema(
    [
        ("label", pa.int8()),
        ("user", pa.int64()),
        ("item", pa.int64()),
        ("cat", pa.int64()),
        ("seq", pa.int64()),
        ("hist_end", pa.int32()),
    ]
)
SEQUENCES_FILE = "sequences.arrow"
SEQUENCES_SCHEMA = pa.schema(
    [("items", pa.large_list(pa.int64())), ("cats", pa.large_list(pa.int64()))]
)


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
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "lz4",
    "use_dictionary": False,
    "use_byte_stream_split": ["user", "item", "cat", "seq", "hist_end", "ts"],
    "write_statistics": ["label", "user", "item", "cat", "ts"],
}
# Parquet encoding releases the GIL, so shards are encoded on writer threads while the main
# thread gathers the next shard's rows: one thread per core in all.
WRITE_THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))


def write_sequences(seqs: Sequences, path: Path) -> None:
    """Write ``seqs`` as one uncompressed Arrow IPC record batch (memory-mappable)."""
    batch = seqs.to_batch()
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)


def read_sequences(path: Path) -> Sequences:
    """Memory-map a sequences file: the arrays are read-only views of the mapping."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        if reader.num_record_batches == 1:
            batch = reader.get_batch(0)
        else:
            batch = reader.read_all().combine_chunks().to_batches()[0]
        if not batch.schema.equals(SEQUENCES_SCHEMA):
            raise DinrecError(f"{path} has columns {batch.schema}, expected {SEQUENCES_SCHEMA}")
        items, cats = batch.column("items"), batch.column("cats")
        offsets = items.offsets.to_numpy()
        vals_i = items.values.to_numpy()
        vals_c = cats.values.to_numpy()
        ok = (
            len(offsets) >= 1 and offsets[0] == 0 and offsets[-1] == len(vals_i) == len(vals_c)
            and np.array_equal(offsets, cats.offsets.to_numpy())
        )  # fmt: skip
    except (OSError, pa.ArrowException, KeyError, IndexError) as exc:
        raise DinrecError(f"{path} is missing or corrupt ({exc}); prepare the store again") from exc
    if not ok:
        raise DinrecError(f"{path} is corrupt (items and cats differ); prepare the store again")
    return Sequences(offsets, vals_i, vals_c)


def _write_splits(built: BuiltSamples, root: Path, shard_rows: int) -> dict[str, list[int]]:
    """Write every split's shards: ``WRITE_THREADS`` threads encode shards while the main
    thread assembles the next one; at most ``WRITE_THREADS + 1`` shards are in memory."""
    jobs: list[tuple[SampleSet, int, int, Path, pa.Schema]] = []
    rows: dict[str, list[int]] = {}
    for name in SPLITS:
        ss = built.splits[name]
        (root / name).mkdir(parents=True)
        schema = STORE_SCHEMA if ss.ts is None else STORE_SCHEMA.append(pa.field("ts", pa.int64()))
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
                pending.append(pool.submit(pq.write_table, table, path, **PARQUET_OPTIONS))
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
    v = built.vocabs
    splits: dict[str, Any] = {}
    for name, ss in built.splits.items():
        n_pos = int((ss.label == 1).sum())
        splits[name] = {
            "rows": len(ss),
            "positives": n_pos,
            "negatives": len(ss) - n_pos,
            "positive_rate": round(n_pos / len(ss), 6) if len(ss) else 0.0,
            "users": _distinct(ss.user),
            "history_length": _length_stats(np.minimum(ss.hist_end, built.max_len)),
        }
    return {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": {k: s["rows"] for k, s in splits.items()},
        "users": len(v.user),
        "items": len(v.item),
        "categories": len(v.cat),
        "vocab_sizes_include_pad_and_oov": True,
        "sequences": {"count": len(built.sequences), "ids": int(built.sequences.offsets[-1])},
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


def prepare_events(events: pa.Table, out_dir: str | Path, cfg: PrepareConfig) -> dict:
    """Build samples from an events table and write them as a store; returns the stats."""
    _check_target(Path(out_dir).absolute())  # fail before the work, not after
    return write_store(build_event_samples(events, cfg), out_dir, cfg)


def prepare_samples(splits: dict[str, pa.Table], out_dir: str | Path, cfg: PrepareConfig) -> dict:
    """Encode ready-made string samples and write them as a store; returns the stats."""
    _check_target(Path(out_dir).absolute())
    return write_store(build_ready_samples(splits, cfg), out_dir, cfg)


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
        self._vocabs: Vocabularies | None = None
        self._sequences: Sequences | None = None

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
    def sequences(self) -> Sequences:
        """The store's behaviour sequences, memory-mapped on first use (read-only arrays)."""
        if self._sequences is None:
            self._sequences = read_sequences(self.path / SEQUENCES_FILE)
        return self._sequences

    @property
    def item_cat(self) -> np.ndarray:
        """Category id of every item id, ``(len(vocabs.item),)`` int64."""
        ic = self.vocabs.item_cat
        if ic is None:
            raise DinrecError(f"{self.path}: vocab/item_cat.arrow is missing; prepare it again")
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
