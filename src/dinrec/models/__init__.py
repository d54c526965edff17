"""Whole CTR models over one shared embedding layout, and the registry of their names."""

from __future__ import annotations

from typing import Any

from dinrec.errors import DinrecError
from dinrec.models.base import CTRModel, ModelConfig, ModelOutput
from dinrec.models.baselines import PNN, BaseModel, WideDeep
from dinrec.models.dien import FAMILY as DIEN_FAMILY
from dinrec.models.din import DIN

MODELS: dict[str, type[CTRModel]] = {
    m.name: m for m in (BaseModel, WideDeep, PNN, DIN, *DIEN_FAMILY)
}


def register(model_class: type[CTRModel]) -> type[CTRModel]:
    """Add a model class to the registry under its ``name`` (usable as a decorator)."""
    MODELS[model_class.name] = model_class
    return model_class


def model_class(name: str) -> type[CTRModel]:
    try:
        return MODELS[name]
    except KeyError:
        raise DinrecError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def build_model(name: str, **config: Any) -> CTRModel:
    """``build_model("din", n_users=..., n_items=..., n_cats=..., embedding_dim=18)``."""
    cls = model_class(name)
    return cls(cls.config_class.from_dict(config))


__all__ = ["MODELS", "CTRModel", "ModelConfig", "ModelOutput", "build_model", "model_class", "register"]
