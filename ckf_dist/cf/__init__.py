"""ckf_dist.cf"""
