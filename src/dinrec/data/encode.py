"""Columns -> ids and floats, as a :class:`~dinrec.data.schema.Feature` says: vectorised.

Every feature is encoded over a *domain* (the rows of the item side table, of the user
side table, or the events) in three steps, so that several features can share one table:

1. :func:`tokens_of` reduces the column to its distinct tokens, the code of every row's
   value(s) and each token's count over the **training** events (a row's weight);
2. :func:`build_table` builds one table's vocabulary from the counts of all the
   features that share it (``min_count``, ids by descending count then token: the same
   ids whatever order the features come in), or nothing for hashing;
3. :func:`ids_of` maps the rows to ids: ``(n,)`` for categorical, ``(n, max_values)``
   0-padded for multi.

Hashing is a fixed 64-bit hash of the token's UTF-8 bytes (multiply-xor with the
splitmix64 constants and its finaliser), never Python's salted ``hash()``, so every
process and machine gets the same ids ``2 .. hash_buckets + 1``.

Numeric features (:func:`numeric_values`) become float64 values (``log1p`` of the value
clipped at 0 when ``log``); their mean and standard deviation over the training rows
(:func:`numeric_stats`) normalise them when batches are made. With ``boundaries`` a
number becomes the id ``2 + (its bucket)`` instead (missing: 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinrec.data.schema import Feature
from dinrec.data.vocab import NUM_SPECIAL, OOV_ID, Vocab
from dinrec.errors import DinrecError

# odd 64-bit constants (golden ratio, splitmix64) for multiplicative hashing
MIX = np.array([0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB], dtype=np.uint64)


def splitmix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 ``x`` (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * MIX[1]
        x = x ^ (x >> np.uint64(27))
        x = x * MIX[2]
        return x ^ (x >> np.uint64(31))


def hash64(tokens: pa.Array) -> np.ndarray:
    """``(n,)`` uint64: a fixed hash of each string's UTF-8 bytes (the same everywhere)."""
    arr = tokens.cast(pa.large_string())
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    arr = pa.concat_arrays([arr]) if arr.offset else arr  # offsets from 0
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=n + 1)
    data = arr.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8, count=int(offsets[-1])) if data else np.zeros(0, np.uint8)
    raw = raw[offsets[0]:]
    lens = np.diff(offsets)
    pos = np.arange(len(raw), dtype=np.int64) - np.repeat(offsets[:-1] - offsets[0], lens)
    with np.errstate(over="ignore"):
        x = splitmix(raw.astype(np.uint64) * MIX[0] + pos.astype(np.uint64) * MIX[1])  # (bytes,)
        h = np.zeros(n, dtype=np.uint64)
        nz = lens > 0
        if len(raw):
            h[nz] = np.add.reduceat(x, (offsets[:-1] - offsets[0])[nz])
        return splitmix(h + lens.astype(np.uint64) * MIX[2])


def hash_ids(tokens: pa.Array, buckets: int) -> np.ndarray:
    """``(n,)`` int64 ids ``2 .. buckets + 1`` of ``tokens`` (see :func:`hash64`)."""
    return (hash64(tokens) % np.uint64(buckets)).astype(np.int64) + NUM_SPECIAL


def string_codes(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Dense codes (int32, first-occurrence order; -1 for null) and the distinct strings."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    enc = col.dictionary_encode()
    idx = enc.indices
    if idx.null_count:
        return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), enc.dictionary
    return idx.to_numpy(zero_copy_only=False), enc.dictionary


def vocab_from_counts(
    distinct: pa.Array, counts: np.ndarray, min_count: int, name: str
) -> tuple[Vocab, np.ndarray]:
    """The vocabulary of the tokens counted at least ``min_count`` times (ids by descending
    count, then token) and the id of every distinct token ``(D,)`` (OOV below the count)."""
    keep = np.flatnonzero(counts >= min_count)  # (K,)
    table = pa.table({"token": distinct.take(pa.array(keep)), "count": counts.take(keep)})
    order = pc.sort_indices(table, sort_keys=[("count", "descending"), ("token", "ascending")])
    order = order.to_numpy()
    ids = np.full(len(distinct), OOV_ID, dtype=np.int64)
    ids[keep.take(order)] = np.arange(NUM_SPECIAL, NUM_SPECIAL + len(keep))
    vocab = Vocab(table.column("token").take(order), counts.take(keep.take(order)), name)
    return vocab, ids


# ---------------------------------------------------------------------- categorical / multi
@dataclass
class Tokens:
    """One categorical or multi feature over a domain of ``n`` rows, reduced to codes."""

    distinct: pa.Array  # (D,) the distinct tokens
    counts: np.ndarray  # (D,) int64 training count of each
    codes: np.ndarray  # (V,) int64 code of each value (-1: missing)
    rows: np.ndarray | None  # multi: (V,) the row of each value; None: one value per row
    pos: np.ndarray | None  # multi: (V,) its place in the row's list
    n: int


def split_multi(col: pa.Array, sep: str) -> pa.Array:
    """A string column split on ``sep`` into trimmed lists without empty entries."""
    lists = pc.split_pattern(pc.fill_null(col.cast(pa.string()), ""), sep or "|")
    values = pc.utf8_trim_whitespace(lists.flatten())
    parent = np.asarray(pc.list_parent_indices(lists))
    keep = np.asarray(pc.greater(pc.utf8_length(values), 0))
    counts = np.bincount(parent[keep], minlength=len(col))
    offsets = np.zeros(len(col) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values.filter(pa.array(keep)))


def _as_lists(col: pa.Array, sep: str, where: str) -> pa.Array:
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return col
    return split_multi(col, sep)


def tokens_of(f: Feature, col: pa.Array, weight: np.ndarray, where: str) -> Tokens:
    """Reduce column ``col`` (one row per domain row) of feature ``f``; ``weight`` ``(n,)`` is
    each row's number of training events (its tokens' counts)."""
    n = len(col)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    rows: np.ndarray | None = None
    pos: np.ndarray | None = None
    if f.kind == "multi":
        lists = _as_lists(col, f.sep, where)
        if lists.null_count:
            lists = pc.fill_null(lists, pa.scalar([], type=lists.type))
        rows = np.asarray(pc.list_parent_indices(lists), dtype=np.int64)  # (V,)
        starts = np.asarray(lists.offsets)[:-1].astype(np.int64)
        flat = lists.flatten()
        pos = np.arange(len(flat), dtype=np.int64) - starts.take(rows) + starts[0] if len(flat) else rows
        keep = pos < f.max_values
        rows, pos = rows[keep], pos[keep]
        codes, distinct = string_codes(flat.filter(pa.array(keep)))
    else:
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            raise DinrecError(f"{where}: holds lists; declare feature {f.name!r} with kind \"multi\"")
        if f.kind == "numeric":  # numeric with boundaries: the bucket is the token
            vals = numeric_values(f, col, where)
            b = np.searchsorted(np.asarray(f.boundaries, dtype=np.float64), vals, side="right")
            return Tokens(pa.array([], pa.string()), np.zeros(0, np.int64),
                          np.where(np.isnan(vals), -1, b), None, None, n)
        codes, distinct = string_codes(col)
    codes = codes.astype(np.int64)
    w = weight if rows is None else weight.take(rows)
    ok = codes >= 0
    counts = np.bincount(codes[ok], weights=w[ok], minlength=len(distinct)).astype(np.int64)
    return Tokens(distinct, counts, codes, rows, pos, n)


def build_table(f: Feature, parts: list[Tokens], min_count: int) -> Vocab | None:
    """The vocabulary of table ``f.table_name`` from every feature using it (None: hashed
    or bucketed)."""
    if f.hash_buckets or f.kind == "numeric":
        return None
    if len(parts) == 1:
        distinct, counts = parts[0].distinct, parts[0].counts
    else:
        allt = pa.concat_arrays([p.distinct.cast(pa.large_string()) for p in parts])
        codes, distinct = string_codes(allt)
        counts = np.bincount(codes, weights=np.concatenate([p.counts for p in parts]),
                             minlength=len(distinct)).astype(np.int64)
    vocab, _ = vocab_from_counts(distinct, counts, max(min_count, f.min_count), f.table_name)
    return vocab


def ids_of(f: Feature, t: Tokens, vocab: Vocab | None, table_owner: Feature) -> np.ndarray:
    """Ids of the rows: ``(n,)`` int64 (categorical) or ``(n, max_values)`` (multi, 0-padded)."""
    if f.kind == "numeric":  # bucketed number: 2 + bucket, missing -> OOV
        return np.where(t.codes < 0, OOV_ID, t.codes + NUM_SPECIAL).astype(np.int64)
    if not len(t.distinct):  # every value missing
        per_value = np.full(len(t.codes), OOV_ID, dtype=np.int64)
    else:
        if vocab is not None:
            per_token = vocab.encode_distinct(t.distinct)  # (D,)
        else:
            per_token = hash_ids(t.distinct, table_owner.hash_buckets)
        per_value = np.where(t.codes < 0, OOV_ID, per_token.take(np.maximum(t.codes, 0)))
    if t.rows is None:
        return per_value.astype(np.int64)
    out = np.zeros((t.n, f.max_values), dtype=np.int64)
    out[t.rows, t.pos] = per_value
    return out


def table_size(f: Feature, vocab: Vocab | None) -> int:
    """Ids of a table including 0 (padding) and 1 (OOV)."""
    if f.kind == "numeric":
        return len(f.boundaries or []) + 1 + NUM_SPECIAL
    if f.hash_buckets:
        return f.hash_buckets + NUM_SPECIAL
    assert vocab is not None
    return len(vocab)


# ---------------------------------------------------------------------- numeric
def numeric_values(f: Feature, col: pa.Array, where: str) -> np.ndarray:
    """``(n,)`` float64 values (NaN: missing), ``log1p`` applied when ``f.log``."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        raise DinrecError(f"{where}: holds lists, not one number per row (numeric feature {f.name!r})")
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)):
        strs = pc.utf8_trim_whitespace(col.cast(pa.string()))
        strs = pc.if_else(pc.equal(pc.utf8_length(strs), 0), pa.scalar(None, pa.string()), strs)
        try:
            col = strs.cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            bad = _first_non_number(strs)
            raise DinrecError(f"{where}: row {bad[0] + 1}: {bad[1]!r} is not a number "
                              f"(numeric feature {f.name!r})") from None
    vals = pc.fill_null(col.cast(pa.float64()), float("nan")).to_numpy(zero_copy_only=False)
    vals = np.array(vals, dtype=np.float64)
    if not np.isfinite(vals[~np.isnan(vals)]).all():
        raise DinrecError(f"{where}: an infinite value in numeric feature {f.name!r}")
    if f.log and f.boundaries is None:
        with np.errstate(invalid="ignore"):
            vals = np.log1p(np.clip(vals, 0, None))
    return vals


def _first_non_number(strs: pa.Array) -> tuple[int, str]:
    for i, s in enumerate(strs.to_pylist()):
        if s is None:
            continue
        try:
            float(s)
        except ValueError:
            return i, s
    return 0, "?"


def numeric_stats(vals: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """Weighted mean and standard deviation over the known values (std 1 when constant)."""
    ok = ~np.isnan(vals) & (weight > 0)
    if not ok.any():
        return 0.0, 1.0
    w = weight[ok].astype(np.float64)
    mean = float(np.average(vals[ok], weights=w))
    std = float(np.sqrt(np.average((vals[ok] - mean) ** 2, weights=w)))
    return mean, std if std > 1e-12 else 1.0


def normalise(vals: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(x - mean) / std`` as float32; missing values become 0 (the mean)."""
    out = ((vals - mean) / std).astype(np.float32)
    out[np.isnan(out)] = 0.0
    return out
