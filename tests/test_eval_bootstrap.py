"""Bootstrap intervals: coverage of a known value, reproducibility from the seed, paired differences."""

import numpy as np
import pytest

from ckf_dist.eval import bootstrap as B


def _mean_interval(values, users, seed, n_boot=400):
    res = B.Resampler(users, n_boot, seed, "t/all")
    reps = B.replicate(res, {"m": {"x": B.mean_stat(values)}})["m"]["x"]
    return B.summarize(float(np.mean(values)), reps)


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(123)
    covered, trials = 0, 200
    for t in range(trials):
        x = rng.binomial(1, 0.3, size=150).astype(float)
        ci = _mean_interval(x, np.arange(150), seed=t)
        covered += ci["lo"] <= 0.3 <= ci["hi"]
    assert 0.89 <= covered / trials <= 0.99, covered / trials


def test_auc_interval_covers_a_known_auc():
    # scores N(1, 1) for positives vs N(0, 1) for negatives: AUC = Phi(1 / sqrt 2) = 0.7602
    rng = np.random.default_rng(5)
    covered = 0
    for t in range(60):
        y = rng.integers(0, 2, 300)
        s = rng.normal(size=300) + y
        res = B.Resampler(np.arange(300), 300, t, "ctr/all")
        reps = B.replicate(res, {"m": {"auc": B.auc_stat(y, s)}})["m"]["auc"]
        lo, hi = B.interval(reps)
        covered += lo <= 0.7602 <= hi
    assert covered >= 52, covered          # ~95% of 60, with room for chance


def test_intervals_are_reproducible_from_the_seed():
    x = np.random.default_rng(0).random(80)
    a, b = _mean_interval(x, np.arange(80), seed=9), _mean_interval(x, np.arange(80), seed=9)
    assert a == b and _mean_interval(x, np.arange(80), seed=10) != a


def test_users_are_resampled_as_clusters():
    """Two rows of one user move together: an all-or-nothing user gives a wider interval than iid rows."""
    x = np.repeat([0.0, 1.0] * 20, 5)                 # 40 users, each with 5 identical rows
    clustered = _mean_interval(x, np.repeat(np.arange(40), 5), seed=1)
    iid = _mean_interval(x, np.arange(200), seed=1)
    assert (clustered["hi"] - clustered["lo"]) > 1.8 * (iid["hi"] - iid["lo"])


def test_paired_difference_detects_a_real_gap_and_not_a_null_one():
    rng = np.random.default_rng(2)
    base = rng.random(200)
    better = base + 0.05 + rng.normal(0, 0.02, 200)
    same = base + rng.normal(0, 0.02, 200)
    res = B.Resampler(np.arange(200), 500, 0, "r/all")
    reps = B.replicate(res, {"a": {"x": B.mean_stat(better)}, "b": {"x": B.mean_stat(base)},
                             "c": {"x": B.mean_stat(same)}})
    gap = B.paired(better.mean(), base.mean(), reps["a"]["x"], reps["b"]["x"])
    null = B.paired(same.mean(), base.mean(), reps["c"]["x"], reps["b"]["x"])
    assert gap["excludes_zero"] and gap["lo"] > 0.04
    assert not null["excludes_zero"]
    # the unpaired intervals of a and b overlap; only the paired one resolves the gap
    assert B.interval(reps["a"]["x"])[0] < B.interval(reps["b"]["x"])[1]
    assert gap["value"] == pytest.approx(better.mean() - base.mean())
