"""Configuration of evaluation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    """Which test users are scored and how."""

    users_per_task: int = 0        # > 0: a seeded sample of test users per task
    batch_size: int = 8
    max_new_tokens: int = 32       # review/explanation generation
    output: str = "runs/eval"
