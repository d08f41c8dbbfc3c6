"""ckf_dist.model"""
