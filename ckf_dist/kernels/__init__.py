"""ckf_dist.kernels"""
