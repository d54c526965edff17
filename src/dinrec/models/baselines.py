"""The classic baselines of the DIN/DIEN papers, over the schema's embedding layer.

Each follows the DIEN reference's model of the same name (inputs to the prediction
MLP, with ``u`` the user and context vectors, ``i`` the candidate's behaviour vector and,
for each sequence ``s``, ``h_s`` the sum of its history):

- ``base`` (Embedding&MLP): ``[u, i, h_s...]``
- ``wide_deep`` (Wide&Deep): the same deep part, plus a wide linear term on ``[i, i*h_s...]``
- ``pnn`` (PNN): ``[u, i, (h_s, i*h_s)...]``, the product of target and history

(``i*h_s`` multiplies the item part of ``h_s``; with the default schema these are the
reference's ``[u, i, h]``, ``[i, i*h]`` and ``[u, i, h, i*h]``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from dinrec.data.batch import Batch
from dinrec.data.schema import Schema
from dinrec.models.base import CTRModel, ModelConfig, ModelOutput
from dinrec.models.embedding import Embedded


@dataclass
class BaseModelConfig(ModelConfig):
    pass


class BaseModel(CTRModel):
    """Embedding&MLP: sum-pooled histories. MLP input ``[u, i, h_s...]``."""

    name = "base"
    config_class: ClassVar[type[ModelConfig]] = BaseModelConfig

    def __init__(self, config: ModelConfig, schema: Schema, table_sizes: dict[str, int]) -> None:
        super().__init__(config, schema, table_sizes)
        self.mlp = self._mlp(self._deep_dim())

    def _deep_dim(self) -> int:
        return self.profile_dim + self.behaviour_dim + sum(map(self.sequence_dim, self.sequence_names))

    def _deep(self, e: Embedded) -> Tensor:
        sums = [e.sequences[s].history_sum for s in self.sequence_names]  # (B, D_s) each
        return self.mlp(torch.cat([*self._profile(e), e.target, *sums], dim=-1))  # (B, 1)

    def forward(self, batch: Batch, return_alphas: bool = False) -> ModelOutput:
        e = self.embedding(batch)
        return ModelOutput(logits=self._deep(e).squeeze(-1))  # (B,)


@dataclass
class WideDeepConfig(ModelConfig):
    pass


class WideDeep(BaseModel):
    """Wide&Deep: the Embedding&MLP deep part plus a linear wide part on ``[i, i*h_s...]``."""

    name = "wide_deep"
    config_class = WideDeepConfig

    def __init__(self, config: WideDeepConfig, schema: Schema, table_sizes: dict[str, int]) -> None:
        super().__init__(config, schema, table_sizes)
        self.wide = nn.Linear((1 + len(self.sequence_names)) * self.behaviour_dim, 1)

    def forward(self, batch: Batch, return_alphas: bool = False) -> ModelOutput:
        e = self.embedding(batch)
        products = [self._product(e.target, e.sequences[s].history_sum) for s in self.sequence_names]
        wide = self.wide(torch.cat([e.target, *products], dim=-1))  # (B, 1)
        return ModelOutput(logits=(self._deep(e) + wide).squeeze(-1))  # (B,)


@dataclass
class PNNConfig(ModelConfig):
    pass


class PNN(CTRModel):
    """PNN as in the DIEN reference: MLP input ``[u, i, (h_s, i*h_s)...]``."""

    name = "pnn"
    config_class = PNNConfig

    def __init__(self, config: PNNConfig, schema: Schema, table_sizes: dict[str, int]) -> None:
        super().__init__(config, schema, table_sizes)
        per_seq = sum(self.sequence_dim(s) + self.behaviour_dim for s in self.sequence_names)
        self.mlp = self._mlp(self.profile_dim + self.behaviour_dim + per_seq)

    def forward(self, batch: Batch, return_alphas: bool = False) -> ModelOutput:
        e = self.embedding(batch)
        parts = [*self._profile(e), e.target]
        for s in self.sequence_names:
            h = e.sequences[s].history_sum  # (B, D_s)
            parts += [h, self._product(e.target, h)]
        return ModelOutput(logits=self.mlp(torch.cat(parts, dim=-1)).squeeze(-1))  # (B,)
