"""Evaluation metrics for CTR and sampled ranking, vectorised NumPy (no per-sample Python).

- :func:`auc`: exact ROC AUC, tied scores count one half (Mann-Whitney), O(n log n),
  computed with integer counts so it is exact for any n.
- :func:`gauc`: the DIN paper's group AUC, per-user AUC weighted by the user's
  number of impressions; users with a single class have no AUC, are skipped and
  reported. One sort by (user, score), no loop over users.
- :func:`logloss`, :func:`accuracy`: on probabilities.
- :func:`hr_at_k`, :func:`ndcg_at_k`: each row holds one positive among sampled
  negatives (the leave-one-out protocol), with an explicit tie policy.
- :func:`evaluate_predictions`: the dictionary a training run records.

Inputs may be NumPy arrays, sequences or CPU torch tensors; labels must be 0/1
(bool, int or float); arrays of shape (n,) and (n, 1) are both accepted.

Degenerate cases: :func:`auc` raises :class:`MetricError` when only one class is
present (like scikit-learn); :func:`gauc` returns ``value=nan`` with ``users_used=0``
when no user has both classes; :func:`evaluate_predictions` reports ``nan`` for those
and logs a warning instead of raising.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dinrec.errors import DinrecError, ShapeError

__all__ = [
    "MetricError",
    "GaucResult",
    "auc",
    "gauc",
    "logloss",
    "accuracy",
    "positive_rank",
    "hr_at_k",
    "ndcg_at_k",
    "evaluate_predictions",
]

log = logging.getLogger(__name__)

TiePolicy = Literal["pessimistic", "expected"]


class MetricError(DinrecError, ValueError):
    """A metric cannot be computed from the given values (one class, bad labels, NaN)."""


@dataclass(frozen=True)
class GaucResult:
    """Group AUC and how much of the data it covers.

    Attributes:
        value: impression-weighted mean of per-user AUC (nan if no user qualifies).
        users_used: users with both a positive and a negative impression.
        users_skipped: users with only one class (no AUC defined).
        impression_share_skipped: fraction of all impressions that belong to skipped users.
    """

    value: float
    users_used: int
    users_skipped: int
    impression_share_skipped: float


# ----------------------------------------------------------------------------- inputs


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _vector(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ShapeError(f"{name} must have shape (n,) or (n, 1), got {a.shape}")
    return a


def _labels(x: Any) -> np.ndarray:
    y = _vector(x, "labels")
    if y.dtype == bool:
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.number):
        raise MetricError(f"labels must be numeric 0/1, got dtype {y.dtype}")
    ok = (y == 0) | (y == 1)
    if not ok.all():
        bad = y[~ok][:5]
        raise MetricError(f"labels must be 0 or 1; found e.g. {bad.tolist()}")
    return y.astype(np.int64)


def _scores(x: Any, name: str, n: int) -> np.ndarray:
    s = _vector(x, name)
    if s.shape[0] != n:
        raise ShapeError(f"{name} has {s.shape[0]} values but labels has {n}")
    if not np.issubdtype(s.dtype, np.number) and s.dtype != bool:
        raise MetricError(f"{name} must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if np.isnan(s).any():
        raise MetricError(f"{name} contains NaN at {int(np.isnan(s).sum())} position(s)")
    return s


def _probs(x: Any, n: int) -> np.ndarray:
    p = _scores(x, "probs", n)
    if ((p < 0) | (p > 1)).any():
        raise MetricError(
            "probs must lie in [0, 1]; got values outside (pass sigmoid(logits), not logits)"
        )
    return p


# ------------------------------------------------------------------------ AUC / GAUC


def _grouped_auc_counts(
    y: np.ndarray, s: np.ndarray, groups: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: (2 * Mann-Whitney U, positives, negatives), all int64.

    ``groups`` are dense codes 0..G-1 (None = one group). AUC_g = U2_g / (2 P_g N_g).
    """
    if groups is None:
        order = np.argsort(s, kind="stable")
        g_sorted = np.zeros(len(s), dtype=np.int64)
        n_groups = 1
    else:
        order = np.lexsort((s, groups))  # by group, then score ascending
        g_sorted = groups[order]
        n_groups = int(groups.max()) + 1 if len(groups) else 0
    if n_groups == 0 or len(y) == 0:
        z = np.zeros(n_groups, dtype=np.int64)
        return z, z.copy(), z.copy()
    y_sorted = y[order]
    s_sorted = s[order]

    n = len(y)
    # tie blocks: runs of equal (group, score)
    new_block = np.ones(n, dtype=bool)
    new_block[1:] = (g_sorted[1:] != g_sorted[:-1]) | (s_sorted[1:] != s_sorted[:-1])
    starts = np.flatnonzero(new_block)  # (K,)
    pos_b = np.add.reduceat(y_sorted, starts)  # (K,)
    size_b = np.diff(np.append(starts, n))  # (K,)
    neg_b = size_b - pos_b  # (K,)
    group_b = g_sorted[starts]  # (K,)

    # negatives strictly below each block, within its group
    neg_cum_excl = np.cumsum(neg_b) - neg_b  # (K,) over all groups
    first_block = np.ones(len(starts), dtype=bool)
    first_block[1:] = group_b[1:] != group_b[:-1]
    group_first = np.flatnonzero(first_block)  # (G_present,)
    offset = np.repeat(neg_cum_excl[group_first], np.diff(np.append(group_first, len(starts))))
    neg_below = neg_cum_excl - offset  # (K,)

    u2_b = 2 * neg_below * pos_b + pos_b * neg_b  # (K,) twice the U statistic
    u2 = np.zeros(n_groups, dtype=np.int64)
    pos = np.zeros(n_groups, dtype=np.int64)
    neg = np.zeros(n_groups, dtype=np.int64)
    present = group_b[group_first]  # (G_present,) blocks are sorted by group
    u2[present] = np.add.reduceat(u2_b, group_first)
    pos[present] = np.add.reduceat(pos_b, group_first)
    neg[present] = np.add.reduceat(neg_b, group_first)
    return u2, pos, neg


def auc(labels: Any, scores: Any) -> float:
    """Exact ROC AUC; tied scores count one half.

    Args:
        labels: (n,) 0/1.
        scores: (n,) any real scores (logits or probabilities; only the order matters).

    Raises:
        MetricError: if only one class is present (AUC undefined), or labels are not 0/1,
            or scores contain NaN.
    """
    y = _labels(labels)
    s = _scores(scores, "scores", len(y))
    u2, pos, neg = _grouped_auc_counts(y, s, None)
    p, q = int(pos[0]), int(neg[0])
    if p == 0 or q == 0:
        raise MetricError(
            f"AUC is undefined with a single class ({p} positives, {q} negatives among "
            f"{len(y)} samples)"
        )
    return float(int(u2[0]) / (2 * p * q))


def gauc(labels: Any, scores: Any, users: Any, known: Any | None = None) -> GaucResult:
    """Group AUC as defined in the DIN paper: sum_u w_u AUC_u / sum_u w_u, w_u = impressions.

    Users whose impressions are all positive or all negative have no AUC; they are left
    out of both sums and reported in ``users_skipped`` / ``impression_share_skipped``.
    Rows whose user is unknown (``known`` False: e.g. an out-of-vocabulary id shared by
    many users) belong to no group: they are left out too and count as skipped
    impressions (never merged into one group, which would turn GAUC into a plain AUC).

    Args:
        labels: (n,) 0/1.
        scores: (n,) real scores.
        users: (n,) user keys of any sortable dtype (ints, strings).
        known: (n,) bool, or None (every key names a user).
    """
    y = _labels(labels)
    s = _scores(scores, "scores", len(y))
    u = _vector(users, "users")
    if u.shape[0] != len(y):
        raise ShapeError(f"users has {u.shape[0]} values but labels has {len(y)}")
    if len(y) == 0:
        raise MetricError("GAUC of an empty set of predictions")
    keep = np.ones(len(y), bool) if known is None else _vector(known, "known").astype(bool)
    if keep.shape[0] != len(y):
        raise ShapeError(f"known has {keep.shape[0]} values but labels has {len(y)}")
    unknown_rows = int(len(y) - keep.sum())
    y, s, u = y[keep], s[keep], u[keep]
    _, codes = np.unique(u, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    u2, pos, neg = _grouped_auc_counts(y, s, codes)
    imps = pos + neg  # (U,)
    ok = (pos > 0) & (neg > 0)
    n_used = int(ok.sum())
    n_skipped = int(len(ok) - n_used)
    share_skipped = float((imps[~ok].sum() + unknown_rows) / (imps.sum() + unknown_rows))
    if n_used == 0:
        log.warning("GAUC undefined: none of %d users has both classes (%d rows of unknown "
                    "users)", len(ok), unknown_rows)
        return GaucResult(math.nan, 0, n_skipped, share_skipped)
    per_user = u2[ok] / (2.0 * pos[ok] * neg[ok])  # (U_used,)
    value = float(np.sum(per_user * imps[ok]) / imps[ok].sum())
    return GaucResult(value, n_used, n_skipped, share_skipped)


# ---------------------------------------------------------------- logloss, accuracy


def logloss(labels: Any, probs: Any, eps: float = 1e-15) -> float:
    """Mean binary cross-entropy of probabilities, clipped to [eps, 1 - eps]."""
    y = _labels(labels)
    p = _probs(probs, len(y))
    if len(y) == 0:
        raise MetricError("logloss of an empty set of predictions")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def accuracy(labels: Any, probs: Any, threshold: float = 0.5) -> float:
    """Share of correct predictions, predicting positive when ``probs >= threshold``."""
    y = _labels(labels)
    p = _probs(probs, len(y))
    if len(y) == 0:
        raise MetricError("accuracy of an empty set of predictions")
    return float(np.mean((p >= threshold) == (y == 1)))


# ------------------------------------------------------------------ HR@K, NDCG@K


def _score_matrix(scores: Any, pos_index: int) -> np.ndarray:
    m = _to_numpy(scores).astype(np.float64)
    if m.ndim != 2 or m.shape[1] < 1:
        raise ShapeError(f"scores must have shape (N, 1 + negatives), got {m.shape}")
    if not -m.shape[1] <= pos_index < m.shape[1]:
        raise ShapeError(f"pos_index {pos_index} out of range for {m.shape[1]} columns")
    if np.isnan(m).any():
        raise MetricError("scores contain NaN")
    if m.shape[0] == 0:
        raise MetricError("ranking metrics of an empty set of rows")
    return m


def positive_rank(scores: Any, pos_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (#candidates scored strictly above the positive, #others tied with it).

    Args:
        scores: (N, 1 + negatives), one positive per row at column ``pos_index``.

    Returns:
        (above, tied), each (N,) int64. The positive's 0-based rank is ``above`` when
        ties go its way, ``above + tied`` when they go against it (pessimistic).
    """
    m = _score_matrix(scores, pos_index)
    pos = m[:, [pos_index]]  # (N, 1)
    above = (m > pos).sum(axis=1).astype(np.int64)  # (N,)
    tied = (m == pos).sum(axis=1).astype(np.int64) - 1  # (N,) minus the positive itself
    return above, tied


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise MetricError(f"k must be a positive integer, got {k}")


def hr_at_k(scores: Any, k: int = 10, pos_index: int = 0, ties: TiePolicy = "pessimistic") -> float:
    """Hit rate: share of rows whose positive ranks in the top ``k``.

    Args:
        scores: (N, 1 + negatives).
        k: cut-off.
        pos_index: column of the positive in every row.
        ties: "pessimistic" ranks the positive below every candidate tied with it (a
            constant model scores 0 unless k exceeds the number of candidates);
            "expected" is the expectation under a uniformly random order of the tied
            candidates.
    """
    _check_k(k)
    above, tied = positive_rank(scores, pos_index)
    if ties == "pessimistic":
        return float(np.mean(above + tied < k))
    if ties == "expected":
        # rank uniform on {above, ..., above + tied}; P(rank < k)
        hits = np.clip(k - above, 0, tied + 1) / (tied + 1)
        return float(np.mean(hits))
    raise MetricError(f"ties must be 'pessimistic' or 'expected', got {ties!r}")


def ndcg_at_k(
    scores: Any, k: int = 10, pos_index: int = 0, ties: TiePolicy = "pessimistic"
) -> float:
    """NDCG with one relevant item per row: mean of ``1 / log2(rank + 2)`` if rank < k.

    Arguments as :func:`hr_at_k`; with "expected" ties the gain is averaged over the
    positive's possible ranks among its tied candidates.
    """
    _check_k(k)
    above, tied = positive_rank(scores, pos_index)
    n_cols = int(above.max(initial=0) + tied.max(initial=0)) + 1
    r = np.arange(n_cols)
    gain = np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)  # (C,) gain at 0-based rank r
    if ties == "pessimistic":
        return float(np.mean(gain[above + tied]))
    if ties == "expected":
        cum = np.concatenate([[0.0], np.cumsum(gain)])  # (C+1,)
        return float(np.mean((cum[above + tied + 1] - cum[above]) / (tied + 1)))
    raise MetricError(f"ties must be 'pessimistic' or 'expected', got {ties!r}")


# --------------------------------------------------------------------------- summary


def evaluate_predictions(
    labels: Any, probs: Any, users: Any | None = None, threshold: float = 0.5,
    known: Any | None = None,
) -> dict[str, float | int]:
    """The metrics a run records for a CTR evaluation set.

    Returns a dict with ``auc``, ``gauc``, ``gauc_users_skipped_share`` (the share of
    *impressions* belonging to users GAUC had to skip), ``gauc_users_used``,
    ``gauc_users_skipped``, ``logloss``, ``accuracy`` and ``n``. AUC/GAUC are ``nan``
    (with a logged warning) where undefined; GAUC is ``nan`` when ``users`` is None.
    """
    y = _labels(labels)
    p = _probs(probs, len(y))
    if len(y) == 0:
        raise MetricError("cannot evaluate an empty set of predictions")
    try:
        auc_value = auc(y, p)
    except MetricError as e:
        log.warning("%s", e)
        auc_value = math.nan
    if users is None:
        g = GaucResult(math.nan, 0, 0, math.nan)
    else:
        g = gauc(y, p, users, known)
    return {
        "auc": auc_value,
        "gauc": g.value,
        "gauc_users_skipped_share": g.impression_share_skipped,
        "gauc_users_used": g.users_used,
        "gauc_users_skipped": g.users_skipped,
        "logloss": logloss(y, p),
        "accuracy": accuracy(y, p, threshold),
        "n": len(y),
    }
