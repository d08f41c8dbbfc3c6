"""Benchmark: the rating CF model's ALS (``cf.loss: rating``) at log scale, and its stacked solve
against one ``np.linalg.solve`` per id (the naive path).

A synthetic explicit-feedback log (``--users`` x ``--per-user`` ratings from a low-rank model
plus biases and noise, items drawn with a long-tailed popularity) is fitted once with
:class:`ckf_dist.cf.rating.BiasedMF`; wall time, peak RSS growth and the cost per interaction
are printed. Then one user half-step is timed both ways on the same rows (the naive loop on a
sample of users, scaled up), and the ratio printed. Both give the same numbers (the unit test
``test_ridge_by_key_equals_one_solve_per_id`` checks it).

    python bench/cf_rating.py                       # 200k users x 30 = 6M ratings
    python bench/cf_rating.py --users 20000         # 600k
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from ckf_dist.cf.rating import BiasedMF, ridge_by_key


def synthetic(n_users: int, per_user: int, n_items: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    weight = 1.0 / np.arange(1, n_items + 1) ** 0.8              # long-tailed item popularity
    items = rng.choice(n_items, size=n_users * per_user, p=weight / weight.sum()).astype(np.int64)
    users = np.repeat(np.arange(n_users, dtype=np.int64), per_user)
    p, q = rng.normal(0, 0.5, (n_users, dim)), rng.normal(0, 0.5, (n_items, dim))
    rating = 3.5 + rng.normal(0, 0.4, n_users)[users] + rng.normal(0, 0.5, n_items)[items]
    rating += (p[users] * q[items]).sum(-1) + rng.normal(0, 0.5, len(users))
    return users, items, np.clip(np.round(rating), 1, 5)


def naive_half_step(keys, feats, target, reg, sample):
    """One ridge solve per id, for the ids in ``sample`` (the path a per-id loop takes)."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    starts = np.searchsorted(k, sample)
    ends = np.searchsorted(k, sample, side="right")
    d = feats.shape[1]
    out = np.zeros((len(sample), d))
    for j, (a, b) in enumerate(zip(starts, ends)):
        rows = order[a:b]
        x = feats[rows]
        out[j] = np.linalg.solve(x.T @ x + reg * np.eye(d), x.T @ target[rows])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--per-user", type=int, default=30)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--naive-users", type=int, default=5_000, help="users solved one by one for the ratio")
    args = ap.parse_args()

    users, items, rating = synthetic(args.users, args.per_user, args.items, args.dim, 0)
    n = len(users)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    mf = BiasedMF(args.dim, 10.0, args.iters).fit(users, items, rating, args.users, args.items)
    fit = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rmse = float(np.sqrt(np.mean((mf.predict(users, items) - rating) ** 2)))
    print(f"ALS fit: {n:,} ratings, {args.users:,} users, {args.items:,} items, d={args.dim}, {args.iters} sweeps: "
          f"{fit:.1f} s ({fit / n / args.iters * 1e6:.2f} us per rating per sweep), peak RSS +{rss1 - rss0:.2f} GB "
          f"over the log's arrays, training RMSE {rmse:.3f}")

    feats = np.concatenate([mf.Q[items], np.ones((n, 1))], axis=1)
    target = rating - mf.mu - mf.bi[items]
    t0 = time.perf_counter()
    ridge_by_key(users, feats, target, args.users, 10.0)
    stacked = time.perf_counter() - t0
    sample = np.random.default_rng(1).choice(args.users, min(args.naive_users, args.users), replace=False)
    sample.sort()
    t0 = time.perf_counter()
    naive_half_step(users, feats, target, 10.0, sample)
    naive = (time.perf_counter() - t0) * args.users / len(sample)
    print(f"one user half-step: stacked {stacked:.2f} s, one solve per id {naive:.2f} s "
          f"(timed on {len(sample):,} users, scaled): {naive / stacked:.1f}x")


if __name__ == "__main__":
    main()
