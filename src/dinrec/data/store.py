"""The Parquet sample store: write it atomically, open it, and describe it.

Layout of a store directory ``DIR``::

    DIR/train/part-00000.parquet ...   rows: label int8, user, item, cat int64,
    DIR/valid/part-00000.parquet ...         hist_items, hist_cats list<int64> (oldest
    DIR/test/part-00000.parquet  ...         first), ts int64 when the input had times
    DIR/vocab/{user,item,cat}.arrow    vocabularies (Arrow IPC: token, count)
    DIR/vocab/item_cat.arrow           category id of every item id
    DIR/stats.json                     counts, history lengths, label balance, shard rows
    DIR/prepare.json                   the PrepareConfig used

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
    build_event_samples,
    build_ready_samples,
)
from dinrec.data.vocab import Vocabularies
from dinrec.errors import DinrecError

log = logging.getLogger(__name__)

STORE_FORMAT = "dinrec-sample-store"
STORE_VERSION = 1

STORE_SCHEMA = pa.schema(
    [
        ("label", pa.int8()),
        ("user", pa.int64()),
        ("item", pa.int64()),
        ("cat", pa.int64()),
        ("hist_items", pa.list_(pa.int64())),
        ("hist_cats", pa.list_(pa.int64())),
    ]
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


# Measured on 500k-row shards of the "medium" synthetic store (mean history 31; see
# benchmarks/data.py): the history lists are ~95% of the bytes. BYTE_STREAM_SPLIT puts the
# 8 bytes of each int64 id in 8 streams, so the mostly-zero high bytes compress to almost
# nothing: with lz4 that writes 1.6x faster than plain lz4, files are 45% smaller and they
# read 3x faster. zstd-1 is 10% smaller again but 15% slower to write; dictionary encoding
# of the lists costs a hash per id for no gain. The logical schema (list<int64>) is
# unchanged: any Parquet reader decodes it.
_HIST_COLUMNS = ["hist_items.list.element", "hist_cats.list.element"]
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "lz4",
    "use_dictionary": ["user", "item", "cat"],
    "use_byte_stream_split": _HIST_COLUMNS,
    "write_statistics": ["label", "user", "item", "cat", "ts"],  # not per history id
}
# Parquet encoding releases the GIL, so shards are encoded on writer threads while the main
# thread assembles the next one: one thread per core in all. On the shared 2-core box a
# second writer measured slower (5.1 s vs 6.4 s median for 1M events; more CPU, not less).
WRITE_THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))


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
            "history_length": _length_stats(ss.hist_len),
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
        if self.stats.get("version", 0) > STORE_VERSION:
            raise DinrecError(
                f"{self.path} was written by a newer dinrec (store version "
                f"{self.stats['version']}); upgrade dinrec"
            )
        try:
            self.config = PrepareConfig.from_dict(
                json.loads((self.path / "prepare.json").read_text())
            )
        except (OSError, ValueError) as exc:
            raise DinrecError(f"{self.path}: prepare.json is missing or corrupt") from exc
        self._vocabs: Vocabularies | None = None

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
