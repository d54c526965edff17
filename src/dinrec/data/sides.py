"""Side tables and the encoding of every feature of a schema.

A :class:`SideTable` (one for items, one for users) has one row per **key**: key 0 is
padding (every feature 0), key 1 the unknown item/user (every categorical feature OOV),
then one key per distinct raw token of the input (events and side table). Keys
``2 .. n_known - 1`` are the tokens in the key feature's vocabulary, in id order, so for a
vocabulary-encoded id ``key == id`` there (negatives are drawn from them); the other
tokens (unseen in training, or rarer than ``min_count``) follow, each with its own key.
Their id is then OOV, but their other attributes (category, brand, genres, price) are
still encoded: a cold item keeps what is known about it. A user key is also the raw-user
group of GAUC: distinct per raw user even when the user id is OOV.

:func:`encode_schema` encodes everything from *domains*: the distinct users / items with
their training counts and one column per side feature (from the side table, else from the
item's / user's first event: training events first), plus the context and per-event
columns over the events. Vocabularies count training events only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinrec.data.encode import (
    Tokens,
    build_table,
    ids_of,
    numeric_stats,
    numeric_values,
    table_size,
    tokens_of,
)
from dinrec.data.schema import Feature, Schema
from dinrec.data.vocab import NUM_SPECIAL, OOV_ID, Vocab


@dataclass
class SideTable:
    """Rows keyed 0 (padding), 1 (unknown), 2.. (see the module docstring)."""

    tokens: pa.Array  # (N,) large_string, "" for keys 0 and 1
    counts: np.ndarray  # (N,) int64 training events of each key
    n_known: int  # keys [2, n_known): the key feature's vocabulary (or train tokens, hashed)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # (N,) | (N, M) | (N,) float64

    def __len__(self) -> int:
        return len(self.counts)

    def keys_of(self, tokens: pa.Array | list[str]) -> np.ndarray:
        """Keys of raw tokens (unknown tokens: 1)."""
        arr = tokens if isinstance(tokens, pa.Array | pa.ChunkedArray) else pa.array(tokens, pa.string())
        pos = pc.index_in(arr.cast(pa.large_string()), value_set=self.tokens)
        return pc.fill_null(pos.cast(pa.int64()), OOV_ID).to_numpy(zero_copy_only=False)

    def to_table(self) -> pa.Table:
        cols: dict[str, pa.Array] = {"token": self.tokens, "count": pa.array(self.counts, pa.int64())}
        for name, v in self.features.items():
            if v.ndim == 2:
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
            else:
                cols[name] = pa.array(v)
        return pa.table(cols, metadata={"n_known": str(self.n_known)})

    @classmethod
    def from_table(cls, t: pa.Table) -> SideTable:
        feats: dict[str, np.ndarray] = {}
        for name in t.column_names[2:]:
            col = t.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(col.type):
                width = col.type.list_size
                feats[name] = col.flatten().to_numpy().reshape(-1, width)
            else:
                feats[name] = col.to_numpy(zero_copy_only=False)
        n_known = int((t.schema.metadata or {}).get(b"n_known", b"2"))
        return cls(t.column("token").combine_chunks(), t.column("count").to_numpy(), n_known, feats)


@dataclass
class Domain:
    """The distinct users or items of the input, before keys are given."""

    distinct: pa.Array  # (D,) raw tokens
    counts: np.ndarray  # (D,) training events of each
    columns: dict[str, pa.Array]  # feature name -> (D,) its input column


@dataclass
class Encoded:
    """Every feature of a schema, encoded (see :func:`encode_schema`)."""

    users: SideTable
    items: SideTable
    user_key: np.ndarray  # (D_users,) key of each user code
    item_key: np.ndarray  # (D_items,) key of each item code
    rows: dict[str, np.ndarray]  # context and per-event features over the event rows
    vocabs: dict[str, Vocab]  # table name -> vocabulary
    sizes: dict[str, int]  # table name -> ids incl. padding and OOV
    numeric: dict[str, dict[str, float]]  # numeric feature -> {"mean", "std"}


def _key_order(key: Feature, dom: Domain, vocab: Vocab | None) -> tuple[np.ndarray, int]:
    """(key of each code, n_known): vocabulary tokens first in id order, then the rest."""
    d = len(dom.distinct)
    if vocab is not None:
        ids = vocab.encode_distinct(dom.distinct)  # (D,)
        known = ids >= NUM_SPECIAL
        n_known = len(vocab)
    else:  # hashed ids: training tokens by count, then token
        known = dom.counts > 0
        ids = np.zeros(d, dtype=np.int64)
        kn = np.flatnonzero(known)
        t = pa.table({"c": dom.counts.take(kn), "t": dom.distinct.take(pa.array(kn))})
        order = pc.sort_indices(t, sort_keys=[("c", "descending"), ("t", "ascending")]).to_numpy()
        ids[kn.take(order)] = np.arange(NUM_SPECIAL, NUM_SPECIAL + len(kn))
        n_known = NUM_SPECIAL + len(kn)
    keys = ids.copy()
    rest = np.flatnonzero(~known)
    keys[rest] = n_known + np.arange(len(rest))
    return keys, n_known


def _side_table(feats: list[Feature], dom: Domain, keys: np.ndarray, n_known: int,
                per_code: dict[str, np.ndarray]) -> SideTable:
    n = NUM_SPECIAL + len(dom.distinct)
    inv = np.empty(len(keys), dtype=np.int64)  # code at each key - 2
    inv[keys - NUM_SPECIAL] = np.arange(len(keys))
    tokens = pa.concat_arrays([pa.array(["", ""], pa.large_string()),
                               dom.distinct.cast(pa.large_string()).take(pa.array(inv))])
    counts = np.concatenate([[0, 0], dom.counts.take(inv)]).astype(np.int64)
    out = SideTable(tokens, counts, n_known)
    for f in feats:
        v = per_code[f.name]
        head_shape = (NUM_SPECIAL, *v.shape[1:])
        head = np.zeros(head_shape, dtype=v.dtype)
        if v.dtype.kind == "f":
            head[:] = np.nan
        elif v.ndim == 1:
            head[1] = OOV_ID
        out.features[f.name] = np.concatenate([head, v.take(inv, axis=0)])
    assert len(out) == n
    return out


def encode_schema(schema: Schema, min_count: int, users: Domain, items: Domain,
                  rows: dict[str, pa.Array], row_weight: np.ndarray) -> Encoded:
    """Encode the user and item side features (over ``users`` / ``items``) and the context and
    per-event features (over ``rows``, the events, ``row_weight`` 1 for training events)."""
    where = {"user": users, "item": items}
    toks: dict[str, Tokens] = {}
    nums: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    for role, f in schema.features():
        if f.source == "time_gap" and role == "event":
            continue  # computed from times when batches are made
        dom = where.get(role)
        if f is schema.user_key or f is schema.item_key:
            assert dom is not None
            codes = np.arange(len(dom.distinct), dtype=np.int64)
            toks[f.name] = Tokens(dom.distinct, dom.counts, codes, None, None, len(codes))
            continue
        col = dom.columns[f.name] if dom is not None else rows[f.name]
        w = dom.counts if dom is not None else row_weight
        at = f"{role} feature {f.name!r} (column {f.source!r})"
        if f.is_numeric:
            nums[f.name] = numeric_values(f, col, at)
            weights[f.name] = w
        else:
            toks[f.name] = tokens_of(f, col, w, at)
    tables = schema.tables()
    vocabs: dict[str, Vocab] = {}
    sizes: dict[str, int] = {}
    for tname, owner in tables.items():
        parts = [toks[f.name] for _, f in schema.features() if f.name in toks and f.table_name == tname]
        v = build_table(owner, parts, min_count)
        if v is not None:
            vocabs[tname] = v
        sizes[tname] = table_size(owner, v)
    enc_ids = {name: ids_of(schema.feature(name), t, vocabs.get(schema.feature(name).table_name),
                            tables[schema.feature(name).table_name])
               for name, t in toks.items()}
    numeric = {}
    for name, vals in nums.items():
        mean, std = numeric_stats(vals, weights[name])
        numeric[name] = {"mean": mean, "std": std}
    sides = {}
    key_of = {}
    for role, dom in where.items():
        key = getattr(schema, f"{role}_key")
        keys, n_known = _key_order(key, dom, vocabs.get(key.table_name))
        feats = getattr(schema, role)
        per_code = {f.name: (nums[f.name] if f.is_numeric else enc_ids[f.name]) for f in feats}
        sides[role] = _side_table(feats, dom, keys, n_known, per_code)
        key_of[role] = keys
    row_feats = [f for _, f in schema.features()
                 if f in schema.context or any(f in s.event_features for s in schema.sequences)]
    row_vals = {f.name: (nums[f.name] if f.is_numeric else enc_ids[f.name])
                for f in row_feats if f.name in nums or f.name in enc_ids}
    return Encoded(sides["user"], sides["item"], key_of["user"], key_of["item"], row_vals,
                   vocabs, sizes, numeric)

