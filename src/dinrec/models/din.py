"""DIN: the Deep Interest Network, with the reference `din_fcn_attention` unit.

Reading top to bottom, for a batch of (user, target, history):

    u = E_user[user]                                  # (B, E)
    i = E_item[item] ++ E_cat[cat]                    # (B, 2E)  the target behaviour
    H = E_item[hist] ++ E_cat[hist_cat]               # (B, T, 2E)
    h = sum of H over valid positions                 # (B, 2E)
    a = din_fcn_attention(i, H, mask, mode="SUM")     # (B, 2E)  interest w.r.t. the target
    logit = MLP([u, i, h, i*h, a])                    # (B,)

as the DIEN reference's DIN model. ``attention="fcn"`` (default) uses
`din_fcn_attention` (query projection + PReLU, then A -> 40 -> 1);
``attention="din"`` the reference's plain `din_attention` (raw target, 80 -> 40 -> 1).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dinrec.errors import DinrecError
from dinrec.models.base import CTRModel, ModelConfig, ModelOutput
from dinrec.nn.attention import DinFcnAttention

if TYPE_CHECKING:  # pragma: no cover
    from dinrec.data.batches import Batch


@dataclass
class DINConfig(ModelConfig):
    attention: str = "fcn"  # "fcn": din_fcn_attention; "din": the reference's din_attention
    attention_size: int = 36  # the DIEN reference's ATTENTION_SIZE (18 * 2); "din" uses 80


class DIN(CTRModel):
    name = "din"
    config_class = DINConfig
    has_attention = True

    def __init__(self, config: DINConfig) -> None:
        super().__init__(config)
        if config.attention not in ("fcn", "din"):
            raise DinrecError(f"attention: expected 'fcn' or 'din', got {config.attention!r}")
        d = self.behaviour_dim
        plain = config.attention == "din"
        self.attention = DinFcnAttention(
            d, d, 80 if plain else config.attention_size, mode="SUM", query_projection=not plain
        )
        n_user = config.embedding_dim if config.use_user else 0
        self.mlp = self._mlp(n_user + 4 * d)

    def _head(self, user: Tensor | None, target: Tensor, hist_sum: Tensor, att: Tensor) -> Tensor:
        parts = [target, hist_sum, target * hist_sum, att]  # (N, 2E) each
        if user is not None:
            parts.insert(0, user)
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (N,)

    def forward(self, batch: Batch, return_alphas: bool = False) -> ModelOutput:
        e = self.embedding(batch)
        att, alphas = self.attention(e.target, e.history, e.mask, return_alphas=True)  # (B,1,2E), (B,1,T)
        user = e.user if self.config.use_user else None
        logits = self._head(user, e.target, e.history_sum, att.squeeze(1))
        return ModelOutput(logits=logits, alphas=alphas.squeeze(1) if return_alphas else None)

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
        """user (), history (T,), candidates (N,): the history part is computed once.

        In eval mode this is :meth:`candidate_scorer` built and called once; a server
        should build that once and reuse it.
        """
        if not self.training:  # used once: no need for a snapshot of the MLP
            return DINCandidateScorer(self, copy_mlp=False)(
                user, hist_items, hist_cats, items, cats, return_alphas=return_alphas,
                compute_dtype=compute_dtype,
            )
        emb = self.embedding
        n = items.shape[0]
        mask = hist_items != 0  # (T,)
        history = emb.behaviours(hist_items, hist_cats)  # (T, 2E)
        targets = emb.behaviours(items, cats)  # (N, 2E)
        hist_sum = (mask.to(history.dtype) @ history).expand(n, -1)  # (N, 2E)
        att, alphas = self.attention.score_candidates(targets, history, mask, return_alphas=True)
        u = emb.user(user.reshape(1)).expand(n, -1) if self.config.use_user else None  # (N, E)
        logits = self._head(u, targets, hist_sum, att.squeeze(1))
        return ModelOutput(logits=logits, alphas=alphas.squeeze(1) if return_alphas else None)

    def candidate_scorer(self) -> DINCandidateScorer:
        """The eval-mode :meth:`score_candidates` with its weight-only work done once."""
        return DINCandidateScorer(self)


class DINCandidateScorer:
    """DIN's candidate ranking for inference: a snapshot of the weights, prepared once.

    Equal to ``DIN.score_candidates`` in eval mode. The attention is a
    :class:`~dinrec.nn.attention.CandidateAttention`, and the MLP's first layer (input
    BatchNorm folded in) is split by input block: the user and history-sum parts are the
    same for every candidate (one row), and the target and ``target * hist_sum`` parts
    fold into one weight ``W_t + W_p diag(hist_sum)``, so the first layer is one
    ``(N, 4E) @ (4E, H1)`` product. Make a new one after the weights change
    (``copy_mlp=False`` shares the MLP's later layers instead of copying them: for a
    scorer that is used at once).
    """

    def __init__(self, model: DIN, copy_mlp: bool = True) -> None:
        if model.training:
            raise DinrecError("DINCandidateScorer: put the model in eval mode first")
        emb = model.embedding
        with torch.no_grad():
            self.item_table = emb.item.weight.detach()  # (n_items, E)
            self.cat_table = emb.cat.weight.detach()  # (n_cats, E)
            self.user_table = emb.user.weight.detach() if model.config.use_user else None
            self.attention = model.attention.candidate_attention()
            w, self.bias = (x.detach() for x in model.mlp.input_layer())  # (H1, F), (H1,)
            d = model.behaviour_dim
            blocks = list(w.split([*(() if self.user_table is None else (self.user_table.shape[1],)),
                                   d, d, d, d], dim=1))
            self.w_att, self.w_prod, self.w_sum, self.w_target = (blocks.pop() for _ in range(4))
            self.w_user = blocks.pop() if blocks else None  # (H1, E) or None
        # the layers after the first: part of the snapshot unless the caller uses it at once
        self.mlp = copy.deepcopy(model.mlp) if copy_mlp else model.mlp

    def _behaviours(self, items: Tensor, cats: Tensor) -> Tensor:
        return torch.cat([self.item_table[items], self.cat_table[cats]], dim=-1)  # (..., 2E)

    @torch.no_grad()
    def __call__(
        self,
        user: Tensor,
        hist_items: Tensor,
        hist_cats: Tensor,
        items: Tensor,
        cats: Tensor,
        return_alphas: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> ModelOutput:
        """user (), history (T,), candidates (N,) -> logits (N,), alphas (N, T) on request."""
        mask = hist_items != 0  # (T,)
        history = self._behaviours(hist_items, hist_cats)  # (T, 2E)
        targets = self._behaviours(items, cats)  # (N, 2E)
        hist_sum = mask.to(history.dtype) @ history  # (2E,)
        att, alphas = self.attention(
            targets, history, mask, return_alphas=True, compute_dtype=compute_dtype
        )  # (N, 1, 2E), (N, 1, T)
        shared = torch.addmv(self.bias, self.w_sum, hist_sum)  # (H1,)
        if self.w_user is not None and self.user_table is not None:
            shared = torch.addmv(shared, self.w_user, self.user_table[user.reshape(())])
        w_cand = torch.cat([self.w_target + self.w_prod * hist_sum, self.w_att], dim=1)  # (H1, 4E)
        pre = torch.addmm(shared, torch.cat([targets, att.squeeze(1)], dim=1), w_cand.t())  # (N, H1)
        logits = self.mlp.forward_from_input_layer(pre).squeeze(-1)  # (N,)
        return ModelOutput(logits=logits, alphas=alphas.squeeze(1) if return_alphas else None)
