"""The recommendation and generation metrics: one definition for the CF baselines and the LLM.

Every method that ranks or scores is measured here, so no two columns of a table can use two
definitions (docs/evaluation.md).

Tie rule, everywhere: **expected value over a uniformly random tie-break**. A candidate tied
with the true item is as likely to be ranked above it as below, so a constant scorer gets
exactly chance level (AUC 0.5, HR@1 = 1/K, MRR = H_K/K) and never a lucky or unlucky order.
For AUC this is the Mann-Whitney statistic with average ranks (scikit-learn's
``roc_auc_score``); for HR@k, NDCG@k and MRR it is the mean of the metric over the positions
the true item can take inside its tie group.

- :func:`auc` (optionally weighted, for the bootstrap), :func:`per_user_auc` / :func:`uauc`;
- :func:`rank_counts` -> :func:`expected_ranking` (per-row HR@k, NDCG@k, MRR);
- :func:`rmse_mae`; :func:`text_metrics` (sacrebleu BLEU-4, rouge-score ROUGE-1/2/L F1) and
  the per-sentence statistics the bootstrap resamples (:func:`bleu_stats`, :func:`rouge_rows`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import numpy as np


# --------------------------------------------------------------------------- AUC
def _auc_from_sorted(y: np.ndarray, starts: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC per row of the weight matrix ``w`` [B, n] (scores already sorted, tie groups at ``starts``)."""
    pos = np.add.reduceat(w * y, starts, axis=1)
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), (pos * (below + 0.5 * neg)).sum(1) / (n_pos * n_neg), np.nan)


def auc_prepare(labels: Sequence[float], scores: Sequence[float]):
    """Sort once: (order, labels in that order, tie-group starts) for :func:`auc_weighted`."""
    y = np.asarray(labels, dtype=np.float64) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isnan(s), -np.inf, s)            # a NaN score ranks lowest, as a certain negative
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_s[1:] != sorted_s[:-1]])) if len(s) else np.zeros(0, int)
    return order, y[order], starts


def auc_weighted(prepared, weights: np.ndarray) -> np.ndarray:
    """AUC under each row of ``weights`` [B, n] (row multiplicities, e.g. bootstrap counts)."""
    order, y, starts = prepared
    if not len(order):
        return np.full(len(weights), np.nan)
    return _auc_from_sorted(y, starts, np.asarray(weights, dtype=np.float64)[:, order])


def auc(labels: Sequence[float], scores: Sequence[float]) -> float:
    """Area under the ROC curve, ties counting half; NaN when one class is missing."""
    prepared = auc_prepare(labels, scores)
    return float(auc_weighted(prepared, np.ones((1, len(prepared[0]))))[0])


def per_user_auc_values(users: Sequence[int], labels: Sequence[float], scores: Sequence[float]) -> dict[int, float]:
    """AUC of every user that has both classes among its rows."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, u in enumerate(users):
        groups[int(u)].append(i)
    lab, sc = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    out = {}
    for u, idx in groups.items():
        v = auc(lab[idx], sc[idx])
        if not math.isnan(v):
            out[u] = v
    return out


def uauc(users: Sequence[int], labels: Sequence[float], scores: Sequence[float]) -> tuple[float, int]:
    """Mean per-user AUC over users that have both classes; (UAUC, number of such users)."""
    values = per_user_auc_values(users, labels, scores)
    return (float(np.mean(list(values.values()))) if values else float("nan")), len(values)


# --------------------------------------------------------------------------- ranking
def rank_counts(scores: np.ndarray, valid: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``scores`` [n, C]: (candidates strictly above the true one, candidates tied with it).

    ``valid`` masks padding columns, ``pos`` is the true candidate's column. A NaN score counts
    as the lowest possible (a NaN true score is tied with nothing and below everything valid).
    """
    s = np.where(np.isnan(scores), -np.inf, np.asarray(scores, dtype=np.float64))
    target = s[np.arange(len(s)), pos][:, None]
    greater = ((s > target) & valid).sum(1)
    ties = ((s == target) & valid).sum(1) - 1
    return greater.astype(np.int64), np.maximum(ties, 0).astype(np.int64)


def rank_counts_lists(score_lists: Sequence[Sequence[float]], true_index: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rank_counts` for ragged candidate lists."""
    width = max((len(s) for s in score_lists), default=1)
    m = np.full((len(score_lists), width), -np.inf)
    valid = np.zeros_like(m, dtype=bool)
    for r, s in enumerate(score_lists):
        m[r, : len(s)] = np.asarray(s, dtype=np.float64)
        valid[r, : len(s)] = True
    return rank_counts(m, valid, np.asarray(true_index, dtype=np.int64))


def expected_ranking(greater: np.ndarray, ties: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-row HR@k, NDCG@k (one relevant item) and MRR, each the mean over the tie group's positions."""
    g, e = np.asarray(greater, dtype=np.int64), np.asarray(ties, dtype=np.int64)
    width = int((g + e).max()) + 2 if len(g) else 2
    ranks = np.arange(width)
    cum_rr = np.concatenate([[0.0], np.cumsum(1.0 / (ranks + 1.0))])
    out = {}
    for k in ks:
        gain = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
        cum = np.concatenate([[0.0], np.cumsum(gain)])
        out[f"hr@{k}"] = np.clip(k - g, 0, e + 1) / (e + 1)
        out[f"ndcg@{k}"] = (cum[g + e + 1] - cum[g]) / (e + 1)
    out["mrr"] = (cum_rr[g + e + 1] - cum_rr[g]) / (e + 1)
    return out


# --------------------------------------------------------------------------- rating
def rmse_mae(truth: Sequence[float], pred: Sequence[float]) -> dict[str, float]:
    """Root mean squared error and mean absolute error."""
    t, p = np.asarray(truth, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    if len(t) == 0:
        return {"rmse": float("nan"), "mae": float("nan")}
    d = p - t
    return {"rmse": float(np.sqrt((d ** 2).mean())), "mae": float(np.abs(d).mean())}


# --------------------------------------------------------------------------- text
def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU()


def bleu_stats(references: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
    """Per-sentence BLEU sufficient statistics [n, 2 + 2*4] (sacrebleu's; corpus BLEU = f(sum))."""
    bleu = _bleu()
    return np.asarray(bleu._extract_corpus_statistics(list(hypotheses), [list(references)]), dtype=np.float64)


def bleu_from_stats(stats_sum: np.ndarray) -> float:
    """Corpus BLEU-4 (0-100) from summed sentence statistics."""
    return float(_bleu()._compute_score_from_stats([int(round(x)) for x in stats_sum]).score)


def rouge_rows(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-sentence ROUGE-1/2/L F1 (0-100)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rows = [scorer.score(ref, hyp) for ref, hyp in zip(references, hypotheses)]
    return {k: np.array([100.0 * r[k].fmeasure for r in rows]) for k in ("rouge1", "rouge2", "rougeL")}


def text_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 (sacrebleu, 0-100) and mean ROUGE-1/2/L F1 (rouge-score, 0-100); offline."""
    if not references:
        return {"bleu4": float("nan"), "rouge1": float("nan"), "rouge2": float("nan"), "rougeL": float("nan")}
    out = {"bleu4": bleu_from_stats(bleu_stats(references, hypotheses).sum(0))}
    out.update({k: float(v.mean()) for k, v in rouge_rows(references, hypotheses).items()})
    return out
