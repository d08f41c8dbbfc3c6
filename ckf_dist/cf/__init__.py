"""ckf_dist.cf: the collaborative-filtering stage (MF/LightGCN with BPR, or a biased rating MF), frozen embeddings and retrieval metrics."""

from ckf_dist.cf.train import CFResult, train_cf

__all__ = ["CFResult", "train_cf"]
