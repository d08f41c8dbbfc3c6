"""Split protocol: k-core, leave-last-out, cold users, tasks, candidates, and no leakage."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ckf_dist.data.config import DataConfig
from ckf_dist.data.errors import DataError
from ckf_dist.data.protocol import build_protocol, counts, kcore
from ckf_dist.data.sources import load_interactions
from ckf_dist.data.sources.base import Interactions

CFG = DataConfig(source="synthetic", synthetic_users=150, synthetic_items=60, synthetic_interactions_per_user=16,
                 max_history=6, n_candidates=5, cold_user_fraction=0.1, cold_max_interactions=3)


@pytest.fixture(scope="module")
def log():
    return load_interactions(CFG, seed=5)


@pytest.fixture(scope="module")
def proto(log):
    return build_protocol(log, CFG, seed=11)


def _table(rows, titles=None, text=False):
    """Interactions from (user, item, rating, ts) tuples."""
    users, items, ratings, ts = zip(*rows)
    return Interactions.from_records("test", [str(u) for u in users], [str(i) for i in items], ratings, ts,
                                     titles or {}, texts=["r"] * len(rows) if text else None)


def test_no_leakage_of_the_target(proto):
    """History = items strictly before the target; the target is never in history; negatives never in the log."""
    seen_tasks = set()
    for s in proto.samples:
        seq = proto.seqs[s.user].tolist()
        t = seq.index(s.item)
        assert s.item not in s.history
        assert len(s.history) <= CFG.max_history
        assert s.history == seq[max(0, t - len(s.history)):t]            # contiguous, strictly before, oldest first
        if len(s.history) < CFG.max_history:
            assert len(s.history) == t                                     # window only cut by max_history
        if s.split == "valid":
            assert t == len(seq) - 2
        elif s.split == "test":
            assert t == len(seq) - 1
        else:
            assert t < len(seq) - 2 and s.warm                             # training never sees valid/test targets
        if s.task == "sequential":
            assert s.candidates.count(s.item) == 1 and s.candidates[int(s.label)] == s.item
            assert len(set(s.candidates)) == len(s.candidates) == CFG.n_candidates
            assert not (set(s.candidates) - {s.item}) & set(seq)           # negatives never in the user's log
        else:
            assert s.candidates == []
        seen_tasks.add(s.task)
    assert seen_tasks == {"ctr", "sequential", "rating", "review"}


def test_history_is_chronological(log, proto):
    raw_time = {}
    for u, i, t in zip(log.users, log.items, log.timestamps):
        raw_time.setdefault((u, i), t)
    for s in proto.samples[:300]:
        u = proto.user_raw[s.user]
        times = [raw_time[(u, proto.item_raw[i])] for i in s.history + [s.item]]
        assert times == sorted(times)


def test_candidate_order_does_not_reveal_the_answer(proto):
    """The true item's position and its rank by item id among candidates are both ~uniform (chi-square)."""
    seq = [s for s in proto.samples if s.task == "sequential"]
    assert len(seq) > 400
    k = CFG.n_candidates
    pos = np.bincount([int(s.label) for s in seq], minlength=k)
    id_rank = np.bincount([sorted(s.candidates).index(s.item) for s in seq], minlength=k)
    critical = 18.47                                   # chi-square, 4 degrees of freedom, p = 0.001
    for observed in (pos, id_rank):
        expected = len(seq) / k
        assert ((observed - expected) ** 2 / expected).sum() < critical, observed
    sorted_lists = sum(s.candidates == sorted(s.candidates) for s in seq)
    assert sorted_lists < 0.05 * len(seq)


def test_leave_last_out_targets(proto):
    for split, pos in (("valid", -2), ("test", -1)):
        assert proto.targets[split].tolist() == [int(s[pos]) for s in proto.seqs]
        users = [s.user for s in proto.samples if s.split == split]
        assert sorted(users) == list(range(proto.n_users))               # each eval user exactly one task per split


def test_cold_users_never_in_training(proto):
    cold = set(np.flatnonzero(~proto.warm).tolist())
    assert cold
    assert not cold & {s.user for s in proto.samples if s.split == "train"}
    assert not cold & set(proto.train_pairs[:, 0].tolist())
    # CF training pairs never include a valid or test target
    eval_pairs = {(u, int(s[-1])) for u, s in enumerate(proto.seqs)} | {(u, int(s[-2])) for u, s in enumerate(proto.seqs)}
    assert not eval_pairs & set(map(tuple, proto.train_pairs.tolist()))
    assert proto.stats["cold_held_out"] == round(0.1 * proto.n_users)
    assert all(not s.warm for s in proto.samples if s.user in cold)


def test_users_with_few_interactions_are_cold():
    rows = [(u, i, 4.0, 10 * u + i) for u in range(6) for i in range(8 if u < 4 else 5)]
    cfg = dataclasses.replace(CFG, kcore=1, cold_user_fraction=0.0, cold_max_interactions=3)
    p = build_protocol(_table(rows), cfg, seed=0)
    assert p.warm.tolist() == [True] * 4 + [False] * 2              # 5 interactions -> 3 training ones -> cold
    assert p.stats["cold_few_interactions"] == 2


def test_kcore_is_iterative():
    users = np.array([0, 0, 1, 1, 2, 2, 2])
    items = np.array([0, 1, 0, 1, 0, 1, 2])
    keep = kcore(users, items, 2)
    assert keep.tolist() == [True] * 6 + [False]                    # item 2 has one interaction
    assert kcore(users, items, 3).sum() == 0                        # removing users 0,1 cascades


def test_kcore_and_dedup_in_protocol():
    rows = [(0, 5, 1.0, 9), (0, 5, 5.0, 1)] + [(u, i, 3.0, i) for u in range(4) for i in range(4)]
    p = build_protocol(_table(rows), dataclasses.replace(CFG, kcore=4, cold_user_fraction=0.0, cold_max_interactions=0), seed=0)
    assert "5" not in p.item_raw                                    # one user only: dropped by 4-core
    assert p.stats["after_dedup"] == 17 and p.stats["after_kcore"] == 16
    assert p.item_raw == sorted(p.item_raw)                         # CF ids follow raw ids, not popularity or time


def test_dedup_keeps_earliest_interaction():
    rows = [(0, 1, 2.0, 50), (0, 1, 5.0, 5), (0, 2, 3.0, 10), (0, 3, 3.0, 20)]
    p = build_protocol(_table(rows), dataclasses.replace(CFG, kcore=1, cold_user_fraction=0.0, cold_max_interactions=0), 0)
    assert [p.item_raw[i] for i in p.seqs[0]] == ["1", "2", "3"] and p.seq_ratings[0].tolist() == [5.0, 3.0, 3.0]


def test_review_only_with_text_and_zero_weights_respected(log):
    no_text = dataclasses.replace(log, texts=None)
    p = build_protocol(no_text, CFG, seed=1)
    c = counts(p.samples)
    assert all(c[s]["review"] == 0 for s in c) and c["train"]["ctr"] > 0
    cfg = dataclasses.replace(CFG, task_weights={"ctr": 0.0, "sequential": 1.0, "rating": 1.0, "review": 0.0})
    c = counts(build_protocol(log, cfg, seed=1).samples)
    assert all(c[s]["ctr"] == 0 and c[s]["review"] == 0 for s in c) and c["test"]["rating"] > 0


def test_task_weights_shape_the_mix(log):
    cfg = dataclasses.replace(CFG, task_weights={"ctr": 3.0, "sequential": 1.0, "rating": 0.0, "review": 0.0})
    c = counts(build_protocol(log, cfg, seed=1).samples)["train"]
    assert 2.4 < c["ctr"] / c["sequential"] < 3.6


def test_train_samples_per_user_keeps_the_latest(log):
    cfg = dataclasses.replace(CFG, train_samples_per_user=3)
    p = build_protocol(log, cfg, seed=1)
    per_user = np.bincount([s.user for s in p.samples if s.split == "train"], minlength=p.n_users)
    assert per_user[p.warm].max() == 3 and per_user[~p.warm].max() == 0
    s = next(s for s in p.samples if s.split == "train")
    assert p.seqs[s.user].tolist().index(s.item) >= len(p.seqs[s.user]) - 5


def test_seeded_and_deterministic(log, proto):
    again = build_protocol(log, CFG, seed=11)
    assert again.samples == proto.samples
    other = build_protocol(log, CFG, seed=12)
    assert other.samples != proto.samples
    assert [s.candidates for s in other.samples if s.task == "sequential"] != [s.candidates for s in proto.samples if s.task == "sequential"]


def test_nothing_left_is_a_clear_error():
    rows = [(u, u, 3.0, 1) for u in range(5)]
    with pytest.raises(DataError, match="nothing left after 5-core"):
        build_protocol(_table(rows), CFG, seed=0)


def test_review_only_without_text_is_a_clear_error(log):
    no_text = dataclasses.replace(log, texts=None)
    cfg = dataclasses.replace(CFG, task_weights={"review": 1.0})
    with pytest.raises(DataError, match="need review text"):
        build_protocol(no_text, cfg, seed=1)
    assert {s.task for s in build_protocol(log, cfg, seed=1).samples} == {"review"}


def test_temporal_split_global_cuts_several_targets_and_defined_uauc(log):
    from ckf_dist.metrics import uauc

    cfg = dataclasses.replace(CFG, split="temporal", temporal_fractions=[0.7, 0.15, 0.15])
    p = build_protocol(log, cfg, seed=11)
    cut_v, cut_t = p.stats["temporal_cut_valid"], p.stats["temporal_cut_test"]
    # the log's kept timestamps in protocol order: recompute each label from the cuts
    by_user = {}
    for u, i, ts in zip(log.users, log.items, log.timestamps):
        by_user.setdefault(str(u), {})[str(i)] = min(ts, by_user.get(str(u), {}).get(str(i), np.inf))
    n_targets = np.zeros(p.n_users, int)
    for x, (seq, lab) in enumerate(zip(p.seqs, p.seq_split)):
        assert np.all(np.diff(lab) >= 0)                                   # history, then valid, then test
        ts = np.array([by_user[p.user_raw[x]][p.item_raw[j]] for j in seq])
        assert np.array_equal(lab, np.where(ts < cut_v, 0, np.where(ts < cut_t, 1, 2)))
        n_targets[x] = int((lab == 2).sum())
    assert n_targets.max() >= 3 and len(p.targets["test"]) == n_targets.sum()
    for s in p.samples:
        t = p.seqs[s.user].tolist().index(s.item)
        assert p.seq_split[s.user][t] == {"train": 0, "valid": 1, "test": 2}[s.split]
        assert s.history == p.seqs[s.user][max(0, t - len(s.history)):t].tolist()
    # training pairs are exactly the warm users' history part
    want = sum(int((p.seq_split[x] == 0).sum()) for x in np.flatnonzero(p.warm))
    assert len(p.train_pairs) == want
    # users have several ctr test rows: per-user AUC exists (a scorer that knows the label gets 1.0)
    ctr = [s for s in p.samples if s.split == "test" and s.task == "ctr"]
    value, n_users = uauc([s.user for s in ctr], [s.label for s in ctr], [s.label for s in ctr])
    assert n_users >= 10 and value == 1.0
    # leave-last-out (the default) gives one test row per user: no user has two
    loo = [s for s in build_protocol(log, CFG, seed=11).samples if s.split == "test" and s.task == "ctr"]
    assert uauc([s.user for s in loo], [s.label for s in loo], [s.label for s in loo])[1] == 0


def test_popularity_matched_negatives():
    rng = np.random.default_rng(0)
    w = 1.0 / np.arange(1, 81) ** 1.1                     # Zipf-like item popularity
    rows = []
    for u in range(120):
        for t, i in enumerate(rng.choice(80, size=12, replace=False, p=w / w.sum())):
            rows.append((u, int(i), float(rng.integers(1, 6)), 1000 * u + t))
    log = _table(rows)
    cfg = dataclasses.replace(CFG, kcore=2, cold_max_interactions=1)
    uniform, matched = build_protocol(log, cfg, seed=3), build_protocol(log, dataclasses.replace(cfg, negatives="popularity"), seed=3)
    pop = np.bincount(uniform.train_pairs[:, 1], minlength=uniform.n_items)

    def negative_popularity(pr):
        return float(np.mean([pop[c] for cands, t in zip(pr.candidates["test"], pr.targets["test"]) for c in cands if c != t]))

    target_pop = float(pop[uniform.targets["test"]].mean())
    assert negative_popularity(matched) > 1.5 * negative_popularity(uniform)
    assert abs(negative_popularity(matched) - target_pop) < abs(negative_popularity(uniform) - target_pop)
    for cands, seq, t in zip(matched.candidates["test"], matched.seqs, matched.targets["test"]):
        assert len(set(cands)) == len(cands) == cfg.n_candidates and t in cands
        assert not (set(cands) - {int(t)}) & set(seq.tolist())
    with pytest.raises(ValueError, match="negatives"):
        dataclasses.replace(CFG, negatives="hard").validate()


def _days(n_users=40, per_user=12, day=86400.0):
    """Users u0..: user k's j-th interaction on day k + j (items cycle), ratings 1..5."""
    return [(f"u{k}", f"i{(k + j) % 30}", 1 + (k + j) % 5, (k + j) * day) for k in range(n_users) for j in range(per_user)]


def test_time_window_keeps_only_records_inside_it():
    rows = _days()
    cfg = dataclasses.replace(CFG, kcore=1, cold_user_fraction=0.0, cold_max_interactions=0,
                              time_window=["1970-01-11", 20 * 86400.0])       # days 10..19
    p = build_protocol(_table(rows), cfg, seed=0)
    inside = sum(10 * 86400 <= t < 20 * 86400 for *_, t in rows)
    assert p.stats["in_time_window"] == inside and p.stats["after_dedup"] <= inside
    assert p.stats["raw_interactions"] == len(rows)
    with pytest.raises(DataError, match=r"no interaction inside data.time_window .*1970-01-01 \.\. 1970-02-"):
        build_protocol(_table(rows), dataclasses.replace(cfg, time_window=["2020-01-01", ""]), seed=0)
    with pytest.raises(ValueError, match="start must be before end"):
        dataclasses.replace(cfg, time_window=["1970-01-20", "1970-01-10"]).validate()


def test_user_sample_is_seeded_and_independent_of_file_order():
    rows = _days(n_users=60)
    cfg = dataclasses.replace(CFG, kcore=1, cold_user_fraction=0.0, cold_max_interactions=0, sample_users=25)
    a = build_protocol(_table(rows), cfg, seed=3)
    b = build_protocol(_table(rows[::-1]), cfg, seed=3)                     # the same log, lines reversed
    c = build_protocol(_table(rows), cfg, seed=4)
    assert a.n_users == 25 and a.stats["sampled_users"] == 25 and a.stats["after_user_sample"] == 25 * 12
    assert a.user_raw == b.user_raw and a.user_raw != c.user_raw
    everyone = build_protocol(_table(rows), dataclasses.replace(cfg, sample_users=1000), seed=3)
    assert everyone.n_users == 60 and everyone.stats["sampled_users"] == 60


def test_default_protocol_records_no_subset_stats(proto):
    assert not {"in_time_window", "sampled_users", "after_user_sample"} & proto.stats.keys()
    assert proto.table.counts() == counts(proto.samples)


@pytest.mark.parametrize("negatives", ["uniform", "popularity"])
def test_samples_drawn_per_user_range_are_the_whole_table(log, negatives):
    """What ``data.engine: ray`` relies on: the samples of users cut into ranges (as Ray tasks draw
    them), appended in user order, are the samples drawn in one pass, candidates included."""
    from ckf_dist.data.samples import SampleContext, popularity_cdf, user_samples
    from ckf_dist.data.ray_stages import user_ranges

    cfg = dataclasses.replace(CFG, negatives=negatives, task_weights={"ctr": 1.0, "sequential": 2.0, "rating": 1.0,
                                                                      "review": 1.0})
    proto = build_protocol(log, cfg, seed=11)
    n_hist = np.array([proto.n_history(x) for x in range(proto.n_users)])
    import pyarrow.compute as pc

    has = pc.binary_length(proto.texts).to_numpy(zero_copy_only=False) > 0
    flags = [has[st:st + len(s)] for st, s in zip(proto.user_start, proto.seqs)]
    cdf = popularity_cdf(proto.train_pairs[:, 1], proto.n_items) if negatives == "popularity" else None
    ctx = SampleContext(11, proto.n_items, cfg.n_candidates, cdf, dict(cfg.task_weights), cfg.train_samples_per_user)
    ranges = user_ranges(np.array([len(s) for s in proto.seqs]), 7)
    assert len(ranges) == 7 and ranges[0][0] == 0 and ranges[-1][1] == proto.n_users
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    parts = [user_samples(ctx, lo, proto.seqs[lo:hi], proto.seq_split[lo:hi], proto.warm[lo:hi], n_hist[lo:hi],
                          flags[lo:hi]) for lo, hi in ranges]
    whole = build_protocol(log, cfg, seed=11).table
    from ckf_dist.data.samples import SampleTable

    merged = SampleTable()
    for split in ("valid", "test"):
        for p in parts:
            merged.extend(p[split]["table"])
        assert [c for p in parts for c in p[split]["candidates"]] == proto.candidates[split]
    for p in parts:
        merged.extend(p["train"])
    for col in ("split", "task", "user", "pos", "cand_start", "cand_len", "cands"):
        assert getattr(merged, col) == getattr(whole, col), col
    assert (np.frombuffer(whole.task, dtype=np.int8) == 3).sum() > 0 and len(whole.cands) > 0
