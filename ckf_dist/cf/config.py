"""Configuration of the collaborative-filtering stage (frozen CF embeddings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class CFConfig:
    """MF or LightGCN trained on the training split, then frozen.

    ``loss: bpr`` learns from which items a user interacted with (implicit feedback: pairwise
    ranking against sampled negatives). ``loss: rating`` (MF only) fits the ratings themselves with
    a biased MF by ALS (:mod:`ckf_dist.cf.rating`), the ridge penalty chosen on the validation
    targets' RMSE; its tables are ``[p, b_u, 1]`` and ``[q, 1, b_i]`` (``dim + 2`` wide), so that
    ``u . v`` is the predicted rating minus the global mean.
    """

    model: Literal["mf", "lightgcn"] = "mf"
    loss: Literal["bpr", "rating"] = "bpr"
    dim: int = 8
    epochs: int = 100
    batch_size: int = 1024
    lr: float = 1e-2
    # "adam": every row of both tables moves at every step (its moments decay), so a step costs
    # O(users + items) and an epoch O(interactions x users): 45 s per epoch at 6M interactions /
    # 200k users on 2 cores. "sparse-adam" (MF only): only the batch's rows and their moments
    # move (lazy Adam), an epoch is linear in the interactions. Not bit-compatible with "adam".
    optimizer: Literal["adam", "sparse-adam"] = "adam"
    weight_decay: float = 1e-4
    lightgcn_layers: int = 2
    patience: int = 10        # early stopping on validation AUC
    eval_every: int = 1
    eval_negatives: int = 100  # sampled negatives per user for the AUC metrics
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])   # HR@k / NDCG@k over the sequential candidates
    rating_regs: list[float] = field(default_factory=lambda: [2.0, 5.0, 10.0, 20.0])   # loss rating: ridge penalties tried
    als_iters: int = 12       # loss rating: ALS sweeps (users, then items) per fit

    def table_dim(self) -> int:
        """Width of the CF tables the bridge reads (``dim``, plus a bias and a constant column for ``loss: rating``)."""
        return self.dim + (2 if self.loss == "rating" else 0)

    def validate(self) -> None:
        if not 1 <= self.dim <= 1024:
            raise ValueError(f"dim: must be in [1, 1024], got {self.dim}")
        if self.epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.patience < 1 or self.eval_every < 1:
            raise ValueError("patience: patience and eval_every must be >= 1")
        if self.eval_negatives < 1:
            raise ValueError(f"eval_negatives: must be >= 1, got {self.eval_negatives}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks: must be a non-empty list of positive cut-offs, got {self.ks}")
        if self.optimizer not in ("adam", "sparse-adam"):
            raise ValueError(f"optimizer: 'adam' or 'sparse-adam', got {self.optimizer!r}")
        if self.optimizer == "sparse-adam" and self.model != "mf":
            raise ValueError("optimizer: 'sparse-adam' needs model 'mf' (LightGCN propagates over the whole graph "
                             "every step, so every row has a gradient)")
        if self.loss not in ("bpr", "rating"):
            raise ValueError(f"loss: 'bpr' or 'rating', got {self.loss!r}")
        if self.loss == "rating" and self.model != "mf":
            raise ValueError("loss: 'rating' needs model 'mf' (the rating model is a biased MF fitted by ALS)")
        if self.loss == "rating" and (not self.rating_regs or min(self.rating_regs) <= 0):
            raise ValueError(f"rating_regs: must be a non-empty list of positive penalties, got {self.rating_regs}")
        if self.als_iters < 1:
            raise ValueError(f"als_iters: must be >= 1, got {self.als_iters}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
