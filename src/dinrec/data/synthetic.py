"""The embedded default dataset: synthetic click logs with a planted ground truth.

Items belong to categories and have Zipf popularity. Every user holds a few category
*interests* that drift (one is replaced now and then). Each next event is, in order of
the probabilities in :class:`SyntheticConfig`:

* ``recent``  — an item of the category of one of the user's last ``recent_window`` events;
* ``interest`` — an item of one of the user's current interests;
* ``explore`` — an item of a random category, which becomes a new interest;
* ``random click`` — any item by global popularity (noise).

Items inside a category are drawn by popularity. So the target's category is best
predicted by the *history items of the same category* (what DIN's target attention can
pick out), while a sum-pooled history mixes every past interest. :class:`GroundTruth`
records item -> category, the interests and each event's cause, and says which history
items are relevant to a target (same category).

Generation is vectorised over users (one NumPy step per event position): millions of
events take seconds. Everything is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinrec.errors import DinrecError

SOURCE_RECENT, SOURCE_INTEREST, SOURCE_EXPLORE, SOURCE_RANDOM = 0, 1, 2, 3
SOURCE_NAMES = ("recent", "interest", "explore", "random")


@dataclass
class SyntheticConfig:
    """Size and behaviour of a synthetic click log (probabilities must sum to <= 1)."""

    n_users: int = 2000
    n_items: int = 1000
    n_cats: int = 50
    events_per_user: int = 50  # mean; lengths are uniform in [min_events, 2*mean - min_events]
    min_events: int = 5
    n_interests: int = 3  # category interests per user
    item_zipf: float = 1.0  # popularity exponent (item rank r has weight r**-item_zipf)
    recent_window: int = 3  # "recent" picks the category of one of the last N events
    p_recent: float = 0.6
    p_interest: float = 0.25
    p_explore: float = 0.05  # the remainder, 1 - p_recent - p_interest - p_explore, is noise
    p_drift: float = 0.02  # per event: one interest is replaced by a random category
    mean_gap_s: int = 3600  # mean seconds between a user's events
    start_ts: int = 1_600_000_000
    seed: int = 0

    @property
    def p_random(self) -> float:
        return 1.0 - self.p_recent - self.p_interest - self.p_explore

    def validate(self) -> None:
        if min(self.n_users, self.n_items, self.n_cats, self.n_interests, self.recent_window) < 1:
            raise DinrecError("synthetic sizes must all be >= 1")
        if self.n_cats > self.n_items:
            raise DinrecError("n_cats must be <= n_items (every category needs an item)")
        if not 1 <= self.min_events <= self.events_per_user:
            raise DinrecError("need 1 <= min_events <= events_per_user")
        probs = (self.p_recent, self.p_interest, self.p_explore, self.p_drift)
        if min(probs) < 0 or self.p_random < -1e-9:
            raise DinrecError("synthetic probabilities must be >= 0 and sum to <= 1")


PRESETS: dict[str, SyntheticConfig] = {
    # a few thousand events: for tests, well under a second
    "tiny": SyntheticConfig(n_users=200, n_items=300, n_cats=12, events_per_user=20),
    # ~100k events: trains in under a minute on 2 cores
    "small": SyntheticConfig(n_users=2000, n_items=1000, n_cats=50, events_per_user=50),
    # ~1M events
    "medium": SyntheticConfig(n_users=20_000, n_items=20_000, n_cats=200, events_per_user=50),
    # ~10M events
    "large": SyntheticConfig(
        n_users=100_000, n_items=100_000, n_cats=500, events_per_user=100, min_events=10
    ),
}


def preset(name: str, **overrides: Any) -> SyntheticConfig:
    """A copy of the named preset (``tiny``, ``small``, ``medium``, ``large``) with overrides."""
    if name not in PRESETS:
        raise DinrecError(f"unknown synthetic preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


@dataclass
class GroundTruth:
    """What the generator planted. Item / category / user indices are those of the tokens
    ``i<k>``, ``c<k>``, ``u<k>``."""

    config: SyntheticConfig
    item_cat: np.ndarray  # (n_items,) category index of each item
    item_weight: np.ndarray  # (n_items,) popularity weight (sums to 1)
    interests_start: np.ndarray  # (n_users, n_interests) category indices
    interests_end: np.ndarray  # (n_users, n_interests) after drift / exploration
    event_source: np.ndarray  # (n_events,) int8 SOURCE_* of each row of the events table

    @staticmethod
    def _index(tokens: Any, prefix: str) -> np.ndarray:
        arr = (
            tokens
            if isinstance(tokens, pa.Array | pa.ChunkedArray)
            else pa.array(np.asarray(tokens, dtype=str).ravel())
        )
        ok = pc.starts_with(arr, prefix)
        digits = pc.utf8_slice_codeunits(arr, 1)
        digits = pc.if_else(pc.and_(ok, pc.utf8_is_digit(digits)), digits, "-1")
        return pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False)

    def category_of(self, items: Any) -> np.ndarray:
        """Category index of item tokens (any array shape); -1 for unknown tokens."""
        shape = np.shape(items) if not isinstance(items, pa.Array | pa.ChunkedArray) else None
        idx = self._index(items, "i")
        ok = (idx >= 0) & (idx < len(self.item_cat))
        out = np.where(ok, self.item_cat[np.where(ok, idx, 0)], -1)
        return out.reshape(shape) if shape is not None else out

    def relevant(self, target_items: Any, hist_items: Any) -> np.ndarray:
        """``(B, T)`` bool: history items of the same category as the target ``(B,)``."""
        t = self.category_of(np.asarray(target_items, dtype=str))  # (B,)
        h = self.category_of(np.asarray(hist_items, dtype=str))  # (B, T)
        return (h == t[:, None]) & (h >= 0)

    def item_id_to_cat(self, item_tokens: Any) -> np.ndarray:
        """True category index per item *id* of a vocabulary, given its tokens for ids 2..

        ``table = truth.item_id_to_cat(store.vocabs.item.tokens)`` then
        ``relevant = (table[hist_ids] == table[target_ids][:, None]) & (table[hist_ids] >= 0)``.
        Ids 0 (padding) and 1 (out-of-vocabulary) map to -1.
        """
        return np.concatenate([[-1, -1], self.category_of(item_tokens)]).astype(np.int64)


def _zipf_weights(n: int, a: float, rng: np.random.Generator) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -a
    return rng.permutation(w) / w.sum()


def generate(cfg: SyntheticConfig) -> tuple[pa.Table, GroundTruth]:
    """A seeded events table (``user``, ``item``, ``cat`` strings, ``ts`` int64; rows in
    time order like a log) and the ground truth behind it.

    Longer than one screen on purpose: every random draw comes from one generator in one
    fixed order, which the fixed-seed demo's figures depend on; its inner helpers keep
    the catalogue and the per-user walk readable without changing that order."""
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    U, N, C, K, W = cfg.n_users, cfg.n_items, cfg.n_cats, cfg.n_interests, cfg.recent_window

    # ---- catalogue: every category has an item; popularity is Zipf over a random ranking
    item_cat = np.concatenate([rng.permutation(C), rng.integers(0, C, N - C)])[rng.permutation(N)]
    item_w = _zipf_weights(N, cfg.item_zipf, rng)  # (N,)
    by_cat = np.argsort(item_cat, kind="stable")  # items grouped by category
    cat_off = np.searchsorted(item_cat[by_cat], np.arange(C + 1))  # (C+1,)
    seg_w = item_w[by_cat]
    seg_sum = np.add.reduceat(seg_w, cat_off[:-1])  # (C,)
    seg_cdf = np.cumsum(seg_w) - np.repeat(np.cumsum(seg_sum) - seg_sum, np.diff(cat_off))
    seg_cdf = seg_cdf / np.repeat(seg_sum, np.diff(cat_off)) + item_cat[by_cat]  # c + (0, 1]
    all_cdf = np.cumsum(item_w)

    def item_in_cat(cats: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(seg_cdf, cats + rng.random(len(cats)), side="right")
        return by_cat[np.clip(pos, cat_off[cats], cat_off[cats + 1] - 1)]

    # ---- users
    lo, hi = cfg.min_events, 2 * cfg.events_per_user - cfg.min_events
    lengths = rng.integers(lo, hi + 1, U)  # (U,)
    T = int(lengths.max())
    interests = rng.integers(0, C, (U, K))
    interests_start = interests.copy()
    recent = np.zeros((U, W), dtype=np.int64)
    items = np.empty((U, T), dtype=np.int64)
    source = np.empty((U, T), dtype=np.int8)
    rows = np.arange(U)
    c1, c2, c3 = (
        cfg.p_recent,
        cfg.p_recent + cfg.p_interest,
        cfg.p_recent + cfg.p_interest + cfg.p_explore,
    )
    for t in range(T):
        drift = rng.random(U) < cfg.p_drift
        interests[drift, rng.integers(0, K, int(drift.sum()))] = rng.integers(
            0, C, int(drift.sum())
        )
        r = rng.random(U)
        if t == 0:  # nothing recent yet: treat "recent" as "interest"
            r = np.where(r < c1, c1 + (r / c1) * (c2 - c1), r)
        src = np.select(
            [r < c1, r < c2, r < c3],
            [SOURCE_RECENT, SOURCE_INTEREST, SOURCE_EXPLORE],
            SOURCE_RANDOM,
        )
        cat = interests[rows, rng.integers(0, K, U)]  # (U,)
        rec = src == SOURCE_RECENT
        if t > 0:
            j = (rng.random(U) * min(t, W)).astype(np.int64)
            cat = np.where(rec, recent[rows, (t - 1 - j) % W], cat)
        exp = src == SOURCE_EXPLORE
        new_cat = rng.integers(0, C, U)
        cat = np.where(exp, new_cat, cat)
        interests[rows[exp], rng.integers(0, K, int(exp.sum()))] = new_cat[exp]
        it = item_in_cat(cat)
        noise = src == SOURCE_RANDOM
        it[noise] = np.searchsorted(all_cdf, rng.random(int(noise.sum())) * all_cdf[-1]).clip(
            max=N - 1
        )
        recent[:, t % W] = item_cat[it]
        items[:, t] = it
        source[:, t] = src

    # ---- timestamps and flattening to a log in time order
    gaps = rng.exponential(cfg.mean_gap_s, (U, T)).astype(np.int64) + 1
    ts = cfg.start_ts + rng.integers(0, 30 * 86400, U)[:, None] + np.cumsum(gaps, axis=1)
    valid = np.arange(T)[None, :] < lengths[:, None]  # (U, T)
    user_idx = np.broadcast_to(rows[:, None], (U, T))[valid]
    item_idx, ts_flat, src_flat = items[valid], ts[valid], source[valid]
    order = np.argsort(ts_flat, kind="stable")
    user_idx, item_idx, ts_flat = (a[order] for a in (user_idx, item_idx, ts_flat))
    src_flat = src_flat[order]

    def tokens(prefix: str, n: int) -> pa.Array:
        return pc.binary_join_element_wise(prefix, pc.cast(pa.array(np.arange(n)), pa.string()), "")

    events = pa.table(
        {
            "user": tokens("u", U).take(pa.array(user_idx)),
            "item": tokens("i", N).take(pa.array(item_idx)),
            "cat": tokens("c", C).take(pa.array(item_cat[item_idx])),
            "ts": pa.array(ts_flat, type=pa.int64()),
        }
    )
    truth = GroundTruth(
        config=cfg,
        item_cat=item_cat,
        item_weight=item_w,
        interests_start=interests_start,
        interests_end=interests,
        event_source=src_flat,
    )
    return events, truth


# ---------------------------------------------------------------------- richer features
def side_features(
    events: pa.Table, truth: GroundTruth, seed: int = 0
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The synthetic log with more to learn from, for schemas beyond the default one.

    Returns ``(events, items, users)``: the events gain ``rating`` (1-5: 4-5 for the
    "recent" and "interest" events, lower for noise, so ``rating >= 4`` is the liked
    sequence) and ``hour`` (context); the item side table has ``brand`` (one per 20
    items, mostly within a category), ``genres`` (the category plus a random one,
    ``"|"``-separated) and ``price`` (log-normal); the user side table ``gender`` and
    ``age``. Seeded; the events' rows and order are unchanged.
    """
    rng = np.random.default_rng([seed, 7])
    n = events.num_rows
    liked = truth.event_source <= SOURCE_INTEREST  # (n,)
    rating = np.where(liked, rng.integers(4, 6, n), rng.integers(1, 4, n)).astype(np.float64)
    ts = events.column("ts").to_numpy()
    hour = pa.array(((ts // 3600) % 24).astype(str))
    events = events.append_column("rating", pa.array(rating)).append_column("hour", hour)
    n_items, n_cats = len(truth.item_cat), int(truth.item_cat.max()) + 1
    ids = np.arange(n_items)
    brand = (truth.item_cat * 7 + rng.integers(0, 3, n_items)) % max(1, n_items // 20)
    other = rng.integers(0, n_cats, n_items)
    genres = pc.binary_join_element_wise(
        pa.array(np.char.add("g", truth.item_cat.astype(str))),
        pa.array(np.char.add("g", other.astype(str))), "|")
    items = pa.table({
        "item": pa.array(np.char.add("i", ids.astype(str))),
        "brand": pa.array(np.char.add("b", brand.astype(str))),
        "genres": genres,
        "price": pa.array(np.round(rng.lognormal(3.0, 1.0, n_items), 2)),
    })  # fmt: skip
    n_users = truth.interests_start.shape[0]
    users = pa.table({
        "user": pa.array(np.char.add("u", np.arange(n_users).astype(str))),
        "gender": pa.array(np.where(rng.random(n_users) < 0.5, "F", "M")),
        "age": pa.array(rng.integers(16, 70, n_users).astype(np.float64)),
    })  # fmt: skip
    return events, items, users


def rich_schema(max_len: int = 100) -> Any:
    """A schema for :func:`side_features`: two sequences (liked: ``rating >= 4`` with the
    rating and the time gap per event; disliked: ``rating < 4``) and six features beyond
    the default ones (user gender and age; item brand, genres, price; the hour)."""
    from dinrec.data.schema import Schema

    return Schema.from_dict({
        "user": ["user", "gender", {"name": "age", "kind": "numeric", "boundaries": [25, 35, 50]}],
        "item": ["item", "cat", "brand", {"name": "genres", "kind": "multi", "max_values": 2},
                 {"name": "price", "kind": "numeric", "log": True}],
        "context": ["hour"],
        "sequences": [
            {"name": "liked", "max_len": max_len, "filter_column": "rating", "values": [">=4"],
             "event_features": [{"name": "rating", "kind": "numeric"},
                                {"name": "time_gap", "kind": "numeric",
                                 "boundaries": [3600, 86400, 604800]}]},
            {"name": "disliked", "max_len": max_len, "filter_column": "rating", "values": ["<4"]},
        ],
    })  # fmt: skip
