"""The evaluation protocol: k-core, id remapping, leave-last-out split, cold users, samples.

From one normalized log (:class:`~ckf_dist.data.sources.Interactions`):

1. duplicates (user, item) keep their earliest interaction; k-core filtering repeats until
   every user and item has >= k interactions; users with < 3 are dropped (no valid/test);
2. raw ids are remapped to CF ids 0..n-1 (sorted by raw id: no popularity or time pattern);
3. split (``data.split``): ``leave-last-out`` - per user, in chronological order, last =
   test, second last = valid, the rest = history (training); ``temporal`` - two global time
   cuts (``data.temporal_fractions`` of all interactions): before the first = history, between
   = valid, after = test, so a user has any number of targets (and UAUC is defined);
4. cold users: a seeded ``cold_user_fraction`` of all users plus every user with
   <= ``cold_max_interactions`` training interactions; they never appear in training
   (neither in CF training nor in prompt samples), only in valid/test;
5. each valid/test target gets one task (seeded, ``task_weights``; review only where the
   target has text) and a seeded candidate set (true item at a uniform random
   position, negatives never in the user's log, uniform or in proportion to training
   popularity (``data.negatives``));
6. training samples: each training interaction of a warm user with >= 1 earlier item,
   one seeded task each. History = at most ``max_history`` items strictly before the target.

Steps 5 and 6 are :mod:`ckf_dist.data.samples`. All randomness is ``numpy`` generators seeded
by (seed, stream, user): the result does not depend on processing order.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ckf_dist.contract import SPLITS, TASKS
from ckf_dist.data.config import DataConfig
from ckf_dist.data.errors import DataError
from ckf_dist.data.samples import SampleContext, SampleTable, popularity_cdf, seeded_rng, user_samples
from ckf_dist.data.sources.base import Interactions


@dataclass(slots=True)
class Sample:
    """One prompt to build: the target interaction, its history and the task's label."""

    split: str
    task: str
    user: int
    item: int
    history: list[int]
    history_ratings: list[float]
    rating: float
    label: float
    candidates: list[int]
    text: str          # the target's summary (else review text); "" when none
    warm: bool


@dataclass
class Protocol:
    """The split log: id maps, per-user sequences, CF training pairs, eval targets, samples."""

    n_users: int
    n_items: int
    user_raw: list[str]
    item_raw: list[str]
    titles: list[str]
    warm: np.ndarray                    # bool [n_users]
    seqs: list[np.ndarray]              # per user: CF item ids, chronological
    seq_ratings: list[np.ndarray]
    train_pairs: np.ndarray             # int64 [N, 2] (user, item): warm users' training interactions
    train_ratings: np.ndarray           # float32 [N]
    targets: dict[str, np.ndarray]      # split -> item id per target (leave-last-out: one per user)
    candidates: dict[str, list[list[int]]]   # split -> per target candidate list (true item included)
    table: SampleTable = field(default_factory=SampleTable)
    stats: dict = field(default_factory=dict)
    seq_split: list[np.ndarray] = field(default_factory=list)    # per user, per interaction: 0 history, 1 valid, 2 test
    target_users: dict[str, np.ndarray] = field(default_factory=dict)   # split -> user of each target
    texts: pa.Array | None = None       # text of every kept interaction, users' sequences one after another
    user_start: np.ndarray | None = None    # int64 [n_users]: where each user's sequence starts in ``texts``
    max_history: int = 10
    like_threshold: float = 4.0

    def n_history(self, user: int) -> int:
        """Interactions of ``user`` before its first validation target (its known history)."""
        return int((self.seq_split[user] == 0).sum())

    def sample(self, k: int) -> Sample:
        """Sample ``k`` of the table, materialized."""
        t = self.table
        x, pos, start = int(t.user[k]), int(t.pos[k]), int(t.cand_start[k])
        task = TASKS[t.task[k]]
        cands = t.cands[start:start + t.cand_len[k]].tolist() if start >= 0 else []
        text = self.texts[int(self.user_start[x]) + pos].as_py() if task == "review" else ""
        return _sample(SPLITS[t.split[k]], task, x, self.seqs[x], self.seq_ratings[x], pos, self.max_history, cands,
                       text, bool(self.warm[x]), self.like_threshold)

    @property
    def samples(self) -> list[Sample]:
        """Every sample, materialized, in protocol order (for tests and small logs; prepare builds
        rows from :attr:`table` chunk by chunk instead)."""
        return [self.sample(k) for k in range(len(self.table))]


def kcore(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of interactions kept by iterative k-core filtering (dense int ids)."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        uc = np.bincount(users[keep], minlength=users.max() + 1)
        ic = np.bincount(items[keep], minlength=items.max() + 1)
        new = keep & (uc[users] >= k) & (ic[items] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def _label(task: str, rating: float, cands: list[int], item: int, like: float) -> float:
    if task == "ctr":
        return float(rating >= like)
    if task == "sequential":
        return float(cands.index(item))
    return float(rating)


def _index(log: Interactions, cfg: DataConfig, seed: int) -> tuple:
    """Dedup, k-core and remap: (order of kept records, user ids, item ids, raw maps, stats)."""
    if len(log) == 0:
        raise DataError(f"{log.source}: no interactions")
    u_rank, u_raw = _sorted_codes(log.user_ids)
    i_rank, i_raw = _sorted_codes(log.item_ids)
    u, i = u_rank[log.user], i_rank[log.item]                          # codes in raw-id order
    sel, subset_stats = _subset(log, u, len(u_raw), cfg, seed)
    order = sel[np.lexsort((sel, log.timestamps[sel], u[sel]))]      # user, time, input order
    key = u[order].astype(np.int64) * len(i_raw) + i[order]
    _, first = np.unique(key, return_index=True)                      # earliest per (user, item)
    order = order[np.sort(first)]
    del key
    k = cfg.kcore
    if cfg.engine == "ray":                                           # on the cluster prepare joined
        from ckf_dist.data.ray_stages import kcore_on_ray

        keep, _ = kcore_on_ray(u[order], i[order], k, blocks=4 * cfg.ray_workers)
    else:
        keep = kcore(u[order], i[order], k)
    order = order[keep]
    if len(order) == 0:
        raise DataError(f"{log.source}: nothing left after {k}-core filtering of {len(sel)} interactions"
                        f"{' (after the data.time_window / data.sample_users subset)' if subset_stats else ''}; "
                        f"lower data.kcore")
    uk, u_new = np.unique(u[order], return_inverse=True)
    ik, i_new = np.unique(i[order], return_inverse=True)
    stats = {"raw_interactions": len(log), **subset_stats, "after_dedup": int(len(first)), "after_kcore": int(len(order))}
    return order, u_new, i_new, [str(x) for x in u_raw[uk]], [str(x) for x in i_raw[ik]], stats


def _subset(log: Interactions, u: np.ndarray, n_users: int, cfg: DataConfig, seed: int) -> tuple[np.ndarray, dict]:
    """Records kept by ``data.time_window`` and ``data.sample_users`` (all when unset), and their counts.

    The window keeps records with ``start <= timestamp < end``; the user sample draws
    ``sample_users`` of the users left in the window, seeded, over users in raw-id order (so the
    draw does not depend on the order of the input file).
    """
    keep = np.ones(len(u), dtype=bool)
    stats: dict = {}
    start, end = cfg.window_seconds()
    if start is not None or end is not None:
        ts = log.timestamps
        keep &= (ts >= start if start is not None else True) & (ts < end if end is not None else True)
        stats["in_time_window"] = int(keep.sum())
        if not stats["in_time_window"]:
            raise DataError(f"{log.source}: no interaction inside data.time_window {cfg.time_window} "
                            f"(the log spans {_day(ts.min())} .. {_day(ts.max())})")
    if cfg.sample_users:
        present = np.flatnonzero(np.bincount(u[keep], minlength=n_users))
        if cfg.sample_users < len(present):
            chosen = np.zeros(n_users, dtype=bool)
            chosen[seeded_rng(seed, "users").choice(present, cfg.sample_users, replace=False)] = True
            keep &= chosen[u]
        stats.update(sampled_users=int(min(cfg.sample_users, len(present))), after_user_sample=int(keep.sum()))
    return np.flatnonzero(keep), stats


def _day(ts: float) -> str:
    return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).strftime("%Y-%m-%d")


def _sorted_codes(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each code's raw id among the sorted distinct ids, the sorted ids)."""
    arr = np.array(names, dtype=str)
    by_name = np.argsort(arr)
    rank = np.empty(len(arr), dtype=np.int32)
    rank[by_name] = np.arange(len(arr), dtype=np.int32)
    return rank, arr[by_name]


def build_protocol(log: Interactions, cfg: DataConfig, seed: int) -> Protocol:
    """Run the whole protocol on a normalized log (see the module docstring)."""
    order, u, i, user_raw, item_raw, stats = _index(log, cfg, seed)
    n_items = len(item_raw)
    ratings = log.ratings[order]
    texts = log.texts.take(pa.array(order)) if log.texts is not None else None
    bounds = np.flatnonzero(np.diff(u)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(u)]])
    long_enough = (ends - starts) >= 3
    stats["dropped_short_users"] = int((~long_enough).sum())
    starts, ends = starts[long_enough], ends[long_enough]
    user_raw = [user_raw[int(u[s])] for s in starts]
    n_users = len(starts)
    if n_users == 0:
        raise DataError(f"{log.source}: no user has >= 3 interactions after filtering")
    seqs = [i[s:e].astype(np.int64) for s, e in zip(starts, ends)]
    seq_ratings = [ratings[s:e] for s, e in zip(starts, ends)]
    if texts is not None:
        lengths = pc.binary_length(texts).to_numpy(zero_copy_only=False)
        has_text = lengths > 0                                        # per kept interaction
    item_titles = [log.titles.get(r) or f"item {r}" for r in item_raw]
    times = log.timestamps[order]
    if cfg.engine == "ray":                                           # the split on Ray Data
        from ckf_dist.data.ray_stages import split_on_ray

        cuts = _temporal_cuts(cfg, times, starts, ends, stats) if cfg.split == "temporal" else None
        labels = split_on_ray(u, times, cuts, min_rows=3, blocks=4 * cfg.ray_workers)
        seq_split = [labels[s:e] for s, e in zip(starts, ends)]
    else:
        seq_split = _split_labels(cfg, times, starts, ends, stats)
    del times
    n_hist = np.array([int((lab == 0).sum()) for lab in seq_split])

    n_cold = int(round(cfg.cold_user_fraction * n_users))
    held_out = np.zeros(n_users, dtype=bool)
    held_out[seeded_rng(seed, "cold").permutation(n_users)[:n_cold]] = True
    few = n_hist <= cfg.cold_max_interactions
    warm = ~(held_out | few)
    stats.update(users=n_users, items=n_items, cold_held_out=int(held_out.sum()), cold_few_interactions=int((few & ~held_out).sum()),
                 warm_users=int(warm.sum()))

    pu = [np.full(n_hist[x], x, dtype=np.int64) for x in range(n_users) if warm[x]]
    pi = [s[:n_hist[x]] for x, s in enumerate(seqs) if warm[x]]
    pr = [r[:n_hist[x]] for x, r in enumerate(seq_ratings) if warm[x]]
    if not pu:
        raise DataError(f"{log.source}: no warm user left for training; lower data.cold_max_interactions or cold_user_fraction")
    train_pairs = np.stack([np.concatenate(pu), np.concatenate(pi)], axis=1)
    stats["train_interactions"] = int(len(train_pairs))

    proto = Protocol(n_users, n_items, user_raw, item_raw, item_titles, warm, seqs, seq_ratings, train_pairs,
                     np.concatenate(pr).astype(np.float32), {}, {}, seq_split=seq_split, texts=texts,
                     user_start=starts.astype(np.int64), max_history=cfg.max_history,
                     like_threshold=cfg.like_threshold)
    ctx = SampleContext(seed, n_items, cfg.n_candidates,
                        popularity_cdf(train_pairs[:, 1], n_items) if cfg.negatives == "popularity" else None,
                        dict(cfg.task_weights), cfg.train_samples_per_user)
    text_flags = [has_text[s:e] for s, e in zip(starts, ends)] if texts is not None else None
    if cfg.engine == "ray":                                           # user ranges on Ray tasks
        from ckf_dist.data.ray_stages import samples_on_ray

        parts = samples_on_ray(ctx, seqs, seq_split, warm, n_hist, text_flags, blocks=4 * cfg.ray_workers)
    else:
        parts = [user_samples(ctx, 0, seqs, seq_split, warm, n_hist, text_flags)]
    for split in ("valid", "test"):
        for part in parts:
            proto.table.extend(part[split]["table"])
        proto.targets[split] = np.concatenate([p[split]["items"] for p in parts]).astype(np.int64)
        proto.target_users[split] = np.concatenate([p[split]["owners"] for p in parts]).astype(np.int64)
        proto.candidates[split] = [c for p in parts for c in p[split]["candidates"]]
    for part in parts:
        proto.table.extend(part["train"])
    stats["has_text"] = texts is not None and bool(has_text.any())
    eligible = sum(max(0, int(n_hist[x]) - 1) for x in np.flatnonzero(warm).tolist())
    if eligible and not len(proto.table.indices("train")):
        raise DataError(f"{log.source}: no training samples: the tasks with weight > 0 ({cfg.task_weights}) need "
                        f"{'review text, which this source lacks' if not stats['has_text'] else 'more data'}")
    proto.stats = stats
    return proto


def _split_labels(cfg: DataConfig, times: np.ndarray, starts: np.ndarray, ends: np.ndarray, stats: dict) -> list[np.ndarray]:
    """Per user, per interaction (chronological): 0 history, 1 valid target, 2 test target.

    ``leave-last-out``: the last interaction is the test target, the second last the validation
    target. ``temporal``: two global time cuts at the ``temporal_fractions`` quantiles of all
    kept interactions' timestamps; a user may have any number of targets in each split.
    """
    if cfg.split == "leave-last-out":
        return [np.r_[np.zeros(e - s - 2), 1, 2].astype(np.int8) for s, e in zip(starts, ends)]
    cut_valid, cut_test = _temporal_cuts(cfg, times, starts, ends, stats)
    out = []
    for s, e in zip(starts, ends):
        ts = times[s:e]
        out.append(np.where(ts < cut_valid, 0, np.where(ts < cut_test, 1, 2)).astype(np.int8))
    return out


def _temporal_cuts(cfg: DataConfig, times: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                   stats: dict) -> tuple[float, float]:
    """The temporal split's two global cuts: ``temporal_fractions`` quantiles of the timestamps of
    the kept users' interactions (recorded in ``stats``)."""
    kept = np.concatenate([times[s:e] for s, e in zip(starts, ends)])
    f_train, f_valid, _ = cfg.temporal_fractions
    cut_valid, cut_test = np.quantile(kept, [f_train, f_train + f_valid])
    stats.update(temporal_cut_valid=float(cut_valid), temporal_cut_test=float(cut_test))
    return float(cut_valid), float(cut_test)


def _sample(split, task, user, seq, rats, t, H, cands, text, warm, like: float) -> Sample:
    lo = max(0, t - H)
    item, rating = int(seq[t]), float(rats[t])
    return Sample(split, task, user, item, seq[lo:t].tolist(), [float(r) for r in rats[lo:t]], rating,
                  _label(task, rating, cands, item, like), cands if task == "sequential" else [],
                  text if task == "review" else "", warm)


def counts(samples: list[Sample]) -> dict[str, dict[str, int]]:
    """``{split: {task: n}}`` over all splits and tasks (zeros included)."""
    out = {s: {t: 0 for t in TASKS} for s in SPLITS}
    for smp in samples:
        out[smp.split][smp.task] += 1
    return out
