"""The shared embedding layout and the interface every dinrec CTR model follows.

Layout (as in the DIEN reference): one table each for users, items and categories; a
behaviour is ``item embedding ++ category embedding`` (2E wide); the target item and
the history items share the tables. Id 0 is padding (a zero vector that never learns),
id 1 out-of-vocabulary (a learned vector).

A model is a config dataclass (a subclass of :class:`ModelConfig`) plus a module (a
subclass of :class:`CTRModel`). ``forward(batch)`` returns a :class:`ModelOutput` with
one logit per row; ``score_candidates`` scores N candidate items against one user's
history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from dinrec.errors import DinrecError
from dinrec.nn.mlp import MLP

if TYPE_CHECKING:  # pragma: no cover
    from dinrec.data.batches import Batch


@dataclass
class ModelConfig:
    """What every model needs: vocabulary sizes (incl. padding and OOV ids) and the MLP."""

    n_users: int
    n_items: int
    n_cats: int
    embedding_dim: int = 18
    hidden: tuple[int, ...] = (200, 80)
    activation: str = "prelu"  # or "dice"
    dropout: float = 0.0
    use_user: bool = True  # the reference feeds the user embedding to the MLP

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
    alphas: Tensor | None = None  # (B, T) attention weights over the history, if the model has them
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Embedded:
    """A batch after the embedding lookups."""

    user: Tensor  # (B, E)
    target: Tensor  # (B, 2E)  item ++ category
    history: Tensor  # (B, T, 2E); padded positions hold the padding id's zero vector
    mask: Tensor  # (B, T) bool
    history_sum: Tensor  # (B, 2E) sum over valid positions


class BehaviourEmbedding(nn.Module):
    """User / item / category tables; behaviours are ``item ++ category`` (2E)."""

    def __init__(self, n_users: int, n_items: int, n_cats: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.user = nn.Embedding(n_users, dim, padding_idx=0)
        self.item = nn.Embedding(n_items, dim, padding_idx=0)
        self.cat = nn.Embedding(n_cats, dim, padding_idx=0)
        for table in (self.user, self.item, self.cat):
            nn.init.normal_(table.weight, std=0.05)
            with torch.no_grad():
                table.weight[0].zero_()

    def behaviours(self, items: Tensor, cats: Tensor) -> Tensor:
        """items, cats (...) int64 -> (..., 2E)."""
        return torch.cat([self.item(items), self.cat(cats)], dim=-1)

    def forward(self, batch: Batch) -> Embedded:
        b, t = batch.hist_items.shape
        # One lookup per table for target and history together.
        items = torch.cat([batch.item.unsqueeze(1), batch.hist_items], dim=1)  # (B, 1+T)
        cats = torch.cat([batch.cat.unsqueeze(1), batch.hist_cats], dim=1)  # (B, 1+T)
        both = self.behaviours(items, cats)  # (B, 1+T, 2E)
        target, history = both[:, 0], both[:, 1:]  # (B, 2E), (B, T, 2E)
        mask = batch.mask
        if mask.dtype != torch.bool:
            mask = mask == 1
        # Masked sum as one batched matmul: right even if a padded id is not 0.
        history_sum = torch.bmm(mask.unsqueeze(1).to(history.dtype), history).squeeze(1)  # (B, 2E)
        return Embedded(
            user=self.user(batch.user),
            target=target,
            history=history,
            mask=mask,
            history_sum=history_sum,
        )


class CTRModel(nn.Module):
    """Base class: ``forward(batch) -> ModelOutput``; registry name in ``name``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    has_attention: ClassVar[bool] = False
    needs_neg_history: ClassVar[bool] = False  # batches must carry neg_items (auxiliary loss)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = BehaviourEmbedding(
            config.n_users, config.n_items, config.n_cats, config.embedding_dim
        )

    @property
    def behaviour_dim(self) -> int:
        return 2 * self.config.embedding_dim

    def _mlp(self, in_features: int) -> MLP:
        c = self.config
        return MLP(in_features, hidden=c.hidden, activation=c.activation, dropout=c.dropout)

    def _user_part(self, e: Embedded) -> list[Tensor]:
        return [e.user] if self.config.use_user else []

    def forward(self, batch: Batch, return_alphas: bool = False) -> ModelOutput:  # pragma: no cover
        raise NotImplementedError

    def candidate_scorer(self) -> Callable[..., ModelOutput]:
        """``score_candidates`` for a server to call many times: models that can prepare
        weight-only work once (DIN) return a frozen scorer; the others this bound method."""
        return self.score_candidates

    def score_candidates(
        self,
        user: Tensor,
        hist_items: Tensor,
        hist_cats: Tensor,
        items: Tensor,
        cats: Tensor,
        return_alphas: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> ModelOutput:
        """Score N candidates for one user: user (), history (T,), candidates (N,) -> logits (N,).

        The generic version repeats the history N times; models with attention override
        it to compute the history part once (``compute_dtype``: the dtype of their
        attention's products, see :func:`dinrec.nn.attention.din_fcn_attention_candidates`;
        ignored here).
        """
        from dinrec.data.batches import Batch

        n, t = items.shape[0], hist_items.shape[0]
        batch = Batch(
            user=user.reshape(1).expand(n),
            item=items,
            cat=cats,
            hist_items=hist_items.reshape(1, t).expand(n, t),
            hist_cats=hist_cats.reshape(1, t).expand(n, t),
            mask=(hist_items != 0).reshape(1, t).expand(n, t),
            label=torch.zeros(n),
        )
        return self.forward(batch, return_alphas=return_alphas)
