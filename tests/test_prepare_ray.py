"""``data.engine: ray``: prompt rows built and shards written by Ray actors give the local dataset."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from ckf_dist.data.errors import DataError
from ckf_dist.data.stream import ShardStream
from ckf_dist.stages.prepare import run_prepare

pytestmark = [pytest.mark.timeout(600), pytest.mark.ray]


def _comparable(manifest: dict) -> dict:
    """The manifest without what may differ between two preparations of the same data: times,
    the output URL, the engine, the CF stage's training seconds."""
    m = json.loads(json.dumps(manifest))
    for key in ("created", "stages", "engine"):
        m.pop(key)
    m["data_config"].pop("output")
    m["cf"]["metrics"].pop("train_seconds")
    m["files"].pop("cf_metrics")
    return m


def test_ray_engine_writes_the_local_dataset(tmp_path):
    log = str(tmp_path / "log")                                     # one synthetic log file for all three
    local = run_prepare(tiny_config(tmp_path / "local", path=log), progress=False)
    for workers in (1, 2):
        ray_m = run_prepare(tiny_config(tmp_path / f"ray{workers}", path=log, engine="ray", ray_workers=workers),
                            progress=False)
        assert ray_m["engine"] == {"engine": "ray", "ray_workers": workers, "ray_address": ""}
        assert _comparable(ray_m) == _comparable(local)              # same shards (sha256), rows, manifest
        assert len(ray_m["shards"]) >= 4
    rows = [r["sample_id"] for r in ShardStream(str(tmp_path / "ray2"), "train", shuffle_buffer=0)]
    assert rows == [r["sample_id"] for r in ShardStream(str(tmp_path / "local"), "train", shuffle_buffer=0)]


def test_ray_worker_failure_leaves_no_complete_dataset(tmp_path, monkeypatch):
    """A row-building actor that fails mid-way (the third training shard; ``CKF_FAULT`` reaches the
    actors through the environment of the local cluster): the error reaches the caller and no
    manifest is written."""
    monkeypatch.setenv("CKF_FAULT", "shard@train/2")
    out = tmp_path / "ds"
    with pytest.raises(Exception, match="injected fault writing shard train/2"):
        run_prepare(tiny_config(out, engine="ray", ray_workers=2), progress=False)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="unfinished `ckf prepare`"):
        ShardStream(str(out), "train")


def test_ray_engine_writes_to_object_storage(tmp_path, s3_url):
    """The actors write their shards straight to S3 (a moto server on 127.0.0.1); the dataset
    reads back with the local run's rows."""
    log = str(tmp_path / "log")
    local = run_prepare(tiny_config(tmp_path / "local", path=log), progress=False)
    remote = run_prepare(tiny_config(f"{s3_url}/ds", path=log, engine="ray", ray_workers=2), progress=False)
    assert [s["sha256"] for s in remote["shards"]] == [s["sha256"] for s in local["shards"]]
    rows = [r["sample_id"] for r in ShardStream(f"{s3_url}/ds", "valid", shuffle_buffer=0)]
    assert rows == [r["sample_id"] for r in ShardStream(str(tmp_path / "local"), "valid", shuffle_buffer=0)]


def test_kcore_on_ray_data_is_the_local_kcore():
    """The k-core filter on Ray Data (block-wise counts, a filter per round) keeps exactly the
    interactions the local filter keeps, on a long-tailed log that needs several rounds."""
    import numpy as np
    import ray

    from ckf_dist.data.protocol import kcore
    from ckf_dist.data.ray_stages import kcore_on_ray

    rng = np.random.default_rng(0)
    users, items = rng.zipf(1.6, 20_000) % 900, rng.zipf(1.4, 20_000) % 700
    ray.init(num_cpus=3, include_dashboard=False)
    try:
        for k in (2, 5):
            want = kcore(users, items, k)
            got, rounds = kcore_on_ray(users, items, k, blocks=4)
            assert rounds >= 3 and 0 < want.sum() < len(want)        # a cascade, not one pass
            np.testing.assert_array_equal(got, want)
        empty, _ = kcore_on_ray(users[:50], items[:50], 40, blocks=4)
        assert not empty.any()
    finally:
        ray.shutdown()


def test_split_on_ray_data_is_the_local_split():
    """The per-user chronological split on Ray Data (a map-side combine of each block's latest two
    rows per user, merged on the driver, then a labelling ``map_batches``) labels every interaction
    as the local split does, for leave-last-out and temporal cuts; users cut across blocks, and
    users too short to split, included."""
    from types import SimpleNamespace

    import numpy as np
    import ray

    from ckf_dist.data.protocol import _split_labels
    from ckf_dist.data.ray_stages import split_on_ray

    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 9, 400)                                 # 1..8 rows: some too short
    users = np.repeat(np.arange(400), lengths)
    times = np.concatenate([np.sort(rng.integers(0, 50, n)) for n in lengths]).astype(np.float64)  # ties too
    ends = np.cumsum(lengths)
    starts = ends - lengths
    long = lengths >= 3
    ray.init(num_cpus=3, include_dashboard=False)
    try:
        for split in ("leave-last-out", "temporal"):
            cfg = SimpleNamespace(split=split, temporal_fractions=(0.7, 0.15, 0.15))
            stats: dict = {}
            want = _split_labels(cfg, times, starts[long], ends[long], stats)
            cuts = (stats["temporal_cut_valid"], stats["temporal_cut_test"]) if split == "temporal" else None
            got = split_on_ray(users, times, cuts, min_rows=3, blocks=7)
            assert len(got) == len(users) and (got[np.repeat(~long, lengths)] == -1).all()
            for k, (s, e) in enumerate(zip(starts[long], ends[long])):
                np.testing.assert_array_equal(got[s:e], want[k], err_msg=f"{split} user {k}")
            if split == "leave-last-out":
                assert (got == 2).sum() == (got == 1).sum() == long.sum()
    finally:
        ray.shutdown()


def _same_table(a, b) -> None:
    import numpy as np

    for col in ("user", "item", "ratings", "timestamps"):
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col), err_msg=col)
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids and a.titles == b.titles
    assert a.texts.to_pylist() == b.texts.to_pylist()
    assert a.bad.report() == b.bad.report()


def test_log_parsed_by_ray_tasks_is_the_local_log(tmp_path, monkeypatch):
    """``data.engine: ray`` parses a review file in chunks of raw lines on Ray tasks (7 lines per
    chunk here): the table, the id codes, skipped records (counts and examples in file order),
    and under ``bad_records: error`` the first bad record's file:line message are the local ones,
    including when a truncated gzip stream ends the file after a bad record."""
    import gzip as gz
    import json as js

    import ray

    from ckf_dist.data import ray_stages
    from ckf_dist.data.errors import BadRecords
    from ckf_dist.data.sources import read_amazon, read_yelp

    def review(k, **kw):
        rec = {"reviewerID": f"U{k % 13}", "asin": f"B{k % 7}", "overall": 1.0 + k % 5, "unixReviewTime": 1000 + k,
               "summary": f"s{k}" if k % 3 else "", "reviewText": f"text {k}"}
        rec.update(kw)
        return js.dumps(rec).encode()

    lines = [review(k) for k in range(60)]
    lines[9] = b'{"reviewerID": "U1", "asin": '                   # malformed, chunk 2
    lines[23] = b'{"reviewerID": "\xff"}'                          # not utf-8, chunk 4
    lines[24] = review(24, overall=9.0)                             # out of range, chunk 4
    lines[40] = b"   "                                              # blank: not a record
    lines[51] = js.dumps({"asin": "B1"}).encode()                   # missing field, chunk 8
    path = tmp_path / "reviews_X.json.gz"
    path.write_bytes(gz.compress(b"\n".join(lines) + b"\n"))
    truncated = tmp_path / "reviews_T.json.gz"
    data = gz.compress(b"\n".join(review(k, reviewText="x" * 300 + str(k)) for k in range(60)) + b"\n")
    truncated.write_bytes(data[: len(data) * 3 // 4])                 # good lines, then a cut stream
    yelp = tmp_path / "yelp"
    yelp.mkdir()
    (yelp / "review.json").write_text("".join(js.dumps({"user_id": f"u{k % 5}", "business_id": f"b{k % 4}", "stars": 1 + k % 5,
                                                        "date": f"2019-01-{1 + k % 28:02d} 10:00:00", "text": f"t{k}"}) + "\n"
                                              for k in range(30)) + '{"user_id": "u1", "business_id": "b1", "stars": 3, "date": "soon"}\n')
    monkeypatch.setattr(ray_stages, "CHUNK_LINES", 7)
    ray.init(num_cpus=3, include_dashboard=False)
    try:
        for source, first_error in ((path, ":10: malformed JSON"), (truncated, "truncated or corrupt compressed file")):
            log = read_amazon(str(source), "", BadRecords("skip"), 2018, "ray")
            _same_table(log, read_amazon(str(source), "", BadRecords("skip"), 2018))
            assert 0 < len(log) < 60 and log.bad.skipped in (1, 4)
            with pytest.raises(DataError) as local:
                read_amazon(str(source), "", BadRecords(), 2018)
            with pytest.raises(DataError) as on_ray:
                read_amazon(str(source), "", BadRecords(), 2018, "ray")
            assert str(on_ray.value) == str(local.value) and first_error in str(local.value)
        _same_table(read_yelp(str(yelp), "", BadRecords("skip"), "ray"), read_yelp(str(yelp), "", BadRecords("skip")))
        with pytest.raises(DataError, match=r"review\.json:31: field 'date': not a date"):
            read_yelp(str(yelp), "", BadRecords(), "ray")
    finally:
        ray.shutdown()
