"""The interface every dinrec CTR model follows, over the schema's embedding layer.

A model is built from a :class:`~dinrec.data.schema.Schema`, the sizes of its tables and
a config dataclass (a subclass of :class:`ModelConfig`)::

    model = create_model("din", schema, store.table_sizes(), hidden=(200, 80))

The embeddings are :class:`~dinrec.models.embedding.FeatureEmbedding`: a behaviour is
the concatenation of its item-keyed feature embeddings (``item ++ cat`` in the default
schema), the candidate the same; each event of a sequence adds its per-event features;
user, context and numeric features go to the prediction MLP. Id 0 is padding (a zero
vector that never learns), id 1 out-of-vocabulary.

``forward(batch)`` returns a :class:`ModelOutput` with one logit per row;
``score_candidates(history, candidates)`` scores N candidates against one user's
history (a 1-row :class:`~dinrec.data.batch.Batch`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from dinrec.data.batch import Batch, Features
from dinrec.data.schema import Schema
from dinrec.errors import DinrecError
from dinrec.models.embedding import INIT_STD, Embedded, FeatureEmbedding
from dinrec.nn.mlp import MLP, ActivationName


@dataclass
class ModelConfig:
    """What every model needs besides the schema and the table sizes: the MLP, widths."""

    embedding_dim: int | None = None  # default table width; None: the schema's
    hidden: tuple[int, ...] = (200, 80)
    activation: str = "prelu"  # or "dice"
    dropout: float = 0.0
    use_user: bool = True  # the reference feeds the user embedding to the MLP
    embedding_init_std: float = INIT_STD  # std of the initial embedding values (the reference's)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise DinrecError(f"model config: unknown fields {sorted(unknown)} for {cls.__name__}")
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


@dataclass
class ModelOutput:
    logits: Tensor  # (B,) one logit per row
    aux_loss: Tensor | None = None  # () auxiliary loss (DIEN), already averaged
    alphas: dict[str, Tensor] | None = None  # {sequence: (B, T)} attention weights, models with attention
    extras: dict[str, Tensor] = field(default_factory=dict)


class CTRModel(nn.Module):
    """Base class: ``forward(batch) -> ModelOutput``; registry name in ``name``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    has_attention: ClassVar[bool] = False
    needs_neg_history: ClassVar[bool] = False  # batches must carry the main sequence's negatives

    def __init__(self, config: ModelConfig, schema: Schema, table_sizes: dict[str, int]) -> None:
        super().__init__()
        self.config = config
        self.schema = schema
        self.table_sizes = {k: int(v) for k, v in table_sizes.items()}
        self.embedding = FeatureEmbedding(schema, table_sizes, config.embedding_dim, config.embedding_init_std)
        self.sequence_names = [s.name for s in schema.sequences]

    # ------------------------------------------------------------------ widths
    @property
    def behaviour_dim(self) -> int:
        """Width of the candidate's behaviour vector (D_item)."""
        return self.embedding.item_dim

    def sequence_dim(self, name: str) -> int:
        """Width of one event of sequence ``name`` (D_s = D_item + its per-event features)."""
        return self.embedding.sequence_dim(name)

    @property
    def profile_dim(self) -> int:
        """Width of the MLP's user and context inputs."""
        return (self.embedding.user_dim if self.config.use_user else 0) + self.embedding.context_dim

    def _mlp(self, in_features: int) -> MLP:
        c = self.config
        activation = cast(ActivationName, c.activation)  # a str in the config; MLP rejects others
        return MLP(in_features, hidden=c.hidden, activation=activation, dropout=c.dropout)

    def _profile(self, e: Embedded) -> list[Tensor]:
        """The MLP's user and context inputs: [(B, D_user)] [(B, D_ctx)]."""
        parts = [e.user] if self.config.use_user else []
        return parts + ([e.context] if e.context.shape[-1] else [])

    def _profile_layout(self) -> list[tuple[str, int]]:
        """The blocks :meth:`_profile` gives, with their widths."""
        out = [("user", self.embedding.user_dim)] if self.config.use_user else []
        return out + ([("context", self.embedding.context_dim)] if self.embedding.context_dim else [])

    def _product(self, target: Tensor, history_sum: Tensor) -> Tensor:
        """``target * history_sum`` over the item part of the events: (B, D_item)."""
        return target * history_sum[..., : target.shape[-1]]

    # ------------------------------------------------------------------ interface
    def forward(self, batch: Batch, return_alphas: bool = False) -> ModelOutput:  # pragma: no cover
        raise NotImplementedError

    def candidate_scorer(self) -> Callable[..., ModelOutput]:
        """``score_candidates`` for a server to call many times: models that can prepare
        weight-only work once (DIN) return a frozen scorer; the others this bound method."""
        return self.score_candidates

    def score_candidates(
        self,
        history: Batch,
        candidates: Features,
        return_alphas: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> ModelOutput:
        """Score N candidates for one user: a 1-row ``history`` batch (user, context,
        sequences; its ``item`` and ``label`` are ignored) and the candidates' item
        features ((N,) / (N, M) / (N,) float) -> logits (N,), alphas {seq: (N, T)}.

        The generic version repeats the history N times; models with attention override
        it to compute the history part once (``compute_dtype``: the dtype of their
        attention's products, see :func:`dinrec.nn.attention.din_fcn_attention_candidates`;
        ignored here).
        """
        return self.forward(candidate_rows(history, candidates), return_alphas=return_alphas)


def candidate_rows(history: Batch, candidates: Features) -> Batch:
    """N rows: the 1-row ``history`` (user, context, sequences) repeated for each candidate."""
    n = _count(candidates)
    check_history(history)
    rows = history.apply(lambda t: t.expand(n, *t.shape[1:]))
    rows.item = dict(candidates)
    rows.label = torch.zeros(n, device=rows.label.device)
    return rows


def check_history(history: Batch) -> None:
    """``history`` must be one row (a user's profile, context and sequences)."""
    if len(history) != 1:
        raise DinrecError(f"history: expected a batch of 1 row, got {len(history)}")


def _count(candidates: Features) -> int:
    if not candidates:
        raise DinrecError("candidates: no item features given")
    sizes = {int(v.shape[0]) for v in candidates.values()}
    if len(sizes) != 1:
        raise DinrecError(f"candidates: the item features have different counts {sorted(sizes)}")
    return sizes.pop()


__all__ = ["CTRModel", "ModelConfig", "ModelOutput", "candidate_rows", "check_history"]
