"""Metrics with 95% bootstrap intervals, and paired differences between methods on the same rows.

The resampling unit is the **user**: a replicate draws the group's users with replacement and
takes all of their rows (under leave-last-out a user has one row per task, so this is the
plain row bootstrap; under a temporal split it keeps a user's correlated rows together).
Every method of a task is resampled with the *same* draws, so the interval of a difference
``A - B`` is the paired bootstrap interval; it excludes 0 when both percentiles have one sign.

Intervals are percentile intervals (2.5%, 97.5%) over ``n_boot`` replicates from a generator
seeded by (seed, task, group): the same seed gives the same intervals.
"""

from __future__ import annotations

import zlib
from typing import Callable

import numpy as np

from ckf_dist.metrics import auc_prepare, auc_weighted, bleu_from_stats, per_user_auc_values

CHUNK = 200          # replicates per weight matrix (bounded memory on large test sets)
LOWER_IS_BETTER = {"rmse", "mae", "rmse_greedy", "mae_greedy"}


class Resampler:
    """User-level bootstrap draws for one (task, group): row weights per replicate."""

    def __init__(self, users: np.ndarray, n_boot: int, seed: int, key: str):
        self.users = np.asarray(users, dtype=np.int64)
        self.uniq, self.row_user = np.unique(self.users, return_inverse=True)
        self.n_boot = n_boot
        self.seed = [seed, zlib.crc32(key.encode())]

    def chunks(self):
        """Yield (user counts [b, U], row weights [b, n]) for all replicates, in fixed chunks."""
        rng = np.random.default_rng(self.seed)
        n_u = len(self.uniq)
        done = 0
        while done < self.n_boot:
            b = min(CHUNK, self.n_boot - done)
            draws = rng.integers(0, n_u, size=(b, n_u))
            flat = (draws + n_u * np.arange(b)[:, None]).ravel()
            counts = np.bincount(flat, minlength=b * n_u).reshape(b, n_u).astype(np.float64)
            yield counts, counts[:, self.row_user]
            done += b


def mean_stat(values: np.ndarray) -> Callable:
    v = np.asarray(values, dtype=np.float64)
    return lambda counts, w: (w @ v) / w.sum(1)


def rmse_stat(errors: np.ndarray) -> Callable:
    sq = np.asarray(errors, dtype=np.float64) ** 2
    return lambda counts, w: np.sqrt((w @ sq) / w.sum(1))


def auc_stat(labels: np.ndarray, scores: np.ndarray) -> Callable:
    prepared = auc_prepare(labels, scores)
    return lambda counts, w: auc_weighted(prepared, w)


def uauc_stat(resampler: Resampler, labels: np.ndarray, scores: np.ndarray) -> Callable:
    per = per_user_auc_values(resampler.users, labels, scores)
    vals = np.array([per.get(int(u), np.nan) for u in resampler.uniq])
    ok = ~np.isnan(vals)
    v = np.where(ok, vals, 0.0)

    def stat(counts, w):
        c = counts * ok
        with np.errstate(invalid="ignore", divide="ignore"):
            return (c @ v) / c.sum(1)
    return stat


def bleu_stat(stats: np.ndarray) -> Callable:
    s = np.asarray(stats, dtype=np.float64)
    return lambda counts, w: np.array([bleu_from_stats(row) for row in w @ s])


def replicate(resampler: Resampler, stats: dict[str, dict[str, Callable]]) -> dict[str, dict[str, np.ndarray]]:
    """``{method: {metric: replicates [n_boot]}}`` with one set of draws shared by every statistic."""
    out = {m: {k: [] for k in per} for m, per in stats.items()}
    for counts, w in resampler.chunks():
        for m, per in stats.items():
            for k, fn in per.items():
                out[m][k].append(fn(counts, w))
    return {m: {k: np.concatenate(v) if v else np.zeros(0) for k, v in per.items()} for m, per in out.items()}


def interval(reps: np.ndarray) -> tuple[float, float]:
    r = reps[~np.isnan(reps)]
    if len(r) < max(10, len(reps) // 2):       # the statistic is mostly undefined on resamples
        return float("nan"), float("nan")
    lo, hi = np.percentile(r, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(point: float, reps: np.ndarray) -> dict:
    lo, hi = interval(reps)
    return {"value": float(point), "lo": lo, "hi": hi}


def paired(point_a: float, point_b: float, reps_a: np.ndarray, reps_b: np.ndarray) -> dict:
    """The difference A - B with its paired bootstrap interval and whether it excludes 0."""
    d = summarize(point_a - point_b, reps_a - reps_b)
    d["excludes_zero"] = bool(np.isfinite(d["lo"]) and (d["lo"] > 0 or d["hi"] < 0))
    return d
