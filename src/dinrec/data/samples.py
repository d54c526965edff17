"""Turn an events table (or ready-made samples) into train / valid / test samples of keys.

Events (a :class:`pyarrow.Table`):

* ``user``, ``item`` (strings; other types are cast to string; rows with a null user or
  item are dropped with a warning);
* ``cat`` (optional string): absent or null -> the category token ``"unknown"``;
* ``ts`` (optional int64): absent -> file order;
* ``label`` (optional, 0/1): absent -> every event is an implicit positive;
* any other column a :class:`~dinrec.data.schema.Schema` reads (user, item, context,
  per-event features, sequence filters). Item and user features come from the item / user
  side table when it has the column, else from the item's / user's first event (training
  events first).

**Order and ties.** A user's events are ordered by ``ts``; events with the same ``ts``
keep their file order (a stable sort). So among tied events the one later in the file is
the later one: it may have the earlier ones in its history, never the reverse, and
leave-last-out puts the *last in the file* of the user's tied last positives into test.
This keeps two promises, tested on tied timestamps: a valid or test target is never
earlier than any training target of its user, and no history event is later than its
target (an event at the same second as the target may be in its history).

A **label-0 event is an explicit negative**: it never enters any history; it becomes a
negative sample whose history is the user's positives before it, in the split of the
user's *next* positive (those after the user's last positive go to ``test``).

Per user, in time order, every positive after the first ``min_history`` positives becomes
a sample (the samples do not depend on the sequences a schema declares), plus
``neg_per_pos`` sampled negatives (seeded; by popularity among training positives or
uniform over the training item vocabulary) that are never one of that user's positives in
any split, sharing the positive's history, user, timestamp, context and split.

Splits (validation is always separate from test):

* ``leave-last-out``: the user's last positive -> test, the second last -> valid, the rest
  -> train; explicit negatives follow their next positive, sampled negatives their positive.
* ``by-user``: a seeded ``test_fraction`` / ``valid_fraction`` of users go to test / valid
  with all their samples (their user ids are then out-of-vocabulary).
* ``time``: samples at ``ts >= time_cut`` -> test (``time_cut`` defaults to the
  ``1 - test_fraction`` quantile of all timestamps); valid is the slice just before the
  cut, from the ``1 - valid_fraction`` quantile of the earlier timestamps to the cut;
  the rest -> train. Histories always use every earlier positive, whatever its split.

Vocabularies are built from training-split events (or samples) only (see
:mod:`dinrec.data.sides`). Everything is vectorised NumPy: one sort by (user, ts) and
offsets per user.

**Keys, not ids.** Rows hold the user's and the item's *key* (a row of the user / item
:class:`~dinrec.data.sides.SideTable`); ids and attributes are looked up there when a
batch is made. Histories are never copied per sample: each behaviour sequence of the
schema is kept once per user (:class:`Sequences`: the user's positives that belong to it,
in time order, as item keys plus per-event values) and a sample points into each with
``(seq, end)``: its history is ``sequence[max(0, end - max_len) : end]``, only events
before it. Ready-made samples carry explicit histories: each distinct one (cut to
``max_len``) becomes a sequence with ``end`` its length.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinrec.data.encode import MIX as _MIX
from dinrec.data.encode import string_codes
from dinrec.data.schema import Schema, SchemaError, SequenceSpec
from dinrec.data.sides import Domain, Encoded, SideTable, encode_schema
from dinrec.data.vocab import NUM_SPECIAL
from dinrec.errors import DinrecError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SPLIT_METHODS = ("leave-last-out", "by-user", "time")
UNKNOWN_CAT = "unknown"
TIME_GAP = "time_gap"  # the built-in per-event feature: seconds from the event to the target


@dataclass
class PrepareConfig:
    """How events become samples (also recorded as ``prepare.json`` in the store)."""

    max_len: int = 100  # longest history kept (the default schema's; a schema sets its own)
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
    """One behaviour sequence of every owner (user, or distinct ready-made history), stored
    once for a whole store, oldest first.

    Owner ``q``'s events are ``items[offsets[q] : offsets[q + 1]]`` (item keys) and the same
    slice of each per-event array in ``events`` (feature ids, numeric values, or ``ts``).
    A sample points into it with ``(seq, end)``: its history is the most recent ``max_len``
    entries before ``end`` (see :meth:`windows`).
    """

    offsets: np.ndarray  # (Q+1,) int64, offsets[0] == 0
    items: np.ndarray  # (P,) int64 item keys
    events: dict[str, np.ndarray] = field(default_factory=dict)  # (P,) per-event values

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """``(Q,)`` int64 length of every sequence."""
        return np.diff(self.offsets)

    def windows(
        self, seq: np.ndarray, end: np.ndarray, max_len: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) of each history in the flat arrays, ``(N,)`` each:
        ``seq[max(0, end - max_len) : end]``."""
        length = np.minimum(end, max_len).astype(np.int64)  # (N,)
        start = self.offsets.take(seq) + end - length  # (N,)
        return start, length

    def history(self, seq: int, end: int, max_len: int) -> np.ndarray:
        """One history's item keys (for messages, tests and serving, not loops)."""
        stop = int(self.offsets[seq]) + int(end)
        return self.items[stop - min(int(end), max_len) : stop]


@dataclass
class SampleSet:
    """The samples of one split as key arrays; histories point into shared :class:`Sequences`.

    Row ``r``'s history in sequence ``s`` is ``sequences[s].windows(seq, ends[s], max_len)``
    of that row. With ``order`` set, the split's row ``r`` is entry ``order[r]`` of the
    column arrays: the training split is shuffled this way, and :meth:`to_table` gathers one
    shard's rows at a time while the previous shard is being encoded. Aggregates (counts,
    distinct users, history lengths) do not depend on the order.
    """

    label: np.ndarray  # (N,) int8
    user: np.ndarray  # (N,) user keys
    item: np.ndarray  # (N,) item keys
    seq: np.ndarray  # (N,) the owner of the row's sequences
    ends: dict[str, np.ndarray]  # sequence name -> (N,) exclusive end of the history
    ts: np.ndarray | None = None  # (N,) int64
    context: dict[str, np.ndarray] = field(default_factory=dict)  # (N,) | (N, M) | (N,) float
    order: np.ndarray | None = None  # (N,) a permutation: the row order (None: as stored)

    def __len__(self) -> int:
        return len(self.label)

    def columns(self) -> dict[str, np.ndarray]:
        """Every column as stored: label, user, item, seq, end.<seq>, ts, ctx.<feature>."""
        cols = {"label": self.label, "user": self.user, "item": self.item, "seq": self.seq}
        cols.update({f"end.{k}": v for k, v in self.ends.items()})
        if self.ts is not None:
            cols["ts"] = self.ts
        cols.update({f"ctx.{k}": v for k, v in self.context.items()})
        return cols

    def rows(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Columns of rows ``[start, stop)`` in row order."""
        sl = slice(start, len(self) if stop is None else stop)
        cols = self.columns()
        if self.order is None:
            return {k: v[sl] for k, v in cols.items()}
        idx = self.order[sl]
        return {k: v.take(idx, axis=0) for k, v in cols.items()}

    def take(self, rows: np.ndarray) -> SampleSet:
        """The rows ``rows`` (in row order), as a set without ``order``."""
        idx = rows if self.order is None else self.order.take(rows)
        return SampleSet(
            self.label.take(idx), self.user.take(idx), self.item.take(idx), self.seq.take(idx),
            {k: v.take(idx) for k, v in self.ends.items()},
            None if self.ts is None else self.ts.take(idx),
            {k: v.take(idx, axis=0) for k, v in self.context.items()},
        )  # fmt: skip

    def to_table(self, start: int = 0, stop: int | None = None) -> pa.Table:
        """Rows ``[start, stop)`` as a store shard table (see :mod:`dinrec.data.store`)."""
        out = {}
        for k, v in self.rows(start, stop).items():
            if k == "label":
                out[k] = pa.array(v.astype(np.int8, copy=False))
            elif k.startswith("end."):
                out[k] = pa.array(v.astype(np.int32))
            elif v.ndim == 2:
                flat = pa.array(v.astype(np.int64, copy=False).reshape(-1))
                out[k] = pa.FixedSizeListArray.from_arrays(flat, v.shape[1])
            elif v.dtype.kind == "f":
                out[k] = pa.array(v.astype(np.float64, copy=False))
            else:
                out[k] = pa.array(v.astype(np.int64, copy=False))
        return pa.table(out)


@dataclass
class BuiltSamples:
    """What sample building produces: the splits, the sequences they point into, the side
    tables, vocabularies and statistics, the ``max_len`` that cuts histories, some counts."""

    splits: dict[str, SampleSet]
    sequences: dict[str, Sequences]
    encoded: Encoded
    schema: Schema
    max_len: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def users(self) -> SideTable:
        return self.encoded.users

    @property
    def items(self) -> SideTable:
        return self.encoded.items

    @property
    def vocabs(self) -> Any:
        """The vocabularies by table name (``vocabs.item``, ``vocabs["cat"]``)."""
        from dinrec.data.vocab import Vocabularies

        return Vocabularies.from_encoded(self.encoded, self.schema)


# ---------------------------------------------------------------------- helpers
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
def _check_schema(schema: Schema, has_ts: bool) -> None:
    for s in schema.sequences:
        for f in s.event_features:
            if f.source == TIME_GAP and not f.boundaries:
                raise SchemaError(f"sequences.{s.name}.event_features.{f.name}: the built-in "
                                  "time gap needs boundaries (seconds), e.g. [3600, 86400, 604800]")
            if f.source == TIME_GAP and not has_ts:
                raise DinrecError(f"sequences.{s.name}: {f.name} (the time gap) needs event times (a ts column)")
            if f.kind == "multi":
                raise SchemaError(f"sequences.{s.name}.event_features.{f.name}: multi-valued "
                                  "per-event features are not supported; use categorical")


def _column(events: pa.Table, name: str, what: str) -> pa.ChunkedArray:
    if name not in events.column_names:
        raise DinrecError(f"events have no column {name!r} for {what} "
                          f"(columns: {', '.join(events.column_names)})")
    return events.column(name)


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
    cols: dict[str, Any] = {"n": n, "has_ts": "ts" in names, "table": events}
    strings = {"user": events.column("user"), "item": events.column("item")}
    with ThreadPoolExecutor(len(strings)) as pool:  # Arrow's hashing releases the GIL
        for name, (codes, distinct) in zip(
            strings, pool.map(string_codes, strings.values()), strict=True
        ):
            cols[name], cols[f"{name}_dict"] = codes, distinct
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


def _split_events(cfg: PrepareConfig, useg: np.ndarray, k: np.ndarray, n_pos_user: np.ndarray,
                  ts: np.ndarray, n_users: int) -> np.ndarray:
    """``(n,)`` int8 split of every sorted event: 0 train, 1 valid, 2 test."""
    split = np.zeros(len(useg), dtype=np.int8)
    if cfg.split == "leave-last-out":
        npu = n_pos_user[useg]
        split[k == npu - 2] = 1
        split[k >= npu - 1] = 2
    elif cfg.split == "by-user":
        perm = np.random.default_rng([cfg.seed, 1]).permutation(n_users)
        n_test = int(round(n_users * cfg.test_fraction))
        n_valid = int(round(n_users * cfg.valid_fraction))
        user_split = np.zeros(n_users, dtype=np.int8)
        user_split[perm[:n_test]] = 2
        user_split[perm[n_test : n_test + n_valid]] = 1
        split = user_split[useg]
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
    return split


def _first_event(codes: np.ndarray, n_codes: int, train: np.ndarray) -> np.ndarray:
    """``(n_codes,)`` the first (sorted) event of each code, a training one when it has one."""
    n = len(codes)
    first = np.full(n_codes, n, dtype=np.int64)
    tr = np.flatnonzero(train)
    np.minimum.at(first, codes.take(tr), tr)
    missing = first == n
    if missing.any():
        anyf = np.full(n_codes, n, dtype=np.int64)
        np.minimum.at(anyf, codes, np.arange(n))
        first[missing] = anyf[missing]
    return first


def _side_column(events: pa.Table, order: np.ndarray, first: np.ndarray, side: pa.Table | None,
                 side_key: np.ndarray | None, col: str, what: str) -> pa.Array:
    """A side feature's column over the domain codes: from the side table when it has the
    column (codes it lacks: null), else from each code's first event."""
    if side is not None and col in side.column_names:
        assert side_key is not None
        vals = side.column(col).combine_chunks()
        return vals.take(pa.array(side_key, mask=side_key < 0))
    if col == "cat" and "cat" not in events.column_names:
        return pa.array(np.full(len(first), UNKNOWN_CAT, dtype=object), pa.string())
    src = _column(events, col, what).combine_chunks()
    idx = pa.array(order.take(np.minimum(first, len(order) - 1)), mask=first >= len(order))
    out = src.take(idx)
    if col == "cat":
        out = pc.fill_null(out.cast(pa.string()), UNKNOWN_CAT)
    return out


def _domain(role: str, schema: Schema, events: pa.Table, order: np.ndarray, codes: np.ndarray,
            distinct: pa.Array, train: np.ndarray, side: pa.Table | None) -> Domain:
    """The distinct users / items (events first, then side-table-only ones), their training
    counts and one input column per side feature."""
    side_key = None
    if side is not None:
        if role not in side.column_names:
            raise DinrecError(f"the {role} side table has no {role!r} column")
        tokens = side.column(role).combine_chunks().cast(distinct.type)
        extra = tokens.filter(pc.invert(pc.is_in(tokens, value_set=distinct)))
        distinct = pa.concat_arrays([distinct, extra.unique()])
        pos = pc.index_in(distinct, value_set=tokens)
        side_key = pc.fill_null(pos.cast(pa.int64()), -1).to_numpy(zero_copy_only=False)
    counts = np.bincount(codes[train], minlength=len(distinct)).astype(np.int64)
    first = _first_event(codes, len(distinct), train)
    cols = {}
    for f in getattr(schema, role)[1:]:
        cols[f.name] = _side_column(events, order, first, side, side_key, f.source,
                                    f"{role} feature {f.name!r}")
    return Domain(distinct, counts, cols)


def _filter_mask(spec: SequenceSpec, col: pa.ChunkedArray) -> np.ndarray:
    """``(n,)`` bool: the events whose ``filter_column`` value is one of ``spec.values``
    (``">=4"``-style bounds compare numbers, all of them must hold)."""
    values = spec.values or []
    if values and all(v.lstrip()[:1] in "<>=!" for v in values):
        x = pc.fill_null(col.cast(pa.float64()), float("nan")).to_numpy()
        keep = np.ones(len(x), dtype=bool)
        for v in values:
            v = v.strip()
            op = next(o for o in (">=", "<=", "==", "!=", ">", "<", "=") if v.startswith(o))
            try:
                b = float(v[len(op):])
            except ValueError:
                raise SchemaError(f"sequences.{spec.name}.values: bad bound {v!r}") from None
            with np.errstate(invalid="ignore"):
                keep &= {">=": x >= b, "<=": x <= b, ">": x > b, "<": x < b, "==": x == b,
                         "=": x == b, "!=": x != b}[op]
        return keep
    t = col.type
    if pa.types.is_floating(t) or pa.types.is_integer(t):
        try:
            nums = pa.array([float(v) for v in values], pa.float64())
        except ValueError:
            raise SchemaError(f"sequences.{spec.name}.values: {values} are not numbers "
                              f"but column {spec.filter_column!r} is numeric") from None
        return pc.fill_null(pc.is_in(col.cast(pa.float64()), value_set=nums), False).to_numpy()
    strs = col.cast(pa.string())
    return pc.fill_null(pc.is_in(strs, value_set=pa.array(values, pa.string())), False).to_numpy()


def _row_columns(schema: Schema, events: pa.Table, order: np.ndarray) -> dict[str, pa.Array]:
    """Context and per-event feature columns, in sorted event order."""
    out = {}
    idx = pa.array(order)
    for role, f in schema.features():
        if role == "context" or (role == "event" and f.source != TIME_GAP):
            out[f.name] = _column(events, f.source, f"{role} feature {f.name!r}").take(idx)
    return out


def _sequences(schema: Schema, events: pa.Table, order: np.ndarray, pos: np.ndarray,
               useg: np.ndarray, ustarts: np.ndarray, item_keys: np.ndarray, ts: np.ndarray,
               enc: Encoded) -> tuple[dict[str, Sequences], dict[str, np.ndarray]]:
    """Every sequence of the schema (one per user) and each event's end in each ``(n,)``."""
    seqs, ends = {}, {}
    for s in schema.sequences:
        member = pos
        if s.filter_column is not None:
            col = _column(events, s.filter_column, f"sequence {s.name!r}").take(pa.array(order))
            member = pos & _filter_mask(s, col)
        before = np.cumsum(member) - member  # (n,) members before each event
        first = before[ustarts]  # (U,) the user's first member in the flat arrays
        ends[s.name] = before - first[useg]  # (n,)
        at = np.flatnonzero(member)
        ev = {f.name: enc.rows[f.name].take(at, axis=0)
              for f in s.event_features if f.source != TIME_GAP}
        if any(f.source == TIME_GAP for f in s.event_features):
            ev["ts"] = ts.take(at)
        seqs[s.name] = Sequences(np.append(first, len(at)).astype(np.int64),
                                 item_keys.take(at), ev)
    return seqs, ends


def build_event_samples(
    events: pa.Table,
    cfg: PrepareConfig,
    schema: Schema | None = None,
    items: pa.Table | None = None,
    users: pa.Table | None = None,
) -> BuiltSamples:
    """Samples, side tables, vocabularies and counts from an events table (see the module
    docstring); ``items`` / ``users``: side tables keyed by an ``item`` / ``user`` column."""
    cfg.validate()
    schema = schema if schema is not None else Schema.default(cfg.max_len)
    c = _event_columns(events)
    events = c["table"]
    n = c["n"]
    if n == 0:
        raise DinrecError("the events table is empty")
    _check_schema(schema, c["has_ts"])

    # ---- sort by (user, ts), stable in file order
    order = _stable_order(c["user"], c["ts"])
    u, it, ts, lab = (c[k].take(order) for k in ("user", "item", "ts", "label"))
    pos = lab == 1  # (n,)
    first_of_user = np.ones(n, dtype=bool)
    first_of_user[1:] = u[1:] != u[:-1]
    ustarts = np.flatnonzero(first_of_user)  # (U,)
    useg = u  # (n,) user segment of each event: codes are dense, every one has events
    pos_before = np.cumsum(pos) - pos  # (n,) global positives before each event
    k = pos_before - pos_before[ustarts][useg]  # (n,) user's positives before this event
    n_pos_user = np.add.reduceat(pos.astype(np.int64), ustarts)  # (U,)
    split = _split_events(cfg, useg, k, n_pos_user, ts, len(c["user_dict"]))
    train_ev = split == 0
    if not train_ev.any():
        raise DinrecError(f"split {cfg.split!r} leaves no training events; check its settings")

    # ---- every feature, vocabularies from training events only
    udom = _domain("user", schema, events, order, u, c["user_dict"], train_ev, users)
    idom = _domain("item", schema, events, order, it, c["item_dict"], train_ev, items)
    enc = encode_schema(schema, cfg.min_count, udom, idom, _row_columns(schema, events, order),
                        train_ev.astype(np.int64))
    item_key = _narrow(enc.item_key).take(it)  # (n,)
    seqs, ends = _sequences(schema, events, order, pos, useg, ustarts, item_key, ts, enc)

    sample_ev = np.flatnonzero(k >= cfg.min_history)  # events that become samples
    neg_ids, neg_ok = _event_negatives(cfg, enc, idom, sample_ev, pos, useg, it, train_ev)
    rows = _sample_rows(sample_ev, split, pos, neg_ids, neg_ok)
    row_ev, neg_rows, negs, ends_per_split = rows
    label = lab.take(row_ev)
    item = item_key.take(row_ev)
    item[neg_rows], label[neg_rows] = negs, 0
    cols: dict[str, Any] = {
        "label": label,
        "user": _narrow(enc.user_key).take(u).take(row_ev),
        "item": item,
        "seq": useg.take(row_ev),
        "ends": {name: _narrow(e).take(row_ev) for name, e in ends.items()},
        "ts": ts.take(row_ev) if c["has_ts"] else None,
        "context": {f.name: enc.rows[f.name].take(row_ev, axis=0) for f in schema.context},
    }
    splits: dict[str, SampleSet] = {}
    for s, name in enumerate(SPLITS):
        sl = slice(int(ends_per_split[s - 1]) if s else 0, int(ends_per_split[s]))
        ss = SampleSet(
            label=cols["label"][sl], user=cols["user"][sl], item=cols["item"][sl],
            seq=cols["seq"][sl], ends={q: v[sl] for q, v in cols["ends"].items()},
            ts=None if cols["ts"] is None else cols["ts"][sl],
            context={q: v[sl] for q, v in cols["context"].items()},
        )  # fmt: skip
        if name == "train":  # shuffled lazily: a shard's rows are gathered when it is written
            ss.order = np.random.default_rng([cfg.seed, 3]).permutation(len(ss))
        splits[name] = ss
    info = {
        "events": int(n),
        "positive_events": int(pos.sum()),
        "explicit_negative_events": int(n - pos.sum()),
        "users_in_events": int(len(c["user_dict"])),
        "items_in_events": int(len(c["item_dict"])),
        "negatives_dropped": int((~neg_ok).sum()),
        "source": "events",
    }
    return BuiltSamples(splits, seqs, enc, schema, cfg.max_len, info)


def _event_negatives(cfg: PrepareConfig, enc: Encoded, idom: Domain, sample_ev: np.ndarray,
                     pos: np.ndarray, useg: np.ndarray, it: np.ndarray,
                     train_ev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(P, neg_per_pos)`` sampled negative item keys of the positive sample events, and
    which draws are usable (False: still one of the user's positives after every retry)."""
    pos_ev = sample_ev[pos[sample_ev]]
    kneg = cfg.neg_per_pos
    neg_ids = np.zeros((len(pos_ev), kneg), dtype=np.int64)
    neg_ok = np.ones((len(pos_ev), kneg), dtype=bool)
    if not kneg or not len(pos_ev):
        return neg_ids, neg_ok
    n_known = enc.items.n_known
    if n_known <= NUM_SPECIAL:
        raise DinrecError("no training items to sample negatives from")
    n_icodes = len(idom.distinct)
    # (user seg, item code) keys; sorted runs per user make the stable sort ~3x faster
    forbidden = np.sort(useg[pos].astype(np.int64) * n_icodes + it[pos], kind="stable")
    key_code = np.full(len(enc.items), -1, dtype=np.int64)  # item key -> code
    key_code[enc.item_key] = np.arange(n_icodes)
    key_code[:NUM_SPECIAL] = -1
    weights = None
    if cfg.neg_sampling == "popularity":
        tr_pos = train_ev & pos
        weights = np.bincount(enc.item_key.take(it[tr_pos]), minlength=n_known)[NUM_SPECIAL:n_known]
        if weights.sum() == 0:
            weights = None
    rng = np.random.default_rng([cfg.seed, 2])
    owner = np.repeat(useg[pos_ev].astype(np.int64), kneg)
    ids, ok = _sample_negatives(rng, len(owner), weights, n_known, forbidden, owner, key_code,
                                n_icodes)
    n_failed = int((~ok).sum())
    if n_failed:
        log.warning("%d negatives could not avoid the user's positives; dropped", n_failed)
    return ids.reshape(-1, kneg), ok.reshape(-1, kneg)


def _sample_rows(sample_ev: np.ndarray, split: np.ndarray, pos: np.ndarray, neg_ids: np.ndarray,
                 neg_ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All sample rows, split by split: each sample event (in (user, ts) order inside its
    split), a positive's sampled negatives right after it. Returns the event of each row
    ``(S,)``, the rows holding a sampled negative, those negatives, and each split's end row."""
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
    rows_per_split = np.bincount(ev_split.take(by_split), weights=reps, minlength=3)
    return row_ev, neg_rows, negs, np.cumsum(rows_per_split.astype(np.int64))


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


def _check_ready_schema(schema: Schema) -> None:
    ok = (
        len(schema.user) == 1 and not schema.context and len(schema.sequences) == 1
        and schema.sequences[0].filter_column is None and not schema.sequences[0].event_features
        and all(f.source in ("item", "cat") and f.kind == "categorical" for f in schema.item[1:])
    )  # fmt: skip
    if not ok:
        raise DinrecError("ready-made samples carry only user, item, cat and one history: "
                          "the schema may declare only those (one sequence, no filter)")


def _carve(t: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Split a samples table by user: (the rest, a seeded ``fraction`` of users)."""
    codes, users = string_codes(t.column("user"))
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


def _window_hash(keys: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """(N,) uint64 hash of each window, given its concatenated item ``keys``."""
    total = len(keys)
    rid_start = np.cumsum(lens) - lens  # (N,)
    pos = np.arange(total, dtype=np.int64) - np.repeat(rid_start, lens)  # (total,) in-window
    with np.errstate(over="ignore"):
        x = keys.astype(np.uint64) * _MIX[0]
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
    keys: np.ndarray, starts: np.ndarray, lens: np.ndarray
) -> tuple[Sequences, np.ndarray]:
    """The distinct windows of item ``keys`` as :class:`Sequences` (first-occurrence order)
    and the sequence of every window, ``(N,)``.

    Windows are grouped by a 64-bit hash, then every window is checked element by element
    against its group's first one; a window that differs (a hash collision) keeps its own
    sequence, so the result is exact.
    """
    n = len(lens)
    gather = _concat_ranges(starts, lens)  # (total,)
    _, first, inverse = np.unique(_window_hash(keys.take(gather), lens), return_index=True,
                                  return_inverse=True)  # fmt: skip
    rep = first.take(inverse.reshape(-1))  # (N,) the first window with the same hash
    dup = np.flatnonzero(rep != np.arange(n))  # (D,) windows that may repeat an earlier one
    other = rep.take(dup)  # (D,)
    same_len = lens.take(dup) == lens.take(other)
    ln = np.where(same_len, lens.take(dup), 0)  # (D,) elements to compare
    a = _concat_ranges(starts.take(dup), ln)
    b = _concat_ranges(starts.take(other), ln)
    differs = keys.take(a) != keys.take(b)
    bad = ~same_len  # (D,) hash collisions: they keep their own sequence
    bad[np.repeat(np.arange(len(dup)), ln)[differs]] = True
    rep[dup[bad]] = dup[bad]
    kept = rep == np.arange(n)  # (N,) windows stored as sequences
    seq_of = np.cumsum(kept) - 1  # (N,) sequence index of a kept window
    seq = seq_of.take(rep)
    klen = lens[kept]
    offsets = np.zeros(int(kept.sum()) + 1, dtype=np.int64)
    np.cumsum(klen, out=offsets[1:])
    return Sequences(offsets, keys.take(_concat_ranges(starts[kept], klen))), seq


def _strs(x: Any) -> pa.Array:
    x = x.combine_chunks() if isinstance(x, pa.ChunkedArray) else x
    return x.cast(pa.large_string())


def _ready_encode(tables: dict[str, pa.Table], cfg: PrepareConfig, schema: Schema
                  ) -> tuple[Encoded, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Encode ready-made samples: every item occurrence (per split its targets, then its
    histories; train first) and user as codes, an item's category from its first (training)
    occurrence. Returns the encoding, item and user codes, each split's history offsets."""
    parts_i, parts_c, users, hist = [], [], [], {}
    for name in SPLITS:
        t = tables[name]
        hi, hoff = _flat_lists(t.column("hist_items"))
        hc, hoff_c = _flat_lists(t.column("hist_cats"))
        if not np.array_equal(hoff, hoff_c):
            raise DinrecError(f"samples of split {name!r}: hist_items and hist_cats lengths differ")
        hist[name] = hoff
        parts_i += [_strs(t.column("item")), _strs(hi)]
        parts_c += [_strs(t.column("cat")), _strs(hc)]
        users.append(_strs(t.column("user")))
    n_train_occ = len(parts_i[0]) + len(parts_i[1])
    icodes, idistinct = string_codes(pa.concat_arrays(parts_i))
    ucodes, udistinct = string_codes(pa.concat_arrays(users))
    icodes, ucodes = icodes.astype(np.int64), ucodes.astype(np.int64)
    first = np.full(len(idistinct), len(icodes), dtype=np.int64)  # train part comes first
    np.minimum.at(first, icodes, np.arange(len(icodes)))
    cats = pa.concat_arrays(parts_c).take(pa.array(first))
    idom = Domain(idistinct, np.bincount(icodes[:n_train_occ], minlength=len(idistinct)),
                  {f.name: cats if f.source == "cat" else idistinct for f in schema.item[1:]})
    n_tr_users = tables["train"].num_rows
    udom = Domain(udistinct, np.bincount(ucodes[:n_tr_users], minlength=len(udistinct)), {})
    enc = encode_schema(schema, cfg.min_count, udom, idom, {}, np.zeros(0, np.int64))
    return enc, icodes, ucodes, hist


def build_ready_samples(
    splits: dict[str, pa.Table], cfg: PrepareConfig, schema: Schema | None = None
) -> BuiltSamples:
    """Encode ready-made string samples (e.g. the DIN / DIEN files) with train-only vocabs.

    Missing ``valid`` (or ``test``) splits are carved out of ``train`` by user with
    ``valid_fraction`` (``test_fraction``); histories longer than ``max_len`` keep their
    most recent ``max_len`` entries (histories are oldest first). Identical histories (a
    positive and its negative, the same user seen twice) are stored as one sequence. An
    item's category is its first one in the training split (else in any split).
    """
    cfg.validate()
    schema = schema if schema is not None else Schema.default(cfg.max_len)
    _check_ready_schema(schema)
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
    if tables["train"].num_rows == 0:
        raise DinrecError("the training split is empty")

    enc, icodes, ucodes, hist = _ready_encode(tables, cfg, schema)
    keys = enc.item_key.take(icodes)  # (occurrences,) item key of each

    # ---- windows (cut to max_len) into the history parts of the pool
    cols: dict[str, dict[str, Any]] = {}
    starts, lens = [], []
    at, uat = 0, 0
    for name in SPLITS:
        t = tables[name]
        n, hoff = t.num_rows, hist[name]
        full = np.diff(hoff)  # (N,)
        keep = np.minimum(full, cfg.max_len)  # (N,)
        starts.append(at + n + hoff[:-1] + full - keep)
        lens.append(keep)
        lab = t.column("label").cast(pa.int64()).to_numpy()
        if len(lab) and not np.isin(lab, (0, 1)).all():
            raise DinrecError(f"samples of split {name!r}: label must hold only 0 and 1")
        cols[name] = {
            "label": lab.astype(np.int8),
            "user": enc.user_key.take(ucodes[uat : uat + n]),
            "item": keys[at : at + n],
            "ts": t.column("ts").cast(pa.int64()).to_numpy() if "ts" in t.column_names else None,
        }
        at, uat = at + n + int(hoff[-1]), uat + n
    seqs, seq = _distinct_windows(keys, np.concatenate(starts), np.concatenate(lens))
    hist_end = np.concatenate(lens)
    main = schema.main_sequence.name
    out: dict[str, SampleSet] = {}
    at = 0
    for name in SPLITS:
        n = len(cols[name]["label"])
        ss = SampleSet(**cols[name], seq=seq[at : at + n], ends={main: hist_end[at : at + n]})
        at += n
        if name == "train":  # shuffled as written (see SampleSet.order)
            ss.order = np.random.default_rng([cfg.seed, 3]).permutation(len(ss))
        out[name] = ss
    info = {
        "source": "samples",
        "input_rows": {k: int(v.num_rows) for k, v in tables.items()},
        "distinct_histories": len(seqs),
    }
    return BuiltSamples(out, {main: seqs}, enc, schema, cfg.max_len, info)
