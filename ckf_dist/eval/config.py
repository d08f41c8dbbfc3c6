"""Configuration of evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class EvalConfig:
    """Which test users are scored, how, and how the groups and intervals are formed."""

    users_per_task: int = 0        # 0: every test user of every task; > 0: a seeded sample (smoke runs)
    batch_size: int = 8
    max_new_tokens: int = 32       # review/explanation generation
    candidate_scoring: Literal["sum", "mean"] = "sum"   # sequential: candidate log-prob summed or per token
    lm_prior: bool = True          # sequential: also rank the candidates by the untuned backbone ("lm-prior")
    bootstrap: int = 1000          # bootstrap replicates of every interval (0: point values only)
    cold_user_max: int = 30        # user-cold: <= this many interactions in the user's known history
    cold_item_max: int = 20        # item-cold: the target item has <= this many training interactions
    min_group_rows: int = 20       # a group with fewer rows is reported as too small, not as a number
    output: str = "runs/eval"

    def validate(self) -> None:
        if self.users_per_task < 0:
            raise ValueError(f"users_per_task: must be >= 0 (0 = all), got {self.users_per_task}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size: eval.batch_size and eval.max_new_tokens must be >= 1")
        if self.candidate_scoring not in ("sum", "mean"):
            raise ValueError(f"candidate_scoring: 'sum' or 'mean', got {self.candidate_scoring!r}")
        if self.bootstrap < 0 or 0 < self.bootstrap < 100:
            raise ValueError(f"bootstrap: 0 (no intervals) or >= 100 replicates, got {self.bootstrap}")
        if min(self.cold_user_max, self.cold_item_max, self.min_group_rows) < 0:
            raise ValueError("cold_user_max: eval.cold_user_max, cold_item_max and min_group_rows must be >= 0")
