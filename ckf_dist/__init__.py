"""ckf-dist: distributed training of CKF adapters for LLM-based multi-task recommendation."""

__version__ = "0.1.0"

from ckf_dist.contract import TASKS  # noqa: F401  (the task keys; see ckf_dist.contract)
