"""Random model inputs for any schema, shared by test_models.py and test_embedding.py.

``RICH`` has every feature kind in every role: a numeric user feature, a user feature
sharing the ``cat`` table, a context feature, multi-valued genres (mean) and tags (sum),
a hashed brand with its own width, a numeric price, and two sequences, the first with
per-event features (a rating, a bucketed time gap and a numeric dwell time).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dinrec.data.batch import Batch, SequenceBatch
from dinrec.data.schema import Feature, Schema, SequenceSpec

DEFAULT_SIZES = {"user": 30, "item": 50, "cat": 8}

RICH = Schema(
    user=[Feature("user"), Feature("age", kind="numeric"), Feature("fav_cat", table="cat")],
    item=[
        Feature("item"),
        Feature("cat"),
        Feature("genres", kind="multi", max_values=3),
        Feature("tags", kind="multi", max_values=4, pooling="sum", embedding_dim=3),
        Feature("brand", hash_buckets=10, embedding_dim=5),
        Feature("price", kind="numeric", log=True),
    ],
    context=[Feature("hour"), Feature("weekday", kind="numeric")],
    sequences=[
        SequenceSpec("liked", max_len=9, filter_column="rating", values=[">=4"], event_features=[
            Feature("rating"),
            Feature("gap", kind="numeric", boundaries=[60.0, 3600.0]),  # bucketed: an id
            Feature("dwell", kind="numeric"),
        ]),
        SequenceSpec("disliked", max_len=5, filter_column="rating", values=["<4"]),
    ],
    embedding_dim=6,
)
RICH_SIZES = {"user": 30, "fav_cat": 0, "cat": 8, "item": 50, "genres": 12, "tags": 9, "brand": 12,
              "hour": 26, "rating": 7, "gap": 5}
RICH_SIZES.pop("fav_cat")  # shares the cat table


def values(f: Feature, shape: tuple[int, ...], sizes: dict[str, int], g: torch.Generator) -> Tensor:
    """Random valid values of feature ``f``: ids >= 2 (multi: some trailing 0 padding), floats."""
    if f.is_numeric:
        return torch.randn(shape, generator=g)
    n = sizes[f.table_name]
    if f.kind != "multi":
        return torch.randint(2, n, shape, generator=g)
    ids = torch.randint(2, n, (*shape, f.max_values), generator=g)
    count = torch.randint(0, f.max_values + 1, shape, generator=g)  # some rows have none
    return ids * (torch.arange(f.max_values) < count.unsqueeze(-1))  # (..., M) 0-padded at the end


def _padded(x: Tensor, valid: Tensor) -> Tensor:
    """``x`` with 0 at invalid positions (valid (B, T) or (B, T, K))."""
    v = valid
    while v.dim() < x.dim():
        v = v.unsqueeze(-1)
    return x * v


def random_batch(
    schema: Schema,
    sizes: dict[str, int],
    b: int = 16,
    seed: int = 0,
    k: int = 1,
    empty_rows: bool = False,
) -> Batch:
    """B rows: each sequence with lengths 1..max_len (0.. with ``empty_rows``, row 1 empty), row 0 full,
    padded positions 0; K negatives per position for the main sequence."""
    g = torch.Generator().manual_seed(seed)
    main = schema.main_sequence.name
    sequences = {}
    for s in schema.sequences:
        t = s.max_len
        lengths = torch.randint(0 if empty_rows else 1, t + 1, (b,), generator=g)
        lengths[0] = t
        if empty_rows and b > 1:
            lengths[1] = 0
        mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
        items = {f.name: _padded(values(f, (b, t), sizes, g), mask) for f in schema.item}
        events = {f.name: _padded(values(f, (b, t), sizes, g), mask) for f in s.event_features}
        neg = None
        if s.name == main and k:
            neg = {f.name: _padded(values(f, (b, t, k), sizes, g), mask[..., None]) for f in schema.item}
        sequences[s.name] = SequenceBatch(items=items, mask=mask, events=events, neg=neg)
    return Batch(
        label=torch.randint(0, 2, (b,), generator=g).float(),
        user={f.name: values(f, (b,), sizes, g) for f in schema.user},
        item={f.name: values(f, (b,), sizes, g) for f in schema.item},
        sequences=sequences,
        context={f.name: values(f, (b,), sizes, g) for f in schema.context},
    )


def with_garbage(batch: Batch, schema: Schema, sizes: dict[str, int], seed: int = 99) -> Batch:
    """The same batch with random values at every padded sequence position and extra
    0 columns on every multi-valued feature: nothing a model may read."""
    g = torch.Generator().manual_seed(seed)

    def noisy(f: Feature, x: Tensor, valid: Tensor) -> Tensor:
        junk = values(f, tuple(x.shape[: valid.dim()]), sizes, g)  # shaped as x
        v = valid.reshape(*valid.shape, *([1] * (x.dim() - valid.dim())))
        return torch.where(v, x, junk)

    def wider(f: Feature, x: Tensor) -> Tensor:
        return torch.nn.functional.pad(x, (0, 2)) if f.kind == "multi" else x

    out = batch.apply(lambda t: t.clone())
    for s in schema.sequences:
        seq = out.sequences[s.name]
        seq.items = {f.name: wider(f, noisy(f, seq.items[f.name], seq.mask)) for f in schema.item}
        seq.events = {f.name: wider(f, noisy(f, seq.events[f.name], seq.mask)) for f in s.event_features}
    out.item = {f.name: wider(f, out.item[f.name]) for f in schema.item}
    out.user = {f.name: wider(f, out.user[f.name]) for f in schema.user}
    return out


def history_row(batch: Batch, row: int) -> Batch:
    """Row ``row`` of ``batch`` as a 1-row batch (the ``history`` of score_candidates)."""
    return batch.apply(lambda t: t[row : row + 1])


def repeat_row(batch: Batch, row: int, candidates: dict[str, Tensor]) -> Batch:
    """Row ``row`` repeated once per candidate, with the candidates as ``item``."""
    n = next(iter(candidates.values())).shape[0]
    rows = batch.apply(lambda t: t[row : row + 1].repeat(n, *([1] * (t.dim() - 1))))
    rows.item = candidates
    return rows


def random_candidates(schema: Schema, sizes: dict[str, int], n: int, seed: int = 5) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f.name: values(f, (n,), sizes, g) for f in schema.item}
