"""Baselines scored on exactly the evaluation's test rows, and the training counts of the cold groups.

Everything here is computed from the prepared dataset alone: its frozen CF tables and its split
log (``cf/interactions.parquet``: every interaction with split 0 = known history, 1 = valid
target, 2 = test target). "Training" means the history part of warm users (what the CF model
and the LLM were trained on); users held out of training ("unseen") still have a known
history, which a deployed system would use at test time and which the baselines use too.

- ctr: the CF model's score ``u . v``, the item's training popularity and the biased MF rating
  regressor's predicted rating (below) of each row's (user, item) pair; AUC over the like
  labels, exactly as the LLM's P(Yes). The rating regressor is the CTR baseline a plain
  recommender would deploy: it is trained on the ratings the like labels are cut from.
- sequential: the same candidate lists ranked by ``u . v`` and by popularity.
- rating: global mean, user mean (over the user's known history), item mean (training; the
  global mean for an item never rated) and a biased matrix-factorisation regressor (ALS,
  :func:`fit_rating_mf`), each row's (user, item) pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ckf_dist.cf.rating import BiasedMF

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


def fit_rating_mf(log: SplitLog, dim: int = 8, reg: float = 5.0, seed: int = 0) -> BiasedMF:
    """The biased MF rating regressor (:class:`ckf_dist.cf.rating.BiasedMF`, ALS) fitted on the
    training interactions; then the vector and bias of each user held out of training are folded
    in by one ridge solve on its known history with the item side frozen (as the CF stage folds in
    its user vectors)."""
    m = log.training
    mf = BiasedMF(dim=dim, reg=reg, seed=seed).fit(log.user[m], log.item[m], log.rating[m], log.n_users, log.n_items)
    held = log.history & ~log.warm[log.user]
    if held.any():
        mf.fold_in(log.user[held], log.item[held], log.rating[held])
    return mf


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
    rating_mf: BiasedMF
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
                   fit_rating_mf(log, seed=seed), scale)

    def cf_scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``u . v`` for pairs (``items`` [n]) or candidate lists (``items`` [n, C])."""
        u = self.cf_user[users]
        v = self.cf_item[items]
        return (u * v).sum(-1) if v.ndim == 2 else np.einsum("nd,ncd->nc", u, v)

    def ctr(self, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        return {self.cf_name: self.cf_scores(users, items), "popularity": self.popularity[items],
                "rating_mf": self.rating_mf.predict(users, items)}

    def sequential(self, users: np.ndarray, cands: np.ndarray) -> dict[str, np.ndarray]:
        safe = np.maximum(cands, 0)
        return {self.cf_name: self.cf_scores(users, safe), "popularity": self.popularity[safe]}

    def rating(self, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        return {"global_mean": np.full(len(users), self.global_mean), "user_mean": self.user_mean[users],
                "item_mean": self.item_mean[items], "rating_mf": np.clip(self.rating_mf.predict(users, items), *self.rating_range)}
