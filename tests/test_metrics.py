"""Tests of dinrec.train.metrics against scikit-learn and slow per-user references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from dinrec.errors import DinrecError, ShapeError
from dinrec.train.metrics import (
    GaucResult,
    MetricError,
    accuracy,
    auc,
    evaluate_predictions,
    gauc,
    hr_at_k,
    logloss,
    ndcg_at_k,
    positive_rank,
)


def pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    """AUC by its definition: P(score_pos > score_neg) + P(equal) / 2 over all pairs."""
    sp, sn = s[y == 1][:, None], s[y == 0][None, :]
    return float(np.mean((sp > sn) + 0.5 * (sp == sn)))


def slow_gauc(labels, scores, users) -> tuple[float, int, int, float]:
    """A plain loop over users with pairwise AUC: the DIN paper definition, written plainly."""
    labels, scores, users = map(np.asarray, (labels, scores, users))
    num = den = 0.0
    used = skipped = 0
    skipped_imps = 0
    for u in np.unique(users):
        sel = users == u
        y, s = labels[sel], scores[sel]
        if y.min() == y.max():
            skipped += 1
            skipped_imps += sel.sum()
            continue
        used += 1
        num += sel.sum() * pairwise_auc(y, s)
        den += sel.sum()
    value = num / den if den else math.nan
    return value, used, skipped, skipped_imps / len(labels)


# ----------------------------------------------------------------------------- AUC


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    y = rng.integers(0, 2, n)
    s = rng.integers(0, 7, n).astype(np.float32)  # heavy ties
    s = s + 0.3 * y * rng.integers(0, 2, n)  # some signal
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_continuous_and_inputs():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    s = rng.normal(size=500) + y
    ref = roc_auc_score(y, s)
    assert auc(y, s) == pytest.approx(ref, abs=1e-12)
    assert auc(y.astype(bool), s) == pytest.approx(ref, abs=1e-12)
    assert auc(y.astype(float)[:, None], s[:, None]) == pytest.approx(ref, abs=1e-12)
    assert auc(torch.tensor(y), torch.tensor(s)) == pytest.approx(ref, abs=1e-12)
    assert auc(list(y), list(s)) == pytest.approx(ref, abs=1e-12)


def test_auc_simple_values():
    assert auc([0, 1], [0.1, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.1]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert auc([0, 0, 1, 1], [1, 1, 1, 1]) == 0.5
    assert auc([0, 1, 0, 1], [-np.inf, np.inf, 0, 0]) == 0.875


def test_auc_errors():
    with pytest.raises(MetricError, match="single class"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(MetricError, match="single class"):
        auc([], [])
    with pytest.raises(MetricError, match="0 or 1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(MetricError, match="NaN"):
        auc([0, 1], [0.1, np.nan])
    with pytest.raises(ShapeError):
        auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ShapeError):
        auc(np.zeros((2, 2)), np.zeros((2, 2)))
    assert issubclass(MetricError, DinrecError) and issubclass(MetricError, ValueError)


# ---------------------------------------------------------------------------- GAUC


@pytest.mark.parametrize("seed", range(4))
def test_gauc_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    users = rng.integers(0, 200, n)
    y = (rng.random(n) < rng.random(200)[users]).astype(int)  # some one-class users
    s = rng.integers(0, 5, n) + 0.5 * y * rng.random(n)
    got = gauc(y, s, users)
    value, used, skipped, share = slow_gauc(y, s, users)
    assert got.value == pytest.approx(value, abs=1e-12)
    assert (got.users_used, got.users_skipped) == (used, skipped)
    assert got.impression_share_skipped == pytest.approx(share, abs=1e-12)
    assert skipped > 0  # the data exercises the skipping


def test_gauc_string_users_and_weighting():
    # user a: 4 impressions, AUC 1; user b: 2 impressions, AUC 0; user c: one class
    y = [0, 0, 1, 1, 1, 0, 1, 1]
    s = [0.1, 0.2, 0.8, 0.9, 0.1, 0.9, 0.5, 0.6]
    u = ["a", "a", "a", "a", "b", "b", "c", "c"]
    got = gauc(y, s, u)
    assert got == GaucResult(4 / 6, 2, 1, 2 / 8)


def test_gauc_no_usable_user_is_nan():
    got = gauc([1, 0], [0.3, 0.4], [1, 2])
    assert math.isnan(got.value)
    assert (got.users_used, got.users_skipped, got.impression_share_skipped) == (0, 2, 1.0)


def test_gauc_errors():
    with pytest.raises(ShapeError):
        gauc([0, 1], [0.1, 0.2], [1])
    with pytest.raises(MetricError):
        gauc([], [], [])


# ------------------------------------------------------------------ logloss, accuracy


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 1000)
    p = rng.uniform(0.001, 0.999, 1000)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-12)


def test_logloss_clips_and_validates():
    assert math.isfinite(logloss([1, 0], [0.0, 1.0]))
    assert logloss([1, 0], [0.0, 1.0], eps=1e-7) == pytest.approx(-math.log(1e-7), rel=1e-6)
    with pytest.raises(MetricError, match=r"\[0, 1\]"):
        logloss([1, 0], [2.0, -1.0])


def test_accuracy():
    assert accuracy([1, 0, 1, 0], [0.5, 0.49, 0.1, 0.9]) == 0.5  # >= threshold is positive
    assert accuracy([1, 0], [0.7, 0.6], threshold=0.65) == 1.0


# --------------------------------------------------------------------- HR / NDCG


def test_hr_ndcg_without_ties():
    # positive in column 0; ranks 0, 1, 3
    scores = np.array([[0.9, 0.1, 0.2, 0.3], [0.5, 0.6, 0.1, 0.2], [0.0, 0.1, 0.2, 0.3]])
    above, tied = positive_rank(scores)
    assert above.tolist() == [0, 1, 3] and tied.tolist() == [0, 0, 0]
    assert hr_at_k(scores, k=1) == pytest.approx(1 / 3)
    assert hr_at_k(scores, k=2) == pytest.approx(2 / 3)
    assert hr_at_k(scores, k=4) == 1.0
    assert ndcg_at_k(scores, k=2) == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert ndcg_at_k(scores, k=10) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 3)
    for ties in ("pessimistic", "expected"):  # no ties: both policies agree
        assert hr_at_k(scores, 2, ties=ties) == hr_at_k(scores, 2)
        assert ndcg_at_k(scores, 3, ties=ties) == pytest.approx(ndcg_at_k(scores, 3))


def test_hr_ndcg_ties():
    const = np.zeros((5, 10))  # a constant model: every candidate tied
    assert hr_at_k(const, k=3) == 0.0
    assert hr_at_k(const, k=3, ties="expected") == pytest.approx(0.3)
    assert hr_at_k(const, k=10) == 1.0
    expected = sum(1 / math.log2(r + 2) for r in range(3)) / 10
    assert ndcg_at_k(const, k=3, ties="expected") == pytest.approx(expected)
    assert ndcg_at_k(const, k=3) == 0.0
    # positive in another column, with one tie above it
    s = np.array([[0.9, 0.5, 0.5, 0.1]])
    assert hr_at_k(s, k=2, pos_index=1) == 0.0
    assert hr_at_k(s, k=2, pos_index=1, ties="expected") == 0.5
    assert ndcg_at_k(s, k=3, pos_index=1, ties="expected") == pytest.approx(
        (1 / math.log2(3) + 1 / math.log2(4)) / 2
    )


def test_ranking_errors():
    with pytest.raises(ShapeError):
        hr_at_k(np.zeros(5), k=1)
    with pytest.raises(ShapeError):
        hr_at_k(np.zeros((2, 3)), k=1, pos_index=3)
    with pytest.raises(MetricError):
        hr_at_k(np.zeros((2, 3)), k=0)
    with pytest.raises(MetricError):
        ndcg_at_k(np.zeros((2, 3)), k=1, ties="optimistic")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- evaluate


def test_evaluate_predictions():
    rng = np.random.default_rng(5)
    n = 400
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    users = rng.integers(0, 30, n)
    out = evaluate_predictions(y, p, users)
    assert set(out) >= {"auc", "gauc", "gauc_users_skipped_share", "logloss", "accuracy", "n"}
    assert out["n"] == n
    assert out["auc"] == pytest.approx(roc_auc_score(y, p))
    assert out["gauc"] == pytest.approx(slow_gauc(y, p, users)[0])
    assert out["logloss"] == pytest.approx(log_loss(y, p))


def test_evaluate_predictions_single_class_is_nan(caplog):
    out = evaluate_predictions([1, 1, 1], [0.2, 0.5, 0.9], [1, 2, 2])
    assert math.isnan(out["auc"]) and math.isnan(out["gauc"])
    assert out["gauc_users_skipped_share"] == 1.0
    assert "single class" in caplog.text
    assert math.isnan(evaluate_predictions([0, 1], [0.2, 0.5])["gauc"])


# -------------------------------------------------------------------- properties


labels_scores = st.integers(2, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.lists(st.integers(-3, 3), min_size=n, max_size=n),  # small range: many ties
        st.lists(st.integers(0, 4), min_size=n, max_size=n),
    )
)


@settings(max_examples=100, deadline=None)
@given(labels_scores)
def test_auc_properties(data):
    y, s, _ = (np.asarray(a) for a in data)
    if y.min() == y.max():
        with pytest.raises(MetricError):
            auc(y, s)
        return
    a = auc(y, s)
    assert 0.0 <= a <= 1.0
    assert a == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc(y, -s) == pytest.approx(1 - a, abs=1e-12)  # order reversal, ties stay half
    assert auc(1 - y, s) == pytest.approx(1 - a, abs=1e-12)
    assert auc(y, np.exp(s)) == pytest.approx(a, abs=1e-12)  # monotone invariance


@settings(max_examples=100, deadline=None)
@given(labels_scores, st.randoms(use_true_random=False))
def test_gauc_properties(data, rnd):
    y, s, u = (np.asarray(a) for a in data)
    got = gauc(y, s, u)
    ref = slow_gauc(y, s, u)
    if math.isnan(ref[0]):
        assert math.isnan(got.value)
    else:
        assert got.value == pytest.approx(ref[0], abs=1e-12)
    assert (got.users_used, got.users_skipped) == ref[1:3]
    perm = np.array(rnd.sample(range(len(y)), len(y)))
    again = gauc(y[perm], s[perm], u[perm])
    assert (math.isnan(got.value) and math.isnan(again.value)) or again.value == pytest.approx(
        got.value, abs=1e-12
    )
    if y.min() != y.max():  # one user: GAUC == AUC
        assert gauc(y, s, np.zeros_like(u)).value == pytest.approx(auc(y, s), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 8).flatmap(
        lambda c: st.lists(
            st.lists(st.integers(0, 3), min_size=c, max_size=c), min_size=1, max_size=20
        )
    ),
    st.integers(1, 9),
)
def test_ranking_properties(rows, k):
    m = np.asarray(rows, dtype=float)
    for metric in (hr_at_k, ndcg_at_k):
        pess = metric(m, k)
        exp = metric(m, k, ties="expected")
        assert 0.0 <= pess <= exp + 1e-12 <= 1.0 + 1e-12
    assert ndcg_at_k(m, k) <= hr_at_k(m, k) + 1e-12
    # expected-tie HR equals the average over explicit tie orders (brute force)
    above, tied = positive_rank(m)
    brute = np.mean(
        [np.mean([r < k for r in range(a, a + t + 1)]) for a, t in zip(above, tied, strict=True)]
    )
    assert hr_at_k(m, k, ties="expected") == pytest.approx(brute)


def test_gauc_leaves_out_rows_of_unknown_users():
    # Two known users and five rows of users the key cannot tell apart (e.g. all OOV):
    # merged into one group they would add a "user" of their own; left out, they only
    # count as skipped impressions.
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1])
    s = np.array([0.9, 0.1, 0.2, 0.8, 0.9, 0.1, 0.8, 0.2, 0.7])
    u = np.array([5, 5, 6, 6, 1, 1, 1, 1, 1])
    known = u != 1
    got = gauc(y, s, u, known=known)
    assert got.value == pytest.approx(slow_gauc(y[:4], s[:4], u[:4])[0]) == 0.5
    assert (got.users_used, got.users_skipped) == (2, 0)
    assert got.impression_share_skipped == pytest.approx(5 / 9)
    merged = gauc(y, s, u)  # the OOV rows as one user: a different figure
    assert merged.users_used == 3 and merged.value != got.value
    # Every row unknown (the by-user split keyed by encoded id): no GAUC, not the AUC.
    none = evaluate_predictions(y, s, np.ones_like(u), known=np.zeros(9, bool))
    assert math.isnan(none["gauc"]) and none["gauc_users_skipped_share"] == 1.0
    assert not math.isnan(none["auc"])
