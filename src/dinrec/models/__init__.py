"""Whole CTR models over the schema's embedding layer, and the registry of their names.

    model = create_model("din", schema, store.table_sizes(), hidden=(200, 80))
"""

from __future__ import annotations

from typing import Any

from dinrec.data.schema import Schema
from dinrec.errors import DinrecError
from dinrec.models.base import CTRModel, ModelConfig, ModelOutput
from dinrec.models.baselines import PNN, BaseModel, WideDeep
from dinrec.models.dien import FAMILY as DIEN_FAMILY
from dinrec.models.din import DIN
from dinrec.models.embedding import FeatureEmbedding

_BUILT_IN: tuple[type[CTRModel], ...] = (BaseModel, WideDeep, PNN, DIN, *DIEN_FAMILY)
MODELS: dict[str, type[CTRModel]] = {m.name: m for m in _BUILT_IN}


def register(model_class: type[CTRModel]) -> type[CTRModel]:
    """Add a model class to the registry under its ``name`` (usable as a decorator)."""
    MODELS[model_class.name] = model_class
    return model_class


def model_class(name: str) -> type[CTRModel]:
    try:
        return MODELS[name]
    except KeyError:
        raise DinrecError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def create_model(name: str, schema: Schema, table_sizes: dict[str, int], **config: Any) -> CTRModel:
    """The model ``name`` over ``schema``'s features, with ``table_sizes[table]`` ids per
    table (``SampleStore.table_sizes()``) and the fields of its config dataclass:
    ``create_model("din", Schema.default(), {"user": 30, "item": 50, "cat": 8}, hidden=[80])``.
    """
    cls = model_class(name)
    try:
        return cls(cls.config_class.from_dict(config), schema, table_sizes)
    except TypeError as exc:
        raise DinrecError(f"model {name!r}: bad configuration: {exc}") from None


__all__ = [
    "MODELS",
    "CTRModel",
    "FeatureEmbedding",
    "ModelConfig",
    "ModelOutput",
    "create_model",
    "model_class",
    "register",
]
