"""ckf_dist.train"""
