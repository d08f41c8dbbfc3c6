"""Configuration of data preparation: source, protocol, prompts and shards."""

from __future__ import annotations

import datetime as dt
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
    time_window: list[str | float] = field(default_factory=list)   # [start, end): UTC dates/times or Unix seconds; "" = open
    sample_users: int = 0              # > 0: keep this many users (seeded draw) before k-core; 0 = all
    kcore: int = 5
    split: Literal["leave-last-out", "temporal"] = "leave-last-out"   # per-user last items, or global time cuts
    temporal_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])   # train/valid/test (temporal)
    like_threshold: float = 4.0        # ctr label: rating >= threshold is a like
    max_history: int = 10
    n_candidates: int = 10             # sequential: 1 true next item + n-1 sampled negatives
    negatives: Literal["uniform", "popularity"] = "uniform"   # candidates' negatives: uniform or popularity-matched
    sequential_answer: Literal["title", "letter"] = "title"   # the answer: the item's title (paper) or its option letter
    cold_max_interactions: int = 5     # users with <= this many training interactions are cold
    cold_user_fraction: float = 0.1    # share of users held out as cold (never in training)
    task_weights: dict[str, float] = field(default_factory=lambda: {"ctr": 1.0, "sequential": 1.0, "rating": 1.0, "review": 1.0})
    train_samples_per_user: int = 0    # 0: every training interaction with enough history
    tokenizer: str = "smollm2"         # "smollm2" (embedded) or a local tokenizer folder
    max_length: int = 512
    max_title_chars: int = 80
    max_review_tokens: int = 32        # review task: the answer (summary, else review text) is cut to this many tokens
    shard_rows: int = 2048
    engine: Literal["local", "ray"] = "local"    # ray: parsing, k-core, samples, prompt rows and shards on Ray
    ray_workers: int = 2               # engine ray: row-building actors (1 CPU each)
    ray_address: str = ""              # engine ray: cluster to join ("" starts a local one)
    bad_records: Literal["error", "skip"] = "error"
    synthetic_users: int = 300
    synthetic_items: int = 200
    synthetic_interactions_per_user: int = 30

    def window_seconds(self) -> tuple[float | None, float | None]:
        """``time_window`` as Unix seconds (None for an open end)."""
        if not self.time_window:
            return None, None
        if len(self.time_window) != 2:
            raise ValueError(f"time_window: [start, end] (either may be \"\"), got {self.time_window}")
        return tuple(_when(v, f"time_window[{k}]") for k, v in enumerate(self.time_window))

    def validate(self) -> None:
        start, end = self.window_seconds()
        if start is not None and end is not None and not start < end:
            raise ValueError(f"time_window: start must be before end, got {self.time_window}")
        if self.sample_users < 0:
            raise ValueError(f"sample_users: must be >= 0 (0 keeps every user), got {self.sample_users}")
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
        if self.sequential_answer not in ("title", "letter"):
            raise ValueError(f"sequential_answer: 'title' or 'letter', got {self.sequential_answer!r}")
        if self.sequential_answer == "letter" and self.n_candidates > 26:
            raise ValueError(f"n_candidates: at most 26 with sequential_answer: letter (options A-Z), got {self.n_candidates}")
        if self.negatives not in ("uniform", "popularity"):
            raise ValueError(f"negatives: 'uniform' or 'popularity', got {self.negatives!r}")
        if self.engine not in ("local", "ray"):
            raise ValueError(f"engine: 'local' or 'ray', got {self.engine!r}")
        if self.ray_workers < 1:
            raise ValueError(f"ray_workers: must be >= 1, got {self.ray_workers}")
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


def _when(value, key: str) -> float | None:
    """A window end as Unix seconds: "" (open), a number of seconds, or an ISO date / date-time (UTC unless given)."""
    text = str(value).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{key}: {value!r} is not a date (YYYY-MM-DD[THH:MM[:SS]]), Unix seconds or \"\"") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()
