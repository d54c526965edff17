"""Turn an events table (or ready-made samples) into train / valid / test samples of ids.

Events (a :class:`pyarrow.Table`):

* ``user``, ``item`` (strings; other types are cast to string; rows with a null user or
  item are dropped with a warning);
* ``cat`` (optional string): absent or null -> the category token ``"unknown"``;
* ``ts`` (optional int64): absent -> file order; ties keep file order (stable sort);
* ``label`` (optional, 0/1): absent -> every event is an implicit positive.

A **label-0 event is an explicit negative**: it never enters any history; it becomes a
negative sample whose history is the user's positives before it, in the split of the
user's *next* positive (those after the user's last positive go to ``test``).

Per user, in time order, every positive after the first ``min_history`` positives becomes
a sample whose history is the previous ``max_len`` positives (oldest first), plus
``neg_per_pos`` sampled negatives (seeded; by popularity among training positives or
uniform over the training item vocabulary) that are never one of that user's positives in
any split, sharing the positive's history, user, timestamp and split.

Splits (validation is always separate from test):

* ``leave-last-out``: the user's last positive -> test, the second last -> valid, the rest
  -> train; explicit negatives follow their next positive, sampled negatives their positive.
* ``by-user``: a seeded ``test_fraction`` / ``valid_fraction`` of users go to test / valid
  with all their samples (their user ids are then out-of-vocabulary).
* ``time``: samples at ``ts >= time_cut`` -> test (``time_cut`` defaults to the
  ``1 - test_fraction`` quantile of all timestamps); valid is the slice just before the
  cut, from the ``1 - valid_fraction`` quantile of the earlier timestamps to the cut;
  the rest -> train. Histories always use every earlier positive, whatever its split.

Vocabularies are built from training-split events (or samples) only, with ``min_count``.
Everything is vectorised NumPy: one sort by (user, ts) and offsets per user.

Histories are never copied per sample. Each behaviour sequence is kept once
(:class:`Sequences`: one per user, their positives in time order) and a sample points into
it with ``(seq, hist_end)``: its history is ``sequence[max(0, hist_end - max_len) :
hist_end]``, only events strictly before it. Ready-made samples carry explicit histories:
each distinct one (cut to ``max_len``) becomes a sequence with ``hist_end`` its length.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinrec.data.vocab import NUM_SPECIAL, OOV_ID, Vocab, Vocabularies
from dinrec.errors import DinrecError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SPLIT_METHODS = ("leave-last-out", "by-user", "time")
UNKNOWN_CAT = "unknown"
# odd 64-bit constants (golden ratio, splitmix64) for multiplicative hashing
_MIX = np.array([0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB], dtype=np.uint64)


@dataclass
class PrepareConfig:
    """How events become samples (also recorded as ``prepare.json`` in the store)."""

    max_len: int = 100  # longest history kept (most recent positives)
    min_history: int = 1  # positives needed before an event becomes a sample
    neg_per_pos: int = 1  # sampled negatives per positive sample
    neg_sampling: str = "popularity"  # or "uniform"
    split: str = "leave-last-out"  # or "by-user", "time"
    valid_fraction: float = 0.1  # by-user: share of users; time: share of pre-cut events
    test_fraction: float = 0.1  # by-user: share of users; time: default cut quantile
    time_cut: int | None = None  # time split: first test timestamp
    min_count: int = 1  # rarer training tokens map to the out-of-vocabulary id
    seed: int = 0
    shard_rows: int = 500_000  # rows per Parquet shard

    def validate(self) -> None:
        if self.max_len < 1:
            raise DinrecError(f"max_len must be >= 1, got {self.max_len}")
        if self.min_history < 0:
            raise DinrecError(f"min_history must be >= 0, got {self.min_history}")
        if self.neg_per_pos < 0:
            raise DinrecError(f"neg_per_pos must be >= 0, got {self.neg_per_pos}")
        if self.neg_sampling not in ("popularity", "uniform"):
            raise DinrecError(
                f"neg_sampling must be 'popularity' or 'uniform', got {self.neg_sampling!r}"
            )
        if self.split not in SPLIT_METHODS:
            raise DinrecError(
                f"split must be one of {', '.join(SPLIT_METHODS)}, got {self.split!r}"
            )
        for name in ("valid_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise DinrecError(f"{name} must be in [0, 1), got {v}")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise DinrecError("valid_fraction + test_fraction must be < 1")
        if self.min_count < 1:
            raise DinrecError(f"min_count must be >= 1, got {self.min_count}")
        if self.shard_rows < 1:
            raise DinrecError(f"shard_rows must be >= 1, got {self.shard_rows}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrepareConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Sequences:
    """Behaviour sequences, stored once for a whole store (oldest first).

    Sequence ``q`` is ``items[offsets[q] : offsets[q + 1]]`` (and the same slice of
    ``cats``). A sample points into one with ``(seq, hist_end)``: its history is the
    most recent ``max_len`` entries before ``hist_end`` (see :meth:`windows`).
    """

    offsets: np.ndarray  # (Q+1,) int64, offsets[0] == 0
    items: np.ndarray  # (P,) int64
    cats: np.ndarray  # (P,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """``(Q,)`` int64 length of every sequence."""
        return np.diff(self.offsets)

    def windows(
        self, seq: np.ndarray, hist_end: np.ndarray, max_len: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) of each history in the flat ``items`` / ``cats``, ``(N,)`` each:
        ``seq[max(0, hist_end - max_len) : hist_end]``."""
        length = np.minimum(hist_end, max_len).astype(np.int64)  # (N,)
        start = self.offsets.take(seq) + hist_end - length  # (N,)
        return start, length

    def history(self, seq: int, hist_end: int, max_len: int) -> tuple[list[int], list[int]]:
        """One history as (items, cats) lists: for messages, tests and serving, not loops."""
        end = int(self.offsets[seq]) + int(hist_end)
        start = end - min(int(hist_end), max_len)
        return self.items[start:end].tolist(), self.cats[start:end].tolist()

    def to_batch(self) -> pa.RecordBatch:
        """One row per sequence: ``items``, ``cats`` as large_list<int64> (64-bit offsets)."""
        off = pa.array(self.offsets.astype(np.int64, copy=False))
        return pa.record_batch({
            "items": pa.LargeListArray.from_arrays(off, pa.array(self.items, pa.int64())),
            "cats": pa.LargeListArray.from_arrays(off, pa.array(self.cats, pa.int64())),
        })  # fmt: skip


@dataclass
class SampleSet:
    """The samples of one split as id arrays; histories point into shared :class:`Sequences`.

    Row ``r``'s history is ``sequences.windows(seq, hist_end, max_len)`` of that row: the
    entries of sequence ``seq[r]`` before ``hist_end[r]``, the most recent ``max_len``.

    With ``order`` set, the split's row ``r`` is entry ``order[r]`` of the column arrays:
    the training split is shuffled this way, and :meth:`to_table` gathers one shard's rows
    at a time while the previous shard is being encoded. Aggregates (counts, distinct
    users, history lengths) do not depend on the order and use the arrays as they are.
    """

    label: np.ndarray  # (N,) int8
    user: np.ndarray  # (N,) int64 (or int32) ids
    item: np.ndarray  # (N,) int64 (or int32)
    cat: np.ndarray  # (N,) int64 (or int32)
    seq: np.ndarray  # (N,) row of the sequences table
    hist_end: np.ndarray  # (N,) exclusive end of the history in that sequence
    ts: np.ndarray | None = None  # (N,) int64
    order: np.ndarray | None = None  # (N,) a permutation: the row order (None: as stored)

    def __len__(self) -> int:
        return len(self.label)

    def rows(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Columns of rows ``[start, stop)`` in row order (``ts`` only when present)."""
        sl = slice(start, len(self) if stop is None else stop)
        names = ["label", "user", "item", "cat", "seq", "hist_end"]
        names += [] if self.ts is None else ["ts"]
        if self.order is None:
            return {k: getattr(self, k)[sl] for k in names}
        idx = self.order[sl]
        return {k: getattr(self, k).take(idx) for k in names}

    def take(self, rows: np.ndarray) -> SampleSet:
        """The rows ``rows`` (in row order), as a set without ``order``."""
        idx = rows if self.order is None else self.order.take(rows)
        return SampleSet(
            self.label.take(idx), self.user.take(idx), self.item.take(idx),
            self.cat.take(idx), self.seq.take(idx), self.hist_end.take(idx),
            None if self.ts is None else self.ts.take(idx),
        )  # fmt: skip

    def to_table(self, start: int = 0, stop: int | None = None) -> pa.Table:
        """Rows ``[start, stop)`` as a store shard table (:data:`dinrec.data.store.STORE_SCHEMA`)."""
        cols = self.rows(start, stop)
        out = {
            "label": pa.array(cols["label"].astype(np.int8, copy=False)),
            "user": pa.array(cols["user"].astype(np.int64, copy=False)),
            "item": pa.array(cols["item"].astype(np.int64, copy=False)),
            "cat": pa.array(cols["cat"].astype(np.int64, copy=False)),
            "seq": pa.array(cols["seq"].astype(np.int64, copy=False)),
            "hist_end": pa.array(cols["hist_end"].astype(np.int32)),
        }
        if "ts" in cols:
            out["ts"] = pa.array(cols["ts"].astype(np.int64, copy=False))
        return pa.table(out)


@dataclass
class BuiltSamples:
    """What sample building produces: the splits, the sequences they point into, the
    vocabularies, the ``max_len`` that cuts histories and some counts."""

    splits: dict[str, SampleSet]
    sequences: Sequences
    vocabs: Vocabularies
    max_len: int
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- helpers
def _codes(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Dense codes (int32, first-occurrence order) and the distinct values of a column."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    enc = col.dictionary_encode()
    return enc.indices.to_numpy(zero_copy_only=False), enc.dictionary  # int32 codes


def _stable_order(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Indices sorting by (user, ts), ties in file order.

    Least-significant-digit first with stable sorts: by ``ts`` (skipped when the log is
    already in time order, as most are), then by ``user`` 16 bits at a time (NumPy sorts
    16-bit keys by radix: linear time, ~5x faster than a comparison sort of 1M keys).
    """
    n = len(user)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = None
    if not (ts[1:] >= ts[:-1]).all():
        order = np.argsort(ts, kind="stable")
    key = user if order is None else user.take(order)  # (n,) user codes >= 0
    top = int(user.max())
    shift = 0
    while True:
        p = np.argsort(((key >> shift) & 0xFFFF).astype(np.uint16), kind="stable")
        order = p if order is None else order.take(p)
        shift += 16
        if top >> shift == 0:
            return order
        key = key.take(p)


def _narrow(ids: np.ndarray) -> np.ndarray:
    """``ids`` (>= 0) as int32 when every value fits, else unchanged."""
    return ids.astype(np.int32) if len(ids) == 0 or ids.max() < 2**31 else ids


def _vocab_from_codes(
    distinct: pa.Array, codes: np.ndarray, min_count: int, name: str
) -> tuple[Vocab, np.ndarray]:
    """What ``Vocab.build(distinct.take(codes), min_count)`` gives, from counts of the codes
    (no string is hashed again), and the id of every code ``(len(distinct),)``."""
    counts = np.bincount(codes, minlength=len(distinct))  # (D,)
    keep = np.flatnonzero(counts >= min_count)  # (K,) codes in the vocabulary
    table = pa.table({"token": distinct.take(pa.array(keep)), "count": counts.take(keep)})
    order = pc.sort_indices(table, sort_keys=[("count", "descending"), ("token", "ascending")])
    order = order.to_numpy()
    ids = np.full(len(distinct), OOV_ID, dtype=np.int64)
    ids[keep.take(order)] = np.arange(NUM_SPECIAL, NUM_SPECIAL + len(keep))
    vocab = Vocab(table.column("token").take(order), counts.take(keep.take(order)), name)
    return vocab, ids


def _item_cat_table(item_ids: np.ndarray, cat_ids: np.ndarray, n_items: int) -> np.ndarray:
    """``item_cat[item id]`` = the category id of that item's first (item, cat) pair."""
    table = np.full(n_items, OOV_ID, dtype=np.int64)
    table[0] = 0
    if len(item_ids):
        first = np.full(n_items, len(item_ids), dtype=np.int64)  # first pair of each item
        np.minimum.at(first, item_ids, np.arange(len(item_ids)))
        seen = np.flatnonzero(first < len(item_ids))
        table[seen] = cat_ids[first[seen]]
    table[0], table[OOV_ID] = 0, OOV_ID
    return table


def _sample_negatives(
    rng: np.random.Generator,
    n: int,
    weights: np.ndarray | None,
    n_ids: int,
    forbidden: np.ndarray,
    owner: np.ndarray,
    id_key: np.ndarray,
    n_keys: int,
    max_rounds: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` item ids from ``[2, n_ids)`` that avoid each owner's forbidden keys.

    ``weights`` (integer counts of ids ``2, 3, ...``; None = uniform) give the popularity.
    ``forbidden`` is a sorted array (repeats allowed) of ``owner * n_keys + key``;
    ``id_key[id]`` gives the key of an id (-1 when the id can never clash). Returns
    (ids, ok) where ``ok`` is False for draws that still clashed after ``max_rounds``.
    """
    if weights is not None:  # integer counts: one id per count, an O(1) exact draw
        table = np.repeat(np.arange(NUM_SPECIAL, NUM_SPECIAL + len(weights)), weights)

    def draw(m: int) -> np.ndarray:
        if weights is None:
            return rng.integers(NUM_SPECIAL, n_ids, size=m)
        return table[rng.integers(0, len(table), size=m)]

    # A Bloom-style filter in front of the exact search: a key's hash slot in a table ~8x
    # larger than ``forbidden`` (<= 64 MB); only draws that land on a used slot (~1 in 8)
    # are looked up with a binary search.
    bits = int(np.clip(np.ceil(np.log2(max(len(forbidden), 1) * 8)), 16, 26))
    shift = np.uint64(64 - bits)

    def slot(full: np.ndarray) -> np.ndarray:
        return ((full.astype(np.uint64) * _MIX[0]) >> shift).astype(np.intp)

    used = np.zeros(1 << bits, dtype=bool)
    used[slot(forbidden)] = True

    def clashes(ids: np.ndarray, own: np.ndarray) -> np.ndarray:
        keys = id_key.take(ids)
        full = own * n_keys + keys
        out = np.zeros(len(ids), dtype=bool)
        cand = np.flatnonzero(used.take(slot(full)) & (keys >= 0))
        if len(cand) and len(forbidden):
            f = full.take(cand)
            at = np.searchsorted(forbidden, f)
            np.minimum(at, len(forbidden) - 1, out=at)
            out[cand] = forbidden.take(at) == f
        return out

    ids = draw(n)
    bad = np.flatnonzero(clashes(ids, owner))
    rounds = 0
    while len(bad) and rounds < max_rounds:
        ids[bad] = draw(len(bad))
        bad = bad[clashes(ids[bad], owner[bad])]
        rounds += 1
    ok = np.ones(n, dtype=bool)
    ok[bad] = False
    return ids, ok


# ---------------------------------------------------------------------- events
def _event_columns(events: pa.Table) -> dict[str, Any]:
    names = set(events.column_names)
    for req in ("user", "item"):
        if req not in names:
            raise DinrecError(
                f"events table has no {req!r} column (columns: {', '.join(events.column_names)})"
            )
    keep = pc.and_(pc.is_valid(events.column("user")), pc.is_valid(events.column("item")))
    n_bad = events.num_rows - pc.sum(pc.cast(keep, pa.int64())).as_py() if events.num_rows else 0
    if n_bad:
        log.warning("dropping %d events with a null user or item", n_bad)
        events = events.filter(keep)
    n = events.num_rows
    cols: dict[str, Any] = {"n": n, "has_ts": "ts" in names}
    strings = {"user": events.column("user"), "item": events.column("item")}
    if "cat" in names:
        strings["cat"] = pc.fill_null(events.column("cat").cast(pa.string()), UNKNOWN_CAT)
    with ThreadPoolExecutor(len(strings)) as pool:  # Arrow's hashing releases the GIL
        for name, (codes, distinct) in zip(
            strings, pool.map(_codes, strings.values()), strict=True
        ):
            cols[name], cols[f"{name}_dict"] = codes, distinct
    if "cat" not in names:
        cols["cat"] = np.zeros(n, dtype=np.int32)
        cols["cat_dict"] = pa.array([UNKNOWN_CAT] if n else [], type=pa.string())
    if "ts" in names:
        ts = events.column("ts")
        if ts.null_count:
            raise DinrecError(f"events column 'ts' has {ts.null_count} null values")
        try:
            cols["ts"] = ts.cast(pa.int64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DinrecError(f"events column 'ts' must be integer timestamps: {exc}") from exc
    else:
        cols["ts"] = np.arange(n, dtype=np.int64)
    if "label" in names:
        lab = events.column("label")
        if lab.null_count:
            raise DinrecError(f"events column 'label' has {lab.null_count} null values")
        lab_np = lab.cast(pa.int64()).to_numpy()
        if n and not np.isin(lab_np, (0, 1)).all():
            raise DinrecError("events column 'label' must hold only 0 and 1")
        cols["label"] = lab_np.astype(np.int8)
    else:
        cols["label"] = np.ones(n, dtype=np.int8)
    return cols


def build_event_samples(events: pa.Table, cfg: PrepareConfig) -> BuiltSamples:
    """Samples, vocabularies and counts from an events table (see the module docstring)."""
    cfg.validate()
    c = _event_columns(events)
    n = c["n"]
    if n == 0:
        raise DinrecError("the events table is empty")

    # ---- sort by (user, ts), stable in file order
    order = _stable_order(c["user"], c["ts"])
    u, it, ct, ts, lab = (c[k].take(order) for k in ("user", "item", "cat", "ts", "label"))
    pos = lab == 1  # (n,)
    first_of_user = np.ones(n, dtype=bool)
    first_of_user[1:] = u[1:] != u[:-1]
    ustarts = np.flatnonzero(first_of_user)  # (U,)
    useg = u  # (n,) user segment of each event: codes are dense, every one has events

    pos_before = np.cumsum(pos) - pos  # (n,) global positives before each event
    user_pos0 = pos_before[ustarts]  # (U,) index of the user's first positive in the pool
    k = pos_before - user_pos0[useg]  # (n,) user's positives before this event
    n_pos_user = np.add.reduceat(pos.astype(np.int64), ustarts)  # (U,)

    # ---- splits: 0 train, 1 valid, 2 test
    split = np.zeros(n, dtype=np.int8)
    if cfg.split == "leave-last-out":
        npu = n_pos_user[useg]
        split[k == npu - 2] = 1
        split[k >= npu - 1] = 2
    elif cfg.split == "by-user":
        n_users = len(c["user_dict"])
        rng_u = np.random.default_rng([cfg.seed, 1])
        perm = rng_u.permutation(n_users)
        n_test = int(round(n_users * cfg.test_fraction))
        n_valid = int(round(n_users * cfg.valid_fraction))
        user_split = np.zeros(n_users, dtype=np.int8)
        user_split[perm[:n_test]] = 2
        user_split[perm[n_test : n_test + n_valid]] = 1
        split = user_split[u]
    else:  # time
        cut = cfg.time_cut
        if cut is None:
            cut = int(np.ceil(np.quantile(ts, 1.0 - cfg.test_fraction)))
        before = ts[ts < cut]
        vstart = cut
        if cfg.valid_fraction > 0 and len(before):
            vstart = int(np.ceil(np.quantile(before, 1.0 - cfg.valid_fraction)))
        split[ts >= vstart] = 1
        split[ts >= cut] = 2
    train_ev = split == 0
    if not train_ev.any():
        raise DinrecError(f"split {cfg.split!r} leaves no training events; check its settings")

    # ---- vocabularies from training events only
    user_v, user_map = _vocab_from_codes(c["user_dict"], u[train_ev], cfg.min_count, "user")
    item_v, item_map = _vocab_from_codes(c["item_dict"], it[train_ev], cfg.min_count, "item")
    cat_v, cat_map = _vocab_from_codes(c["cat_dict"], ct[train_ev], cfg.min_count, "cat")
    item_cat = _item_cat_table(item_map[it[train_ev]], cat_map[ct[train_ev]], len(item_v))

    # ---- one sequence per user: their positives in time order; event i's history is the
    # user's first k[i] positives (the most recent max_len of them, cut when read)
    seq_offsets = np.append(user_pos0, int(pos.sum()))  # (U+1,)
    sequences = Sequences(seq_offsets, item_map[it[pos]], cat_map[ct[pos]])  # (P,) each
    sample_ev = np.flatnonzero(k >= cfg.min_history)  # events that become samples

    # ---- sampled negatives for positive samples
    pos_ev = sample_ev[pos[sample_ev]]
    kneg = cfg.neg_per_pos
    neg_ids = np.zeros((len(pos_ev), kneg), dtype=np.int64)
    neg_ok = np.ones((len(pos_ev), kneg), dtype=bool)
    n_failed = 0
    if kneg and len(pos_ev):
        if len(item_v) <= NUM_SPECIAL:
            raise DinrecError("no training items to sample negatives from")
        n_icodes = len(c["item_dict"])
        # (user seg, item code) keys; sorted runs per user make the stable sort ~3x faster
        forbidden = np.sort(useg[pos].astype(np.int64) * n_icodes + it[pos], kind="stable")
        id_key = np.full(len(item_v), -1, dtype=np.int64)
        id_key[item_map] = np.arange(n_icodes)  # id -> code (OOV id 1 gets some code; unused)
        id_key[:NUM_SPECIAL] = -1
        weights = None
        if cfg.neg_sampling == "popularity":
            tr_pos = train_ev & pos
            weights = np.bincount(item_map[it[tr_pos]], minlength=len(item_v))[NUM_SPECIAL:]
            if weights.sum() == 0:
                weights = None
        rng = np.random.default_rng([cfg.seed, 2])
        owner = np.repeat(useg[pos_ev].astype(np.int64), kneg)
        ids, ok = _sample_negatives(
            rng, len(owner), weights, len(item_v), forbidden, owner, id_key, n_icodes
        )
        neg_ids, neg_ok = ids.reshape(-1, kneg), ok.reshape(-1, kneg)
        n_failed = int((~neg_ok).sum())
        if n_failed:
            log.warning("%d negatives could not avoid the user's positives; dropped", n_failed)

    # ---- all sample rows, split by split: each sample event (in (user, ts) order inside its
    # split), a positive's sampled negatives right after it
    ev_split = split.take(sample_ev)  # (E,)
    by_split = np.argsort(ev_split, kind="stable")  # int8 keys: a radix sort
    se = sample_ev.take(by_split)  # (E,) sample events, split-major
    is_pos = pos.take(se)  # (E,)
    pidx = (np.cumsum(pos.take(sample_ev)) - 1).take(by_split)[is_pos]  # row of neg_ids
    reps = np.ones(len(se), dtype=np.int64)  # (E,) rows of each sample event
    reps[is_pos] += neg_ok.sum(axis=1).take(pidx)
    row_ev = np.repeat(se, reps)  # (S,) the event of each row
    neg_rows = np.ones(len(row_ev), dtype=bool)
    neg_rows[np.cumsum(reps) - reps] = False  # the event's own row
    neg_rows = np.flatnonzero(neg_rows)  # rows holding a sampled negative
    negs = neg_ids.take(pidx, axis=0)[neg_ok.take(pidx, axis=0)]  # row-major, as neg_rows
    # (S,) columns, 32-bit where the values fit: the training split's shuffle gathers them
    # at random, and half the bytes is ~30% less time (cast to int64 when written)
    item = _narrow(item_map).take(it).take(row_ev)
    cat = _narrow(cat_map).take(ct).take(row_ev)
    label = lab.take(row_ev)
    item[neg_rows], cat[neg_rows], label[neg_rows] = negs, item_cat.take(negs), 0
    cols = {
        "label": label,
        "user": _narrow(user_map).take(u).take(row_ev),
        "item": item,
        "cat": cat,
        "seq": useg.take(row_ev),
        "hist_end": _narrow(k).take(row_ev),
        "ts": ts.take(row_ev) if c["has_ts"] else None,
    }
    rows_per_split = np.bincount(ev_split.take(by_split), weights=reps, minlength=3)
    ends = np.cumsum(rows_per_split.astype(np.int64))  # (3,) end row of each split
    splits: dict[str, SampleSet] = {}
    for s, name in enumerate(SPLITS):
        sl = slice(int(ends[s - 1]) if s else 0, int(ends[s]))
        ss = SampleSet(**{key: None if v is None else v[sl] for key, v in cols.items()})
        if name == "train":  # shuffled lazily: a shard's rows are gathered when it is written
            ss.order = np.random.default_rng([cfg.seed, 3]).permutation(len(ss))
        splits[name] = ss
    info = {
        "events": int(n),
        "positive_events": int(pos.sum()),
        "explicit_negative_events": int(n - pos.sum()),
        "users_in_events": int(len(c["user_dict"])),
        "items_in_events": int(len(c["item_dict"])),
        "categories_in_events": int(len(c["cat_dict"])),
        "negatives_dropped": n_failed,
        "source": "events",
    }
    vocabs = Vocabularies(user=user_v, item=item_v, cat=cat_v, item_cat=item_cat)
    return BuiltSamples(splits, sequences, vocabs, cfg.max_len, info)


# ---------------------------------------------------------------------- ready-made samples
SAMPLE_COLUMNS = ("label", "user", "item", "cat", "hist_items", "hist_cats")


def _check_sample_table(name: str, t: pa.Table) -> None:
    missing = [col for col in SAMPLE_COLUMNS if col not in t.column_names]
    if missing:
        raise DinrecError(f"samples of split {name!r} lack the column(s) {', '.join(missing)}")
    for col in ("hist_items", "hist_cats"):
        typ = t.schema.field(col).type
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)):
            raise DinrecError(f"samples of split {name!r}: {col} must be a list column, got {typ}")


def _carve(t: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Split a samples table by user: (the rest, a seeded ``fraction`` of users)."""
    codes, users = _codes(t.column("user"))
    perm = np.random.default_rng([seed, 4]).permutation(len(users))
    chosen = np.zeros(len(users), dtype=bool)
    chosen[perm[: int(round(len(users) * fraction))]] = True
    mask = chosen[codes]
    return t.filter(pa.array(~mask)), t.filter(pa.array(mask))


def _flat_lists(col: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Flattened values and int64 offsets of a list column (nulls as empty lists)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        arr = pc.fill_null(arr, pa.scalar([], type=arr.type))
    lens = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return arr.flatten(), offsets


def _concat_ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(starts[r], starts[r] + lens[r])`` of all rows, by one cumsum."""
    total = int(lens.sum())
    inc = np.ones(total, dtype=np.int64)  # (total,)
    nz = lens > 0
    if total == 0:
        return inc
    hs, ln = starts[nz], lens[nz]
    at = np.cumsum(ln) - ln  # where each non-empty range begins
    inc[at[0]] = hs[0]
    inc[at[1:]] = hs[1:] - (hs[:-1] + ln[:-1] - 1)
    return np.cumsum(inc, out=inc)


def _window_hash(items: np.ndarray, cats: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """(N,) uint64 hash of each window, given its concatenated ``items`` / ``cats``."""
    total = len(items)
    rid_start = np.cumsum(lens) - lens  # (N,)
    pos = np.arange(total, dtype=np.int64) - np.repeat(rid_start, lens)  # (total,) in-window
    with np.errstate(over="ignore"):
        x = items.astype(np.uint64) * _MIX[0] ^ cats.astype(np.uint64) * _MIX[1]
        x ^= (pos.astype(np.uint64) + np.uint64(1)) * _MIX[2]
        x ^= x >> np.uint64(31)  # splitmix64 finaliser
        x *= _MIX[1]
        x ^= x >> np.uint64(29)
        h = np.zeros(len(lens), dtype=np.uint64)
        nz = lens > 0
        if total:
            h[nz] = np.add.reduceat(x, rid_start[nz])
        return h + lens.astype(np.uint64) * _MIX[0]


def _distinct_windows(
    items: np.ndarray, cats: np.ndarray, starts: np.ndarray, lens: np.ndarray
) -> tuple[Sequences, np.ndarray]:
    """The distinct (items, cats) windows as :class:`Sequences` (first-occurrence order) and
    the sequence of every window, ``(N,)``.

    Windows are grouped by a 64-bit hash, then every window is checked element by element
    against its group's first one; a window that differs (a hash collision) keeps its own
    sequence, so the result is exact.
    """
    n = len(lens)
    gather = _concat_ranges(starts, lens)  # (total,)
    wi, wc = items.take(gather), cats.take(gather)  # (total,) each
    _, first, inverse = np.unique(_window_hash(wi, wc, lens), return_index=True,
                                  return_inverse=True)  # fmt: skip
    rep = first.take(inverse.reshape(-1))  # (N,) the first window with the same hash
    dup = np.flatnonzero(rep != np.arange(n))  # (D,) windows that may repeat an earlier one
    other = rep.take(dup)  # (D,)
    same_len = lens.take(dup) == lens.take(other)
    ln = np.where(same_len, lens.take(dup), 0)  # (D,) elements to compare
    a = _concat_ranges(starts.take(dup), ln)
    b = _concat_ranges(starts.take(other), ln)
    differs = (items.take(a) != items.take(b)) | (cats.take(a) != cats.take(b))
    bad = ~same_len  # (D,) hash collisions: they keep their own sequence
    bad[np.repeat(np.arange(len(dup)), ln)[differs]] = True
    rep[dup[bad]] = dup[bad]
    kept = rep == np.arange(n)  # (N,) windows stored as sequences
    seq_of = np.cumsum(kept) - 1  # (N,) sequence index of a kept window
    seq = seq_of.take(rep)
    klen = lens[kept]
    offsets = np.zeros(int(kept.sum()) + 1, dtype=np.int64)
    np.cumsum(klen, out=offsets[1:])
    kg = _concat_ranges(starts[kept], klen)
    return Sequences(offsets, items.take(kg), cats.take(kg)), seq


def build_ready_samples(splits: dict[str, pa.Table], cfg: PrepareConfig) -> BuiltSamples:
    """Encode ready-made string samples (e.g. the DIN / DIEN files) with train-only vocabs.

    Missing ``valid`` (or ``test``) splits are carved out of ``train`` by user with
    ``valid_fraction`` (``test_fraction``); histories longer than ``max_len`` keep their
    most recent ``max_len`` entries (histories are oldest first). Identical histories (a
    positive and its negative, the same user seen twice) are stored as one sequence.
    """
    cfg.validate()
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise DinrecError(f"unknown split name(s) {sorted(unknown)}; use {', '.join(SPLITS)}")
    if "train" not in splits:
        raise DinrecError("ready-made samples need a 'train' split")
    tables = dict(splits)
    for name, t in tables.items():
        _check_sample_table(name, t)
    if "test" not in tables:
        tables["train"], tables["test"] = _carve(tables["train"], cfg.test_fraction, cfg.seed)
    if "valid" not in tables:
        tables["train"], tables["valid"] = _carve(tables["train"], cfg.valid_fraction, cfg.seed)

    train = tables["train"]
    if train.num_rows == 0:
        raise DinrecError("the training split is empty")
    tr_items, _ = _flat_lists(train.column("hist_items"))
    tr_cats, _ = _flat_lists(train.column("hist_cats"))

    def strs(x: Any) -> pa.Array:
        x = x.combine_chunks() if isinstance(x, pa.ChunkedArray) else x
        return x.cast(pa.large_string())

    user_v = Vocab.build(strs(train.column("user")), cfg.min_count, "user")
    all_tr_items = pa.concat_arrays([strs(train.column("item")), strs(tr_items)])
    all_tr_cats = pa.concat_arrays([strs(train.column("cat")), strs(tr_cats)])
    item_v = Vocab.build(all_tr_items, cfg.min_count, "item")
    cat_v = Vocab.build(all_tr_cats, cfg.min_count, "cat")
    item_cat = _item_cat_table(item_v.encode(all_tr_items), cat_v.encode(all_tr_cats), len(item_v))

    # ---- encode every split's histories (cut to max_len) as windows into one pool
    cols: dict[str, dict[str, Any]] = {}
    pools_i, pools_c, starts, lens = [], [], [], []
    shift = 0
    for name in SPLITS:
        t = tables[name]
        hi, hoff = _flat_lists(t.column("hist_items"))
        hc, hoff_c = _flat_lists(t.column("hist_cats"))
        if not np.array_equal(hoff, hoff_c):
            raise DinrecError(f"samples of split {name!r}: hist_items and hist_cats lengths differ")
        full = np.diff(hoff)  # (N,)
        keep = np.minimum(full, cfg.max_len)  # (N,)
        starts.append(shift + hoff[:-1] + full - keep)
        lens.append(keep)
        pools_i.append(item_v.encode(hi))
        pools_c.append(cat_v.encode(hc))
        shift += int(hoff[-1])
        lab = t.column("label").cast(pa.int64()).to_numpy()
        if len(lab) and not np.isin(lab, (0, 1)).all():
            raise DinrecError(f"samples of split {name!r}: label must hold only 0 and 1")
        cols[name] = {
            "label": lab.astype(np.int8),
            "user": user_v.encode(t.column("user")),
            "item": item_v.encode(t.column("item")),
            "cat": cat_v.encode(t.column("cat")),
            "ts": t.column("ts").cast(pa.int64()).to_numpy() if "ts" in t.column_names else None,
        }
    sequences, seq = _distinct_windows(
        np.concatenate(pools_i), np.concatenate(pools_c), np.concatenate(starts),
        np.concatenate(lens),
    )  # fmt: skip
    hist_end = np.concatenate(lens)

    out: dict[str, SampleSet] = {}
    at = 0
    for name in SPLITS:
        n = len(cols[name]["label"])
        ss = SampleSet(**cols[name], seq=seq[at : at + n], hist_end=hist_end[at : at + n])
        at += n
        if name == "train":  # shuffled as written (see SampleSet.order)
            ss.order = np.random.default_rng([cfg.seed, 3]).permutation(len(ss))
        out[name] = ss
    info = {
        "source": "samples",
        "input_rows": {k: int(v.num_rows) for k, v in tables.items()},
        "distinct_histories": len(sequences),
    }
    vocabs = Vocabularies(user=user_v, item=item_v, cat=cat_v, item_cat=item_cat)
    return BuiltSamples(out, sequences, vocabs, cfg.max_len, info)
