"""ckf_dist.eval"""
