"""Retrieval metrics of the CF stage at prepare time (early stopping, ``cf/metrics.json``).

These are *not* the evaluation table's baselines (``ckf evaluate`` scores every method on the
same test rows, :mod:`ckf_dist.eval.baselines`); they measure the CF model on its own terms,
per warm/cold users, with the definitions of :mod:`ckf_dist.metrics`.

For each evaluated user the positive is the split's target item:
- AUC: against ``n`` sampled negatives (never in the user's log);
- HR@k / NDCG@k: over the user's candidate set (the same seeded candidates the sequential
  task uses: 1 true item + K-1 negatives).
Ties: expected value over a random tie-break (:mod:`ckf_dist.metrics`).
"""

from __future__ import annotations

import numpy as np

from ckf_dist.data.protocol import Protocol
from ckf_dist.data.samples import sample_negatives
from ckf_dist.metrics import expected_ranking, rank_counts


def auc_items(proto: Protocol, split: str, n_neg: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items [n_targets, 1 + n] (column 0 = target, -1 = padding) and their validity mask."""
    targets, owners = proto.targets[split], proto.target_users[split]
    items = np.full((len(targets), 1 + n_neg), -1, dtype=np.int64)
    items[:, 0] = targets
    for x, user in enumerate(owners.tolist()):
        rng = np.random.default_rng([seed, 11 if split == "valid" else 12, x])
        neg = sample_negatives(rng, proto.n_items, set(proto.seqs[user].tolist()), n_neg)
        items[x, 1:1 + len(neg)] = neg
    return items, items >= 0


def candidate_items(proto: Protocol, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate matrix [n_targets, K] (-1 padded), validity mask, and the target's column."""
    cands = proto.candidates[split]
    width = max((len(c) for c in cands), default=1)
    items = np.full((len(cands), width), -1, dtype=np.int64)
    for x, c in enumerate(cands):
        items[x, : len(c)] = c
    pos = (items == proto.targets[split][:, None]).argmax(axis=1)
    return items, items >= 0, pos


def per_user_auc(scores: np.ndarray, valid: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Per-user retrieval AUC of the target against the other valid columns (ties count half)."""
    g, e = rank_counts(scores, valid, pos)
    n = valid.sum(1) - 1
    return (n - g - 0.5 * e) / np.maximum(n, 1)


def per_user_hr_ndcg(scores: np.ndarray, valid: np.ndarray, pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected HR@k and NDCG@k per user (the tie rule of :mod:`ckf_dist.metrics`)."""
    m = expected_ranking(*rank_counts(scores, valid, pos), [k])
    return m[f"hr@{k}"], m[f"ndcg@{k}"]


def evaluate_scores(score_fn, proto: Protocol, split: str, auc_set, ks: list[int]) -> dict:
    """Metrics of ``score_fn(users [n], items [n, c]) -> scores`` over the split's targets, all/warm/cold users."""
    users = proto.target_users[split]
    a_items, a_valid = auc_set
    auc = per_user_auc(score_fn(users, np.maximum(a_items, 0)), a_valid, np.zeros(len(users), dtype=np.int64))
    c_items, c_valid, c_pos = candidate_items(proto, split)
    c_scores = score_fn(users, np.maximum(c_items, 0))
    per = {"auc": auc}
    for k in ks:
        hr, ndcg = per_user_hr_ndcg(c_scores, c_valid, c_pos, k)
        if k < c_items.shape[1]:          # HR@K over K candidates is always 1
            per[f"hr@{k}"] = hr
        if k > 1:                         # NDCG@1 equals HR@1
            per[f"ndcg@{k}"] = ndcg
    out = {}
    warm = proto.warm[users]
    for group, mask in (("all", np.ones(len(users), bool)), ("warm", warm), ("cold", ~warm)):
        if mask.any():
            out[group] = {name: round(float(v[mask].mean()), 4) for name, v in per.items()} | {"users": int(len(np.unique(users[mask])))}
    return out


def popularity_scores(proto: Protocol):
    """A scorer ranking items by their number of training interactions."""
    pop = np.bincount(proto.train_pairs[:, 1], minlength=proto.n_items).astype(np.float64)
    return lambda users, items: pop[items]
