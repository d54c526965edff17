"""Fast, seeded, resumable batches from a sample store.

A :class:`BatchLoader` streams one split of a store shard by shard. Each epoch is planned
from ``(seed, epoch)`` alone:

1. this rank's *pieces* (whole shards assigned round-robin over ranks, or row ranges of
   every shard when there are fewer shards than ranks) are put in a seeded order;
2. consecutive pieces are grouped into *windows* of at most ``shuffle_buffer`` rows (at
   least one piece) — the bounded shuffle buffer — and rows are permuted inside a window;
3. the resulting row stream is cut into batches; with ``bucket=True`` into *units* of
   ``bucket_batches`` batches whose rows are sorted by history length, cut into batches,
   and the batch order inside the unit shuffled (much less padding).

Because the plan depends only on ``(seed, epoch)`` and the shards' row counts (in
``stats.json``), :meth:`BatchLoader.state_dict` is just ``(epoch, position)`` and resuming
skips straight to the right window without reading the batches before it.

Shards hold ``(seq, hist_end)`` per row, not histories: when a shard is read, each row
becomes a window ``(start, length)`` of the store's memory-mapped sequence values (see
:mod:`dinrec.data.store`), and a batch is one fancy-index gather per column of those
values: each history keeps its most recent ``max_len`` items (and never more than the
store's ``max_len``), left-aligned (oldest first), 0-padded at the end.
With ``neg_history=K`` every valid history position also gets K negative items, sampled
by popularity (training counts) or uniformly from the item vocabulary, never equal to the
positive item at that position, with categories from the store's item -> category table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from dinrec.data.samples import Sequences
from dinrec.data.store import SampleStore
from dinrec.data.vocab import NUM_SPECIAL
from dinrec.errors import DinrecError

log = logging.getLogger(__name__)

_COLUMNS = ["label", "user", "item", "cat", "seq", "hist_end"]


@dataclass
class Batch:
    """One batch of samples (all tensors on the same device)."""

    user: Tensor  # (B,) int64
    item: Tensor  # (B,) int64 target item
    cat: Tensor  # (B,) int64 target category
    hist_items: Tensor  # (B, T) int64, oldest first, 0-padded at the end
    hist_cats: Tensor  # (B, T) int64
    mask: Tensor  # (B, T) bool, True = valid
    label: Tensor  # (B,) float32
    neg_items: Tensor | None = None  # (B, T, K) int64, 0 where padded
    neg_cats: Tensor | None = None  # (B, T, K) int64

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {
            f.name: (None if v is None else v.to(device, non_blocking=non_blocking))
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return Batch(**moved)

    def pin_memory(self) -> Batch:
        return Batch(**{
            f.name: (None if v is None else v.pin_memory())
            for f in fields(self)
            for v in [getattr(self, f.name)]
        })  # fmt: skip


# ---------------------------------------------------------------------- blocks of rows
@dataclass
class _Block:
    """Rows in memory: scalar columns plus each history as a window of the store's flat
    sequence values (already cut to ``max_len``)."""

    label: np.ndarray  # (n,) int8
    user: np.ndarray  # (n,) int64
    item: np.ndarray  # (n,) int64
    cat: np.ndarray  # (n,) int64
    starts: np.ndarray  # (n,) int64 first history entry in the sequences' flat values
    lens: np.ndarray  # (n,) int64 history length, <= max_len

    def __len__(self) -> int:
        return len(self.label)

    def take(self, rows: np.ndarray) -> _Block:
        return _Block(*(getattr(self, f.name).take(rows) for f in fields(self)))


def _concat_blocks(blocks: list[_Block]) -> _Block:
    if len(blocks) == 1:
        return blocks[0]
    return _Block(*(np.concatenate([getattr(b, f.name) for b in blocks]) for f in fields(_Block)))


def _read_piece(
    path: Path, start: int, stop: int, n_rows: int, seqs: Sequences, max_len: int
) -> _Block:
    """Rows ``[start, stop)`` of a shard, their histories resolved to windows of ``seqs``."""
    table = pq.read_table(path, columns=_COLUMNS, memory_map=True)
    if table.num_rows != n_rows:
        raise DinrecError(
            f"{path} has {table.num_rows} rows, stats.json says {n_rows}; prepare again"
        )
    if start or stop != n_rows:
        table = table.slice(start, stop - start)
    col = {k: table.column(k).to_numpy() for k in _COLUMNS}
    seq, hist_end = col["seq"].astype(np.int64), col["hist_end"].astype(np.int64)  # (n,)
    bad = len(seq) > 0 and (seq.min() < 0 or seq.max() >= len(seqs) or hist_end.min() < 0)
    if len(seq) and not bad:
        seq_len = seqs.offsets.take(seq + 1) - seqs.offsets.take(seq)  # (n,)
        bad = bool((hist_end > seq_len).any())
    if bad:
        raise DinrecError(f"{path} points outside the store's sequences; prepare again")
    starts, lens = seqs.windows(seq, hist_end, max_len)
    return _Block(
        label=col["label"].astype(np.int8),
        user=col["user"].astype(np.int64),
        item=col["item"].astype(np.int64),
        cat=col["cat"].astype(np.int64),
        starts=starts,
        lens=lens,
    )


# ---------------------------------------------------------------------- the loader
class BatchLoader:
    """Iterate over :class:`Batch` es of one split of a sample store.

    Args:
        store: a store directory or an opened :class:`SampleStore`.
        split: ``train``, ``valid`` or ``test``.
        batch_size: rows per batch (the last one may be smaller unless ``drop_last``).
        max_len: histories keep their most recent ``max_len`` items.
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
        self._seqs = self.store.sequences  # memory-mapped, shared by every window
        self._hist_len = min(max_len, self.store.max_len)  # the store cut at its max_len
        # the gather source of padding positions when the store holds no history id at all
        self._values = (
            (self._seqs.items, self._seqs.cats) if len(self._seqs.items) else
            (np.zeros(1, np.int64), np.zeros(1, np.int64))
        )  # fmt: skip
        if neg_history:
            self._item_cat = self.store.item_cat
            n_items = len(self._item_cat)
            if n_items <= NUM_SPECIAL + 1:
                raise DinrecError("neg_history needs at least two items in the item vocabulary")
            self._n_items = n_items
            self._neg_table = None  # popularity as a lookup table: O(1) per draw
            if neg_sampling == "popularity":
                counts_ = self.store.vocabs.item.counts[NUM_SPECIAL:].astype(np.float64)
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
                    _read_piece(self._files[f], a, b, self._file_rows[f], self._seqs, self._hist_len)
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
                order = np.argsort(rows.lens, kind="stable")
                slots = np.arange(last - first)
                if self.shuffle:
                    slots = self._rng(2, u).permutation(last - first)
            for j in range(p - first, last - first):
                if self.bucket:
                    k = int(slots[j])
                    sel = order[k * B : (k + 1) * B]  # the last slot may be partial
                else:
                    sel = slice(j * B, (j + 1) * B)
                batch = self._make_batch(rows, sel, int(starts[j]))
                self.position = int(starts[j]) + 1
                yield batch
        self.epoch += 1
        self.position = 0

    # ------------------------------------------------------------------ assembly
    def _make_batch(self, rows: _Block, sel: Any, index: int) -> Batch:
        lens = rows.lens[sel]  # (B,)
        T = max(1, int(lens.max(initial=0)))
        pos = np.arange(T)  # (T,)
        mask = pos[None, :] < lens[:, None]  # (B, T)
        idx = rows.starts[sel][:, None] + pos  # (B, T) flat positions, one gather per column
        idx *= mask  # padding reads position 0, then is zeroed
        items, cats = self._values
        hist_items = items.take(idx)  # (B, T)
        hist_cats = cats.take(idx)  # (B, T)
        hist_items *= mask
        hist_cats *= mask
        neg_items = neg_cats = None
        if self.neg_history:
            neg = self._sample_neg_history(hist_items, mask, index)  # (B, T, K)
            neg_items = torch.from_numpy(neg)
            neg_cats = torch.from_numpy(self._item_cat.take(neg))
        return Batch(
            user=torch.from_numpy(np.ascontiguousarray(rows.user[sel])),
            item=torch.from_numpy(np.ascontiguousarray(rows.item[sel])),
            cat=torch.from_numpy(np.ascontiguousarray(rows.cat[sel])),
            hist_items=torch.from_numpy(hist_items),
            hist_cats=torch.from_numpy(hist_cats),
            mask=torch.from_numpy(mask),
            label=torch.from_numpy(rows.label[sel].astype(np.float32)),
            neg_items=neg_items,
            neg_cats=neg_cats,
        )

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
