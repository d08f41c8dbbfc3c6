"""Train the CF stage on the training split, stop early on validation AUC, fold in cold users.

(``loss: rating`` instead fits a biased MF to the ratings by ALS and picks its penalty on the
validation RMSE; see :func:`_train_rating`. The rest of this docstring is about BPR.)

Cold users are never trained on. Their CF user embedding is *folded in*: with the item
table frozen, a user vector is fitted by BPR on the items of the user's log before the
first validation target (its known history, the part a deployed system would already know);
no valid or test target is ever used. This is the standard MF fold-in and keeps the
user and item tables in one scoring space (the mean of item vectors would not be).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ckf_dist.cf.config import CFConfig
from ckf_dist.cf.metrics import auc_items, evaluate_scores, per_user_auc, popularity_scores
from ckf_dist.cf.models import MF, LightGCN, bpr_loss
from ckf_dist.cf.rating import BiasedMF
from ckf_dist.data.protocol import Protocol

FOLD_IN_STEPS = 200


@dataclass
class CFResult:
    """Frozen tables (float32 numpy) and the baseline metrics written beside them."""

    user: np.ndarray
    item: np.ndarray
    metrics: dict


def _negatives(rng: np.random.Generator, users: np.ndarray, n_items: int, known: np.ndarray) -> np.ndarray:
    """One uniform negative per user, resampled (a few rounds) where it hits the user's training items."""
    neg = rng.integers(0, n_items, size=len(users))
    todo = np.arange(len(users))
    for _ in range(10):
        keys = users[todo] * n_items + neg[todo]
        todo = todo[known[np.minimum(np.searchsorted(known, keys), len(known) - 1)] == keys]
        if not len(todo):
            break
        neg[todo] = rng.integers(0, n_items, size=len(todo))
    return neg


SCORE_ROWS = 8192      # users scored at once: the gathered item vectors are rows x candidates x dim


def _scorer(user: np.ndarray, item: np.ndarray):
    """``score(users [n], items [n, c]) -> u . v [n, c]``, gathering the item vectors a block of
    users at a time (all at once: 650 MB for 200k users x 101 candidates at d = 8)."""
    def score(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        out = np.empty(items.shape, dtype=np.result_type(user.dtype, item.dtype))
        for b in range(0, len(users), SCORE_ROWS):
            out[b:b + SCORE_ROWS] = np.einsum("nd,ncd->nc", user[users[b:b + SCORE_ROWS]], item[items[b:b + SCORE_ROWS]])
        return out
    return score


def fold_in(item: torch.Tensor, users: list[list[int]], dim: int, cfg: CFConfig, seed: int) -> np.ndarray:
    """User vectors fitted by BPR against a frozen item table (one row per list of known items)."""
    if not any(users):            # no user with a known item: nothing to fit
        return np.zeros((len(users), dim), dtype=np.float32)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.tensor([x for x, items in enumerate(users) for _ in items])
    pos = torch.tensor([i for items in users for i in items])
    vec = torch.nn.Parameter(torch.randn(len(users), dim, generator=gen) * 0.1)
    opt = torch.optim.Adam([vec], lr=0.05)
    item = item.detach()
    for _ in range(FOLD_IN_STEPS):
        neg = torch.randint(0, item.shape[0], (len(pos),), generator=gen)
        u = vec.index_select(0, rows)
        loss = bpr_loss((u * (item[pos] - item[neg])).sum(-1), 0.0) + cfg.weight_decay * vec.square().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = vec.detach().numpy().astype(np.float32)
    out[[x for x, items in enumerate(users) if not items]] = 0.0     # no known item: no preference
    return out


@contextmanager
def single_thread():
    """Run torch on one thread: CF tensors are tiny, and on a busy CPU extra threads only spin
    (docs/performance.md, "CF stage threads")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def train_cf(proto: Protocol, cfg: CFConfig, seed: int, progress: bool = False) -> CFResult:
    """Fit MF or LightGCN with BPR (or a biased MF on the ratings, ``loss: rating``) on
    ``proto.train_pairs``; return tables and metrics."""
    if cfg.loss == "rating":
        return _train_rating(proto, cfg, seed, progress)
    with single_thread():
        return _train_cf(proto, cfg, seed, progress)


def _split_ratings(proto: Protocol, code: int, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, rating) of the interactions labelled ``code`` (0 history, 1 valid) of ``users``."""
    u, i, r = [], [], []
    for x in users.tolist():
        pos = np.flatnonzero(proto.seq_split[x] == code)
        u.append(np.full(len(pos), x, dtype=np.int64))
        i.append(proto.seqs[x][pos])
        r.append(np.asarray(proto.seq_ratings[x], dtype=np.float64)[pos])
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(u) if u else empty, np.concatenate(i) if i else empty,
            np.concatenate(r) if r else np.zeros(0))


def _train_rating(proto: Protocol, cfg: CFConfig, seed: int, progress: bool) -> CFResult:
    """Biased MF on the training ratings by ALS, one fit per ``rating_regs`` penalty; the fit with
    the lowest RMSE on the warm users' validation targets is kept. Cold users are folded in on the
    ratings of their pre-validation history (one ridge solve, item side frozen)."""
    start = time.perf_counter()
    pairs, ratings = proto.train_pairs, proto.train_ratings.astype(np.float64)
    vu, vi, vr = _split_ratings(proto, 1, np.flatnonzero(proto.warm))
    fits = {}
    for reg in cfg.rating_regs:
        mf = BiasedMF(cfg.dim, reg, cfg.als_iters, seed).fit(pairs[:, 0], pairs[:, 1], ratings, proto.n_users, proto.n_items)
        rmse = float(np.sqrt(np.mean((mf.predict(vu, vi) - vr) ** 2))) if len(vr) else float("nan")
        fits[reg] = (rmse, mf)
        if progress:
            print(f"  cf mf (rating loss) reg {reg:g}  valid RMSE (warm) {rmse:.4f}", flush=True)
    reg = min(fits, key=lambda k: (np.nan_to_num(fits[k][0], nan=np.inf), k))
    mf = fits[reg][1]
    cold = np.flatnonzero(~proto.warm)
    mf.fold_in(*_split_ratings(proto, 0, cold))
    user, item = mf.tables()
    metrics = {
        "model": "mf", "loss": "rating", "dim": cfg.dim, "table_dim": user.shape[1], "global_mean": round(mf.mu, 4),
        "reg": reg, "valid_rmse_warm": {f"{k:g}": round(v[0], 4) for k, v in fits.items()},
        "train_seconds": round(time.perf_counter() - start, 2),
        "cold_user_embedding": "fold-in: ridge fit of the user vector and bias on its pre-validation ratings, item table frozen",
        "negatives": cfg.eval_negatives,
    }
    _retrieval_metrics(metrics, proto, cfg, seed, user, item)
    return CFResult(user, item, metrics)


def _retrieval_metrics(metrics: dict, proto: Protocol, cfg: CFConfig, seed: int, user: np.ndarray, item: np.ndarray,
                       valid_auc_set=None) -> None:
    """Sampled-negative AUC and HR/NDCG over the candidates of ``u . v`` and popularity, valid and test."""
    ks = [k for k in cfg.ks if k <= max((len(c) for c in proto.candidates["valid"]), default=0)]
    for split in ("valid", "test"):
        auc_set = valid_auc_set if split == "valid" and valid_auc_set is not None else \
            auc_items(proto, split, cfg.eval_negatives, seed)
        metrics[split] = {"cf": evaluate_scores(_scorer(user, item), proto, split, auc_set, ks),
                          "popularity": evaluate_scores(popularity_scores(proto), proto, split, auc_set, ks)}


def _train_cf(proto: Protocol, cfg: CFConfig, seed: int, progress: bool) -> CFResult:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 21])
    pairs = proto.train_pairs
    if cfg.model == "mf":
        model = MF(proto.n_users, proto.n_items, cfg.dim, gen)
    else:
        model = LightGCN(proto.n_users, proto.n_items, cfg.dim, cfg.lightgcn_layers, pairs, gen)
    sparse = cfg.optimizer == "sparse-adam"
    opt = (torch.optim.SparseAdam if sparse else torch.optim.Adam)(model.parameters(), lr=cfg.lr)
    known = np.sort(pairs[:, 0] * proto.n_items + pairs[:, 1])
    valid_auc_set = auc_items(proto, "valid", cfg.eval_negatives, seed)
    warm = proto.warm
    best, best_epoch, bad_evals, epoch = -1.0, 0, 0, 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(len(pairs))
        negs = _negatives(rng, pairs[order, 0], proto.n_items, known)
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            u = torch.as_tensor(pairs[idx, 0])
            i = torch.as_tensor(pairs[idx, 1])
            j = torch.as_tensor(negs[b:b + cfg.batch_size])
            U, V = model.embeddings()
            if sparse:      # sparse row gradients: the optimizer touches only the batch's rows
                eu, ei, ej = (torch.nn.functional.embedding(x, t, sparse=True) for x, t in ((u, U), (i, V), (j, V)))
            else:           # index_select: its backward is a plain scatter-add, many times faster on CPU than U[u]'s
                eu, ei, ej = U.index_select(0, u), V.index_select(0, i), V.index_select(0, j)
            loss = bpr_loss((eu * (ei - ej)).sum(-1), 0.0)
            if isinstance(model, LightGCN):     # the L2 penalty applies to the layer-0 embeddings
                eu, ei = model.base(u, i)
                ej = model.item.index_select(0, j)
            loss = loss + cfg.weight_decay * (eu.square().sum() + ei.square().sum() + ej.square().sum()) / (2 * len(idx))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % cfg.eval_every and epoch != cfg.epochs:
            continue
        with torch.no_grad():
            U, V = (t.numpy() for t in model.embeddings())
        items, mask = valid_auc_set
        owners = proto.target_users["valid"]
        auc = float(per_user_auc(_scorer(U, V)(owners, np.maximum(items, 0)), mask,
                                 np.zeros(len(owners), dtype=np.int64))[warm[owners]].mean())
        if progress:
            print(f"  cf {cfg.model} epoch {epoch:3d}  loss {loss.item():.4f}  valid AUC (warm) {auc:.4f}", flush=True)
        if auc > best:
            best, best_epoch, bad_evals = auc, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_evals += 1
            if bad_evals >= cfg.patience:
                break
    model.load_state_dict(best_state)
    with torch.no_grad():
        U_t, V_t = model.embeddings()
    user, item = U_t.detach().numpy().astype(np.float32).copy(), V_t.detach().numpy().astype(np.float32)
    cold = np.flatnonzero(~warm)
    user[cold] = fold_in(V_t, [proto.seqs[x][:proto.n_history(x)].tolist() for x in cold], cfg.dim, cfg, seed)
    metrics = {
        "model": cfg.model, "loss": "bpr", "dim": cfg.dim, "best_epoch": best_epoch, "epochs_run": epoch,
        "best_valid_auc_warm": round(best, 4), "train_seconds": round(time.perf_counter() - start, 2),
        "cold_user_embedding": "fold-in: BPR fit of the user vector on its pre-validation items, item table frozen",
        "negatives": cfg.eval_negatives,
    }
    _retrieval_metrics(metrics, proto, cfg, seed, user, item, valid_auc_set)
    return CFResult(user, item, metrics)
