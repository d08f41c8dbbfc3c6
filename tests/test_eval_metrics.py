"""Metrics against hand-computed values on toy cases."""

import math

import pytest

from ckf_dist.eval import metrics as M


def test_auc_hand_computed():
    # pairs (pos, neg): (0.9>0.1) (0.9>0.4) (0.35<0.4) (0.35>0.1) -> 3 of 4
    assert M.auc([1, 0, 1, 0], [0.9, 0.1, 0.35, 0.4]) == pytest.approx(0.75)
    assert M.auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
    assert math.isnan(M.auc([1, 1], [0.2, 0.3]))


def test_uauc_skips_single_class_users():
    users = [1, 1, 2, 2, 3]
    labels = [1, 0, 1, 0, 1]
    scores = [0.9, 0.1, 0.2, 0.8, 0.5]
    value, n = M.uauc(users, labels, scores)
    assert n == 2 and value == pytest.approx(0.5)  # user 1: 1.0, user 2: 0.0, user 3 skipped


def test_rank_ties_are_pessimistic_and_hr_ndcg():
    assert M.rank_of_true([0.1, 0.5, 0.3], 1) == 0
    assert M.rank_of_true([0.5, 0.5, 0.5], 1) == 2  # all tied: worst rank, no free credit
    out = M.hit_ndcg([0, 1, 4], ks=(1, 5))
    assert out["hr@1"] == pytest.approx(1 / 3)
    assert out["hr@5"] == pytest.approx(1.0)
    assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 3)


def test_rmse_mae():
    out = M.rmse_mae([1, 2, 3], [2, 2, 5])
    assert out["mae"] == pytest.approx(1.0)
    assert out["rmse"] == pytest.approx(math.sqrt(5 / 3))


def test_text_metrics_identity_and_disjoint():
    same = M.text_metrics(["the movie was great fun"], ["the movie was great fun"])
    assert same["bleu4"] == pytest.approx(100.0) and same["rougeL"] == pytest.approx(100.0)
    none = M.text_metrics(["the movie was great fun"], ["zzz qqq"])
    assert none["rouge1"] == 0.0 and none["bleu4"] < 1.0
