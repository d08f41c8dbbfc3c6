"""Configuration of the collaborative-filtering stage (frozen CF embeddings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class CFConfig:
    """MF (BPR) or LightGCN trained on the training split, then frozen."""

    model: Literal["mf", "lightgcn"] = "mf"
    dim: int = 8
    epochs: int = 100
    batch_size: int = 1024
    lr: float = 1e-2
    weight_decay: float = 1e-4
    lightgcn_layers: int = 2
    patience: int = 10        # early stopping on validation AUC
    eval_every: int = 1

    def validate(self) -> None:
        if not 1 <= self.dim <= 1024:
            raise ValueError(f"dim: must be in [1, 1024], got {self.dim}")
        if self.epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
