"""Drawing the samples of the protocol: tasks, candidate lists and the columnar sample table.

Every draw comes from a ``numpy`` generator seeded by (seed, stream, user)
(:func:`seeded_rng`), so the samples of a user do not depend on which other users are drawn
with it, nor in which order: users can be cut into ranges and drawn on different machines
(:func:`ckf_dist.data.ray_stages.samples_on_ray`) with the result of one pass.

- validation / test: each target gets one task (``data.task_weights``; review only where
  the target has text) and a candidate list (the true item at a uniform random position among
  negatives never in the user's log, uniform or in proportion to training popularity);
- training: each training interaction of a warm user with at least one earlier item gets one
  task, and a candidate list when the task is sequential.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np

from ckf_dist.contract import SPLITS, TASKS

TASK_CODE = {t: k for k, t in enumerate(TASKS)}
STREAMS = {"cold": 1, "valid": 2, "test": 3, "task-valid": 4, "task-test": 5, "train": 6, "users": 7}


def seeded_rng(seed: int, stream: str, user: int | None = None) -> np.random.Generator:
    """The generator of one (seed, stream[, user]) draw (see :data:`STREAMS`)."""
    return np.random.default_rng([seed, STREAMS[stream]] if user is None else [seed, STREAMS[stream], user])


class SampleTable:
    """Every sample to build, in columnar form (the prompt rows are built from it chunk by chunk).

    Per sample: split and task codes (indices into SPLITS and TASKS), user, the target's
    position in the user's sequence and, for sequential samples, its slice of the flat
    candidate array. Appended in protocol order (valid targets, test targets, training).
    """

    def __init__(self) -> None:
        self.split, self.task = array("b"), array("b")
        self.user, self.pos = array("i"), array("i")
        self.cand_start, self.cand_len = array("q"), array("h")
        self.cands = array("i")

    def add(self, split: int, task: int, user: int, pos: int, cands: list[int] | None) -> None:
        self.split.append(split)
        self.task.append(task)
        self.user.append(user)
        self.pos.append(pos)
        if cands is None:
            self.cand_start.append(-1)
            self.cand_len.append(0)
        else:
            self.cand_start.append(len(self.cands))
            self.cand_len.append(len(cands))
            self.cands.extend(cands)

    def extend(self, other: "SampleTable") -> None:
        """Append ``other``'s samples after ours (its candidate slices move with them)."""
        base = len(self.cands)
        self.split.extend(other.split)
        self.task.extend(other.task)
        self.user.extend(other.user)
        self.pos.extend(other.pos)
        starts = np.frombuffer(other.cand_start, dtype=np.int64) if len(other.cand_start) else np.zeros(0, np.int64)
        self.cand_start.frombytes(np.where(starts >= 0, starts + base, -1).astype(np.int64).tobytes())
        self.cand_len.extend(other.cand_len)
        self.cands.extend(other.cands)

    def __len__(self) -> int:
        return len(self.split)

    def indices(self, split: str) -> np.ndarray:
        """Sample indices of one split, in protocol order."""
        return np.flatnonzero(np.frombuffer(self.split, dtype=np.int8) == SPLITS.index(split))

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {task: n}}`` over all splits and tasks (zeros included)."""
        n = np.bincount(np.frombuffer(self.split, dtype=np.int8).astype(np.int64) * len(TASKS)
                        + np.frombuffer(self.task, dtype=np.int8), minlength=len(SPLITS) * len(TASKS))
        return {s: {t: int(n[a * len(TASKS) + b]) for b, t in enumerate(TASKS)} for a, s in enumerate(SPLITS)}





def sample_negatives(rng: np.random.Generator, n_items: int, exclude: set[int], n: int,
                     cdf: np.ndarray | None = None) -> list[int]:
    """``n`` distinct item ids outside ``exclude`` (fewer if not enough exist).

    Uniform over items, or with ``cdf`` (:func:`popularity_cdf`) in proportion to training
    popularity; when the popular items run out (a user who touched most of them), the rest
    are drawn uniformly.
    """
    n = min(n, n_items - len(exclude))
    out: list[int] = []
    seen = set(exclude)
    rounds = 0
    while len(out) < n:
        size = 2 * (n - len(out)) + 4
        if cdf is not None and rounds < 20:
            draws = np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), n_items - 1)
        else:
            draws = rng.integers(0, n_items, size=size)
        rounds += 1
        for j in draws.tolist():
            if j not in seen:
                seen.add(j)
                out.append(j)
                if len(out) == n:
                    break
    return out


def popularity_cdf(train_items: np.ndarray, n_items: int) -> np.ndarray:
    """Cumulative distribution of items in proportion to their training interactions."""
    counts = np.bincount(train_items, minlength=n_items).astype(np.float64)
    if counts.sum() == 0:
        counts[:] = 1.0
    return np.cumsum(counts) / counts.sum()


def make_candidates(rng: np.random.Generator, target: int, n_items: int, exclude: set[int], k: int,
                    cdf: np.ndarray | None = None) -> list[int]:
    """True item at a uniform random position among ``k - 1`` sampled negatives."""
    cands = sample_negatives(rng, n_items, exclude | {target}, k - 1, cdf)
    cands.insert(int(rng.integers(0, len(cands) + 1)), target)
    return cands


class TaskPicker:
    """Draws a task from ``task_weights`` given one uniform number; review only when text exists."""

    def __init__(self, weights: dict[str, float]):
        def table(with_review: bool):
            names = [t for t in TASKS if weights.get(t, 0.0) > 0 and (t != "review" or with_review)]
            w = np.cumsum([weights[t] for t in names]) if names else np.zeros(0)
            return names, (w / w[-1]).tolist() if names else []
        self.tables = {True: table(True), False: table(False)}

    def __call__(self, uniform: float, has_text: bool) -> str | None:
        names, cum = self.tables[has_text]
        for name, c in zip(names, cum):
            if uniform < c:
                return name
        return names[-1] if names else None



@dataclass(frozen=True)
class SampleContext:
    """What drawing one user's samples needs besides the user's own sequence (see :func:`user_samples`)."""

    seed: int
    n_items: int
    n_candidates: int
    cdf: np.ndarray | None              # popularity negatives: training popularity CDF; None: uniform
    task_weights: dict
    train_samples_per_user: int


def user_samples(ctx: SampleContext, first_user: int, seqs: list[np.ndarray], seq_split: list[np.ndarray],
                 warm: np.ndarray, n_hist: np.ndarray, text_flags: list[np.ndarray] | None) -> dict:
    """The samples of users ``first_user .. first_user + len(seqs) - 1`` (their sequences, split
    labels, warm flags, history lengths and per-interaction has-text flags, or None for a source
    without text): per split a :class:`SampleTable` in protocol order, and for valid/test the
    targets' items, owners and candidate lists. Every draw comes from generators seeded by
    (seed, stream, user), so any cut of the users into ranges gives the same samples."""
    pick = TaskPicker(ctx.task_weights)
    K, n_items, cdf = ctx.n_candidates, ctx.n_items, ctx.cdf
    out: dict = {}
    for code, split in ((1, "valid"), (2, "test")):
        table, items, owners, cand_lists = SampleTable(), [], [], []
        for k, s in enumerate(seqs):
            positions = np.flatnonzero(seq_split[k] == code).tolist()
            if not positions:
                continue
            x = first_user + k
            rng, task_rng = seeded_rng(ctx.seed, split, x), seeded_rng(ctx.seed, "task-" + split, x)
            exclude = set(s.tolist())
            for t in positions:            # one generator per user, drawn in time order
                cands = make_candidates(rng, int(s[t]), n_items, exclude, K, cdf)
                items.append(int(s[t]))
                owners.append(x)
                cand_lists.append(cands)
                task = pick(float(task_rng.random()), text_flags is not None and bool(text_flags[k][t]))
                if task is not None:
                    table.add(code, TASK_CODE[task], x, t, cands if task == "sequential" else None)
        out[split] = {"table": table, "items": np.array(items, dtype=np.int64), "owners": np.array(owners, dtype=np.int64),
                      "candidates": cand_lists}
    train = SampleTable()
    for k in np.flatnonzero(warm).tolist():
        s, x = seqs[k], first_user + k
        rng = seeded_rng(ctx.seed, "train", x)
        end = int(n_hist[k])
        first = 1 if ctx.train_samples_per_user <= 0 else max(1, end - ctx.train_samples_per_user)
        exclude = set(s.tolist())
        uniforms = rng.random(len(s)).tolist()
        for t in range(first, end):
            task = pick(uniforms[t], text_flags is not None and bool(text_flags[k][t]))
            if task is None:
                continue
            cands = make_candidates(rng, int(s[t]), n_items, exclude, K, cdf) if task == "sequential" else None
            train.add(0, TASK_CODE[task], x, t, cands)
    out["train"] = train
    return out


