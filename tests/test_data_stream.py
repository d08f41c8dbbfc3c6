"""ShardStream: equal rows per rank, one global order for every world size, determinism, shuffle
buffer, exact resume (also on another world size); collate."""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ckf_dist.data.collate import IGNORE_INDEX, collate
from ckf_dist.data.errors import DataError
from ckf_dist.data.stream import ShardStream, shuffle_buffer_order


@pytest.fixture(scope="module")
def url(prepared_dataset):
    return prepared_dataset.url


def _ids(stream) -> list[int]:
    return [r["sample_id"] for r in stream]


def _n_train(prepared_dataset) -> int:
    return sum(prepared_dataset.manifest["counts"]["train"].values())


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_equal_rows_per_rank_disjoint_and_nearly_complete(url, prepared_dataset, world):
    total = _n_train(prepared_dataset)
    per_rank = [_ids(ShardStream(url, "train", r, world, seed=1, shuffle_buffer=64)) for r in range(world)]
    assert {len(p) for p in per_rank} == {total // world}
    assert all(ShardStream(url, "train", r, world).rows_per_rank(e) == total // world for r in range(world) for e in (0, 3))
    union = [i for p in per_rank for i in p]
    assert len(set(union)) == len(union)                         # disjoint
    assert total - len(union) == total % world                   # only the remainder is dropped


def test_drop_remainder_false_covers_everything(url, prepared_dataset):
    total = _n_train(prepared_dataset)
    ids = [i for r in range(3) for i in _ids(ShardStream(url, "train", r, 3, drop_remainder=False))]
    assert sorted(ids) == sorted(_ids(ShardStream(url, "train", shuffle_buffer=0))) and len(ids) == total


def test_deterministic_shuffled_and_epoch_dependent(url):
    a = _ids(ShardStream(url, "train", 0, 2, seed=3, shuffle_buffer=50))
    assert a == _ids(ShardStream(url, "train", 0, 2, seed=3, shuffle_buffer=50, prefetch=0))
    assert a != _ids(ShardStream(url, "train", 0, 2, seed=4, shuffle_buffer=50))
    s = ShardStream(url, "train", 0, 2, seed=3, shuffle_buffer=50)
    e0, e1 = _ids(s), _ids(s)                                     # a second pass is the next epoch
    assert e0 == a and e1 != e0 and s.epoch == 2
    plain = _ids(ShardStream(url, "train", shuffle_buffer=0))
    assert plain == sorted(plain)                                 # shuffle off: stored order
    assert _ids(ShardStream(url, "train", shuffle_buffer=64)) != plain


def _reference_shuffle_buffer(n, buffer, rng):
    """The textbook loop that the vectorized shuffle_buffer_order must reproduce exactly."""
    buffer = min(buffer, n)
    buf, out = list(range(buffer)), []
    for t, j in enumerate(rng.integers(0, buffer, size=n - buffer).tolist()):
        out.append(buf[j])
        buf[j] = buffer + t
    return out + rng.permutation(np.asarray(buf)).tolist()


@pytest.mark.parametrize("n, buffer", [(1000, 16), (50, 50), (51, 50), (7, 100), (300, 2)])
def test_shuffle_buffer_matches_the_reference_loop(n, buffer):
    got = shuffle_buffer_order(n, buffer, np.random.default_rng(n + buffer))
    assert got.tolist() == _reference_shuffle_buffer(n, buffer, np.random.default_rng(n + buffer))


def test_shuffle_buffer_order_is_a_bounded_window_permutation():
    order = shuffle_buffer_order(1000, 16, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    # an element cannot come out before it entered the buffer: position k holds an index < k + 16
    assert all(order[k] < k + 16 for k in range(1000))
    assert shuffle_buffer_order(10, 1, np.random.default_rng(0)).tolist() == list(range(10))


@pytest.mark.parametrize("stop_at", [0, 1, 31, 32, 33, 100, "end"])
def test_resume_yields_exactly_the_remaining_rows(url, stop_at):
    kw = dict(rank=1, world_size=2, seed=9, shuffle_buffer=40, prefetch=2)
    full = ShardStream(url, "train", **kw)
    epoch0, epoch1 = _ids(full), _ids(full)
    k = len(epoch0) if stop_at == "end" else stop_at
    s = ShardStream(url, "train", **kw)
    it = iter(s)
    got = [next(it)["sample_id"] for _ in range(k)]
    state = json.loads(json.dumps(s.state_dict()))               # what a checkpoint stores
    it.close()
    resumed = ShardStream(url, "train", **kw)
    resumed.load_state_dict(state)
    rest = _ids(resumed)
    if stop_at == "end":                                          # a fully consumed epoch resumes at the next one
        assert state["epoch"] == 1 and state["position"] == 0 and rest == epoch1
    else:
        assert got + rest == epoch0 and state["position"] == k
        assert _ids(resumed) == epoch1                            # and the following epoch is unchanged


def test_resume_cursor_names_the_next_row(url):
    s = ShardStream(url, "train", seed=1, shuffle_buffer=0)
    it = iter(s)
    for _ in range(40):
        next(it)
    st = s.state_dict()
    assert st["next_shard"] == "train/part-00001.parquet" and st["next_row"] == 8     # 32 rows per shard
    assert next(it)["sample_id"] == 40


def test_resume_with_other_settings_is_refused(url):
    s = ShardStream(url, "train", 0, 2, seed=1, rank_batch=3)
    with pytest.raises(DataError, match="global_batch=12"):
        s.load_state_dict(dict(s.state_dict(), global_batch=12))
    with pytest.raises(DataError, match="another sample order"):             # a cursor of the old per-rank order
        s.load_state_dict({k: v for k, v in s.state_dict().items() if k != "order"})
    with pytest.raises(DataError, match="into a global batch"):               # elastic resume needs a boundary
        s.load_state_dict(dict(s.state_dict(), world_size=3, batch_offset=1))


def _global_batches(url, world, rank_batch, epochs=2, **kw):
    """Per global batch, the ranks' slices concatenated in rank order, over ``epochs`` epochs."""
    streams = [ShardStream(url, "train", r, world, rank_batch=rank_batch, **kw) for r in range(world)]
    out = []
    for _ in range(epochs):
        per_rank = [_ids(s) for s in streams]
        for b in range(len(per_rank[0]) // rank_batch):
            out.append([i for p in per_rank for i in p[b * rank_batch:(b + 1) * rank_batch]])
    return out


def test_global_batches_do_not_depend_on_the_world_size(url, prepared_dataset):
    kw = dict(seed=5, shuffle_buffer=48, prefetch=2)
    one = _global_batches(url, 1, 12, **kw)
    assert len(one) == 2 * (_n_train(prepared_dataset) // 12) and all(len(b) == 12 for b in one)
    for world, rank_batch in [(2, 6), (3, 4), (4, 3), (12, 1)]:
        assert _global_batches(url, world, rank_batch, **kw) == one, (world, rank_batch)
    assert _global_batches(url, 2, 6, seed=6, shuffle_buffer=48) != one       # the seed still matters


@pytest.mark.parametrize("old, new", [((2, 6), (3, 4)), ((1, 12), (4, 3)), ((4, 3), (1, 12))])
def test_resume_on_another_world_size_continues_the_global_order(url, old, new):
    kw = dict(seed=2, shuffle_buffer=40, prefetch=0)
    full = _global_batches(url, 1, 12, epochs=1, **kw)
    (w0, r0), (w1, r1) = old, new
    saved = []
    for rank in range(w0):                      # every rank of the first run stops after 5 steps
        s = ShardStream(url, "train", rank, w0, rank_batch=r0, **kw)
        it = iter(s)
        for _ in range(5 * r0):
            next(it)
        saved.append(json.loads(json.dumps(s.state_dict())))
        it.close()
    assert {st["global_position"] for st in saved} == {60} and {st["batch_offset"] for st in saved} == {0}
    streams = []
    for rank in range(w1):                      # the new world resumes from rank 0's cursor
        s = ShardStream(url, "train", rank, w1, rank_batch=r1, **kw)
        s.load_state_dict(saved[0])
        streams.append(s)
    per_rank = [[r["sample_id"] for r, _ in zip(s, range(s.rows_per_rank() - s.position))] for s in streams]
    rest = [[i for p in per_rank for i in p[b * r1:(b + 1) * r1]] for b in range(len(per_rank[0]) // r1)]
    assert rest == full[5:]


def test_rows_match_the_stored_shards(url, prepared_dataset):
    entry = next(e for e in prepared_dataset.manifest["shards"] if e["split"] == "valid")
    stored = pq.read_table(f"{url}/{entry['path']}").to_pylist()
    rows = [r.to_dict(lists=True) for r in ShardStream(url, "valid", shuffle_buffer=0)][: len(stored)]
    assert rows == stored
    r = next(iter(ShardStream(url, "valid", shuffle_buffer=0)))
    assert r["text_ids"].dtype == np.int32 and isinstance(r["task"], str) and "cf_ids" in r and dict(r).keys() == r.keys()


@pytest.mark.parametrize("prefetch", [0, 1, 2, 4, 8])
def test_each_shard_is_read_once_per_pass(url, prefetch):
    s = ShardStream(url, "train", 0, 1, seed=3, shuffle_buffer=100, prefetch=prefetch)
    calls = []
    load = s._load
    s._load = lambda k: (calls.append(k), load(k))[1]
    assert sum(1 for _ in s) == s.total_rows
    assert sorted(calls) == list(range(len(s.shards)))


def test_breaking_out_leaves_no_threads(url):
    before = threading.active_count()
    for _ in range(3):
        for k, _row in enumerate(ShardStream(url, "train", prefetch=3)):
            if k == 5:
                break
    import gc
    import time

    gc.collect()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


def test_collate_contract(url, prepared_dataset):
    rows = list(ShardStream(url, "train", shuffle_buffer=0))[:12]
    pad = prepared_dataset.manifest["tokenizer"]["pad_id"]
    b = collate(rows, pad)
    B = len(rows)
    assert b["task_ids"].tolist() == [r["task_id"] for r in rows] and b["users"].shape == (B,)
    assert b["history"].shape[0] == B and (b["history"][0, len(rows[0]["history"]):] == -1).all()
    for name, ids_key, len_key in (("text", "text_ids", "text_prompt_len"), ("cf", "cf_ids", "cf_prompt_len")):
        ids, mask, labels = b[f"{name}_input_ids"], b[f"{name}_attention_mask"], b[f"{name}_labels"]
        assert ids.dtype == torch.long and ids.shape == mask.shape == labels.shape
        assert ids.shape[1] == max(len(r[ids_key]) for r in rows)
        for k, r in enumerate(rows):
            n, p = len(r[ids_key]), r[len_key]
            assert ids[k, :n].tolist() == r[ids_key].tolist() and (ids[k, n:] == pad).all()     # right padding
            assert mask[k].tolist() == [1] * n + [0] * (ids.shape[1] - n)
            assert (labels[k, :p] == IGNORE_INDEX).all() and (labels[k, n:] == IGNORE_INDEX).all()
            assert labels[k, p:n].tolist() == r[ids_key][p:].tolist()
    n_slots = [len(r["slot_pos"]) for r in rows]
    assert b["slot_row"].tolist() == [k for k, n in enumerate(n_slots) for _ in range(n)]
    assert b["slot_pos"].tolist() == [int(p) for r in rows for p in r["slot_pos"]]
    slot_ids = b["cf_input_ids"][b["slot_row"], b["slot_pos"]]
    assert (slot_ids == prepared_dataset.manifest["tokenizer"]["slot_id"]).all()
    assert b["slot_kind"].tolist() == [int(k) for r in rows for k in r["slot_kind"]]
    with pytest.raises(ValueError):
        collate([], pad)
