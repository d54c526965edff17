"""The feature schema: every feature a store, a model and a request carry, declared once.

A :class:`Schema` names each feature by its **role**:

* ``user``: features of the user (the first one is the user id): MLP input;
* ``item``: features keyed by item id (the first one is the item id itself), stored once
  in the store's item side table and shared by the candidate and every history event;
  a behaviour vector is the concatenation of their embeddings;
* ``context``: features of the impression (hour, weekday, platform): MLP input;
* ``sequences``: one or more behaviour sequences, each with its own name, maximum length,
  the events that belong to it (``filter_column`` / ``values``), and optional per-event
  features (behaviour type, rating, time since the event, bucketed).

Each :class:`Feature` is ``categorical`` (one id), ``multi`` (a list of ids, pooled with
its padding masked) or ``numeric`` (a float, normalised with train-split statistics).
A categorical or multi feature gets its ids from a vocabulary built on the train split
(0 padding, 1 out-of-vocabulary, ``min_count``) or by hashing into ``hash_buckets``
buckets (ids ``2 .. hash_buckets + 1``, the same in every process); ``table`` lets
several features share one vocabulary and embedding table.

Today's layout (a user id, an item id with one category, one sequence ``hist``) is
:meth:`Schema.default`. The schema is saved as ``schema.json`` beside the sample store
and in every run folder; everything downstream (batches, embeddings, models, ranker,
export inputs, HTTP request models) is derived from it.

    >>> s = Schema.default()
    >>> Schema.from_json(s.to_json()) == s
    True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from dinrec.errors import DinrecError

KINDS = ("categorical", "multi", "numeric")
ROLES = ("user", "item", "context", "event")
POOLINGS = ("mean", "sum")
SCHEMA_FILE = "schema.json"
SCHEMA_VERSION = 1

Kind = Literal["categorical", "multi", "numeric"]


class SchemaError(DinrecError):
    """A schema that cannot be used; the message names the feature and the field."""


@dataclass
class Feature:
    """One feature.

    Args:
        name: unique across the whole schema; the key in batches and requests.
        kind: ``categorical`` | ``multi`` | ``numeric``.
        column: the input column it is read from (default: ``name``).
        min_count: vocabulary: training tokens seen fewer times map to OOV (id 1).
        hash_buckets: > 0: hash tokens into this many buckets instead of a vocabulary.
        embedding_dim: its embedding width (default: the schema's ``embedding_dim``);
            ignored for numeric features (one value each).
        table: share the vocabulary and embedding table of the feature with this name.
        max_values: multi: keep at most this many values per row (padded with 0).
        sep: multi: the separator inside a text cell (``"Comedy|Drama"``).
        pooling: multi: ``mean`` or ``sum`` over the valid values.
        log: numeric: ``log1p`` (of the value clipped at 0) before normalising.
        boundaries: numeric read as categorical: the value's bucket among these sorted
            boundaries becomes its id (e.g. the time since an event, in seconds).
    """

    name: str
    kind: Kind = "categorical"
    column: str | None = None
    min_count: int = 1
    hash_buckets: int = 0
    embedding_dim: int | None = None
    table: str | None = None
    max_values: int = 8
    sep: str = "|"
    pooling: str = "mean"
    log: bool = False
    boundaries: list[float] | None = None

    @property
    def source(self) -> str:
        """The input column this feature is read from."""
        return self.column or self.name

    @property
    def table_name(self) -> str:
        """The vocabulary / embedding table this feature uses."""
        return self.table or self.name

    def validate(self, where: str) -> None:
        at = f"{where}.{self.name}" if self.name else where
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise SchemaError(f"{at}: name must be letters, digits, '_' or '-', got {self.name!r}")
        if self.kind not in KINDS:
            raise SchemaError(f"{at}.kind: expected one of {KINDS}, got {self.kind!r}")
        if self.min_count < 1 or self.hash_buckets < 0 or self.max_values < 1:
            raise SchemaError(f"{at}: min_count and max_values must be >= 1, hash_buckets >= 0")
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise SchemaError(f"{at}.embedding_dim: must be >= 1, got {self.embedding_dim}")
        if self.pooling not in POOLINGS:
            raise SchemaError(f"{at}.pooling: expected one of {POOLINGS}, got {self.pooling!r}")
        if self.boundaries is not None and list(self.boundaries) != sorted(self.boundaries):
            raise SchemaError(f"{at}.boundaries: must be sorted ascending")
        if self.kind == "numeric" and (self.hash_buckets or (self.table and not self.boundaries)):
            raise SchemaError(f"{at}: a numeric feature has no hashing, and no table unless "
                              "it has boundaries")

    @property
    def is_numeric(self) -> bool:
        """True when the model sees a float (numeric without boundaries)."""
        return self.kind == "numeric" and self.boundaries is None


@dataclass
class SequenceSpec:
    """One behaviour sequence.

    Args:
        name: the sequence's name (``hist``, ``liked``, ``cart``...).
        max_len: the most recent events kept per sample.
        filter_column: the event column that decides membership (``None``: every
            positive event belongs to this sequence).
        values: the values of ``filter_column`` that belong to this sequence (compared as
            strings; numeric columns may use ``">=4"``, ``"<4"`` style bounds).
        event_features: per-event features (from event columns; a feature whose column is
            ``time_gap`` is built in: the seconds between the event and the sample's
            target, bucketed by its ``boundaries``).
    """

    name: str = "hist"
    max_len: int = 100
    filter_column: str | None = None
    values: list[str] | None = None
    event_features: list[Feature] = field(default_factory=list)

    def validate(self) -> None:
        where = f"sequences.{self.name}"
        if self.max_len < 1:
            raise SchemaError(f"{where}.max_len: must be >= 1, got {self.max_len}")
        if (self.filter_column is None) != (self.values is None):
            raise SchemaError(f"{where}: filter_column and values go together")
        for f in self.event_features:
            f.validate(f"{where}.event_features")


@dataclass
class Schema:
    """Features by role; see the module docstring. ``user[0]`` is the user id and
    ``item[0]`` the item id (the key of the item side table)."""

    user: list[Feature] = field(default_factory=lambda: [Feature("user")])
    item: list[Feature] = field(default_factory=lambda: [Feature("item"), Feature("cat")])
    context: list[Feature] = field(default_factory=list)
    sequences: list[SequenceSpec] = field(default_factory=lambda: [SequenceSpec()])
    embedding_dim: int = 18
    version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ construction
    @classmethod
    def default(cls, max_len: int = 100) -> Schema:
        """Today's layout: user id; item id + one category; one sequence ``hist``."""
        return cls(sequences=[SequenceSpec("hist", max_len=max_len)])

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ queries
    @property
    def user_key(self) -> Feature:
        return self.user[0]

    @property
    def item_key(self) -> Feature:
        return self.item[0]

    @property
    def main_sequence(self) -> SequenceSpec:
        """The first sequence (DIEN runs its interest evolution on this one)."""
        return self.sequences[0]

    def features(self) -> list[tuple[str, Feature]]:
        """Every feature with its role (``event`` for per-event features)."""
        out: list[tuple[str, Feature]] = []
        for role in ("user", "item", "context"):
            out += [(role, f) for f in getattr(self, role)]
        for s in self.sequences:
            out += [("event", f) for f in s.event_features]
        return out

    def feature(self, name: str) -> Feature:
        for _, f in self.features():
            if f.name == name:
                return f
        raise SchemaError(f"schema has no feature {name!r}")

    def sequence(self, name: str) -> SequenceSpec:
        for s in self.sequences:
            if s.name == name:
                return s
        raise SchemaError(f"schema has no sequence {name!r}")

    def tables(self) -> dict[str, Feature]:
        """Each vocabulary / embedding table with the feature that owns it (the first one
        declared with that table name); numeric features have none."""
        out: dict[str, Feature] = {}
        for _, f in self.features():
            if not f.is_numeric:
                out.setdefault(f.table_name, f)
        return out

    def is_default(self) -> bool:
        return self == Schema.default(self.main_sequence.max_len)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.version != SCHEMA_VERSION:
            raise SchemaError(f"schema version {self.version} is not supported (expected {SCHEMA_VERSION})")
        if self.embedding_dim < 1:
            raise SchemaError(f"embedding_dim: must be >= 1, got {self.embedding_dim}")
        for role in ("user", "item", "context"):
            for f in getattr(self, role):
                f.validate(role)
        if not self.user or self.user[0].kind != "categorical":
            raise SchemaError("user: the first user feature must be the categorical user id")
        if not self.item or self.item[0].kind != "categorical":
            raise SchemaError("item: the first item feature must be the categorical item id")
        if not self.sequences:
            raise SchemaError("sequences: at least one behaviour sequence is needed")
        for s in self.sequences:
            s.validate()
        self._check_unique()

    def _check_unique(self) -> None:
        seen: set[str] = set()
        for role, f in self.features():
            if f.name in seen:
                raise SchemaError(f"{role}.{f.name}: feature names must be unique")
            seen.add(f.name)
        names = [s.name for s in self.sequences]
        if len(set(names)) != len(names):
            raise SchemaError(f"sequences: names must be unique, got {names}")
        owners = self.tables()
        for role, f in self.features():
            if f.table and f.table not in owners:
                raise SchemaError(f"{role}.{f.name}.table: no feature has table {f.table!r}")
            owner = owners.get(f.table_name)
            if f.table and owner is not None and owner is not f and owner.is_numeric:
                raise SchemaError(f"{role}.{f.name}.table: {f.table!r} is numeric")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "schema") -> Schema:
        if not isinstance(d, dict):
            raise SchemaError(f"{where}: expected an object, got {type(d).__name__}")
        _no_unknown(d, cls, where)
        kw: dict[str, Any] = {k: v for k, v in d.items() if k not in ("user", "item", "context", "sequences")}
        for role in ("user", "item", "context"):
            if role in d:
                kw[role] = [_feature(x, f"{where}.{role}[{i}]") for i, x in enumerate(_list(d[role], f"{where}.{role}"))]
        if "sequences" in d:
            kw["sequences"] = [_sequence(x, f"{where}.sequences[{i}]") for i, x in enumerate(_list(d["sequences"], f"{where}.sequences"))]
        try:
            return cls(**kw)
        except TypeError as e:  # a wrong type reached a comparison
            raise SchemaError(f"{where}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "schema") -> Schema:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{where}: line {e.lineno}: not JSON: {e.msg}") from None
        return cls.from_dict(d, where)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SCHEMA_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        """From a ``schema.json`` file, or a directory (store, run folder) holding one."""
        p = Path(path)
        if p.is_dir():
            p = p / SCHEMA_FILE
        try:
            text = p.read_text()
        except OSError as e:
            raise SchemaError(f"{p}: cannot read the schema: {e.strerror}") from None
        return cls.from_json(text, where=str(p))


# ---------------------------------------------------------------------- command-line flags
def parse_feature_flag(spec: str, where: str) -> Feature:
    """One feature from a flag: ``NAME[:KIND][:log][:hash=N][:max=M][:sep=S]`` where KIND is
    ``categorical`` (default), ``multi`` or ``numeric`` (``brand``, ``genres:multi``,
    ``price:numeric:log``, ``user_zip:hash=1000``)."""
    name, *opts = [x.strip() for x in spec.split(":")]
    kw: dict[str, Any] = {"name": name}
    for o in opts:
        key, _, val = o.partition("=")
        try:
            if o in KINDS:
                kw["kind"] = o
            elif o == "log":
                kw["log"] = True
            elif key == "hash":
                kw["hash_buckets"] = int(val)
            elif key == "max":
                kw["max_values"] = int(val)
            elif key == "sep":
                kw["sep"] = val
            elif key == "min":
                kw["min_count"] = int(val)
            elif key == "buckets":
                kw["boundaries"] = [float(b) for b in val.split("|")]
            else:
                raise SchemaError(f"{where}: {spec!r}: unknown option {o!r} (kinds: "
                                  f"{', '.join(KINDS)}; options: log, hash=N, max=M, sep=S, "
                                  "min=N, buckets=B1|B2)")
        except ValueError:
            raise SchemaError(f"{where}: {spec!r}: {o!r} needs a number") from None
    return _feature(kw, f"{where}.{name}")


def parse_sequence_flag(spec: str, max_len: int, where: str = "--sequence") -> SequenceSpec:
    """``NAME`` (every positive) or ``NAME:COLUMN:V1|V2`` (``liked:rating:>=4``,
    ``buy:type:buy|cart``)."""
    parts = [x.strip() for x in spec.split(":", 2)]
    if len(parts) == 1:
        return SequenceSpec(parts[0], max_len)
    if len(parts) != 3 or not all(parts):
        raise SchemaError(f"{where}: {spec!r}: expected NAME or NAME:COLUMN:VALUE[|VALUE...]")
    return SequenceSpec(parts[0], max_len, parts[1], [v.strip() for v in parts[2].split("|")])


def schema_from_options(
    path: str | Path | None = None,
    max_len: int = 100,
    user: str | None = None,
    item: str | None = None,
    context: str | None = None,
    sequences: list[str] | None = None,
    event: str | None = None,
    time_gap: str | None = None,
) -> Schema | None:
    """The schema of ``dinrec prepare``: a JSON file (``--schema``) and/or flags that add to
    it (or to the default schema): comma-separated features (:func:`parse_feature_flag`)
    for ``--user-features`` / ``--item-features`` / ``--context-features`` /
    ``--event-features`` (every sequence), ``--sequence`` (repeatable, the first is the
    main one) and ``--time-gap B1,B2,...`` (seconds: the built-in per-event time gap).
    None when nothing was given (the default schema)."""
    if path is None and not any((user, item, context, sequences, event, time_gap)):
        return None
    schema = Schema.load(path) if path is not None else Schema.default(max_len)
    d = schema.to_dict()

    def feats(flag: str | None, name: str) -> list[dict[str, Any]]:
        return [asdict(parse_feature_flag(x, name)) for x in (flag or "").split(",") if x.strip()]

    d["user"] += feats(user, "--user-features")
    d["item"] += feats(item, "--item-features")
    d["context"] += feats(context, "--context-features")
    if sequences:
        d["sequences"] = [asdict(parse_sequence_flag(x, max_len)) for x in sequences]
    extra = feats(event, "--event-features")
    if time_gap:
        try:
            bounds = [float(b) for b in time_gap.split(",")]
        except ValueError:
            raise SchemaError(f"--time-gap: {time_gap!r}: expected seconds B1,B2,...") from None
        extra.append(asdict(Feature("time_gap", "numeric", boundaries=bounds)))
    for i, s in enumerate(d["sequences"]):  # names stay unique: suffix all but the first,
        s["event_features"] += [  # which share the first one's table
            e if i == 0 else {**e, "name": f"{e['name']}_{s['name']}",
                              "column": e["column"] or e["name"],
                              "table": None if e["kind"] == "numeric" and not e["boundaries"]
                              else e["table"] or e["name"]}
            for e in extra]
    return Schema.from_dict(d, where=str(path) if path else "schema")


# ---------------------------------------------------------------------- helpers
def _no_unknown(d: dict[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise SchemaError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")


def _list(x: Any, where: str) -> list[Any]:
    if not isinstance(x, list):
        raise SchemaError(f"{where}: expected a list, got {type(x).__name__}")
    return x


_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "column": (str, type(None)), "min_count": (int,),
    "hash_buckets": (int,), "embedding_dim": (int, type(None)), "table": (str, type(None)),
    "max_values": (int,), "sep": (str,), "pooling": (str,), "log": (bool,),
    "boundaries": (list, type(None)), "max_len": (int,), "filter_column": (str, type(None)),
    "values": (list, type(None)), "event_features": (list,),
}


def _check_types(d: dict[str, Any], where: str) -> None:
    for k, v in d.items():
        want = _TYPES.get(k)
        ok = want is None or (isinstance(v, want) and not (isinstance(v, bool) and bool not in want))
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in want or ())
            raise SchemaError(f"{where}.{k}: expected {names}, got {json.dumps(v)}")


def _feature(d: Any, where: str) -> Feature:
    if isinstance(d, str):  # shorthand: a categorical feature read from the column of that name
        d = {"name": d}
    if not isinstance(d, dict):
        raise SchemaError(f"{where}: expected an object or a name, got {type(d).__name__}")
    _no_unknown(d, Feature, where)
    if "name" not in d:
        raise SchemaError(f"{where}: a feature needs a name")
    _check_types(d, where)
    if d.get("boundaries") is not None:
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in d["boundaries"]):
            raise SchemaError(f"{where}.boundaries: expected numbers")
    return Feature(**d)


def _sequence(d: Any, where: str) -> SequenceSpec:
    if not isinstance(d, dict):
        raise SchemaError(f"{where}: expected an object, got {type(d).__name__}")
    _no_unknown(d, SequenceSpec, where)
    _check_types(d, where)
    d = dict(d)
    d["event_features"] = [
        _feature(x, f"{where}.event_features[{i}]") for i, x in enumerate(d.get("event_features", []))
    ]
    if d.get("values") is not None:
        d["values"] = [str(v) for v in d["values"]]
    return SequenceSpec(**d)
