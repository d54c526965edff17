"""DIEN and its family: interest extraction, the auxiliary loss, attention-driven evolution.

Reading top to bottom, for a batch of (user, context, candidate, sequences), as the DIEN
reference's ``Model_DIN_V2_Gru_Vec_attGru_Neg``:

    u = [user features] ++ [context features]          # (B, D_u)
    i = [item features of the candidate]               # (B, D)   the target behaviour
    H = [item ++ per-event features] of the MAIN seq.  # (B, T, D_m)
    h = sum of H over valid positions                  # (B, D_m)
    S, _ = GRU(H, mask)                                # (B, T, Hd) interest states
    aux = auxiliary_loss(S, H_item, E[neg], mask)      # ()  h_t must tell e_{t+1} from a negative
    _, a = din_fcn_attention(i, S, mask, mode="LIST", return_alphas=True)   # (B, T)
    _, f = AUGRU(S, a, mask)                           # (B, Hd) final evolved interest
    for each OTHER sequence s:                         # DIN attention, as in models/din.py
        h_s, a_s = sum of H_s, din_fcn_attention(i, H_s, mask_s, "SUM")      # (B, D_s) each
    logit = MLP([u, i, h, i*h, f, (h_s, i*h_s, a_s) for s])                # (B,)

**Several sequences.** The interest extractor, the auxiliary loss and the evolution run
on the schema's *main* sequence (``schema.main_sequence``, the first one declared); every
other sequence gets a DIN attention unit of its own, as in :mod:`dinrec.models.din`. The
evolution models how one stream of interest drifts towards the candidate, which needs
one time-ordered stream; running a GRU pair per sequence would multiply the recurrent
cost (the dominant one) by the number of sequences, while the other sequences (liked /
disliked, carts, buys) are short-range signals that DIN attention already reads well.
Declare the richest, longest sequence first. The auxiliary loss compares the states
with the *item* part of the next event (negatives have no per-event features).

The family (registry names), to read the DIEN paper's comparison off our own numbers:

- ``gru_att``: two GRU layers, then SUM attention over the second one's states;
- ``aigru``: attention scales the evolving GRU's input;
- ``agru``: attention replaces its update gate;
- ``augru``: attention scales its update gate (no auxiliary loss);
- ``dien``: AUGRU + the auxiliary loss (weight ``aux_weight`` in the trainer).

The attention of the family is the reference's ``din_fcn_attention`` in every training
configuration; dinrec's default training (``TrainConfig()``) trains it on shuffled batches
with Dice in the MLP, ``TrainConfig.reference()`` (``dinrec train --reference``) on the
reference's length-sorted batches with PReLU (docs/training.md).

``gate`` picks the AUGRU convention: ``"reference"`` (the reference code's
``u' = (1 - a) * u`` on the keep gate, default) or ``"paper"`` (``u' = a * u`` on the
update gate); see :mod:`dinrec.nn.rnn`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from dinrec.data.batch import Batch, Features
from dinrec.data.schema import Schema
from dinrec.errors import DinrecError
from dinrec.models.base import CTRModel, ModelConfig, ModelOutput, check_history
from dinrec.models.embedding import Embedded, EmbeddedSequence
from dinrec.nn.attention import DinFcnAttention
from dinrec.nn.auxiliary import AuxiliaryNet, pair_loss, pair_positions
from dinrec.nn.rnn import AttentionGRU, AttentionGRUConfig, Gate, InterestExtractor, Kind

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
    config: DIENConfig

    def __init__(self, config: DIENConfig, schema: Schema, table_sizes: dict[str, int]) -> None:
        super().__init__(config, schema, table_sizes)
        if config.evolution not in EVOLUTIONS:
            raise DinrecError(f"evolution: expected one of {', '.join(EVOLUTIONS)}, got {config.evolution!r}")
        if config.gate not in ("reference", "paper"):
            raise DinrecError(f"gate: expected 'reference' or 'paper', got {config.gate!r}")
        self.main, *self.others = self.sequence_names
        d, hd, size = self.behaviour_dim, config.hidden_size, config.attention_size
        self.extractor = InterestExtractor(self.sequence_dim(self.main), hd)
        if config.evolution == "gru_att":
            self.second = InterestExtractor(hd, hd)
            self.attention = DinFcnAttention(d, hd, size, mode="SUM")
        else:
            self.attention = DinFcnAttention(d, hd, size, mode="LIST")
            self.evolution = AttentionGRU(
                # both checked against their allowed values above
                AttentionGRUConfig(hd, hd, kind=cast(Kind, config.evolution), gate=cast(Gate, config.gate))
            )
        self.aux_net = AuxiliaryNet(hd, d) if config.aux_loss else None
        # DIN attention on every other sequence
        self.attentions = nn.ModuleDict(
            {s: DinFcnAttention(d, self.sequence_dim(s), size, mode="SUM") for s in self.others}
        )
        per_other = sum(2 * self.sequence_dim(s) + d for s in self.others)
        self.mlp = self._mlp(self.profile_dim + 2 * d + self.sequence_dim(self.main) + hd + per_other)

    # ------------------------------------------------------------------ pieces
    def _unit(self, seq: str) -> DinFcnAttention:
        """The DIN attention unit of a sequence other than the main one."""
        return self.attentions[seq]  # type: ignore[return-value]

    def _auxiliary(self, batch: Batch, states: Tensor, main: EmbeddedSequence) -> Tensor:
        """The auxiliary loss of the main sequence's states: ().

        Only the valid ``(t, t + 1)`` pairs are gathered, and only their negatives are
        looked up (N of the B * T positions): :func:`dinrec.nn.auxiliary.auxiliary_loss`
        over the whole batch, without embedding the padding's negatives."""
        seq = batch.sequences[self.main]
        if seq.neg is None:
            raise DinrecError(
                f"{self.name}: the auxiliary loss needs negative history items "
                "(train with --neg-history 1)"
            )
        b, t = main.mask.shape
        flat, nxt = pair_positions(main.mask)  # (N,) each
        neg_ids = {k: None if v is None else v.flatten(0, 1).index_select(0, nxt).unsqueeze(0)
                   for k, v in seq.neg.items()}  # (1, N, K[, M]): the (B, T, K) layout, B = 1
        negatives = self.embedding.negatives(self.main, replace(seq, neg=neg_ids))  # (1, N, K, D)
        assert negatives is not None and self.aux_net is not None
        clicked = main.history[..., : self.behaviour_dim]  # (B, T, D) item part of each event
        h = states.reshape(b * t, -1).index_select(0, flat)  # (N, Hd)
        pos = clicked.reshape(b * t, -1).index_select(0, nxt)  # (N, D)
        return pair_loss(self.aux_net, h, pos, negatives[0])  # ()

    def _evolve(self, target: Tensor, states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """target (N, D), states (N, T, Hd), mask (N, T) -> interest (N, Hd), alphas (N, T)."""
        if self.config.evolution == "gru_att":
            states2, _ = self.second(states, mask)  # (N, T, Hd)
            att, alphas = self.attention(target, states2, mask, return_alphas=True)  # (N,1,Hd), (N,1,T)
            return att.squeeze(1), alphas.squeeze(1)
        _, alphas = self.attention(target, states, mask, return_alphas=True)  # (N, T)
        _, interest = self.evolution(states, alphas, mask)  # (N, Hd)
        return interest, alphas

    def _head(self, e: Embedded, interest: Tensor, attended: dict[str, Tensor]) -> Tensor:
        h = e.sequences[self.main].history_sum  # (N, D_m)
        parts = [*self._profile(e), e.target, h, self._product(e.target, h), interest]
        for s in self.others:
            h = e.sequences[s].history_sum  # (N, D_s)
            parts += [h, self._product(e.target, h), attended[s]]
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (N,)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Batch, return_alphas: bool = False) -> ModelOutput:
        e = self.embedding(batch)
        main = e.sequences[self.main]
        states, _ = self.extractor(main.history, main.mask)  # (B, T, Hd)
        aux = None
        if self.aux_net is not None and self.training:
            aux = self._auxiliary(batch, states, main)
        interest, alphas_main = self._evolve(e.target, states, main.mask)  # (B, Hd), (B, T)
        attended, alphas = {}, {self.main: alphas_main}
        for s in self.others:
            seq = e.sequences[s]
            att, a = self._unit(s)(e.target, seq.history, seq.mask, return_alphas=True)  # (B,1,D_s), (B,1,T)
            attended[s], alphas[s] = att.squeeze(1), a.squeeze(1)
        logits = self._head(e, interest, attended)
        return ModelOutput(logits=logits, aux_loss=aux, alphas=alphas if return_alphas else None)

    def score_candidates(
        self,
        history: Batch,
        candidates: Features,
        return_alphas: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> ModelOutput:
        """A 1-row ``history``, N candidates: the interest extractor runs once; the
        evolution (which depends on the candidate) runs over N rows. No auxiliary loss.
        ``compute_dtype`` applies to the other sequences' DIN attention."""
        check_history(history)
        emb = self.embedding
        targets = emb.behaviours(candidates)  # (N, D)
        n = targets.shape[0]
        user, context = emb.roles(history)  # (1, D_user), (1, D_ctx)
        seqs = {s: emb.sequence(s, history.sequences[s]) for s in self.sequence_names}
        main = seqs[self.main]
        states, _ = self.extractor(main.history, main.mask)  # (1, T, Hd)
        t = states.shape[1]
        interest, alphas_main = self._evolve(
            targets, states.expand(n, t, -1), main.mask.expand(n, t)
        )  # (N, Hd), (N, T)
        attended, alphas = {}, {self.main: alphas_main}
        for s in self.others:
            att, a = self._unit(s).score_candidates(
                targets, seqs[s].history[0], seqs[s].mask[0], return_alphas=True, compute_dtype=compute_dtype
            )  # (N, 1, D_s), (N, 1, T)
            attended[s], alphas[s] = att.squeeze(1), a.squeeze(1)
        expanded = {
            s: EmbeddedSequence(q.history, q.mask, q.history_sum.expand(n, -1)) for s, q in seqs.items()
        }
        e = Embedded(user.expand(n, -1), context.expand(n, -1), targets, expanded)
        logits = self._head(e, interest, attended)
        return ModelOutput(logits=logits, alphas=alphas if return_alphas else None)


def _variant(name: str, evolution: str, aux: bool) -> type[DIEN]:
    cfg_cls: type[DIENConfig] = dataclass(type(f"{name.upper()}Config", (DIENConfig,), {
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
