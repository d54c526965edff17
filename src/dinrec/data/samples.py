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
Everything is vectorised NumPy: one sort by (user, ts), offsets per user, and histories
as (start, length) windows into one array of positives, materialised per output shard.
"""

from __future__ import annotations

import logging
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
class SampleSet:
    """The samples of one split as id arrays; histories are windows into shared pools.

    Row ``r``'s history is ``hist_item_pool[hist_start[r] : hist_start[r] + hist_len[r]]``
    (oldest first), and the same window of ``hist_cat_pool``.
    """

    label: np.ndarray  # (N,) int8
    user: np.ndarray  # (N,) int64
    item: np.ndarray  # (N,) int64
    cat: np.ndarray  # (N,) int64
    hist_start: np.ndarray  # (N,) int64
    hist_len: np.ndarray  # (N,) int64
    hist_item_pool: np.ndarray  # (P,) int64
    hist_cat_pool: np.ndarray  # (P,) int64
    ts: np.ndarray | None = None  # (N,) int64

    def __len__(self) -> int:
        return len(self.label)

    def take(self, rows: np.ndarray) -> SampleSet:
        """The rows ``rows`` (sharing the pools)."""
        return SampleSet(
            self.label.take(rows), self.user.take(rows), self.item.take(rows),
            self.cat.take(rows), self.hist_start.take(rows), self.hist_len.take(rows),
            self.hist_item_pool, self.hist_cat_pool,
            None if self.ts is None else self.ts.take(rows),
        )  # fmt: skip

    def to_table(self, start: int = 0, stop: int | None = None) -> pa.Table:
        """Rows ``[start, stop)`` as a store table (histories materialised as list<int64>)."""
        sl = slice(start, len(self) if stop is None else stop)
        lens = self.hist_len[sl]
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        total = int(offsets[-1])
        if total > np.iinfo(np.int32).max:
            raise DinrecError("a shard's histories exceed 2**31 ids; lower shard_rows")
        gather = _window_index(self.hist_start[sl], lens, offsets, total)
        off32 = pa.array(offsets.astype(np.int32))
        cols = {
            "label": pa.array(self.label[sl].astype(np.int8)),
            "user": pa.array(self.user[sl]),
            "item": pa.array(self.item[sl]),
            "cat": pa.array(self.cat[sl]),
            "hist_items": pa.ListArray.from_arrays(off32, self.hist_item_pool.take(gather)),
            "hist_cats": pa.ListArray.from_arrays(off32, self.hist_cat_pool.take(gather)),
        }
        if self.ts is not None:
            cols["ts"] = pa.array(self.ts[sl].astype(np.int64))
        return pa.table(cols)


def _window_index(
    starts: np.ndarray, lens: np.ndarray, offsets: np.ndarray, total: int
) -> np.ndarray:
    """Concatenated ``arange(starts[r], starts[r] + lens[r])`` for all rows, by one cumsum."""
    inc = np.ones(total, dtype=np.int64)
    nz = lens > 0
    if total == 0:
        return inc
    hs, ln, at = starts[nz], lens[nz], offsets[:-1][nz]
    inc[at[0]] = hs[0]
    inc[at[1:]] = hs[1:] - (hs[:-1] + ln[:-1] - 1)
    return np.cumsum(inc, out=inc)


@dataclass
class BuiltSamples:
    """What sample building produces: the splits, the vocabularies and some counts."""

    splits: dict[str, SampleSet]
    vocabs: Vocabularies
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- helpers
def _codes(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Dense codes (int64, first-occurrence order) and the distinct values of a column."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    enc = col.dictionary_encode()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary


def _stable_order(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Indices sorting by (user, ts), ties in file order."""
    n = len(user)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    tmin, tmax = int(ts.min()), int(ts.max())
    span = tmax - tmin + 1
    if (int(user.max()) + 1) * span < 2**62:  # one composite key, one stable sort
        key = user * span + (ts - tmin)
        return np.argsort(key, kind="stable")
    return np.lexsort((ts, user))


def _code_to_id(vocab: Vocab, distinct: pa.Array) -> np.ndarray:
    return vocab.encode_distinct(distinct) if len(distinct) else np.zeros(0, np.int64)


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

    def clashes(ids: np.ndarray, own: np.ndarray) -> np.ndarray:
        keys = id_key[ids]
        full = own * n_keys + keys
        pos = np.searchsorted(forbidden, full).clip(max=max(len(forbidden) - 1, 0))
        if len(forbidden) == 0:
            return np.zeros(len(ids), dtype=bool)
        return (keys >= 0) & (forbidden[pos] == full)

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
    cols["user"], cols["user_dict"] = _codes(events.column("user"))
    cols["item"], cols["item_dict"] = _codes(events.column("item"))
    if "cat" in names:
        cat = pc.fill_null(events.column("cat").cast(pa.string()), UNKNOWN_CAT)
        cols["cat"], cols["cat_dict"] = _codes(cat)
    else:
        cols["cat"] = np.zeros(n, dtype=np.int64)
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
    u, it, ct, ts, lab = (c[k][order] for k in ("user", "item", "cat", "ts", "label"))
    pos = lab == 1  # (n,)
    first_of_user = np.ones(n, dtype=bool)
    first_of_user[1:] = u[1:] != u[:-1]
    ustarts = np.flatnonzero(first_of_user)  # (U,)
    ulen = np.diff(np.append(ustarts, n))  # (U,)
    useg = np.repeat(np.arange(len(ustarts)), ulen)  # (n,) user segment of each event

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
    user_v = Vocab.build(c["user_dict"].take(pa.array(u[train_ev])), cfg.min_count, "user")
    item_v = Vocab.build(c["item_dict"].take(pa.array(it[train_ev])), cfg.min_count, "item")
    cat_v = Vocab.build(c["cat_dict"].take(pa.array(ct[train_ev])), cfg.min_count, "cat")
    user_map = _code_to_id(user_v, c["user_dict"])  # code -> id
    item_map = _code_to_id(item_v, c["item_dict"])
    cat_map = _code_to_id(cat_v, c["cat_dict"])
    item_cat = _item_cat_table(item_map[it[train_ev]], cat_map[ct[train_ev]], len(item_v))

    # ---- the positive pool and each event's history window
    pool_items = item_map[it[pos]]  # (P,)
    pool_cats = cat_map[ct[pos]]  # (P,)
    hlen = np.minimum(k, cfg.max_len)  # (n,)
    hstart = user_pos0[useg] + k - hlen  # (n,)
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
        forbidden = np.sort(useg[pos] * n_icodes + it[pos])  # (user seg, item code) keys
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
        owner = np.repeat(useg[pos_ev], kneg)
        ids, ok = _sample_negatives(
            rng, len(owner), weights, len(item_v), forbidden, owner, id_key, n_icodes
        )
        neg_ids, neg_ok = ids.reshape(-1, kneg), ok.reshape(-1, kneg)
        n_failed = int((~neg_ok).sum())
        if n_failed:
            log.warning("%d negatives could not avoid the user's positives; dropped", n_failed)

    # ---- all sample rows: each event sample, its sampled negatives right after a positive
    reps = np.ones(len(sample_ev), dtype=np.int64)
    is_pos_sample = pos[sample_ev]
    reps[is_pos_sample] += neg_ok.sum(axis=1)
    src = np.repeat(sample_ev, reps)  # (S,) the event each sample row comes from
    first = np.zeros(len(src), dtype=bool)
    first[np.concatenate([[0], np.cumsum(reps)[:-1]])] = True  # the event's own row
    neg_slot = np.cumsum(~first) - 1  # (S,) a negative row's index into neg_flat
    neg_flat = neg_ids[neg_ok]  # row-major: per positive sample in order
    ev_user, ev_item, ev_cat = user_map.take(u), item_map.take(it), cat_map.take(ct)  # (n,)
    row_split = split.take(src)

    # ---- each split gathers its rows once from the per-event arrays (no (S,) copies first)
    splits: dict[str, SampleSet] = {}
    for s, name in enumerate(SPLITS):
        rows = np.flatnonzero(row_split == s)
        if name == "train":
            rows = rows.take(np.random.default_rng([cfg.seed, 3]).permutation(len(rows)))
        ev = src.take(rows)  # (N,) the event of each row
        neg = np.flatnonzero(~first.take(rows))  # rows holding a sampled negative
        negs = neg_flat.take(neg_slot.take(rows.take(neg)))
        item, cat, label = ev_item.take(ev), ev_cat.take(ev), lab.take(ev)
        item[neg], cat[neg], label[neg] = negs, item_cat.take(negs), 0
        splits[name] = SampleSet(
            label=label,
            user=ev_user.take(ev),
            item=item,
            cat=cat,
            hist_start=hstart.take(ev),
            hist_len=hlen.take(ev),
            hist_item_pool=pool_items,
            hist_cat_pool=pool_cats,
            ts=ts.take(ev) if c["has_ts"] else None,
        )
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
    return BuiltSamples(splits=splits, vocabs=vocabs, info=info)


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


def build_ready_samples(splits: dict[str, pa.Table], cfg: PrepareConfig) -> BuiltSamples:
    """Encode ready-made string samples (e.g. the DIN / DIEN files) with train-only vocabs.

    Missing ``valid`` (or ``test``) splits are carved out of ``train`` by user with
    ``valid_fraction`` (``test_fraction``); histories longer than ``max_len`` keep their
    most recent ``max_len`` entries (histories are oldest first).
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

    out: dict[str, SampleSet] = {}
    for name in SPLITS:
        t = tables[name]
        hi, hoff = _flat_lists(t.column("hist_items"))
        hc, hoff_c = _flat_lists(t.column("hist_cats"))
        if not np.array_equal(hoff, hoff_c):
            raise DinrecError(f"samples of split {name!r}: hist_items and hist_cats lengths differ")
        lens = np.diff(hoff)
        keep = np.minimum(lens, cfg.max_len)
        lab = t.column("label").cast(pa.int64()).to_numpy()
        if len(lab) and not np.isin(lab, (0, 1)).all():
            raise DinrecError(f"samples of split {name!r}: label must hold only 0 and 1")
        ts = None
        if "ts" in t.column_names:
            ts = t.column("ts").cast(pa.int64()).to_numpy()
        ss = SampleSet(
            label=lab.astype(np.int8),
            user=user_v.encode(t.column("user")),
            item=item_v.encode(t.column("item")),
            cat=cat_v.encode(t.column("cat")),
            hist_start=hoff[:-1] + lens - keep,
            hist_len=keep,
            hist_item_pool=item_v.encode(hi),
            hist_cat_pool=cat_v.encode(hc),
            ts=ts,
        )
        if name == "train":
            ss = ss.take(np.random.default_rng([cfg.seed, 3]).permutation(len(ss)))
        out[name] = ss
    info = {"source": "samples", "input_rows": {k: int(v.num_rows) for k, v in tables.items()}}
    vocabs = Vocabularies(user=user_v, item=item_v, cat=cat_v, item_cat=item_cat)
    return BuiltSamples(splits=out, vocabs=vocabs, info=info)
