"""DIEN and its family: interest extraction, the auxiliary loss, attention-driven evolution.

Reading top to bottom, for a batch of (user, target, history), as the DIEN reference's
``Model_DIN_V2_Gru_Vec_attGru_Neg``:

    u = E_user[user]                                   # (B, E)
    i = E_item[item] ++ E_cat[cat]                     # (B, 2E)  the target behaviour
    H = E_item[hist] ++ E_cat[hist_cat]                # (B, T, 2E)
    h = sum of H over valid positions                  # (B, 2E)
    S, _ = GRU(H, mask)                                # (B, T, Hd) interest states
    aux = auxiliary_loss(S, H, E[neg_hist], mask)      # ()  h_t must tell e_{t+1} from a negative
    _, a = din_fcn_attention(i, S, mask, mode="LIST", return_alphas=True)   # (B, T)
    _, f = AUGRU(S, a, mask)                           # (B, Hd) final evolved interest
    logit = MLP([u, i, h, i*h, f])                     # (B,)

The family (registry names), to read the DIEN paper's comparison off our own numbers:

- ``gru_att``: two GRU layers, then SUM attention over the second one's states;
- ``aigru``: attention scales the evolving GRU's input;
- ``agru``: attention replaces its update gate;
- ``augru``: attention scales its update gate (no auxiliary loss);
- ``dien``: AUGRU + the auxiliary loss (weight ``aux_weight`` in the trainer).

``gate`` picks the AUGRU convention: ``"reference"`` (the reference code's
``u' = (1 - a) * u`` on the keep gate, default) or ``"paper"`` (``u' = a * u`` on the
update gate); see :mod:`dinrec.nn.rnn`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from dinrec.errors import DinrecError
from dinrec.models.base import CTRModel, ModelConfig, ModelOutput
from dinrec.nn.attention import DinFcnAttention
from dinrec.nn.auxiliary import AuxiliaryNet
from dinrec.nn.rnn import AttentionGRU, AttentionGRUConfig, InterestExtractor

if TYPE_CHECKING:  # pragma: no cover
    from dinrec.data.batches import Batch

EVOLUTIONS = ("gru_att", "aigru", "agru", "augru")


@dataclass
class DIENConfig(ModelConfig):
    hidden_size: int = 36  # the reference's HIDDEN_SIZE (18 * 2)
    attention_size: int = 36  # the reference's ATTENTION_SIZE
    evolution: str = "augru"  # one of EVOLUTIONS
    gate: str = "reference"  # AUGRU convention: "reference" or "paper"
    aux_loss: bool = True


class DIEN(CTRModel):
    name = "dien"
    config_class = DIENConfig
    has_attention = True
    needs_neg_history: ClassVar[bool] = True

    def __init__(self, config: DIENConfig) -> None:
        super().__init__(config)
        if config.evolution not in EVOLUTIONS:
            raise DinrecError(f"evolution: expected one of {', '.join(EVOLUTIONS)}, got {config.evolution!r}")
        if config.gate not in ("reference", "paper"):
            raise DinrecError(f"gate: expected 'reference' or 'paper', got {config.gate!r}")
        d, hd = self.behaviour_dim, config.hidden_size
        self.extractor = InterestExtractor(d, hd)
        if config.evolution == "gru_att":
            self.second = InterestExtractor(hd, hd)
            self.attention = DinFcnAttention(d, hd, config.attention_size, mode="SUM")
        else:
            self.attention = DinFcnAttention(d, hd, config.attention_size, mode="LIST")
            self.evolution = AttentionGRU(
                AttentionGRUConfig(hd, hd, kind=config.evolution, gate=config.gate)
            )
        self.aux_net = AuxiliaryNet(hd, d) if config.aux_loss else None
        n_user = config.embedding_dim if config.use_user else 0
        self.mlp = self._mlp(n_user + 3 * d + hd)

    def forward(self, batch: Batch, return_alphas: bool = False) -> ModelOutput:
        e = self.embedding(batch)
        states, _ = self.extractor(e.history, e.mask)  # (B, T, Hd)
        aux = None
        if self.aux_net is not None and self.training:
            if batch.neg_items is None:
                raise DinrecError(
                    f"{self.name}: the auxiliary loss needs negative history items "
                    "(train with --neg-history 1)"
                )
            neg_cats = batch.neg_cats if batch.neg_cats is not None else torch.zeros_like(batch.neg_items)
            negatives = self.embedding.behaviours(batch.neg_items, neg_cats)  # (B, T, K, 2E)
            aux = self.aux_net.loss(states, e.history, negatives, e.mask)  # ()
        if self.config.evolution == "gru_att":
            states2, _ = self.second(states, e.mask)  # (B, T, Hd)
            att, alphas = self.attention(e.target, states2, e.mask, return_alphas=True)  # (B,1,Hd), (B,1,T)
            interest, alphas = att.squeeze(1), alphas.squeeze(1)  # (B, Hd), (B, T)
        else:
            _, alphas = self.attention(e.target, states, e.mask, return_alphas=True)  # (B, T)
            _, interest = self.evolution(states, alphas, e.mask)  # (B, Hd)
        parts = [e.target, e.history_sum, e.target * e.history_sum, interest]
        if self.config.use_user:
            parts.insert(0, e.user)
        logits = self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (B,)
        return ModelOutput(logits=logits, aux_loss=aux, alphas=alphas if return_alphas else None)


def _variant(name: str, evolution: str, aux: bool) -> type[DIEN]:
    cfg_cls = dataclass(type(f"{name.upper()}Config", (DIENConfig,), {
        "__annotations__": {"evolution": str, "aux_loss": bool},
        "evolution": evolution,
        "aux_loss": aux,
    }))
    return type(name.upper(), (DIEN,), {
        "name": name,
        "config_class": cfg_cls,
        "needs_neg_history": aux,
        "__doc__": f"The DIEN family member {name!r}: evolution {evolution!r}, auxiliary loss {aux}.",
    })


GRUAtt = _variant("gru_att", "gru_att", False)
AIGRUModel = _variant("aigru", "aigru", False)
AGRUModel = _variant("agru", "agru", False)
AUGRUModel = _variant("augru", "augru", False)
FAMILY: tuple[type[DIEN], ...] = (DIEN, GRUAtt, AIGRUModel, AGRUModel, AUGRUModel)
