"""Token <-> id vocabularies: id 0 is padding, id 1 is out-of-vocabulary, tokens are strings.

A :class:`Vocab` is built from training data only (``min_count`` filters rare tokens to
the out-of-vocabulary id) and encodes whole Arrow / NumPy string arrays at once: the
input is dictionary-encoded, only its distinct values are looked up in the vocabulary's
hash table, and the result is spread back with one NumPy ``take``.

On disk a vocabulary is one Arrow IPC file (``DIR/vocab/<name>.arrow``) with the columns
``token`` (large_string, ids 2.. in order) and ``count`` (int64, occurrences in the
training data): binary-safe for any string and memory-mappable, so millions of tokens
load in milliseconds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinrec.errors import DinrecError

log = logging.getLogger(__name__)

PAD_ID = 0
OOV_ID = 1
NUM_SPECIAL = 2
PAD_TOKEN = "<pad>"
OOV_TOKEN = "<oov>"
ITEM_CAT_FILE = "item_cat.arrow"

ArrayLike: TypeAlias = pa.Array | pa.ChunkedArray | np.ndarray | Iterable[str]


def _as_string_array(values: ArrayLike) -> pa.Array | pa.ChunkedArray:
    """Any array of strings (or of values with a string form) as an Arrow string array."""
    if isinstance(values, pa.ChunkedArray | pa.Array):
        arr = values
    elif isinstance(values, np.ndarray) and values.dtype.kind in "US":
        arr = pa.array(values.astype(str), type=pa.string())
    else:
        arr = pa.array(values if isinstance(values, np.ndarray) else list(values))
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr
    if pa.types.is_null(arr.type):
        return arr.cast(pa.string())
    return arr.cast(pa.string())


class Vocab:
    """A string vocabulary: ``id 0 = <pad>``, ``id 1 = <oov>``, tokens from id 2 on.

    Args:
        tokens: the tokens for ids ``2, 3, ...`` in order (distinct strings).
        counts: occurrences of each token in the data it was built from (same length),
            used for popularity sampling; defaults to ones.
        name: a label used in messages and as the file name in a store.
    """

    def __init__(self, tokens: ArrayLike, counts: np.ndarray | None = None, name: str = ""):
        arr = _as_string_array(tokens)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        self._tokens: pa.Array = arr.cast(pa.large_string())
        if self._tokens.null_count:
            raise DinrecError(f"vocabulary {name!r}: tokens must not be null")
        n = len(self._tokens)
        if counts is None:
            counts = np.ones(n, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (n,):
            raise DinrecError(f"vocabulary {name!r}: {n} tokens but {counts.shape} counts")
        self._counts = counts
        self.name = name

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, values: ArrayLike, min_count: int = 1, name: str = "") -> Vocab:
        """Vocabulary of the distinct non-null values seen at least ``min_count`` times.

        Ids are given by descending count, ties broken by token (deterministic).
        """
        arr = _as_string_array(values)
        if len(arr) == 0:
            return cls(pa.array([], type=pa.large_string()), np.zeros(0, np.int64), name)
        vc = pc.value_counts(arr)
        if isinstance(vc, pa.ChunkedArray):
            vc = vc.combine_chunks()
        toks = vc.field("values")
        cnts = vc.field("counts")
        keep = pc.and_(pc.is_valid(toks), pc.greater_equal(cnts, min_count))
        table = pa.table({"token": toks, "count": cnts}).filter(keep)
        order = pc.sort_indices(table, sort_keys=[("count", "descending"), ("token", "ascending")])
        table = table.take(order)
        return cls(
            table.column("token"),
            table.column("count").to_numpy().astype(np.int64),
            name,
        )

    # ------------------------------------------------------------------ lookups
    def __len__(self) -> int:
        """Number of ids including the two special ones (the embedding table size)."""
        return len(self._tokens) + NUM_SPECIAL

    def __repr__(self) -> str:
        return f"Vocab(name={self.name!r}, size={len(self)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self._tokens.equals(other._tokens) and np.array_equal(self._counts, other._counts)

    def __contains__(self, token: str) -> bool:
        return self.token_to_id(token) != OOV_ID

    @property
    def tokens(self) -> pa.Array:
        """Tokens of ids ``2..len-1`` (large_string array)."""
        return self._tokens

    @property
    def counts(self) -> np.ndarray:
        """Training counts indexed by id, length ``len(self)``; 0 for the special ids."""
        return np.concatenate([np.zeros(NUM_SPECIAL, np.int64), self._counts])

    def token_to_id(self, token: str) -> int:
        return int(self.encode(pa.array([token], type=pa.string()))[0])

    def id_to_token(self, idx: int) -> str:
        return self.decode(np.asarray([idx]))[0]

    def encode(self, values: ArrayLike) -> np.ndarray:
        """Ids (int64) of ``values``; unknown and null values get :data:`OOV_ID`. Vectorised."""
        arr = _as_string_array(values)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
        if len(arr) == 0:
            return np.zeros(0, dtype=np.int64)
        arr = arr.cast(pa.large_string())
        denc = arr.dictionary_encode()
        dict_ids = self.encode_distinct(denc.dictionary)  # (D,)
        indices = denc.indices
        if indices.null_count:
            indices = pc.fill_null(indices.cast(pa.int64()), -1)
            dict_ids = np.append(dict_ids, OOV_ID)  # -1 -> the appended OOV
        idx = indices.to_numpy(zero_copy_only=False)
        return dict_ids[idx].astype(np.int64, copy=False)

    def encode_distinct(self, distinct: pa.Array) -> np.ndarray:
        """Ids of an array of distinct values (one hash lookup per element).

        Hashes the smaller side: a few values against a huge vocabulary are found by one
        scan of the vocabulary against a small hash set, not by hashing every token.
        """
        distinct = distinct.cast(pa.large_string())
        if len(distinct) * 4 < len(self._tokens):
            where = pc.index_in(self._tokens, value_set=distinct)  # (V,) position in distinct
            where = pc.fill_null(where.cast(pa.int64()), -1).to_numpy(zero_copy_only=False)
            found = np.flatnonzero(where >= 0)
            out = np.full(len(distinct), OOV_ID, dtype=np.int64)
            out[where[found]] = found + NUM_SPECIAL
            return out
        pos = pc.index_in(distinct, value_set=self._tokens)
        out = pc.fill_null(pos.cast(pa.int64()), -1).to_numpy(zero_copy_only=False)
        return (np.asarray(out, dtype=np.int64) + NUM_SPECIAL).clip(min=OOV_ID)

    def decode(self, ids: np.ndarray | Iterable[int]) -> list[str]:
        """Tokens of ``ids``: 0 -> ``<pad>``, 1 -> ``<oov>``."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise DinrecError(f"vocabulary {self.name!r}: id out of range [0, {len(self)})")
        specials = pa.array([PAD_TOKEN, OOV_TOKEN], type=pa.large_string())
        full = pa.concat_arrays([specials, self._tokens])
        return full.take(pa.array(ids.ravel())).to_pylist()

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        """Write one Arrow IPC file (``token``, ``count`` columns)."""
        table = pa.table(
            {"token": self._tokens, "count": pa.array(self._counts, type=pa.int64())},
            metadata={"dinrec.vocab": "1", "name": self.name},
        )
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> Vocab:
        path = Path(path)
        if not path.is_file():
            raise DinrecError(f"vocabulary file {path} is missing")
        try:
            with pa.memory_map(str(path), "r") as src:
                table = pa.ipc.open_file(src).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            raise DinrecError(f"vocabulary file {path} is unreadable: {exc}") from exc
        if table.column_names[:2] != ["token", "count"]:
            raise DinrecError(f"vocabulary file {path}: expected columns token, count")
        meta = table.schema.metadata or {}
        if name is None:
            name = meta.get(b"name", path.stem.encode()).decode()
        return cls(table.column("token"), table.column("count").to_numpy(), name)


class Vocabularies:
    """The vocabularies of one store or run by table name (``vocabs.item``, ``vocabs["cat"]``),
    plus ``item_cat``: the category id of every item id when the schema has an item feature
    ``cat`` (0 for padding, OOV for the OOV item), for code written against the default
    schema. Hashed and bucketed tables have no vocabulary.
    """

    def __init__(self, tables: dict[str, Vocab] | None = None, item_cat: np.ndarray | None = None,
                 **named: Vocab):
        self.tables: dict[str, Vocab] = {**(tables or {}), **named}
        self.item_cat = item_cat

    @classmethod
    def from_encoded(cls, enc: Any, schema: Any) -> Vocabularies:
        """From :class:`dinrec.data.sides.Encoded` (``item_cat`` from the item side table)."""
        item_cat = None
        cat = next((f for f in schema.item[1:] if f.name == "cat" and f.kind == "categorical"), None)
        if cat is not None:
            n = max(enc.items.n_known, NUM_SPECIAL)
            item_cat = np.asarray(enc.items.features["cat"][:n], dtype=np.int64)
        return cls(dict(enc.vocabs), item_cat)

    def __getattr__(self, name: str) -> Vocab:
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(f"no vocabulary {name!r} (tables: {', '.join(tables) or 'none'})")

    def __getitem__(self, name: str) -> Vocab:
        return self.tables[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tables

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabularies):
            return NotImplemented
        a, b = self.item_cat, other.item_cat
        same_ic = (a is None and b is None) or (
            a is not None and b is not None and np.array_equal(a, b))
        return self.tables == other.tables and same_ic

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, v in self.tables.items():
            v.save(d / f"{name}.arrow")
        if self.item_cat is not None:
            table = pa.table({"cat": pa.array(np.asarray(self.item_cat, np.int64))})
            with (
                pa.OSFile(str(d / ITEM_CAT_FILE), "wb") as sink,
                pa.ipc.new_file(sink, table.schema) as w,
            ):
                w.write_table(table)

    @classmethod
    def load(cls, directory: str | Path) -> Vocabularies:
        d = Path(directory)
        if not d.is_dir():
            raise DinrecError(f"vocabulary folder {d} is missing")
        tables = {p.stem: Vocab.load(p, name=p.stem) for p in sorted(d.glob("*.arrow"))
                  if p.name != ITEM_CAT_FILE}
        item_cat = None
        if (d / ITEM_CAT_FILE).is_file():
            with pa.memory_map(str(d / ITEM_CAT_FILE), "r") as src:
                item_cat = pa.ipc.open_file(src).read_all().column("cat").to_numpy()
            item_cat = np.asarray(item_cat, dtype=np.int64)
        return cls(tables, item_cat)
