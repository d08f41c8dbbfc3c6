"""CF models in plain torch: matrix factorization and LightGCN, both trained with BPR.

Both expose ``embeddings() -> (users [n_users, d], items [n_items, d])`` such that a
user-item score is the dot product; for LightGCN these are the layer-averaged propagated
embeddings (He et al., 2020, eq. 4: e = mean_{l=0..L} e^(l), e^(l+1) = A_hat e^(l)).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn


class MF(nn.Module):
    """Matrix factorization: score(u, i) = <p_u, q_i>."""

    def __init__(self, n_users: int, n_items: int, dim: int, generator: torch.Generator):
        super().__init__()
        self.user = nn.Parameter(torch.randn(n_users, dim, generator=generator) * 0.1)
        self.item = nn.Parameter(torch.randn(n_items, dim, generator=generator) * 0.1)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user, self.item

    def base(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-0 embeddings of a batch (what the L2 penalty applies to)."""
        return self.user.index_select(0, users), self.item.index_select(0, items)


class LightGCN(nn.Module):
    """LightGCN on the user-item bipartite graph of the training interactions."""

    def __init__(self, n_users: int, n_items: int, dim: int, layers: int, pairs: np.ndarray, generator: torch.Generator):
        super().__init__()
        self.n_users, self.layers = n_users, layers
        self.user = nn.Parameter(torch.randn(n_users, dim, generator=generator) * 0.1)
        self.item = nn.Parameter(torch.randn(n_items, dim, generator=generator) * 0.1)
        self.register_buffer("adj", normalized_adjacency(pairs, n_users, n_items), persistent=False)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        e = torch.cat([self.user, self.item])
        total = e
        for _ in range(self.layers):
            e = SymmetricSpMM.apply(self.adj, e)
            total = total + e
        total = total / (self.layers + 1)
        return total[: self.n_users], total[self.n_users:]

    def base(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user.index_select(0, users), self.item.index_select(0, items)


class SymmetricSpMM(torch.autograd.Function):
    """``adj @ x`` for a symmetric sparse ``adj``: the gradient is ``adj @ grad`` again.

    torch's generic sparse backward builds transposes every step (100x slower on CPU here).
    """

    @staticmethod
    def forward(ctx, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return adj @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, ctx.adj @ grad


def normalized_adjacency(pairs: np.ndarray, n_users: int, n_items: int) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the symmetric bipartite graph, as a sparse CSR tensor."""
    u = torch.as_tensor(pairs[:, 0], dtype=torch.long)
    i = torch.as_tensor(pairs[:, 1], dtype=torch.long) + n_users
    rows, cols = torch.cat([u, i]), torch.cat([i, u])
    n = n_users + n_items
    deg = torch.bincount(rows, minlength=n).float().clamp(min=1)
    vals = deg[rows].rsqrt() * deg[cols].rsqrt()
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n), check_invariants=False).coalesce()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # "sparse CSR support is in beta"
        return coo.to_sparse_csr()


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor | float) -> torch.Tensor:
    """Bayesian personalized ranking: -log sigmoid(s_pos - s_neg), averaged."""
    return -torch.nn.functional.logsigmoid(pos - neg).mean()
