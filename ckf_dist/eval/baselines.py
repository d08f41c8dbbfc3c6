"""Baselines scored on exactly the evaluation's test rows, and the training counts of the cold groups.

Everything here is computed from the prepared dataset alone: its frozen CF tables and its split
log (``cf/interactions.parquet``: every interaction with split 0 = known history, 1 = valid
target, 2 = test target). "Training" means the history part of warm users (what the CF model
and the LLM were trained on); users held out of training ("unseen") still have a known
history, which a deployed system would use at test time and which the baselines use too.

- ctr: the CF model's score ``u . v`` and the item's training popularity, of each row's
  (user, item) pair; AUC over the like labels, exactly as the LLM's P(Yes).
- sequential: the same candidate lists ranked by ``u . v`` and by popularity.
- rating: global mean, user mean (over the user's known history), item mean (training; the
  global mean for an item never rated) and a biased matrix-factorisation regressor (ALS,
  :class:`RatingMF`), each row's (user, item) pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLIT_HISTORY, SPLIT_VALID, SPLIT_TEST = 0, 1, 2


@dataclass
class SplitLog:
    """The dataset's split log as arrays, with the warm flags of its users."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    split: np.ndarray
    warm: np.ndarray          # bool [n_users]
    n_users: int
    n_items: int

    @classmethod
    def from_table(cls, table, warm: np.ndarray, n_items: int) -> "SplitLog":
        col = {name: table.column(name).to_numpy() for name in ("user", "item", "rating", "split")}
        return cls(col["user"].astype(np.int64), col["item"].astype(np.int64), col["rating"].astype(np.float64),
                   col["split"].astype(np.int8), np.asarray(warm, dtype=bool), len(warm), n_items)

    @property
    def history(self) -> np.ndarray:
        return self.split == SPLIT_HISTORY

    @property
    def training(self) -> np.ndarray:
        """Interactions the models were trained on: the history of warm users."""
        return self.history & self.warm[self.user]

    def user_history_counts(self) -> np.ndarray:
        return np.bincount(self.user[self.history], minlength=self.n_users)

    def item_training_counts(self) -> np.ndarray:
        return np.bincount(self.item[self.training], minlength=self.n_items)


class RatingMF:
    """Biased matrix factorisation for ratings, fitted by alternating ridge regressions (ALS).

    ``r(u, i) = mu + b_u + b_i + p_u . q_i``; ``fit`` on the training interactions, then the
    vector and bias of each user held out of training are folded in by one ridge solve on
    its known history with the item side frozen (as the CF stage folds in its user vectors).
    Deterministic given the seed.
    """

    def __init__(self, dim: int = 8, reg: float = 5.0, iters: int = 12, seed: int = 0):
        self.dim, self.reg, self.iters, self.seed = dim, reg, iters, seed

    @staticmethod
    def _solve(groups, other_f, other_b, target, reg, out_f, out_b):
        """For every id: ridge fit of [f, b] on features [other_f, 1] against ``target - other_b``."""
        d = other_f.shape[1]
        penalty = reg * np.eye(d + 1)
        for x, (idx, j) in groups.items():
            a = np.concatenate([other_f[j], np.ones((len(j), 1))], axis=1)
            y = target[idx] - other_b[j]
            w = np.linalg.solve(a.T @ a + penalty, a.T @ y)
            out_f[x], out_b[x] = w[:d], w[d]

    def fit(self, log: SplitLog) -> "RatingMF":
        m = log.training
        u, i, r = log.user[m], log.item[m], log.rating[m]
        rng = np.random.default_rng([self.seed, 57])
        self.mu = float(r.mean()) if len(r) else 3.0
        self.P = rng.normal(0, 0.1, (log.n_users, self.dim))
        self.Q = rng.normal(0, 0.1, (log.n_items, self.dim))
        self.bu, self.bi = np.zeros(log.n_users), np.zeros(log.n_items)
        by_user = _groups(u, i)
        by_item = _groups(i, u)
        centred = r - self.mu
        for _ in range(self.iters):
            self._solve(by_user, self.Q, self.bi, centred, self.reg, self.P, self.bu)
            self._solve(by_item, self.P, self.bu, centred, self.reg, self.Q, self.bi)
        held = log.history & ~log.warm[log.user]       # users held out: fold in on their history
        if held.any():
            self._solve(_groups(log.user[held], log.item[held]), self.Q, self.bi,
                        log.rating[held] - self.mu, self.reg, self.P, self.bu)
        return self

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.mu + self.bu[users] + self.bi[items] + (self.P[users] * self.Q[items]).sum(-1)


def _groups(keys: np.ndarray, other: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{key: (positions, other ids)}`` of the rows of each key."""
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    cuts = np.flatnonzero(np.diff(ks)) + 1
    out = {}
    for part in np.split(order, cuts):
        if len(part):
            out[int(keys[part[0]])] = (part, other[part])
    return out


@dataclass
class Baselines:
    """Per-row scorers of the baseline methods, all fitted on the dataset's training side."""

    cf_name: str
    cf_user: np.ndarray
    cf_item: np.ndarray
    popularity: np.ndarray
    global_mean: float
    user_mean: np.ndarray
    item_mean: np.ndarray
    rating_mf: RatingMF
    rating_range: tuple[float, float]

    @classmethod
    def fit(cls, log: SplitLog, cf_user: np.ndarray, cf_item: np.ndarray, cf_name: str, seed: int) -> "Baselines":
        train, hist = log.training, log.history
        glob = float(log.rating[train].mean()) if train.any() else float(log.rating[hist].mean())
        n_hist = np.bincount(log.user[hist], minlength=log.n_users)
        s_hist = np.bincount(log.user[hist], weights=log.rating[hist], minlength=log.n_users)
        n_item = np.bincount(log.item[train], minlength=log.n_items)
        s_item = np.bincount(log.item[train], weights=log.rating[train], minlength=log.n_items)
        with np.errstate(invalid="ignore", divide="ignore"):
            user_mean = np.where(n_hist > 0, s_hist / np.maximum(n_hist, 1), glob)
            item_mean = np.where(n_item > 0, s_item / np.maximum(n_item, 1), glob)
        scale = (float(log.rating.min()), float(log.rating.max())) if len(log.rating) else (1.0, 5.0)
        return cls(cf_name, cf_user, cf_item, n_item.astype(np.float64), glob, user_mean, item_mean,
                   RatingMF(seed=seed).fit(log), scale)

    def cf_scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``u . v`` for pairs (``items`` [n]) or candidate lists (``items`` [n, C])."""
        u = self.cf_user[users]
        v = self.cf_item[items]
        return (u * v).sum(-1) if v.ndim == 2 else np.einsum("nd,ncd->nc", u, v)

    def ctr(self, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        return {self.cf_name: self.cf_scores(users, items), "popularity": self.popularity[items]}

    def sequential(self, users: np.ndarray, cands: np.ndarray) -> dict[str, np.ndarray]:
        safe = np.maximum(cands, 0)
        return {self.cf_name: self.cf_scores(users, safe), "popularity": self.popularity[safe]}

    def rating(self, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        return {"global_mean": np.full(len(users), self.global_mean), "user_mean": self.user_mean[users],
                "item_mean": self.item_mean[items], "rating_mf": np.clip(self.rating_mf.predict(users, items), *self.rating_range)}
