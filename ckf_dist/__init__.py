"""ckf-dist: distributed training of CKF adapters for LLM-based multi-task recommendation."""

__version__ = "0.1.0"

TASKS = ("ctr", "sequential", "rating", "review")
"""Task keys in task-id order: a sample's ``task_id`` indexes this tuple."""
