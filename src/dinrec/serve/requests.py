"""The HTTP request models, generated from the run's schema (``pydantic.create_model``).

For a schema with user features ``user, gender, age``, context ``hour``, item features
``item, cat, genres, price`` and a sequence ``hist`` with the per-event feature
``rating``, ``/recommend`` takes::

    {"user": {"user": "u12", "gender": "F", "age": 31},      # or just "u12"
     "context": {"hour": "14"},
     "sequences": {"hist": ["i3", {"item": "i9", "rating": 4.5}]},   # oldest first
     "candidates": ["i1", {"item": "new-7", "cat": "Drama", "genres": ["Drama"], "price": 9.5}],
     "k": 10, "explain": 3}

Every model forbids unknown fields (a feature the run does not have is a 422, not
ignored). Value types follow the feature kind: categorical -> string token, multi -> list
of tokens, numeric (also bucketed numeric such as ``time_gap``) -> number. The id of the
user / item / event is required; every other feature is optional (looked up in the run's
side tables, else OOV / the training mean). An item or event given as a plain string is
its id. A bad request is a 422 whose message names the field path
(``candidates.3.price: Input should be a valid number``).
"""

from __future__ import annotations

from types import GenericAlias
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    Tag,
    create_model,
)

from dinrec.data.schema import Feature, Schema

FORBID = ConfigDict(extra="forbid")
#: Union tags in error locations (``candidates.0.<tag>.price``); removed from messages.
ID_TAG, OBJECT_TAG = "~id", "~features"


def _types(limits: Any) -> dict[str, Any]:
    token = Annotated[StrictStr, StringConstraints(min_length=1, max_length=limits.max_token_chars)]
    number = StrictFloat  # ints too; strings and booleans refused
    return {"token": token, "number": number}


def _list_of(item: Any) -> Any:
    """``list[item]`` for an element type made at run time (not a static type to mypy)."""
    return GenericAlias(list, item)


def value_type(f: Feature, t: dict[str, Any]) -> Any:
    """The JSON type of one feature's value."""
    if f.kind == "numeric":
        return t["number"]
    if f.kind == "multi":
        token = t["token"]
        return Annotated[_list_of(token), Field(max_length=max(f.max_values, 64),
                                                      description=f"up to {f.max_values} used")]
    return t["token"]


def _describe(f: Feature, role: str) -> str:
    what = {"categorical": "token", "multi": "list of tokens", "numeric": "number"}[f.kind]
    extra = " (bucketed)" if f.kind == "numeric" and f.boundaries else ""
    return f"{role} feature {f.name!r}: {what}{extra}"


def _fields(features: list[Feature], role: str, t: dict[str, Any], required: str | None) -> dict[str, Any]:
    out = {}
    for f in features:
        typ = value_type(f, t)
        if f.name == required:
            out[f.name] = (typ, Field(description=_describe(f, role) + " (required)"))
        else:
            out[f.name] = (typ | None, Field(None, description=_describe(f, role)))
    return out


def _id_or(model: type[BaseModel], token: Any) -> Any:
    """A plain id string, or the object ``model``; errors name the object's fields."""
    return Annotated[
        Annotated[token, Tag(ID_TAG)] | Annotated[model, Tag(OBJECT_TAG)],
        Discriminator(lambda v: ID_TAG if isinstance(v, str) else OBJECT_TAG),
    ]


def request_models(schema: Schema, limits: Any) -> dict[str, type[BaseModel]]:
    """``{"RecommendRequest", "ScoreRequest", "Item", "User", "Context", ...}`` for ``schema``."""
    t = _types(limits)
    token = t["token"]
    item = create_model("Item", __config__=FORBID,
                        **_fields(schema.item, "item", t, schema.item_key.name))
    user = create_model("User", __config__=FORBID,
                        **_fields(schema.user, "user", t, schema.user_key.name))
    context = create_model("Context", __config__=FORBID, **_fields(schema.context, "context", t, None))
    seq_fields: dict[str, Any] = {}
    models: dict[str, type[BaseModel]] = {"Item": item, "User": user, "Context": context}
    for s in schema.sequences:
        event = create_model(
            f"Event_{s.name}", __config__=FORBID,
            **_fields(schema.item, "item", t, schema.item_key.name),
            **_fields(s.event_features, f"{s.name} event", t, None),
        )
        models[event.__name__] = event
        seq_fields[s.name] = (
            Annotated[_list_of(_id_or(event, token)), Field(max_length=limits.max_history)],
            Field(default_factory=list, description=f"events of {s.name!r}, oldest first "
                  f"(the last {s.max_len} used); an item id or an object with its features"),
        )
    sequences = create_model("Sequences", __config__=FORBID, **seq_fields)
    candidate = _id_or(item, token)
    common: dict[str, Any] = {
        "user": (_id_or(user, token), Field(description="the user id, or the user's features")),
        "context": (context, Field(default_factory=context)),
        "sequences": (sequences, Field(default_factory=sequences)),
    }
    recommend = create_model(
        "RecommendRequest", __config__=FORBID, **common,
        candidates=(_list_of(candidate), Field(min_length=1, max_length=limits.max_candidates,
                                               description="item ids, or objects with inline features")),
        k=(StrictInt, Field(10, ge=1, le=limits.max_candidates, description="items returned")),
        explain=(StrictInt, Field(0, ge=0, le=limits.max_explain,
                                  description="attended events shown per ranked item and sequence")),
    )
    row = create_model("ScoreRow", __config__=FORBID, **common, item=(candidate, ...))
    score = create_model("ScoreRequest", __config__=FORBID,
                         rows=(_list_of(row), Field(min_length=1, max_length=limits.max_rows)))
    models.update({"Sequences": sequences, "RecommendRequest": recommend, "ScoreRow": row,
                   "ScoreRequest": score})
    return models


def plain(value: Any) -> Any:
    """A validated id-or-object value as the encoder takes it: str, or a dict without Nones."""
    if isinstance(value, BaseModel):
        return {k: v for k, v in value.__dict__.items() if v is not None}
    return value


def request_signature(schema: Schema) -> dict[str, Any]:
    """What decides the request models: feature names, kinds and roles (not vocabularies)."""
    def sig(fs: list[Feature]) -> list[tuple[str, str, bool]]:
        return [(f.name, f.kind, f.boundaries is not None) for f in fs]

    return {"user": sig(schema.user), "item": sig(schema.item), "context": sig(schema.context),
            "sequences": [(s.name, sig(s.event_features)) for s in schema.sequences]}
