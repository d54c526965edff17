"""The embedding layer derived from a :class:`~dinrec.data.schema.Schema`.

One table per vocabulary (``Schema.tables()``: one per feature, or shared through
``Feature.table``), ``table_sizes[table]`` rows (0 padding, a zero vector that never
learns; 1 out-of-vocabulary), ``embedding_dim`` columns (the feature's own, else the
model's, else the schema's). Each feature becomes a vector:

    categorical   E[id]                                  # (..., d)
    multi         mean (or sum) of E[ids] over ids != 0  # (..., d)   padding masked
    numeric       its normalised value                   # (..., 1)

and the roles concatenate them:

    user      = [f(x) for the user features]                          # (B, D_user)
    context   = [f(x) for the context features]                       # (B, D_ctx), maybe 0 wide
    target    = [f(x) for the item features of the candidate]         # (B, D_item)
    history_s = [item features ++ per-event features of s, per event] # (B, T, D_s)
    sum_s     = sum of history_s over valid positions                 # (B, D_s)

With the default schema this is the former ``BehaviourEmbedding`` exactly: tables user,
item, cat created and initialised in that order (normal, std 0.05, row 0 zeroed), and a
behaviour is ``item ++ cat``. The std is the model config's ``embedding_init_std``
(0.05 by default, the reference's; ``dinrec train``'s default configuration uses 1e-4,
FuxiCTR's: docs/training.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dinrec.data.batch import Batch, Features, SequenceBatch
from dinrec.data.schema import Feature, Schema
from dinrec.errors import DinrecError
from dinrec.nn.lookup import lookup

#: Standard deviation of the initial embedding values by default (the former fixed tables').
INIT_STD = 0.05


@dataclass
class EmbeddedSequence:
    """One behaviour sequence after the lookups."""

    history: Tensor  # (B, T, D_s) item ++ per-event features; padded positions are not to be trusted
    mask: Tensor  # (B, T) bool, True = valid
    history_sum: Tensor  # (B, D_s) sum over valid positions


@dataclass
class PackedSequence:
    """One behaviour sequence with only its valid events looked up, in row-major order."""

    facts: Tensor  # (N, D_s) item ++ per-event features of the N valid events
    index: Tensor  # (N,) int64 flat position b * T + t of each
    rows: Tensor  # (N,) int64 row b of each
    mask: Tensor  # (B, T) bool, True = valid
    history_sum: Tensor  # (B, D_s) sum over valid positions


@dataclass
class PackedEmbedded:
    """A batch after the lookups of :meth:`FeatureEmbedding.packed`."""

    user: Tensor  # (B, D_user)
    context: Tensor  # (B, D_ctx); (B, 0) without context features
    target: Tensor  # (B, D_item)
    sequences: dict[str, PackedSequence]


@dataclass
class Embedded:
    """A batch after the lookups (see the module docstring)."""

    user: Tensor  # (B, D_user)
    context: Tensor  # (B, D_ctx); (B, 0) without context features
    target: Tensor  # (B, D_item) the candidate's behaviour vector
    sequences: dict[str, EmbeddedSequence]


class FeatureEmbedding(nn.Module):
    """Tables and pooling for every feature of ``schema`` (see the module docstring).

    Args:
        schema: the features.
        table_sizes: rows of each table (``SampleStore.table_sizes()``), by table name.
        embedding_dim: default width of a table (``None``: the schema's); a feature's own
            ``embedding_dim`` wins.
        init_std: standard deviation of the tables' initial values.
    """

    def __init__(self, schema: Schema, table_sizes: dict[str, int], embedding_dim: int | None = None,
                 init_std: float = INIT_STD) -> None:
        super().__init__()
        if not init_std > 0:
            raise DinrecError(f"embedding_init_std: expected a positive number, got {init_std!r}")
        self.schema = schema
        self.init_std = init_std
        default = embedding_dim or schema.embedding_dim
        self.dims: dict[str, int] = {}  # table -> width
        tables: dict[str, nn.Embedding] = {}
        for name, owner in schema.tables().items():
            if name not in table_sizes:
                raise DinrecError(f"table_sizes: no size for table {name!r} (feature {owner.name!r})")
            self.dims[name] = owner.embedding_dim or default
            tables[name] = nn.Embedding(int(table_sizes[name]), self.dims[name], padding_idx=0)
        for role, f in schema.features():
            if f.is_numeric or f.embedding_dim in (None, self.dims[f.table_name]):
                continue
            raise DinrecError(
                f"{role}.{f.name}.embedding_dim: {f.embedding_dim}, but its table "
                f"{f.table_name!r} is {self.dims[f.table_name]} wide"
            )
        self.tables = nn.ModuleDict(tables)
        self.reset_parameters()
        self._item_features = list(schema.item)
        self._events = {s.name: list(s.event_features) for s in schema.sequences}

    def reset_parameters(self) -> None:
        """Normal values (std ``init_std``), the padding row zero; table by table."""
        for name in self.tables:
            weight = self.table(name).weight  # (rows, d)
            nn.init.normal_(weight, std=self.init_std)
            with torch.no_grad():
                weight[0].zero_()

    def table(self, name: str) -> nn.Embedding:
        """The embedding table ``name`` (a table name of ``schema.tables()``)."""
        return self.tables[name]  # type: ignore[return-value]

    # ------------------------------------------------------------------ widths
    def width(self, feature: Feature) -> int:
        return 1 if feature.is_numeric else self.dims[feature.table_name]

    def widths(self, features: list[Feature]) -> int:
        return sum(self.width(f) for f in features)

    @property
    def user_dim(self) -> int:
        return self.widths(self.schema.user)

    @property
    def context_dim(self) -> int:
        return self.widths(self.schema.context)

    @property
    def item_dim(self) -> int:
        """Width of a behaviour vector (the candidate's, and each event's item part)."""
        return self.widths(self._item_features)

    def sequence_dim(self, name: str) -> int:
        """Width of one event of sequence ``name``: item part ++ per-event features."""
        return self.item_dim + self.widths(self._events[name])

    # ------------------------------------------------------------------ lookups
    def feature(self, f: Feature, x: Tensor) -> Tensor:
        """One feature's vectors: categorical (...,) / multi (..., M) / numeric (...,) -> (..., d)."""
        if f.is_numeric:
            return x.to(self._dtype()).unsqueeze(-1)  # (..., 1)
        e = lookup(self.table(f.table_name), x)  # (..., d) or (..., M, d)
        if f.kind != "multi":
            return e
        valid = (x != 0).to(e.dtype)  # (..., M)
        pooled = (e * valid.unsqueeze(-1)).sum(-2)  # (..., d)
        if f.pooling == "mean":
            pooled = pooled / valid.sum(-1, keepdim=True).clamp(min=1.0)
        return pooled

    def concat(self, features: list[Feature], values: Features, where: str) -> Tensor:
        """The features' vectors side by side: (..., sum of widths)."""
        try:
            parts = [self.feature(f, values[f.name]) for f in features]
        except KeyError as e:
            raise DinrecError(f"{where}: missing feature {e.args[0]!r}") from None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def behaviours(self, items: Features) -> Tensor:
        """Item features (any leading shape) -> behaviour vectors (..., D_item)."""
        return self.concat(self._item_features, items, "item")

    def roles(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The user (B, D_user) and context (B, D_ctx) vectors."""
        user = self.concat(self.schema.user, batch.user, "user")
        if self.schema.context:
            context = self.concat(self.schema.context, batch.context, "context")
        else:
            context = user.new_zeros(user.shape[0], 0)
        return user, context

    def sequence(self, name: str, seq: SequenceBatch, items: Tensor | None = None) -> EmbeddedSequence:
        """One sequence; ``items`` (B, T, D_item): its item part, when already looked up.

        Padded positions are read as padding (id 0, value 0) whatever they hold: the mask
        is the truth, never the ids.
        """
        mask = _bool(seq.mask)  # (B, T)
        if items is None:
            items = self.behaviours({k: _valid_only(v, mask) for k, v in seq.items.items()})
        history = items  # (B, T, D_item)
        if self._events[name]:
            valid = {k: _valid_only(v, mask) for k, v in seq.events.items()}
            events = self.concat(self._events[name], valid, f"sequences.{name}.events")
            history = torch.cat([history, events], dim=-1)  # (B, T, D_s)
        # Masked sum as one batched matmul: right whatever padded positions hold.
        history_sum = torch.bmm(mask.unsqueeze(1).to(history.dtype), history).squeeze(1)  # (B, D_s)
        return EmbeddedSequence(history=history, mask=mask, history_sum=history_sum)

    def negatives(self, name: str, seq: SequenceBatch) -> Tensor | None:
        """Behaviour vectors of the K negatives per position (B, T, K, D_item), if any."""
        if seq.neg is None:
            return None
        neg = dict(seq.neg)
        for f in self._item_features:  # a layout without some item features: padding
            if neg.get(f.name) is None:
                like = next(v for v in neg.values() if v is not None)
                shape = (*like.shape[:3], *((1,) if f.kind == "multi" else ()))  # (B, T, K[, 1])
                dtype = self._dtype() if f.is_numeric else torch.int64
                neg[f.name] = torch.zeros(shape, dtype=dtype, device=like.device)
        return self.behaviours(neg)

    def forward(self, batch: Batch) -> Embedded:
        # One lookup per item feature for the candidate and every history event together.
        names = [s.name for s in self.schema.sequences]
        seqs = [batch.sequences[n] for n in names]
        lengths = [s.mask.shape[1] for s in seqs]
        joined: Features = {}
        for f in self._item_features:
            try:
                parts = [batch.item[f.name].unsqueeze(1),
                         *(_valid_only(s.items[f.name], _bool(s.mask)) for s in seqs)]
            except KeyError as e:
                raise DinrecError(f"item: missing feature {e.args[0]!r}") from None
            joined[f.name] = torch.cat(parts, dim=1)  # (B, 1 + sum T, ...)
        both = self.behaviours(joined)  # (B, 1 + sum T, D_item)
        target, *histories = both.split([1, *lengths], dim=1)
        user, context = self.roles(batch)
        return Embedded(
            user=user,
            context=context,
            target=target.squeeze(1),
            sequences={n: self.sequence(n, s, h) for n, s, h in zip(names, seqs, histories, strict=True)},
        )

    def packed(self, batch: Batch) -> PackedEmbedded:
        """:meth:`forward` with only the valid events of each sequence looked up.

        Equal to :meth:`forward` (``facts`` are the rows of ``history`` at the valid
        positions, ``history_sum`` the same sums), without the padded ``(B, T, D_s)``
        tensors: the lookups, the concatenations and the tables' gradients cover the
        ``N`` valid events only. One lookup per item feature for the candidates and the
        valid events of every sequence together. Eager mode (N is data).
        """
        names = [s.name for s in self.schema.sequences]
        seqs = [batch.sequences[n] for n in names]
        masks = [_bool(s.mask) for s in seqs]  # (B, T) each
        index = [m.reshape(-1).nonzero().squeeze(1) for m in masks]  # (N_s,) each
        joined: Features = {}
        for f in self._item_features:
            try:
                parts = [batch.item[f.name],
                         *(_take(s.items[f.name], i) for s, i in zip(seqs, index, strict=True))]
            except KeyError as e:
                raise DinrecError(f"item: missing feature {e.args[0]!r}") from None
            joined[f.name] = torch.cat(parts, dim=0)  # (B + sum N_s, ...)
        b = len(batch)
        target, *items = self.behaviours(joined).split([b, *(int(i.numel()) for i in index)], dim=0)
        user, context = self.roles(batch)
        sequences = {}
        for name, seq, mask, idx, facts in zip(names, seqs, masks, index, items, strict=True):
            if self._events[name]:
                where = f"sequences.{name}.events"
                try:
                    valid = {f.name: _take(seq.events[f.name], idx) for f in self._events[name]}
                except KeyError as e:
                    raise DinrecError(f"{where}: missing feature {e.args[0]!r}") from None
                facts = torch.cat([facts, self.concat(self._events[name], valid, where)], dim=1)  # (N, D_s)
            rows = torch.div(idx, mask.shape[1], rounding_mode="floor")  # (N,)
            history_sum = facts.new_zeros(b, facts.shape[1]).index_add(0, rows, facts)  # (B, D_s)
            sequences[name] = PackedSequence(facts, idx, rows, mask, history_sum)
        return PackedEmbedded(user=user, context=context, target=target, sequences=sequences)

    def _dtype(self) -> torch.dtype:
        return self.table(next(iter(self.tables))).weight.dtype


def _bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask == 1


def _take(x: Tensor, index: Tensor) -> Tensor:
    """The values of x (B, T, ...) at the flat positions index (N,): (N, ...)."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, index)


def _valid_only(x: Tensor, mask: Tensor) -> Tensor:
    """x (B, T, ...) with 0 (padding) wherever mask (B, T) is False."""
    m = mask.reshape(*mask.shape, *([1] * (x.dim() - mask.dim())))
    return torch.where(m, x, 0)


__all__ = ["INIT_STD", "Embedded", "EmbeddedSequence", "FeatureEmbedding", "PackedEmbedded", "PackedSequence"]
