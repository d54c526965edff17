"""The batch contract between data, models, training and serving, derived from a schema.

A :class:`Batch` holds, for B rows, one tensor per feature of the
:class:`~dinrec.data.schema.Schema`, keyed by feature name:

* categorical: ``(B,)`` int64 ids; multi: ``(B, M)`` int64 ids, 0-padded; numeric:
  ``(B,)`` float32, already normalised;
* ``item``: the candidate's item features (the item id under the item key's name);
* ``sequences[name]``: a :class:`SequenceBatch`, the item features of every history
  event ``(B, T)`` / ``(B, T, M)`` / ``(B, T)`` plus its per-event features, its mask
  and, for DIEN's auxiliary loss, the item features of K negative items per position.

Padded positions hold id 0 (and 0.0); ``mask`` is the truth, never the ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Features = dict[str, Tensor]


def _map(d: Features | None, fn: Any) -> Features | None:
    return None if d is None else {k: fn(v) for k, v in d.items()}


@dataclass
class SequenceBatch:
    """One behaviour sequence of B rows, oldest event first, 0-padded at the end."""

    items: Features  # item features per position: (B, T) | (B, T, M) | (B, T) float
    mask: Tensor  # (B, T) bool, True = valid
    events: Features = field(default_factory=dict)  # per-event features: (B, T) | (B, T, M)
    neg: Features | None = None  # item features of K negatives per position: (B, T, K) | (B, T, K, M)

    def apply(self, fn: Any) -> SequenceBatch:
        return SequenceBatch(
            items=_map(self.items, fn) or {},
            mask=fn(self.mask),
            events=_map(self.events, fn) or {},
            neg=_map(self.neg, fn),
        )


@dataclass
class Batch:
    """B rows of samples, one tensor per schema feature (see the module docstring)."""

    label: Tensor  # (B,) float32
    user: Features  # user features (the user id under the user key's name)
    item: Features  # the candidate's item features
    sequences: dict[str, SequenceBatch]
    context: Features = field(default_factory=dict)
    group: Tensor | None = None  # (B,) int64: one value per raw user (GAUC), also for OOV users

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def apply(self, fn: Any) -> Batch:
        """A new batch with ``fn`` applied to every tensor."""
        return Batch(
            label=fn(self.label),
            user=_map(self.user, fn) or {},
            item=_map(self.item, fn) or {},
            sequences={k: s.apply(fn) for k, s in self.sequences.items()},
            context=_map(self.context, fn) or {},
            group=None if self.group is None else fn(self.group),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self.apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self.apply(lambda t: t.pin_memory())

    # ------------------------------------------------------------------ default schema
    @classmethod
    def from_ids(
        cls,
        user: Tensor,
        item: Tensor,
        cat: Tensor,
        hist_items: Tensor,
        hist_cats: Tensor,
        mask: Tensor | None = None,
        label: Tensor | None = None,
        neg_items: Tensor | None = None,
        neg_cats: Tensor | None = None,
    ) -> Batch:
        """A batch of the default schema (``user``; ``item`` + ``cat``; sequence ``hist``):
        user, item, cat (B,), hist_items, hist_cats (B, T), neg_* (B, T, K)."""
        if mask is None:
            mask = hist_items != 0
        neg = None
        if neg_items is not None and neg_cats is not None:
            neg = {"item": neg_items, "cat": neg_cats}
        return cls(
            label=torch.zeros(item.shape[0]) if label is None else label,
            user={"user": user},
            item={"item": item, "cat": cat},
            sequences={"hist": SequenceBatch(items={"item": hist_items, "cat": hist_cats},
                                             mask=mask.bool(), neg=neg)},
        )


__all__ = ["Batch", "Features", "SequenceBatch"]
