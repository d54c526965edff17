"""Raw request values -> the model's tensors, derived from the run's schema.

A request names features as the schema does (see :mod:`dinrec.serve.requests`): user and
context features, the events of each behaviour sequence, candidates. Every value is
encoded exactly as the data layer encoded the training data (:mod:`dinrec.data.encode`):

* categorical / multi: the token's id in the feature's table vocabulary (OOV, reported,
  when unknown), or its fixed 64-bit hash bucket for hashed tables; multi lists keep their
  first ``max_values`` values, 0-padded;
* numeric: ``log1p`` when the feature says so, then the training mean/std; bucketed
  numeric (``boundaries``, e.g. ``time_gap`` in seconds): id ``2 + bucket``;
* items (candidates and history events) by item id: their attributes come from the
  run's item side table (also for items whose id is out of the vocabulary but whose
  attributes were seen), and any attribute given inline wins over the table (an unknown
  item with inline attributes scores with them); users likewise from the user table.

Missing optional values: categorical -> OOV, numeric -> the training mean (0 after
normalising), as in the store. The tables come from the run folder (:data:`SERVING_FILES`),
else from the store the run was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dinrec.data.batch import Batch, SequenceBatch
from dinrec.data.encode import hash_ids, normalise
from dinrec.data.schema import Feature, Schema
from dinrec.data.sides import SideTable
from dinrec.data.vocab import NUM_SPECIAL, OOV_ID, OOV_TOKEN, PAD_TOKEN, Vocab
from dinrec.errors import DinrecError

#: What serving reads from a run folder (or, when absent there, from the run's store).
SERVING_FILES = ("schema.json", "features.json", "items.arrow", "users.arrow", "vocab")

Value = Any  # a JSON value: str | float | list[str]
Entry = str | dict[str, Value]  # an item / event: its id, or its features by name


def find_serving_folder(run_dir: Path, store: str | Path | None) -> dict[str, Path]:
    """Where each of :data:`SERVING_FILES` is: the run folder first, then the store."""
    out = {}
    for name in SERVING_FILES:
        for folder in (run_dir, Path(store) if store else None):
            if folder is not None and (folder / name).exists():
                out[name] = folder / name
                break
        else:
            if name != "users.arrow":
                raise DinrecError(f"{run_dir}: no {name} in the run folder or its store {store}")
    return out


class FeatureCodec:
    """Encode (and decode, for explanations) the values of one feature."""

    def __init__(self, f: Feature, vocab: Vocab | None, hash_buckets: int, stats: dict[str, float] | None):
        self.feature = f
        self.name = f.name
        self.kind = f.kind
        self.hash_buckets = hash_buckets
        self.boundaries = None if f.boundaries is None else np.asarray(f.boundaries, np.float64)
        self.mean, self.std = (stats or {}).get("mean", 0.0), (stats or {}).get("std", 1.0)
        self.tokens: list[str] | None = None
        self.ids: dict[str, int] | None = None
        if vocab is not None:
            self.tokens = [PAD_TOKEN, OOV_TOKEN, *vocab.tokens.to_pylist()]
            self.ids = {t: i for i, t in enumerate(self.tokens[NUM_SPECIAL:], NUM_SPECIAL)}

    @property
    def numeric(self) -> bool:
        return self.feature.is_numeric

    def ids_of(self, tokens: Sequence[str], unknown: list[str] | None) -> np.ndarray:
        """(n,) int64 ids of tokens; unknown ones (vocabularies only) -> OOV, appended to ``unknown``."""
        if self.ids is None:
            if not tokens:
                return np.zeros(0, np.int64)
            return hash_ids(pa.array(list(tokens), pa.string()), self.hash_buckets)
        get = self.ids.get
        ids = [get(t, OOV_ID) for t in tokens]
        if unknown is not None and OOV_ID in ids:
            unknown.extend(t for t, i in zip(tokens, ids, strict=True) if i == OOV_ID)
        return np.asarray(ids, dtype=np.int64)

    def encode(self, values: Sequence[Value | None], unknown: list[str] | None = None) -> np.ndarray:
        """n values (None: missing) -> (n,) int64 | (n, max_values) int64 | (n,) float32."""
        n = len(values)
        if self.numeric:
            x = np.array([np.nan if v is None else float(v) for v in values], np.float64)  # (n,)
            if self.feature.log:
                with np.errstate(invalid="ignore"):
                    x = np.log1p(np.clip(x, 0, None))
            with np.errstate(over="ignore"):
                out = normalise(x, self.mean, self.std)
            if not np.isfinite(out).all():
                bad = values[int(np.flatnonzero(~np.isfinite(out))[0])]
                raise DinrecError(f"{self.name}: {bad} is out of the range this model takes")
            return out
        if self.boundaries is not None:  # a number read as a bucket id
            x = np.array([np.nan if v is None else float(v) for v in values], np.float64)
            ids = np.searchsorted(self.boundaries, x, side="right") + NUM_SPECIAL
            return np.where(np.isnan(x), OOV_ID, ids).astype(np.int64)
        if self.kind == "multi":
            m = self.feature.max_values
            out = np.zeros((n, m), np.int64)  # (n, M)
            for r, v in enumerate(values):
                if v:
                    vals = list(v)[:m]
                    out[r, :len(vals)] = self.ids_of(vals, unknown)
            return out
        present = [i for i, v in enumerate(values) if v is not None]
        out = np.full(n, OOV_ID, np.int64)
        if present:
            out[present] = self.ids_of([v for v in values if v is not None], unknown)
        return out

    def decode(self, value: Any) -> Any:
        """An encoded value from a side table -> what a person reads (token, tokens, number)."""
        if self.numeric:  # side tables hold log1p(x) for log features
            if value is None or np.isnan(value):
                return None
            return round(float(np.expm1(value) if self.feature.log else value), 6)
        if self.kind == "multi":
            return [self.decode_id(int(i)) for i in np.asarray(value) if i != 0]
        return self.decode_id(int(value))

    def decode_id(self, i: int) -> str:
        if self.tokens is not None and 0 <= i < len(self.tokens):
            return self.tokens[i]
        if self.boundaries is not None and i >= NUM_SPECIAL:
            b = self.boundaries
            lo = "-inf" if i == NUM_SPECIAL else f"{b[i - NUM_SPECIAL - 1]:g}"
            hi = "inf" if i - NUM_SPECIAL >= len(b) else f"{b[i - NUM_SPECIAL]:g}"
            return f"[{lo}, {hi})"
        return OOV_TOKEN if i == OOV_ID else f"#{i}"


@dataclass
class Side:
    """A side table ready for lookups: token -> key, encoded and raw features by key."""

    keys: dict[str, int]  # raw token -> key (2..N-1); absent: key 1 (unknown)
    counts: np.ndarray  # (N,) training events of each key (popularity)
    encoded: dict[str, np.ndarray]  # feature -> (N,) ids | (N, M) ids | (N,) float32 normalised
    raw: dict[str, np.ndarray]  # feature -> what the table holds (numeric: raw float64)

    @classmethod
    def build(cls, table: SideTable | None, feats: list[Feature], codecs: dict[str, FeatureCodec]) -> Side:
        if table is None:  # no side table (users without one): key 1 for everyone
            keys: dict[str, int] = {}
            counts = np.zeros(2, np.int64)
            raw = {f.name: np.zeros((2, f.max_values) if f.kind == "multi" else 2,
                                    np.float64 if f.is_numeric else np.int64) for f in feats}
            for f in feats:
                if not f.is_numeric:
                    raw[f.name][1] = OOV_ID
        else:
            tokens = table.tokens.to_pylist()
            keys = {t: k for k, t in enumerate(tokens) if k >= NUM_SPECIAL}
            counts = np.asarray(table.counts, np.int64)
            raw = {f.name: table.features[f.name] for f in feats}
        encoded = {}
        for f in feats:
            v = raw[f.name]
            if f.is_numeric:
                c = codecs[f.name]
                v = normalise(np.asarray(v, np.float64), c.mean, c.std)
                v[0] = 0.0
            encoded[f.name] = np.ascontiguousarray(v)
        return cls(keys, counts, encoded, raw)

    def keys_of(self, tokens: Sequence[str]) -> np.ndarray:
        get = self.keys.get
        return np.fromiter((get(t, OOV_ID) for t in tokens), np.int64, len(tokens))


class RequestEncoder:
    """Build the model's inputs from raw request values (see the module docstring).

    Args:
        schema: the run's schema.
        vocabs: vocabulary by table name (hashed and bucketed tables have none).
        table_sizes: ids per table (hashed tables: ``hash_buckets + 2``).
        numeric: numeric feature -> ``{"mean", "std"}`` (training statistics).
        items, users: the side tables (``users`` may be None).
        max_len: per sequence, the most recent events kept (default: the schema's).
    """

    def __init__(self, schema: Schema, vocabs: dict[str, Vocab], numeric: dict[str, dict[str, float]],
                 items: SideTable, users: SideTable | None, max_len: dict[str, int] | None = None) -> None:
        self.schema = schema
        tables = schema.tables()
        self.codecs: dict[str, FeatureCodec] = {}
        for _, f in schema.features():
            owner = tables.get(f.table_name)
            vocab = vocabs.get(f.table_name) if owner is not None and not owner.hash_buckets else None
            if owner is not None and not owner.hash_buckets and owner.kind != "numeric" and vocab is None:
                raise DinrecError(f"feature {f.name!r}: no vocabulary for table {f.table_name!r}")
            self.codecs[f.name] = FeatureCodec(f, vocab, owner.hash_buckets if owner else 0, numeric.get(f.name))
        self.items = Side.build(items, schema.item, self.codecs)
        self.users = Side.build(users, schema.user, self.codecs)
        self.max_len = {s.name: (max_len or {}).get(s.name, s.max_len) for s in schema.sequences}
        self.item_key = schema.item_key.name
        self.user_key = schema.user_key.name

    @classmethod
    def load(cls, files: dict[str, Path], max_len: dict[str, int] | None = None) -> RequestEncoder:
        """From the files found by :func:`find_serving_folder`."""
        import json

        from dinrec.data.store import _ipc_read

        schema = Schema.load(files["schema.json"])
        features = json.loads(files["features.json"].read_text())
        vocabs = {p.stem: Vocab.load(p, name=p.stem) for p in sorted(files["vocab"].glob("*.arrow"))
                  if p.stem in schema.tables()}
        items = SideTable.from_table(_ipc_read(files["items.arrow"]))
        users = SideTable.from_table(_ipc_read(files["users.arrow"])) if "users.arrow" in files else None
        return cls(schema, vocabs, features.get("numeric", {}), items, users, max_len)

    # ------------------------------------------------------------------ items
    def item_features(self, entries: Sequence[Entry], unknown: dict[str, list[str]],
                      extra: Sequence[Feature] = ()) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Items by id or with inline features -> item (and ``extra``) features
        ``{name: (n,) | (n, M) | (n,) float32}`` and their side-table keys ``(n,)``."""
        ids = [e if isinstance(e, str) else e[self.item_key] for e in entries]
        keys = self.items.keys_of(ids)  # (n,)
        out = {name: v.take(keys, axis=0) for name, v in self.items.encoded.items()}
        inline = {i: e for i, e in enumerate(entries) if not isinstance(e, str)}  # row -> features
        unknown_ids: list[str] = []
        if inline:  # given attributes win over the table's, one feature at a time
            for f in self.schema.item[1:]:
                rows = [i for i, e in inline.items() if e.get(f.name) is not None]
                if rows:
                    out[f.name][rows] = self.codecs[f.name].encode(
                        [inline[i][f.name] for i in rows], unknown.setdefault(f.name, []))
        # the id itself: the table's id (OOV for items outside the vocabulary)
        key_ids = out[self.item_key]
        bad = np.flatnonzero(key_ids == OOV_ID)
        if bad.size:
            unknown_ids = [ids[i] for i in bad.tolist()]
            unknown.setdefault(self.item_key, []).extend(unknown_ids)
        for f in extra:
            vals = [None if isinstance(e, str) else e.get(f.name) for e in entries]
            out[f.name] = self.codecs[f.name].encode(vals, unknown.setdefault(f.name, []))
        return out, keys

    def user_features(self, user: Entry, unknown: dict[str, list[str]]) -> dict[str, np.ndarray]:
        """One user by id (features from the user table) or with inline features -> (1,) each."""
        uid = user if isinstance(user, str) else user[self.user_key]
        key = self.users.keys_of([uid])  # (1,)
        out = {name: v.take(key, axis=0) for name, v in self.users.encoded.items()}
        out[self.user_key] = self.codecs[self.user_key].encode([uid], unknown.setdefault(self.user_key, []))
        if not isinstance(user, str):
            for f in self.schema.user[1:]:
                if user.get(f.name) is not None:
                    out[f.name] = self.codecs[f.name].encode([user[f.name]], unknown.setdefault(f.name, []))
        return out

    def context_features(self, context: dict[str, Value] | None, n: int,
                         unknown: dict[str, list[str]]) -> dict[str, np.ndarray]:
        """Context features -> (1,) each, repeated to ``n`` rows."""
        out = {}
        for f in self.schema.context:
            v = self.codecs[f.name].encode([(context or {}).get(f.name)], unknown.setdefault(f.name, []))
            out[f.name] = np.repeat(v, n, axis=0)
        return out

    # ------------------------------------------------------------------ batches
    def history(self, user: Entry, context: dict[str, Value] | None,
                sequences: dict[str, Sequence[Entry]] | None,
                unknown: dict[str, list[str]]) -> tuple[Batch, dict[str, list[Entry]]]:
        """The 1-row history batch of one request, and the events used per sequence (the
        most recent ``max_len``, oldest first)."""
        used: dict[str, list[Entry]] = {}
        seqs = {}
        for s in self.schema.sequences:
            events = list((sequences or {}).get(s.name) or [])[-self.max_len[s.name]:]
            used[s.name] = events
            seqs[s.name] = self._sequence(s.name, s.event_features, [events], unknown)
        users = self.user_features(user, unknown)
        batch = Batch(
            label=torch.zeros(1),
            user={k: torch.from_numpy(v) for k, v in users.items()},
            item={k: torch.from_numpy(v[:1].copy()) for k, v in self.items.encoded.items()},  # ignored
            sequences=seqs,
            context={k: torch.from_numpy(v) for k, v in self.context_features(context, 1, unknown).items()},
        )
        return batch, used

    def _sequence(self, name: str, event_features: list[Feature], rows: list[list[Entry]],
                  unknown: dict[str, list[str]]) -> SequenceBatch:
        """B rows of events (each at most max_len) -> a (B, T) sequence batch, left-aligned."""
        b = len(rows)
        lengths = np.array([len(r) for r in rows], np.int64)  # (B,)
        t = max(1, int(lengths.max(initial=0)))
        mask = np.arange(t)[None, :] < lengths[:, None]  # (B, T)
        flat = [e for r in rows for e in r]
        feats, _ = self.item_features(flat, unknown, extra=event_features)
        items: dict[str, torch.Tensor] = {}
        events: dict[str, torch.Tensor] = {}
        for f in [*self.schema.item, *event_features]:
            v = feats[f.name]
            full = np.zeros((b, t, *v.shape[1:]), v.dtype)  # (B, T[, M])
            full[mask] = v
            (events if f in event_features else items)[f.name] = torch.from_numpy(full)
        return SequenceBatch(items=items, mask=torch.from_numpy(mask), events=events)

    def candidates(self, entries: Sequence[Entry], unknown: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        """N candidates -> their item features ``{name: (N,) | (N, M) | (N,) float32}``."""
        feats, _ = self.item_features(entries, unknown)
        return {k: torch.from_numpy(v) for k, v in feats.items()}

    def rows(self, rows: Sequence[dict[str, Any]], unknown: dict[str, list[str]]) -> Batch:
        """B full rows (``user``, ``context``, ``sequences``, ``item``) -> a B-row batch."""
        users = [self.user_features(r["user"], unknown) for r in rows]
        items, _ = self.item_features([r["item"] for r in rows], unknown)
        context = {f.name: self.codecs[f.name].encode([(r.get("context") or {}).get(f.name) for r in rows],
                                                      unknown.setdefault(f.name, []))
                   for f in self.schema.context}
        seqs = {s.name: self._sequence(
            s.name, s.event_features,
            [list((r.get("sequences") or {}).get(s.name) or [])[-self.max_len[s.name]:] for r in rows],
            unknown) for s in self.schema.sequences}
        return Batch(
            label=torch.zeros(len(rows)),
            user={f.name: torch.from_numpy(np.concatenate([u[f.name] for u in users])) for f in self.schema.user},
            item={k: torch.from_numpy(v) for k, v in items.items()},
            sequences=seqs,
            context={k: torch.from_numpy(v) for k, v in context.items()},
        )

    # ------------------------------------------------------------------ explanations
    def describe(self, entry: Entry, features: list[Feature]) -> dict[str, Any]:
        """An item or event as a person reads it: inline values as given, the rest decoded
        from the item table (its id first)."""
        item_id = entry if isinstance(entry, str) else entry[self.item_key]
        key = int(self.items.keys.get(item_id, OOV_ID))
        out: dict[str, Any] = {self.item_key: item_id}
        for f in features:
            if f.name == self.item_key:
                continue
            given = None if isinstance(entry, str) else entry.get(f.name)
            if given is not None:
                out[f.name] = given
            elif f.name in self.items.raw:
                out[f.name] = self.codecs[f.name].decode(self.items.raw[f.name][key])
        return out
