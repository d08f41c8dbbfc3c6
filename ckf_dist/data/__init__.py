"""ckf_dist.data"""
