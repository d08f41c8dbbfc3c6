"""Recommendation and generation metrics (docs/method.md, the task table).

Ranking ties are broken pessimistically (a candidate tied with the true item counts as
ranked above it), so a scorer that gives every candidate the same score gets no credit.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import numpy as np


def auc(labels: Sequence[float], scores: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN if one class only."""
    y = np.asarray(labels, dtype=np.float64) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over tied runs
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def uauc(users: Sequence[int], labels: Sequence[float], scores: Sequence[float]) -> tuple[float, int]:
    """Mean per-user AUC over users that have both classes; returns (UAUC, number of such users)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, u in enumerate(users):
        groups[int(u)].append(i)
    lab, sc = np.asarray(labels), np.asarray(scores)
    values = [auc(lab[idx], sc[idx]) for idx in groups.values()]
    values = [v for v in values if not math.isnan(v)]
    return (float(np.mean(values)) if values else float("nan")), len(values)


def rank_of_true(scores: Sequence[float], true_index: int) -> int:
    """0-based rank of the true candidate; ties count against it."""
    s = np.asarray(scores, dtype=np.float64)
    t = s[true_index]
    if math.isnan(t):
        return len(s) - 1
    others = np.delete(s, true_index)
    return int((others >= t).sum())


def hit_ndcg(ranks: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """HR@k and NDCG@k (one relevant item per list) from 0-based ranks."""
    r = np.asarray(ranks, dtype=np.int64)
    out = {}
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = float(hit.mean()) if len(r) else float("nan")
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0).mean()) if len(r) else float("nan")
    return out


def rmse_mae(truth: Sequence[float], pred: Sequence[float]) -> dict[str, float]:
    """Root mean squared error and mean absolute error."""
    t, p = np.asarray(truth, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    if len(t) == 0:
        return {"rmse": float("nan"), "mae": float("nan")}
    d = p - t
    return {"rmse": float(np.sqrt((d ** 2).mean())), "mae": float(np.abs(d).mean())}


def text_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 (sacrebleu, 0-100) and mean ROUGE-1/2/L F1 (rouge-score, 0-100); offline."""
    if not references:
        return {"bleu4": float("nan"), "rouge1": float("nan"), "rouge2": float("nan"), "rougeL": float("nan")}
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    sums = defaultdict(float)
    for ref, hyp in zip(references, hypotheses):
        for k, v in scorer.score(ref, hyp).items():
            sums[k] += v.fmeasure
    n = len(references)
    return {"bleu4": float(bleu), **{k: 100.0 * v / n for k, v in sums.items()}}
