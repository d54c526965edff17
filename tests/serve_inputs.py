"""A rich schema (every feature kind, two sequences, per-event features) and a small store of
it, for the serving and export tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from dinrec.data.schema import Feature, Schema, SequenceSpec

RICH = Schema(
    user=[Feature("user"), Feature("gender"), Feature("age", kind="numeric")],
    item=[Feature("item"), Feature("cat"), Feature("genres", kind="multi", max_values=3),
          Feature("price", kind="numeric", log=True)],
    context=[Feature("hour"), Feature("platform", hash_buckets=16)],
    sequences=[
        SequenceSpec("hist", max_len=30, event_features=[
            Feature("rating", kind="numeric"),
            Feature("time_gap", kind="numeric", boundaries=[60.0, 3600.0, 86400.0]),
        ]),
        SequenceSpec("liked", max_len=10, filter_column="behaviour", values=["like"],
                     event_features=[Feature("behaviour")]),
    ],
    embedding_dim=8,
)

#: Table sizes of a store-less model of RICH (export tests).
RICH_SIZES = {"user": 40, "gender": 4, "item": 300, "cat": 12, "genres": 20, "hour": 26,
              "platform": 18, "time_gap": 6, "behaviour": 5}

GENRES = ["Comedy", "Drama", "Action", "Horror", "Kids", "Noir"]


def rich_tables(seed: int = 0, users: int = 30, items: int = 80, events: int = 1500) -> dict[str, pa.Table]:
    """Events (user, item, ts, rating, behaviour, hour, platform) and item / user side tables."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, events)
    it = rng.integers(0, items, events)
    ev = pa.table({
        "user": [f"u{x}" for x in u],
        "item": [f"i{x}" for x in it],
        "ts": np.sort(rng.integers(1_600_000_000, 1_600_900_000, events)),
        "rating": rng.integers(1, 6, events).astype(np.float64),
        "behaviour": rng.choice(["view", "like", "cart"], events).tolist(),
        "hour": [str(h) for h in rng.integers(0, 24, events)],
        "platform": rng.choice(["ios", "android", "web"], events).tolist(),
    })
    item_table = pa.table({
        "item": [f"i{x}" for x in range(items)],
        "cat": [f"c{x % 7}" for x in range(items)],
        "genres": ["|".join(rng.choice(GENRES, rng.integers(1, 4), replace=False)) for _ in range(items)],
        "price": rng.uniform(1, 100, items).round(2),
    })
    user_table = pa.table({
        "user": [f"u{x}" for x in range(users)],
        "gender": rng.choice(["F", "M"], users).tolist(),
        "age": rng.integers(18, 70, users).astype(np.float64),
    })
    return {"events": ev, "items": item_table, "users": user_table}


def rich_store(path: Path, seed: int = 0) -> Path:
    """A sample store of RICH from :func:`rich_tables`."""
    from dinrec.data.samples import PrepareConfig
    from dinrec.data.store import prepare_events

    t = rich_tables(seed)
    prepare_events(t["events"], path, PrepareConfig(max_len=30, seed=seed), RICH,
                   items=t["items"], users=t["users"])
    return path


def rich_ranker(store_path: Path, name: str = "din", seed: int = 0, **kw):
    """A Ranker over a freshly initialised model ``name`` (seeded) of a RICH store."""
    import torch

    from dinrec.data.store import SampleStore
    from dinrec.models import create_model
    from dinrec.serve.features import RequestEncoder, find_serving_folder
    from dinrec.serve.ranker import Ranker

    store = SampleStore(store_path)
    torch.manual_seed(seed)
    model = create_model(name, store.schema, store.table_sizes())
    encoder = RequestEncoder.load(find_serving_folder(store.path, None))
    return Ranker.from_parts(model, encoder, {"model": {"name": name, "config": {}}}, **kw)
