"""ckf_dist.cf: the collaborative-filtering stage (MF/LightGCN with BPR), frozen embeddings and baselines."""

from ckf_dist.cf.train import CFResult, train_cf

__all__ = ["CFResult", "train_cf"]
