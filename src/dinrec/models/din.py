"""DIN: the Deep Interest Network, with the reference `din_fcn_attention` unit.

Reading top to bottom, for a batch of (user, context, candidate, sequences):

    u = [user features] ++ [context features]         # (B, D_u)  embeddings, numeric values
    i = [item features of the candidate]              # (B, D)    the target behaviour
    for each sequence s:
        H_s = [item ++ per-event features, per event] # (B, T_s, D_s)
        h_s = sum of H_s over valid positions         # (B, D_s)
        q_s = i ++ zeros(D_s - D)                     # (B, D_s)  the target at the events' width
        a_s = din_attention(q_s, H_s, mask_s, "SUM")  # (B, D_s)  interest w.r.t. the target
    logit = MLP([u, i, (h_s, i*h_s, a_s) for s])      # (B,)      i*h_s: the item part of h_s

one attention unit per sequence, each with its own mask. On eager CPU runs with padded
batches (:meth:`DIN.packs`: a shuffled batch is mostly padding) the same is computed on
the valid events only: ``H_s`` is never padded, the lookups, the attention MLP and the
sums run over the N valid events (``FeatureEmbedding.packed``,
``DinFcnAttention.forward_packed``); values and gradients are the same. With the default schema
(user; item ++ cat; one sequence) this is the DIEN reference's DIN model:
``MLP([u, i, h, i*h, a])``.

The attention unit (``attention``):

* ``"din"`` (default): the reference's plain ``din_attention``: the raw target goes into
  the attention MLP ``[q, k, q-k, q*k] -> 80 -> 40 -> 1`` (sigmoids, softmax over the
  valid events). It is the more accurate one (docs/results.md, "Peers"). A sequence with
  per-event features (behaviour type, rating, time gap) has events wider than the
  target; the target, which has no per-event values, is zero-padded to the events' width
  for the attention (``q_s`` above): the per-event features then enter through ``k`` and
  ``q - k`` only (``q * k`` is 0 there), and the unit can weigh events by them, but not
  match them against the candidate. With events as wide as the target (the default
  schema) nothing is padded.
* ``"fcn"``: the reference's ``din_fcn_attention`` (the DIEN reference configuration,
  ``TrainConfig.reference()``): the target is projected to the events' width by a dense
  layer + PReLU, then ``A -> 40 -> 1`` with ``A = attention_size``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinrec.data.batch import Batch, Features
from dinrec.data.schema import Schema
from dinrec.errors import DinrecError
from dinrec.models.base import CTRModel, ModelConfig, ModelOutput, check_history
from dinrec.models.embedding import Embedded, EmbeddedSequence, PackedEmbedded
from dinrec.nn._backend import resolve
from dinrec.nn.attention import DinFcnAttention
from dinrec.nn.packed import can_pack, packs


@dataclass
class DINConfig(ModelConfig):
    attention: str = "din"  # "din": the reference's din_attention; "fcn": din_fcn_attention
    attention_size: int = 36  # "fcn": the DIEN reference's ATTENTION_SIZE (18 * 2); "din" uses 80


class DIN(CTRModel):
    name = "din"
    config_class = DINConfig
    has_attention = True
    config: DINConfig

    def __init__(self, config: DINConfig, schema: Schema, table_sizes: dict[str, int]) -> None:
        super().__init__(config, schema, table_sizes)
        if config.attention not in ("fcn", "din"):
            raise DinrecError(f"attention: expected 'fcn' or 'din', got {config.attention!r}")
        self.attentions = nn.ModuleDict({s: self._attention(s) for s in self.sequence_names})
        self.mlp = self._mlp(sum(w for _, w in self.mlp_layout()))

    def _attention(self, seq: str) -> DinFcnAttention:
        d, ds = self.behaviour_dim, self.sequence_dim(seq)
        if self.config.attention == "din":  # the target, zero-padded to the events' width
            return DinFcnAttention(ds, ds, 80, mode="SUM", query_projection=False)
        return DinFcnAttention(d, ds, self.config.attention_size, mode="SUM")

    def query(self, seq: str, target: Tensor) -> Tensor:
        """The attention query of sequence ``seq`` for targets (N, D): with ``attention="din"``
        the target zero-padded to the events' width (N, D_s), else the target."""
        width = self.unit(seq).query_size
        return target if width == target.shape[-1] else F.pad(target, (0, width - target.shape[-1]))

    def unit(self, seq: str) -> DinFcnAttention:
        """The attention unit of sequence ``seq``."""
        return self.attentions[seq]  # type: ignore[return-value]

    @property
    def attention(self) -> DinFcnAttention:
        """The main sequence's attention unit."""
        return self.unit(self.sequence_names[0])

    def mlp_layout(self) -> list[tuple[str, int]]:
        """The MLP's input blocks in order, with widths: profile, ``target``, then per
        sequence ``sum:s``, ``prod:s``, ``att:s``."""
        d = self.behaviour_dim
        out = [*self._profile_layout(), ("target", d)]
        for s in self.sequence_names:
            ds = self.sequence_dim(s)
            out += [(f"sum:{s}", ds), (f"prod:{s}", d), (f"att:{s}", ds)]
        return out

    def _head(self, e: Embedded | PackedEmbedded, attended: dict[str, Tensor]) -> Tensor:
        """MLP over the blocks of :meth:`mlp_layout` -> logits (N,)."""
        parts = [*self._profile(cast(Embedded, e)), e.target]  # (N, .) each; reads user, context
        for s in self.sequence_names:
            h = e.sequences[s].history_sum  # (N, D_s)
            parts += [h, self._product(e.target, h), attended[s]]
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (N,)

    def forward(self, batch: Batch, return_alphas: bool = False) -> ModelOutput:
        if self.packs(batch):
            return self._forward_packed(batch, return_alphas)
        e = self.embedding(batch)
        attended, alphas = {}, {}
        for s in self.sequence_names:
            seq = e.sequences[s]
            q = self.query(s, e.target)  # (B, D) or (B, D_s)
            att, a = self.unit(s)(q, seq.history, seq.mask, return_alphas=True)  # (B,1,D_s), (B,1,T)
            attended[s], alphas[s] = att.squeeze(1), a.squeeze(1)
        logits = self._head(e, attended)
        return ModelOutput(logits=logits, alphas=alphas if return_alphas else None)

    def _forward_packed(self, batch: Batch, return_alphas: bool) -> ModelOutput:
        """:meth:`forward` on the valid events only (:meth:`FeatureEmbedding.packed`,
        :meth:`DinFcnAttention.forward_packed`): the same values and gradients."""
        e = self.embedding.packed(batch)
        attended, alphas = {}, {}
        for s in self.sequence_names:
            seq = e.sequences[s]
            q = self.query(s, e.target)  # (B, D) or (B, D_s)
            att, a = self.unit(s).forward_packed(
                q, seq.facts, seq.index, seq.rows, seq.mask.shape[1], return_alphas=True
            )  # (B, 1, D_s), (B, 1, T)
            attended[s], alphas[s] = att.squeeze(1), a.squeeze(1)
        logits = self._head(e, attended)
        return ModelOutput(logits=logits, alphas=alphas if return_alphas else None)

    def packs(self, batch: Batch) -> bool:
        """Whether :meth:`forward` looks up and attends to the valid events only: eager CPU
        runs without autocast, every unit on the fast backend, and few enough valid
        positions (:func:`dinrec.nn.packed.packs` with ``inputs``, by the main unit's width)."""
        units = [self.unit(s) for s in self.sequence_names]
        masks = [batch.sequences[s].mask for s in self.sequence_names]
        if not (masks and can_pack(masks[0]) and not torch.is_autocast_enabled("cpu")):
            return False
        dtype = self.embedding.table(next(iter(self.embedding.tables))).weight.dtype
        if not all(u.packable and resolve(u.impl) == "fast" and u.att1.weight.dtype == dtype for u in units):
            return False
        valid = sum(int(m.count_nonzero()) if m.dtype == torch.bool else int((m == 1).sum()) for m in masks)
        return packs(valid, sum(m.numel() for m in masks), units[0].attention_size, inputs=True)

    def score_candidates(
        self,
        history: Batch,
        candidates: Features,
        return_alphas: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> ModelOutput:
        """A 1-row ``history``, N candidates: each history part is computed once.

        In eval mode this is :meth:`candidate_scorer` built and called once; a server
        should build that once and reuse it.
        """
        if not self.training:  # used once: no need for a snapshot of the MLP
            return DINCandidateScorer(self, copy_mlp=False)(
                history, candidates, return_alphas=return_alphas, compute_dtype=compute_dtype
            )
        emb = self.embedding
        targets = emb.behaviours(candidates)  # (N, D)
        n = targets.shape[0]
        user, context = emb.roles(history)  # (1, D_user), (1, D_ctx)
        seqs: dict[str, EmbeddedSequence] = {}
        attended, alphas = {}, {}
        for s in self.sequence_names:
            seq = emb.sequence(s, history.sequences[s])  # (1, T, D_s)
            att, a = self.unit(s).score_candidates(
                self.query(s, targets), seq.history[0], seq.mask[0], return_alphas=True,
                compute_dtype=compute_dtype,
            )  # (N, 1, D_s), (N, 1, T)
            attended[s], alphas[s] = att.squeeze(1), a.squeeze(1)
            seqs[s] = EmbeddedSequence(seq.history, seq.mask, seq.history_sum.expand(n, -1))
        e = Embedded(user.expand(n, -1), context.expand(n, -1), targets, seqs)
        logits = self._head(e, attended)
        return ModelOutput(logits=logits, alphas=alphas if return_alphas else None)

    def candidate_scorer(self) -> DINCandidateScorer:
        """The eval-mode :meth:`score_candidates` with its weight-only work done once."""
        return DINCandidateScorer(self)


class DINCandidateScorer:
    """DIN's candidate ranking for inference: the weight-only work prepared once.

    Equal to ``DIN.score_candidates`` in eval mode. Each attention is a
    :class:`~dinrec.nn.attention.CandidateAttention` (a snapshot of its weights), and the
    MLP's first layer (input BatchNorm folded in) is split by input block: the profile
    and history-sum parts are the same for every candidate (one row), and the target and
    every ``target * h_s`` part fold into one weight ``W_t + sum_s W_p,s diag(h_s)``, so
    the first layer is one ``(N, D + sum D_s) @ (D + sum D_s, H1)`` product. The
    embedding tables are the model's own (not copied). Make a new one after the weights
    change (``copy_mlp=False`` shares the MLP's later layers instead of copying them: for
    a scorer that is used at once).
    """

    def __init__(self, model: DIN, copy_mlp: bool = True) -> None:
        if model.training:
            raise DinrecError("DINCandidateScorer: put the model in eval mode first")
        self.embedding = model.embedding
        self.names = list(model.sequence_names)
        self.item_dim = model.behaviour_dim
        self.query = model.query  # weight-free: the target padded to the events' width
        with torch.no_grad():
            self.attentions = {s: model.unit(s).candidate_attention() for s in self.names}
            w, self.bias = (x.detach() for x in model.mlp.input_layer())  # (H1, F), (H1,)
            layout = model.mlp_layout()
            self.w = dict(zip((k for k, _ in layout), w.split([n for _, n in layout], dim=1), strict=True))
        # the layers after the first: part of the snapshot unless the caller uses it at once
        self.mlp = copy.deepcopy(model.mlp) if copy_mlp else model.mlp

    @torch.no_grad()
    def __call__(
        self,
        history: Batch,
        candidates: Features,
        return_alphas: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> ModelOutput:
        """A 1-row history, candidates' item features (N, ...) -> logits (N,), alphas {s: (N, T)}."""
        check_history(history)
        emb = self.embedding
        targets = emb.behaviours(candidates)  # (N, D)
        shared, w_target = self.bias, self.w["target"]  # (H1,), (H1, D)
        cand, w_cand, alphas = [targets], [], {}
        for s in self.names:
            seq = emb.sequence(s, history.sequences[s])
            h, mask, h_sum = seq.history[0], seq.mask[0], seq.history_sum[0]  # (T, D_s), (T,), (D_s,)
            att, a = self.attentions[s](
                self.query(s, targets), h, mask, return_alphas=True, compute_dtype=compute_dtype
            )  # (N, 1, D_s), (N, 1, T)
            shared = torch.addmv(shared, self.w[f"sum:{s}"], h_sum)  # (H1,)
            w_target = w_target + self.w[f"prod:{s}"] * h_sum[: self.item_dim]  # (H1, D)
            cand.append(att.squeeze(1))
            w_cand.append(self.w[f"att:{s}"])  # (H1, D_s)
            alphas[s] = a.squeeze(1)
        user, context = emb.roles(history)  # (1, D_user), (1, D_ctx)
        for key, x in (("user", user), ("context", context)):
            if key in self.w:
                shared = torch.addmv(shared, self.w[key], x[0])
        w_all = torch.cat([w_target, *w_cand], dim=1)  # (H1, D + sum D_s)
        pre = torch.addmm(shared, torch.cat(cand, dim=1), w_all.t())  # (N, H1)
        logits = self.mlp.forward_from_input_layer(pre).squeeze(-1)  # (N,)
        return ModelOutput(logits=logits, alphas=alphas if return_alphas else None)
