"""ckf_dist.checkpoint"""
