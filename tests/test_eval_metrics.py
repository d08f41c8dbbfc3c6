"""Metrics against hand-computed values on toy cases."""

import math

import numpy as np
import pytest

from ckf_dist import metrics as M


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


def test_ranking_ties_by_expected_rank_hand_computed():
    # true item (column 0) vs candidates: row 0 clear first; row 1 tied with one other; row 2 all tied (3)
    scores = np.array([[0.9, 0.1, 0.3], [0.5, 0.5, 0.7], [0.2, 0.2, 0.2]])
    g, e = M.rank_counts(scores, np.ones_like(scores, dtype=bool), np.zeros(3, dtype=np.int64))
    assert g.tolist() == [0, 1, 0] and e.tolist() == [0, 1, 2]
    m = M.expected_ranking(g, e, ks=(1, 2))
    # row 1 sits at rank 1 or 2 (0-based) with equal chance; row 2 at rank 0, 1 or 2
    assert m["hr@1"].tolist() == pytest.approx([1.0, 0.0, 1 / 3])
    assert m["hr@2"].tolist() == pytest.approx([1.0, 0.5, 2 / 3])
    assert m["ndcg@2"].tolist() == pytest.approx([1.0, 0.5 / math.log2(3), (1 + 1 / math.log2(3)) / 3])
    assert m["mrr"].tolist() == pytest.approx([1.0, (1 / 2 + 1 / 3) / 2, (1 + 1 / 2 + 1 / 3) / 3])
    # ragged lists give the same counts; padding never counts
    g2, e2 = M.rank_counts_lists([[0.9, 0.1, 0.3], [0.5, 0.5, 0.7], [0.2, 0.2, 0.2, np.nan]], [0, 0, 0])
    assert g2.tolist() == [0, 1, 0] and e2.tolist() == [0, 1, 2]


def test_constant_scorer_is_chance_level():
    k = 10
    g, e = M.rank_counts(np.zeros((5, k)), np.ones((5, k), dtype=bool), np.arange(5))
    m = M.expected_ranking(g, e, ks=(1, 5))
    assert m["hr@1"].mean() == pytest.approx(1 / k) and m["hr@5"].mean() == pytest.approx(5 / k)
    assert m["mrr"].mean() == pytest.approx(sum(1 / r for r in range(1, k + 1)) / k)
    assert M.auc([1, 0, 1, 0], [0.3] * 4) == pytest.approx(0.5)


def test_weighted_auc_equals_auc_of_repeated_rows():
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 40), np.round(rng.random(40), 1)      # many ties
    w = rng.integers(0, 4, 40)
    rep = np.repeat(np.arange(40), w)
    got = M.auc_weighted(M.auc_prepare(y, s), w[None, :].astype(float))[0]
    assert got == pytest.approx(M.auc(y[rep], s[rep]))


def test_rmse_mae():
    out = M.rmse_mae([1, 2, 3], [2, 2, 5])
    assert out["mae"] == pytest.approx(1.0)
    assert out["rmse"] == pytest.approx(math.sqrt(5 / 3))


def test_text_metrics_identity_and_disjoint():
    same = M.text_metrics(["the movie was great fun"], ["the movie was great fun"])
    assert same["bleu4"] == pytest.approx(100.0) and same["rougeL"] == pytest.approx(100.0)
    none = M.text_metrics(["the movie was great fun"], ["zzz qqq"])
    assert none["rouge1"] == 0.0 and none["bleu4"] < 1.0


def test_bleu_from_sentence_stats_equals_corpus_bleu():
    import sacrebleu

    refs = ["the movie was great fun", "a dull slow film", "loved the cast and the music"]
    hyps = ["the movie was fun", "a slow film", "loved the music"]
    want = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert M.bleu_from_stats(M.bleu_stats(refs, hyps).sum(0)) == pytest.approx(want)
    assert M.text_metrics(refs, hyps)["bleu4"] == pytest.approx(want)
