"""Configuration of data preparation: source, protocol, prompts and shards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SourceKind = Literal["movielens-embedded", "movielens-100k", "movielens-1m", "amazon2014", "amazon2018", "yelp", "synthetic"]


@dataclass
class DataConfig:
    """Where the log comes from, how it is split, and where the shards go."""

    source: SourceKind = "movielens-embedded"
    path: str = ""                     # raw files (folder or file); unused for movielens-embedded
    meta_path: str = ""                # amazon metadata file (titles) where separate
    output: str = "runs/data/ml-100k"  # fsspec URL of the prepared dataset
    kcore: int = 5
    split: Literal["leave-last-out", "temporal"] = "leave-last-out"   # per-user last items, or global time cuts
    temporal_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])   # train/valid/test (temporal)
    like_threshold: float = 4.0        # ctr label: rating >= threshold is a like
    max_history: int = 10
    n_candidates: int = 10             # sequential: 1 true next item + n-1 sampled negatives
    negatives: Literal["uniform", "popularity"] = "uniform"   # candidates' negatives: uniform or popularity-matched
    cold_max_interactions: int = 5     # users with <= this many training interactions are cold
    cold_user_fraction: float = 0.1    # share of users held out as cold (never in training)
    task_weights: dict[str, float] = field(default_factory=lambda: {"ctr": 1.0, "sequential": 1.0, "rating": 1.0, "review": 1.0})
    train_samples_per_user: int = 0    # 0: every training interaction with enough history
    tokenizer: str = "smollm2"         # "smollm2" (embedded) or a local tokenizer folder
    max_length: int = 512
    max_title_chars: int = 80
    max_review_tokens: int = 32        # review task: the answer (summary, else review text) is cut to this many tokens
    shard_rows: int = 2048
    bad_records: Literal["error", "skip"] = "error"
    synthetic_users: int = 300
    synthetic_items: int = 200
    synthetic_interactions_per_user: int = 30

    def validate(self) -> None:
        if self.kcore < 1:
            raise ValueError(f"kcore: must be >= 1, got {self.kcore}")
        if not 1 <= self.max_history <= 512:
            raise ValueError(f"max_history: must be in [1, 512], got {self.max_history}")
        if self.n_candidates < 2:
            raise ValueError(f"n_candidates: must be >= 2 (one true item and negatives), got {self.n_candidates}")
        if not 0.0 <= self.cold_user_fraction < 1.0:
            raise ValueError(f"cold_user_fraction: must be in [0, 1), got {self.cold_user_fraction}")
        if self.split not in ("leave-last-out", "temporal"):
            raise ValueError(f"split: 'leave-last-out' or 'temporal', got {self.split!r}")
        fr = self.temporal_fractions
        if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"temporal_fractions: three positive fractions (train, valid, test) summing to 1, got {fr}")
        if self.negatives not in ("uniform", "popularity"):
            raise ValueError(f"negatives: 'uniform' or 'popularity', got {self.negatives!r}")
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows: must be >= 1, got {self.shard_rows}")
        if self.max_length < 16:
            raise ValueError(f"max_length: must be >= 16, got {self.max_length}")
        if self.max_review_tokens < 1 or self.max_title_chars < 1:
            raise ValueError("max_review_tokens: max_review_tokens and max_title_chars must be >= 1")
        if not 0.0 < self.like_threshold:
            raise ValueError(f"like_threshold: must be > 0, got {self.like_threshold}")
        if self.cold_max_interactions < 0:
            raise ValueError(f"cold_max_interactions: must be >= 0, got {self.cold_max_interactions}")
        if self.source == "synthetic" and min(self.synthetic_users, self.synthetic_items, self.synthetic_interactions_per_user) < 3:
            raise ValueError("synthetic_users: synthetic users, items and interactions per user must be >= 3")
        if self.source == "synthetic" and self.synthetic_interactions_per_user > self.synthetic_items:
            raise ValueError("synthetic_interactions_per_user: must be <= synthetic_items")
        bad = set(self.task_weights) - {"ctr", "sequential", "rating", "review"}
        if bad:
            raise ValueError(f"task_weights: unknown task(s) {sorted(bad)}; tasks are ctr, sequential, rating, review")
        if any(w < 0 for w in self.task_weights.values()):
            raise ValueError("task_weights: weights must be >= 0")
        if not any(w > 0 for w in self.task_weights.values()):
            raise ValueError("task_weights: at least one task needs a weight > 0")
        if self.source not in ("movielens-embedded", "synthetic") and not self.path:
            raise ValueError(f"path: source {self.source!r} needs data.path (the raw files)")
