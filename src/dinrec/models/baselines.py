"""The classic baselines of the DIN/DIEN papers, over the shared embedding layout.

Each follows the DIEN reference's model of the same name (inputs to the prediction
MLP, with ``u`` the user, ``i`` the target behaviour, ``h`` the sum of the history):

- ``base`` (Embedding&MLP): ``[u, i, h]``
- ``wide_deep`` (Wide&Deep): the same deep part, plus a wide linear term on ``[i, i*h]``
- ``pnn`` (PNN): ``[u, i, h, i*h]``, the product of target and history
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from dinrec.models.base import CTRModel, ModelConfig, ModelOutput

if TYPE_CHECKING:  # pragma: no cover
    from dinrec.data.batches import Batch


@dataclass
class BaseModelConfig(ModelConfig):
    pass


class BaseModel(CTRModel):
    """Embedding&MLP: sum-pooled history. MLP input ``[u, i, h]``."""

    name = "base"
    config_class = BaseModelConfig

    def __init__(self, config: BaseModelConfig) -> None:
        super().__init__(config)
        n_user = config.embedding_dim if config.use_user else 0
        self.mlp = self._mlp(n_user + 2 * self.behaviour_dim)

    def forward(self, batch: Batch, return_alphas: bool = False) -> ModelOutput:
        e = self.embedding(batch)
        x = torch.cat([*self._user_part(e), e.target, e.history_sum], dim=-1)  # (B, E + 4E)
        return ModelOutput(logits=self.mlp(x).squeeze(-1))  # (B,)


@dataclass
class WideDeepConfig(ModelConfig):
    pass


class WideDeep(CTRModel):
    """Wide&Deep: the Embedding&MLP deep part plus a linear wide part on ``[i, i*h]``."""

    name = "wide_deep"
    config_class = WideDeepConfig

    def __init__(self, config: WideDeepConfig) -> None:
        super().__init__(config)
        n_user = config.embedding_dim if config.use_user else 0
        self.mlp = self._mlp(n_user + 2 * self.behaviour_dim)
        self.wide = nn.Linear(2 * self.behaviour_dim, 1)

    def forward(self, batch: Batch, return_alphas: bool = False) -> ModelOutput:
        e = self.embedding(batch)
        deep = self.mlp(torch.cat([*self._user_part(e), e.target, e.history_sum], dim=-1))  # (B, 1)
        wide = self.wide(torch.cat([e.target, e.target * e.history_sum], dim=-1))  # (B, 1)
        return ModelOutput(logits=(deep + wide).squeeze(-1))  # (B,)


@dataclass
class PNNConfig(ModelConfig):
    pass


class PNN(CTRModel):
    """PNN as in the DIEN reference: MLP input ``[u, i, h, i*h]``."""

    name = "pnn"
    config_class = PNNConfig

    def __init__(self, config: PNNConfig) -> None:
        super().__init__(config)
        n_user = config.embedding_dim if config.use_user else 0
        self.mlp = self._mlp(n_user + 3 * self.behaviour_dim)

    def forward(self, batch: Batch, return_alphas: bool = False) -> ModelOutput:
        e = self.embedding(batch)
        x = torch.cat(
            [*self._user_part(e), e.target, e.history_sum, e.target * e.history_sum], dim=-1
        )  # (B, E + 6E)
        return ModelOutput(logits=self.mlp(x).squeeze(-1))  # (B,)
