"""Biased matrix factorisation for explicit ratings, fitted by alternating ridge regressions (ALS).

``r(u, i) = mu + b_u + b_i + p_u . q_i``. Each half-step solves, for every user (then every
item), the ridge regression of ``[p, b]`` on the other side's features ``[q, 1]`` against
``r - mu - b_other``, with the penalty ``reg * I`` on both the vector and the bias. The normal
equations of a block of ids are summed by ``np.bincount`` and solved at once, so a half-step
costs O(rows x d^2) in numpy, not a Python loop per id.

Used twice: as the CF stage's model when ``cf.loss: rating`` (its tables, augmented so that
``u . v = r - mu``, feed the bridge) and as the evaluation's rating and CTR baseline.
"""

from __future__ import annotations

import numpy as np

KEYS_PER_BLOCK = 65536      # ids whose normal equations are held and solved at once (memory: ids x d^2)


def ridge_by_key(keys: np.ndarray, feats: np.ndarray, target: np.ndarray, n_keys: int, reg: float,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Per id ``k``: ``argmin_w sum_{rows of k} (feats . w - target)^2 + reg |w|^2``.

    Returns ``[n_keys, feats.shape[1]]``; ids without a row keep ``out``'s row (zeros when no
    ``out`` is given). Each entry of the ids' normal equations is one ``np.bincount`` over the
    rows of a block of ids (``d (d + 1) / 2`` of them for the Gram matrices), and the block's
    systems are solved at once: memory is bounded by ``KEYS_PER_BLOCK`` ids and the rows, whatever
    the number of rows of one id.
    """
    d = feats.shape[1]
    out = np.zeros((n_keys, d)) if out is None else out
    if not len(keys):
        return out
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    upper = np.triu_indices(d)
    penalty = reg * np.eye(d)
    for lo in range(0, int(k[-1]) + 1, KEYS_PER_BLOCK):
        a, b = np.searchsorted(k, [lo, lo + KEYS_PER_BLOCK])
        if a == b:
            continue
        rows, local = order[a:b], k[a:b] - lo
        x, y = feats[rows], target[rows]
        n = min(KEYS_PER_BLOCK, n_keys - lo)
        gram = np.empty((n, d, d))
        for i, j in zip(*upper):
            gram[:, i, j] = gram[:, j, i] = np.bincount(local, x[:, i] * x[:, j], minlength=n)
        rhs = np.stack([np.bincount(local, x[:, i] * y, minlength=n) for i in range(d)], axis=1)
        has = np.bincount(local, minlength=n) > 0
        out[lo:lo + n][has] = np.linalg.solve(gram[has] + penalty, rhs[has][..., None])[..., 0]
    return out


class BiasedMF:
    """``r(u, i) = mu + b_u + b_i + p_u . q_i`` by ALS; deterministic given the seed."""

    def __init__(self, dim: int = 8, reg: float = 5.0, iters: int = 12, seed: int = 0):
        self.dim, self.reg, self.iters, self.seed = dim, reg, iters, seed

    def fit(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, n_users: int, n_items: int) -> "BiasedMF":
        """Fit on training interactions; users and items without one keep a zero vector and bias."""
        users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
        r = np.asarray(ratings, dtype=np.float64)
        rng = np.random.default_rng([self.seed, 57])
        self.mu = float(r.mean()) if len(r) else 3.0
        self.P = rng.normal(0, 0.1, (n_users, self.dim))
        self.Q = rng.normal(0, 0.1, (n_items, self.dim))
        self.P[np.bincount(users, minlength=n_users) == 0] = 0.0
        self.Q[np.bincount(items, minlength=n_items) == 0] = 0.0
        self.bu, self.bi = np.zeros(n_users), np.zeros(n_items)
        centred = r - self.mu
        for _ in range(self.iters):
            self._half(users, items, centred, self.Q, self.bi, self.P, self.bu)
            self._half(items, users, centred, self.P, self.bu, self.Q, self.bi)
        return self

    def fold_in(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> None:
        """Refit the vector and bias of ``users`` on these ratings, the item side frozen (one ridge solve)."""
        users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
        self._half(users, items, np.asarray(ratings, dtype=np.float64) - self.mu, self.Q, self.bi, self.P, self.bu)

    def _half(self, keys, other, centred, other_f, other_b, out_f, out_b) -> None:
        feats = np.concatenate([other_f[other], np.ones((len(other), 1))], axis=1)
        w = ridge_by_key(keys, feats, centred - other_b[other], len(out_f), self.reg,
                         np.concatenate([out_f, out_b[:, None]], axis=1))
        out_f[:], out_b[:] = w[:, :-1], w[:, -1]

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.mu + self.bu[users] + self.bi[items] + (self.P[users] * self.Q[items]).sum(-1)

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``user [n_users, d + 2]`` = ``[p, b_u, 1]`` and ``item [n_items, d + 2]`` = ``[q, 1, b_i]``:
        their dot product is ``predict - mu``, so everything that scores by ``u . v`` ranks by the rating."""
        ones_u, ones_i = np.ones((len(self.P), 1)), np.ones((len(self.Q), 1))
        user = np.concatenate([self.P, self.bu[:, None], ones_u], axis=1)
        item = np.concatenate([self.Q, ones_i, self.bi[:, None]], axis=1)
        return user.astype(np.float32), item.astype(np.float32)
