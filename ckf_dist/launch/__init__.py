"""ckf_dist.launch"""
