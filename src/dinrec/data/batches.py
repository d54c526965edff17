"""Fast, seeded, resumable batches from a sample store.

A :class:`BatchLoader` streams one split of a store shard by shard. Each epoch is planned
from ``(seed, epoch)`` alone:

1. this rank's *pieces* (whole shards assigned round-robin over ranks, or row ranges of
   every shard when there are fewer shards than ranks) are put in a seeded order;
2. consecutive pieces are grouped into *windows* of at most ``shuffle_buffer`` rows (at
   least one piece) — the bounded shuffle buffer — and rows are permuted inside a window;
3. the resulting row stream is cut into batches; with ``bucket=True`` into *units* of
   ``bucket_batches`` batches whose rows are sorted by (main) history length, cut into
   batches, and the batch order inside the unit shuffled (much less padding).

Because the plan depends only on ``(seed, epoch)`` and the shards' row counts (in
``stats.json``), :meth:`BatchLoader.state_dict` is just ``(epoch, position)`` and resuming
skips straight to the right window without reading the batches before it.

A batch is a :class:`dinrec.data.batch.Batch` with one tensor per feature of the store's
schema, assembled without per-row Python: shards hold keys and ``(seq, end)`` pointers per
row; each history becomes a window ``(start, length)`` of the store's memory-mapped
sequence values, gathered with one fancy index per batch (most recent ``max_len`` events,
left-aligned, oldest first, padded with key 0), and every item / user feature is one
``take`` from the side tables by key (key 0 is all-zero padding). Numeric features come
out normalised with the training mean and standard deviation; the built-in ``time_gap``
is the seconds from the event to the sample's time, bucketed. ``batch.group`` is the user
key: one value per raw user, also when the user id is out-of-vocabulary (GAUC).
With ``neg_history=K`` every valid position of the main sequence also gets K negative
items (their item features), sampled by popularity (training counts) or uniformly from
the known items, never equal to the positive item at that position.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from dinrec.data.batch import Batch, SequenceBatch
from dinrec.data.encode import normalise
from dinrec.data.samples import TIME_GAP, Sequences
from dinrec.data.schema import Feature, Schema
from dinrec.data.sides import SideTable
from dinrec.data.store import SampleStore
from dinrec.data.vocab import NUM_SPECIAL
from dinrec.errors import DinrecError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- blocks of rows
@dataclass
class _Block:
    """Rows in memory: ``label``, ``user``, ``item`` keys, ``ts``, ``ctx.<f>`` and, per
    sequence, ``start.<s>`` / ``len.<s>``: windows of its flat values (cut to ``max_len``)."""

    cols: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.cols["label"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    def take(self, rows: np.ndarray) -> _Block:
        return _Block({k: v.take(rows, axis=0) for k, v in self.cols.items()})


def _concat_blocks(blocks: list[_Block]) -> _Block:
    if len(blocks) == 1:
        return blocks[0]
    return _Block({k: np.concatenate([b.cols[k] for b in blocks]) for k in blocks[0].cols})


def _read_piece(path: Path, start: int, stop: int, n_rows: int, seqs: dict[str, Sequences],
                max_len: dict[str, int], columns: list[str]) -> _Block:
    """Rows ``[start, stop)`` of a shard, their histories resolved to windows of ``seqs``
    (each cut to its ``max_len[name]`` most recent events)."""
    table = pq.read_table(path, columns=columns, memory_map=True)
    if table.num_rows != n_rows:
        raise DinrecError(
            f"{path} has {table.num_rows} rows, stats.json says {n_rows}; prepare again"
        )
    if start or stop != n_rows:
        table = table.slice(start, stop - start)
    cols: dict[str, np.ndarray] = {}
    for k in columns:
        col = table.column(k)
        if k.startswith("end.") or k == "seq":
            continue
        arr = col.combine_chunks()
        if hasattr(arr.type, "list_size"):  # multi-valued context: (n, M)
            cols[k] = arr.flatten().to_numpy().reshape(-1, arr.type.list_size)
        else:
            cols[k] = arr.to_numpy(zero_copy_only=False)
    cols["label"] = cols["label"].astype(np.int8)
    cols["user"], cols["item"] = cols["user"].astype(np.int64), cols["item"].astype(np.int64)
    seq = table.column("seq").to_numpy().astype(np.int64)  # (n,)
    for name, q in seqs.items():
        end = table.column(f"end.{name}").to_numpy().astype(np.int64)  # (n,)
        bad = len(seq) > 0 and (seq.min() < 0 or seq.max() >= len(q) or end.min() < 0)
        if len(seq) and not bad:
            bad = bool((end > q.offsets.take(seq + 1) - q.offsets.take(seq)).any())
        if bad:
            raise DinrecError(f"{path} points outside the store's sequences; prepare again")
        cols[f"start.{name}"], cols[f"len.{name}"] = q.windows(seq, end, max_len[name])
    return _Block(cols)


# ---------------------------------------------------------------------- the loader
class BatchLoader:
    """Iterate over :class:`Batch` es of one split of a sample store.

    Args:
        store: a store directory or an opened :class:`SampleStore`.
        split: ``train``, ``valid`` or ``test``.
        batch_size: rows per batch (the last one may be smaller unless ``drop_last``).
        max_len: histories keep their most recent ``max_len`` items (and never more than
            their sequence's ``max_len`` in the schema).
        shuffle: seeded shuffling (shard order, rows inside the shuffle buffer, bucket order).
        seed: with the epoch number, fixes every random choice.
        bucket: sort rows by history length inside units of ``bucket_batches`` batches.
        neg_history: K negative history items per position (for DIEN's auxiliary loss).
        drop_last: drop the last incomplete batch.
        rank, world_size: this process's share: whole shards round-robin, or row ranges of
            each shard when there are fewer shards than ranks. Every rank yields the same
            number of batches (the smallest rank's), so distributed steps stay in lockstep.
        shuffle_buffer: rows held in memory for shuffling (whole shards; at least one).
        neg_sampling: ``popularity`` (training counts) or ``uniform`` for ``neg_history``.
        bucket_batches: batches per bucketing unit.
    """

    def __init__(
        self,
        store: str | Path | SampleStore,
        split: str,
        batch_size: int = 128,
        max_len: int = 100,
        shuffle: bool = True,
        seed: int = 0,
        bucket: bool = False,
        neg_history: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 200_000,
        neg_sampling: str = "popularity",
        bucket_batches: int = 50,
    ):
        self.store = store if isinstance(store, SampleStore) else SampleStore(store)
        if batch_size < 1 or max_len < 1 or shuffle_buffer < 1 or bucket_batches < 1:
            raise DinrecError("batch_size, max_len, shuffle_buffer and bucket_batches must be >= 1")
        if neg_history < 0:
            raise DinrecError(f"neg_history must be >= 0, got {neg_history}")
        if not 0 <= rank < world_size:
            raise DinrecError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        if neg_sampling not in ("popularity", "uniform"):
            raise DinrecError(
                f"neg_sampling must be 'popularity' or 'uniform', got {neg_sampling!r}"
            )
        self.split = split
        self.batch_size = batch_size
        self.max_len = max_len
        self.shuffle = shuffle
        self.seed = seed
        self.bucket = bucket
        self.neg_history = neg_history
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.neg_sampling = neg_sampling
        self.bucket_batches = bucket_batches if bucket else 1
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out

        self._files = self.store.files(split)
        self._file_rows = self.store.shard_rows(split)
        self._pieces = self._rank_pieces(rank)
        self._rows = sum(stop - start for _, start, stop in self._pieces)
        counts = [
            self._count_batches(sum(b - a for _, a, b in self._rank_pieces(r)))
            for r in range(world_size)
        ]
        self._num_batches = min(counts)
        self._stream_rows = min(self._rows, self._num_batches * batch_size)
        self._setup_features()
        self._hist_len = {s.name: min(max_len, s.max_len) for s in self.schema.sequences}
        if neg_history:
            self._setup_negatives()

    def _setup_features(self) -> None:
        """The gather sources of every feature: side tables by key, flat sequence values."""
        self.schema: Schema = self.store.schema
        self._seqs = self.store.sequences  # memory-mapped, shared by every window
        stats = self._stats = self.store.numeric_stats
        self._users = _feature_arrays(self.schema.user, self.store.users, stats)
        self._items = _feature_arrays(self.schema.item, self.store.items, stats)
        self._needs_ts = any(f.source == TIME_GAP for s in self.schema.sequences
                             for f in s.event_features)
        self._columns = ["label", "user", "item", "seq"]
        self._columns += [f"end.{s.name}" for s in self.schema.sequences]
        self._columns += [f"ctx.{f.name}" for f in self.schema.context]
        self._columns += ["ts"] if self._needs_ts else []
        # padding positions read entry 0 (zeros when a sequence is empty)
        self._flat: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
        for q in self.schema.sequences:
            seq = self._seqs[q.name]
            items = seq.items if len(seq.items) else np.zeros(1, np.int64)
            events = {k: (v if len(v) else np.zeros(1, v.dtype)) for k, v in seq.events.items()}
            for f in q.event_features:
                if f.is_numeric:
                    st = stats[f.name]
                    events[f.name] = normalise(events[f.name], st["mean"], st["std"])
            self._flat[q.name] = (items, events)

    def _setup_negatives(self) -> None:
        """``neg_history``: draw from the known items (keys 2..n_known-1, == their ids)."""
        side = self.store.items
        if side.n_known <= NUM_SPECIAL + 1:
            raise DinrecError("neg_history needs at least two items in the item vocabulary")
        self._n_items = side.n_known
        self._neg_table = None  # popularity as a lookup table: O(1) per draw
        if self.neg_sampling == "popularity":
            counts_ = side.counts[NUM_SPECIAL : side.n_known].astype(np.float64)
            if counts_.sum() > 0:
                size = max(1 << 20, 16 * len(counts_))
                reps = np.maximum(np.round(counts_ / counts_.sum() * size), counts_ > 0)
                ids = np.arange(NUM_SPECIAL, NUM_SPECIAL + len(counts_))
                self._neg_table = np.repeat(ids, reps.astype(np.int64))

    # ------------------------------------------------------------------ plan
    def _rank_pieces(self, rank: int) -> list[tuple[int, int, int]]:
        """(file index, first row, end row) of the pieces a rank reads."""
        n_files = len(self._files)
        if self.world_size == 1:
            return [(f, 0, self._file_rows[f]) for f in range(n_files)]
        if n_files >= self.world_size:
            return [(f, 0, self._file_rows[f]) for f in range(rank, n_files, self.world_size)]
        out = []
        for f, n in enumerate(self._file_rows):
            a, b = n * rank // self.world_size, n * (rank + 1) // self.world_size
            out.append((f, a, b))
        return out

    def _count_batches(self, rows: int) -> int:
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *key])

    def _windows(self) -> list[list[tuple[int, int, int]]]:
        order = np.arange(len(self._pieces))
        if self.shuffle:
            order = self._rng(0).permutation(len(self._pieces))
        windows: list[list[tuple[int, int, int]]] = []
        size = 0
        for i in order:
            piece = self._pieces[i]
            n = piece[2] - piece[1]
            if windows and size + n <= self.shuffle_buffer:
                windows[-1].append(piece)
                size += n
            else:
                windows.append([piece])
                size = n
        return windows

    # ------------------------------------------------------------------ public
    def __len__(self) -> int:
        """Batches per epoch (on every rank)."""
        return self._num_batches

    @property
    def num_rows(self) -> int:
        """Rows this rank reads per epoch before batching."""
        return self._rows

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning at the next iteration."""
        self.epoch = int(epoch)
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_batches": self._num_batches,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "num_batches", "world_size"):
            if key in state and state[key] != getattr(
                self, key if key != "num_batches" else "_num_batches"
            ):
                raise DinrecError(
                    f"cannot resume: the saved loader had {key}={state[key]}, this one has "
                    f"{getattr(self, key if key != 'num_batches' else '_num_batches')}"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def __iter__(self) -> Iterator[Batch]:
        nb, B, ub = self._num_batches, self.batch_size, self.bucket_batches
        windows = self._windows()
        w_rows = np.array([sum(b - a for _, a, b in w) for w in windows], dtype=np.int64)
        w_start = np.concatenate([[0], np.cumsum(w_rows)])  # stream row where each window starts
        loaded: dict[int, tuple[_Block, np.ndarray]] = {}

        def window(w: int) -> tuple[_Block, np.ndarray]:
            if w not in loaded:
                for old in [k for k in loaded if k < w]:
                    del loaded[old]  # release shards behind us
                blocks = [
                    _read_piece(self._files[f], a, b, self._file_rows[f], self._seqs,
                                self._hist_len, self._columns)
                    for f, a, b in windows[w]
                ]
                block = _concat_blocks(blocks)
                perm = (
                    self._rng(1, w).permutation(len(block))
                    if self.shuffle
                    else np.arange(len(block))
                )
                loaded[w] = (block, perm)
            return loaded[w]

        def stream_rows(a: int, b: int) -> _Block:
            parts = []
            w = int(np.searchsorted(w_start, a, side="right") - 1)
            while a < b:
                block, perm = window(w)
                stop = min(b, int(w_start[w + 1]))
                parts.append((block, perm[a - w_start[w] : stop - w_start[w]]))
                a, w = stop, w + 1
            return _concat_blocks([block.take(rows) for block, rows in parts])

        while self.position < nb:
            p = self.position
            u = p // ub
            first, last = u * ub, min((u + 1) * ub, nb)  # batches of this unit
            rows = stream_rows(first * B, min(last * B, self._stream_rows))
            starts = np.arange(first, last)
            if self.bucket:
                order = np.argsort(rows[f"len.{self.schema.main_sequence.name}"], kind="stable")
                slots = np.arange(last - first)
                if self.shuffle:
                    slots = self._rng(2, u).permutation(last - first)
            for j in range(p - first, last - first):
                if self.bucket:
                    k = int(slots[j])
                    sel: Any = order[k * B : (k + 1) * B]  # the last slot may be partial
                else:
                    sel = slice(j * B, (j + 1) * B)
                batch = self._make_batch(rows, sel, int(starts[j]))
                self.position = int(starts[j]) + 1
                yield batch
        self.epoch += 1
        self.position = 0

    def item_features(self, keys: np.ndarray) -> dict[str, torch.Tensor]:
        """The item features of item keys ``(...)``, as batches carry them: ``(...)`` ids or
        normalised values, ``(..., M)`` for multi-valued features."""
        return {k: torch.from_numpy(v.take(keys, axis=0)) for k, v in self._items.items()}

    # ------------------------------------------------------------------ assembly
    def _make_batch(self, rows: _Block, sel: Any, index: int) -> Batch:
        ukey = np.ascontiguousarray(rows["user"][sel])  # (B,)
        ikey = np.ascontiguousarray(rows["item"][sel])  # (B,)
        context = {}
        for f in self.schema.context:
            v = rows[f"ctx.{f.name}"][sel]
            if f.is_numeric:
                st = self._stats[f.name]
                v = normalise(v, st["mean"], st["std"])
            context[f.name] = torch.from_numpy(np.ascontiguousarray(v))
        sequences = {}
        for q in self.schema.sequences:
            sequences[q.name] = self._sequence(rows, sel, q.name, q.event_features, index)
        return Batch(
            label=torch.from_numpy(rows["label"][sel].astype(np.float32)),
            user={k: torch.from_numpy(v.take(ukey, axis=0)) for k, v in self._users.items()},
            item={k: torch.from_numpy(v.take(ikey, axis=0)) for k, v in self._items.items()},
            sequences=sequences,
            context=context,
            group=torch.from_numpy(ukey),
        )

    def _sequence(self, rows: _Block, sel: Any, name: str, event_features: list[Feature],
                  index: int) -> SequenceBatch:
        """One sequence of the rows ``sel``: item features (B, T[, M]), events, mask, neg."""
        lens = rows[f"len.{name}"][sel]  # (B,)
        T = max(1, int(lens.max(initial=0)))
        pos = np.arange(T)  # (T,)
        mask = pos[None, :] < lens[:, None]  # (B, T)
        idx = rows[f"start.{name}"][sel][:, None] + pos  # (B, T) flat positions, one gather
        idx *= mask  # padding reads position 0, then is zeroed
        flat_items, flat_events = self._flat[name]
        keys = flat_items.take(idx)  # (B, T) item keys
        keys *= mask  # key 0: every item feature is padding
        items = {k: torch.from_numpy(v.take(keys, axis=0)) for k, v in self._items.items()}
        events = {}
        for f in event_features:
            if f.source == TIME_GAP:
                gap = rows["ts"][sel][:, None] - flat_events["ts"].take(idx)  # (B, T) seconds
                ids = np.searchsorted(np.asarray(f.boundaries, np.float64), gap, side="right")
                v = (ids + NUM_SPECIAL) * mask
            else:
                v = flat_events[f.name].take(idx) * mask
            events[f.name] = torch.from_numpy(v)
        neg = None
        if self.neg_history and name == self.schema.main_sequence.name:
            nk = self._sample_neg_history(keys, mask, index)  # (B, T, K) keys
            neg = {k: torch.from_numpy(v.take(nk, axis=0)) for k, v in self._items.items()}
        return SequenceBatch(items=items, mask=torch.from_numpy(mask), events=events, neg=neg)

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self._neg_table is None:
            return rng.integers(NUM_SPECIAL, self._n_items, n)
        n_table = len(self._neg_table)
        dtype = np.int32 if n_table < 2**31 else np.int64  # 32-bit draws are cheaper
        return self._neg_table.take(rng.integers(0, n_table, n, dtype=dtype))

    def _sample_neg_history(self, hist: np.ndarray, mask: np.ndarray, index: int) -> np.ndarray:
        """(B, T, K) negatives for the valid positions of ``hist`` (0 where padded); only
        valid positions are drawn (a third of B*T for padded batches of mean length 31)."""
        B, T = hist.shape
        K = self.neg_history
        rng = self._rng(3, index)
        at = np.flatnonzero(mask.reshape(-1))  # (V,) valid positions
        flat = self._draw(rng, len(at) * K)  # (V*K,)
        pos = np.repeat(hist.reshape(-1).take(at), K)  # (V*K,) the positive at each draw
        bad = np.flatnonzero(flat == pos)
        for _ in range(100):
            if len(bad) == 0:
                break
            flat[bad] = self._draw(rng, len(bad))
            bad = bad[flat[bad] == pos[bad]]
        while len(bad):  # popularity mass concentrated on one item: fall back to uniform
            flat[bad] = rng.integers(NUM_SPECIAL, self._n_items, len(bad))
            bad = bad[flat[bad] == pos[bad]]
        neg = np.zeros((B * T, K), dtype=np.int64)
        neg[at] = flat.reshape(-1, K)
        return neg.reshape(B, T, K)


def _feature_arrays(feats: list[Feature], table: SideTable,
                    stats: dict[str, dict[str, float]]) -> dict[str, np.ndarray]:
    """Each feature's gather source by key: ids (N,) / (N, M), numeric normalised float32."""
    out = {}
    for f in feats:
        v = table.features[f.name]
        if f.is_numeric:
            v = normalise(v, stats[f.name]["mean"], stats[f.name]["std"])
            v[0] = 0.0
        out[f.name] = np.ascontiguousarray(v)
    return out


__all__ = ["Batch", "BatchLoader", "SequenceBatch"]
