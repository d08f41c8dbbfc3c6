"""CF stage: metrics are right, MF/LightGCN beat popularity on synthetic data, early stopping, cold fold-in."""

from __future__ import annotations

import numpy as np
import pytest

from ckf_dist.cf import train_cf
from ckf_dist.cf.config import CFConfig
from ckf_dist.cf.metrics import per_user_auc, per_user_hr_ndcg
from ckf_dist.data.config import DataConfig
from ckf_dist.data.protocol import build_protocol
from ckf_dist.data.sources import load_interactions

DATA = DataConfig(source="synthetic", synthetic_users=300, synthetic_items=120, synthetic_interactions_per_user=25,
                  n_candidates=10, cold_user_fraction=0.1)


@pytest.fixture(scope="module")
def proto():
    return build_protocol(load_interactions(DATA, seed=2), DATA, seed=3)


@pytest.fixture(scope="module")
def mf(proto):
    return train_cf(proto, CFConfig(model="mf", epochs=60, patience=8), seed=4)


def test_auc_and_ranking_metrics_by_hand():
    scores = np.array([[3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    valid = np.array([[True, True, True, False], [True, True, True, True]])
    pos = np.array([2, 0])
    # row 0: target 2.0 beats 1.0, loses to 3.0 (5.0 is padding): AUC 1/2; row 1: all tied: 1/2
    assert per_user_auc(scores, valid, pos).tolist() == [0.5, 0.5]
    hr1, ndcg2 = per_user_hr_ndcg(scores, valid, pos, 1)[0], per_user_hr_ndcg(scores, valid, pos, 2)[1]
    assert hr1.tolist() == [0.0, 0.25]                              # a 4-way tie: rank 0 with probability 1/4
    assert ndcg2[0] == pytest.approx(1 / np.log2(3))                # rank 1 -> 1/log2(3)
    assert ndcg2[1] == pytest.approx((1 + 1 / np.log2(3)) / 4)


def test_constant_scorer_is_exactly_chance():
    rng = np.random.default_rng(0)
    scores = np.zeros((50, 10))
    valid = np.ones((50, 10), bool)
    pos = rng.integers(0, 10, 50)
    assert per_user_auc(scores, valid, pos).mean() == pytest.approx(0.5)
    assert per_user_hr_ndcg(scores, valid, pos, 1)[0].mean() == pytest.approx(0.1)
    perfect = np.where(np.arange(10)[None, :] == pos[:, None], 1.0, 0.0)
    assert per_user_auc(perfect, valid, pos).mean() == 1.0 and per_user_hr_ndcg(perfect, valid, pos, 1)[0].mean() == 1.0


def test_mf_beats_popularity_on_synthetic(mf):
    for split in ("valid", "test"):
        cf, pop = mf.metrics[split]["cf"]["all"], mf.metrics[split]["popularity"]["all"]
        assert cf["auc"] > pop["auc"] + 0.05, (split, cf, pop)
        assert cf["hr@1"] > pop["hr@1"] + 0.05 and cf["ndcg@5"] > pop["ndcg@5"]
        assert mf.metrics[split]["cf"]["warm"]["auc"] > mf.metrics[split]["popularity"]["warm"]["auc"]


def test_cold_users_get_useful_fold_in_embeddings(mf, proto):
    cold = mf.metrics["test"]["cf"]["cold"]
    assert cold["users"] == int((~proto.warm).sum()) > 0
    assert cold["auc"] > 0.65, cold                      # fitted only on pre-validation items, never on targets
    assert np.isfinite(mf.user).all() and mf.user.shape == (proto.n_users, 8) and mf.item.shape == (proto.n_items, 8)
    assert mf.user.dtype == np.float32 and "fold-in" in mf.metrics["cold_user_embedding"]


def test_early_stopping_restores_the_best_epoch(mf):
    m = mf.metrics
    assert 1 <= m["best_epoch"] <= m["epochs_run"] <= 60
    assert m["valid"]["cf"]["warm"]["auc"] == pytest.approx(m["best_valid_auc_warm"], abs=1e-4)


def test_lightgcn_beats_popularity(proto):
    res = train_cf(proto, CFConfig(model="lightgcn", epochs=40, patience=6, lightgcn_layers=2), seed=4)
    cf, pop = res.metrics["test"]["cf"]["all"], res.metrics["test"]["popularity"]["all"]
    assert cf["auc"] > pop["auc"] + 0.05, (cf, pop)
    assert res.metrics["model"] == "lightgcn"


def test_cf_is_seeded(proto):
    cfg = CFConfig(epochs=3, patience=3)
    a, b = train_cf(proto, cfg, seed=9), train_cf(proto, cfg, seed=9)
    assert np.array_equal(a.user, b.user) and np.array_equal(a.item, b.item)
    assert not np.array_equal(a.item, train_cf(proto, cfg, seed=10).item)


def test_scorer_in_blocks_equals_one_einsum(monkeypatch):
    """The CF scorer gathers item vectors a block of users at a time, with the same values."""
    from ckf_dist.cf import train as cf_train

    rng = np.random.default_rng(0)
    user, item = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(70, 8)).astype(np.float32)
    users, items = rng.integers(0, 50, size=23), rng.integers(0, 70, size=(23, 11))
    whole = np.einsum("nd,ncd->nc", user[users], item[items])
    monkeypatch.setattr(cf_train, "SCORE_ROWS", 4)
    assert np.array_equal(cf_train._scorer(user, item)(users, items), whole)


def test_sparse_adam_learns_like_adam(proto, mf):
    """cf.optimizer: sparse-adam (MF, lazy Adam on sparse row gradients): the same quality as dense
    Adam on the synthetic log; LightGCN (every row has a gradient every step) refuses it."""
    sparse = train_cf(proto, CFConfig(model="mf", epochs=60, patience=8, optimizer="sparse-adam"), seed=4)
    assert sparse.metrics["best_valid_auc_warm"] > mf.metrics["best_valid_auc_warm"] - 0.03
    assert sparse.metrics["test"]["cf"]["all"]["auc"] > sparse.metrics["test"]["popularity"]["all"]["auc"]
    with pytest.raises(ValueError, match="sparse-adam.*needs model 'mf'"):
        CFConfig(model="lightgcn", optimizer="sparse-adam").validate()


def test_ridge_by_key_equals_one_solve_per_id(monkeypatch):
    """The stacked, block-wise normal equations give each id's own ridge solution (blocks of 3 ids
    here, so block edges are crossed); ids without a row keep the given values."""
    from ckf_dist.cf import rating

    rng = np.random.default_rng(1)
    keys = rng.integers(0, 9, size=60)
    keys[keys == 4] = 5                                    # id 4 has no row
    x, y = rng.normal(size=(60, 3)), rng.normal(size=60)
    keep = np.full((9, 3), 7.0)
    monkeypatch.setattr(rating, "KEYS_PER_BLOCK", 3)
    got = rating.ridge_by_key(keys, x, y, 9, 0.5, keep.copy())
    for k in range(9):
        m = keys == k
        want = np.linalg.solve(x[m].T @ x[m] + 0.5 * np.eye(3), x[m].T @ y[m]) if m.any() else keep[k]
        assert got[k] == pytest.approx(want, abs=1e-10), k


def _valid_ratings(proto, users):
    from ckf_dist.cf.train import _split_ratings
    return _split_ratings(proto, 1, users)


def test_rating_loss_tables_score_the_predicted_rating(proto):
    """cf.loss: rating: the tables are d + 2 wide and u . v + mean is the fitted rating; the penalty
    kept is the one with the lowest validation RMSE, which beats the item means', and cold users
    (folded in on their history's ratings) beat the global mean on their validation targets."""
    cfg = CFConfig(loss="rating", dim=4)
    res = train_cf(proto, cfg, seed=4)
    m = res.metrics
    assert res.user.shape == (proto.n_users, 6) and res.item.shape == (proto.n_items, 6) and cfg.table_dim() == 6
    assert res.user.dtype == np.float32 and np.isfinite(res.user).all()
    assert (res.user[:, -1] == 1).all() and (res.item[:, -2] == 1).all()            # [p, b_u, 1] . [q, 1, b_i]
    rmses = m["valid_rmse_warm"]
    assert set(rmses) == {"2", "5", "10", "20"} and rmses[f"{m['reg']:g}"] == min(rmses.values())
    warm_u, warm_i, warm_r = _valid_ratings(proto, np.flatnonzero(proto.warm))
    pred = m["global_mean"] + (res.user[warm_u] * res.item[warm_i]).sum(-1)
    assert np.sqrt(np.mean((pred - warm_r) ** 2)) == pytest.approx(min(rmses.values()), abs=1e-3)
    tr_i, tr_r = proto.train_pairs[:, 1], proto.train_ratings
    item_mean = np.bincount(tr_i, tr_r, proto.n_items) / np.maximum(np.bincount(tr_i, minlength=proto.n_items), 1)
    assert min(rmses.values()) < 0.9 * np.sqrt(np.mean((item_mean[warm_i] - warm_r) ** 2))
    cold_u, cold_i, cold_r = _valid_ratings(proto, np.flatnonzero(~proto.warm))
    assert len(cold_u) > 0
    cold_pred = m["global_mean"] + (res.user[cold_u] * res.item[cold_i]).sum(-1)
    assert np.sqrt(np.mean((cold_pred - cold_r) ** 2)) < np.sqrt(np.mean((m["global_mean"] - cold_r) ** 2))
    assert m["loss"] == "rating" and "test" in m and "cf" in m["test"]


def test_rating_loss_refuses_lightgcn_and_bad_penalties():
    with pytest.raises(ValueError, match="loss: 'rating' needs model 'mf'"):
        CFConfig(model="lightgcn", loss="rating").validate()
    with pytest.raises(ValueError, match="rating_regs"):
        CFConfig(loss="rating", rating_regs=[0.0]).validate()
    with pytest.raises(ValueError, match="loss: 'bpr' or 'rating'"):
        CFConfig(loss="mse").validate()
