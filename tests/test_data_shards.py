"""Prepared datasets: manifest, round trips on local disk and a real S3 server, commit safety, bad storage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import free_port, tiny_config
from safetensors.numpy import load_file

from ckf_dist import TASKS
from ckf_dist.data import shards as shards_mod
from ckf_dist.data.errors import DataError
from ckf_dist.stages.prepare import run_prepare
from ckf_dist.data.shards import read_dataset_manifest
from ckf_dist.data.stream import ShardStream, check_tokenizer
from ckf_dist.resources import load_tokenizer
from ckf_dist.contract import DATASET_MARKER


def _ids(url: str, split: str = "train", **kw) -> list[int]:
    return [r["sample_id"] for r in ShardStream(url, split, shuffle_buffer=0, **kw)]


def test_manifest_describes_the_dataset(prepared_dataset):
    m, url = prepared_dataset.manifest, prepared_dataset.url
    assert m["schema_version"] == shards_mod.SCHEMA_VERSION
    assert json.load(open(f"{url}/manifest.json")) == m
    tok = load_tokenizer("smollm2")
    assert m["tokenizer"]["vocab_size"] == len(tok) and m["tokenizer"]["eos_id"] == tok.eos_token_id
    assert m["answer_tokens"]["ctr"] == [tok.encode(" No", add_special_tokens=False)[0], tok.encode(" Yes", add_special_tokens=False)[0]]
    assert m["users"]["warm"] + m["users"]["cold"] == m["n_users"] and m["users"]["cold"] > 0
    assert set(m["counts"]) == {"train", "valid", "test"} and all(set(c) == set(TASKS) for c in m["counts"].values())
    assert m["counts"]["train"]["review"] > 0 and m["source"]["has_text"]
    # per-shard rows and hashes match the files; per-task counts match the rows
    seen = {s: {t: 0 for t in TASKS} for s in m["counts"]}
    for entry in m["shards"]:
        table = pq.read_table(f"{url}/{entry['path']}")
        assert table.num_rows == entry["rows"] <= m["data_config"]["shard_rows"]
        assert table.schema.names == shards_mod.COLUMNS
        for split, task in zip(table.column("split").to_pylist(), table.column("task").to_pylist()):
            seen[split][task] += 1
    assert seen == m["counts"]
    assert m["cf"]["metrics"]["test"]["cf"]["all"]["auc"] > 0.5 and m["cf"]["dim"] == 8


def test_cf_embeddings_and_item_table(prepared_dataset):
    m, url = prepared_dataset.manifest, prepared_dataset.url
    emb = load_file(f"{url}/{m['cf']['path']}")
    assert set(emb) == {"user", "item"}
    assert emb["user"].shape == (m["n_users"], 8) and emb["item"].shape == (m["n_items"], 8)
    assert emb["user"].dtype == np.float32 and np.isfinite(emb["user"]).all()
    items = pq.read_table(f"{url}/items.parquet")
    assert items.column("item_id").to_pylist() == list(range(m["n_items"]))
    assert json.load(open(f"{url}/cf/metrics.json")) == m["cf"]["metrics"]


def test_refuses_to_overwrite_a_complete_dataset(prepared_dataset):
    with pytest.raises(DataError, match="already there.*--overwrite"):
        run_prepare(prepared_dataset.cfg, overwrite=False, progress=False)


def test_interrupted_prepare_never_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    cfg = tiny_config(out)
    real = shards_mod.DatasetWriter.write_split
    calls = []

    def crash_on_second_split(self, split, rows, shard_rows):
        calls.append(split)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(self, split, rows, shard_rows)

    monkeypatch.setattr(shards_mod.DatasetWriter, "write_split", crash_on_second_split)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(cfg, progress=False)
    assert (out / "train").is_dir() and not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="unfinished `ckf prepare`"):
        ShardStream(str(out), "train")
    monkeypatch.setattr(shards_mod.DatasetWriter, "write_split", real)
    m = run_prepare(cfg, progress=False)                      # a partial run is cleaned up without --overwrite
    assert (out / "manifest.json").exists() and not (out / DATASET_MARKER).exists()
    assert len(_ids(str(out))) == sum(m["counts"]["train"].values())


def test_overwrite_replaces_and_foreign_folders_are_refused(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "precious.txt").write_text("do not delete")
    cfg = tiny_config(out)
    with pytest.raises(DataError, match="not empty and not a ckf dataset"):
        run_prepare(cfg, progress=False)
    assert (out / "precious.txt").exists()
    run_prepare(cfg, overwrite=True, progress=False)
    assert not (out / "precious.txt").exists() and (out / "manifest.json").exists()


def test_prepare_is_deterministic_and_s3_round_trip(prepared_dataset, s3_url):
    url = f"{s3_url}/datasets/tiny"
    m = run_prepare(tiny_config(url), progress=False)
    local = prepared_dataset.manifest
    assert [(s["path"], s["sha256"]) for s in m["shards"]] == [(s["path"], s["sha256"]) for s in local["shards"]]
    assert read_dataset_manifest(url)[0] == m
    for split in ("train", "valid", "test"):
        assert _ids(url, split) == _ids(prepared_dataset.url, split)
    remote = [r.to_dict(lists=True) for r in ShardStream(url, "test", shuffle_buffer=0, prefetch=2)]
    assert remote == [r.to_dict(lists=True) for r in ShardStream(prepared_dataset.url, "test", shuffle_buffer=0)]
    with pytest.raises(DataError, match="already there"):
        run_prepare(tiny_config(url), progress=False)


def test_corrupt_and_missing_shards_are_named(prepared_dataset, tmp_path):
    import shutil

    url = str(tmp_path / "copy")
    shutil.copytree(prepared_dataset.url, url)
    entry = next(s for s in prepared_dataset.manifest["shards"] if s["split"] == "valid")
    path = f"{url}/{entry['path']}"
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(DataError, match=r"valid/part-00000\.parquet: corrupt shard.*sha256"):
        list(ShardStream(url, "valid", prefetch=2))
    import os

    os.remove(path)
    with pytest.raises(DataError, match=r"valid/part-00000\.parquet: file not found"):
        list(ShardStream(url, "valid", prefetch=0))
    with pytest.raises(DataError, match="no shards for split 'dev'"):
        ShardStream(url, "dev")
    open(f"{url}/manifest.json", "w").write("{not json")
    with pytest.raises(DataError, match="corrupt manifest"):
        ShardStream(url, "train")


def test_tokenizer_mismatch(prepared_dataset):
    import copy

    tok = load_tokenizer("smollm2")
    check_tokenizer(prepared_dataset.manifest, tok)                     # the right one passes
    other = copy.deepcopy(tok)
    other.add_tokens(["<ckf-extra>"])
    with pytest.raises(DataError, match="tokenizer mismatch.*smollm2.*re-run `ckf prepare`"):
        check_tokenizer(prepared_dataset.manifest, other)


def test_missing_bucket_and_unreachable_store(s3_server, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="bucket 'ckf-no-such-bucket' does not exist"):
        run_prepare(tiny_config("s3://ckf-no-such-bucket/ds"), progress=False)
    with pytest.raises(DataError, match="bucket 'ckf-no-such-bucket' does not exist"):
        ShardStream("s3://ckf-no-such-bucket/ds", "train")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")     # nothing listens there
    monkeypatch.setenv("CKF_STORAGE_OPTIONS", json.dumps({"config_kwargs": {"retries": {"max_attempts": 1}}}))
    with pytest.raises(DataError, match=r"s3://some-bucket/ds: storage unreachable.*AWS_ENDPOINT_URL"):
        ShardStream("s3://some-bucket/ds", "train")
    with pytest.raises(DataError, match=r"s3://some-bucket/ds: storage unreachable"):
        run_prepare(tiny_config("s3://some-bucket/ds"), progress=False)
    monkeypatch.setenv("CKF_STORAGE_OPTIONS", "[1, 2]")
    with pytest.raises(DataError, match="CKF_STORAGE_OPTIONS"):
        ShardStream("s3://some-bucket/ds", "train")


def test_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        ShardStream(str(tmp_path), "train")


def test_side_files_are_loaded_and_checked(prepared_dataset, tmp_path):
    import shutil

    from ckf_dist.data import load_cf_tables, load_items

    m = prepared_dataset.manifest
    tables = load_cf_tables(prepared_dataset.url)
    assert tables["user"].shape == (m["n_users"], m["cf"]["dim"])
    assert load_items(prepared_dataset.url).num_rows == m["n_items"]
    url = str(tmp_path / "copy")
    shutil.copytree(prepared_dataset.url, url)
    with open(f"{url}/cf/embeddings.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(DataError, match=r"cf/embeddings\.safetensors: corrupt file"):
        load_cf_tables(url)


def test_bad_records_end_to_end_error_or_counted_in_manifest(tmp_path):
    import gzip

    from ckf_dist.data.sources.synthetic import write_synthetic

    files = write_synthetic(str(tmp_path / "raw"), n_users=48, n_items=40, per_user=12, seed=7)
    lines = gzip.open(files["reviews"]).read().splitlines()
    lines[3:3] = [b'{"reviewerID": "X", "asin": ', b'{"reviewerID": "Y", "asin": "B000001", "overall": 9, "unixReviewTime": 5}']
    with gzip.open(files["reviews"], "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    cfg = tiny_config(tmp_path / "out", source="amazon2018", path=str(tmp_path / "raw"))
    with pytest.raises(DataError, match=r"reviews_Synthetic\.json\.gz:4: malformed JSON"):
        run_prepare(cfg, progress=False)
    assert not (tmp_path / "out").exists()                       # failed before anything was written
    cfg = tiny_config(tmp_path / "out", source="amazon2018", path=str(tmp_path / "raw"), bad_records="skip")
    m = run_prepare(cfg, progress=False)
    bad = m["source"]["bad_records"]
    assert bad["skipped"] == 2 and bad["by_reason"] == {"malformed_json": 1, "rating_out_of_range": 1}
    assert m["source"]["interactions"] == 48 * 12


def test_rows_are_written_shard_by_shard(tmp_path, monkeypatch):
    """Prepare streams prompt rows into shards: when a shard is written, no more than one shard of
    rows has been built beyond the rows already written (the rows are never all in memory)."""
    from ckf_dist.data import prompts

    built = {"n": 0}
    real_build = prompts.PromptBuilder.build

    def counting_build(self, s):
        built["n"] += 1
        return real_build(self, s)
    real_write = shards_mod.DatasetWriter.write_file
    ahead, written = [], [0]

    def watching_write(self, relpath, data):
        if "/part-" in relpath:
            ahead.append(built["n"] - written[0])           # rows built but not yet in a shard
            written[0] += pq.read_metadata(pa.BufferReader(data)).num_rows
        return real_write(self, relpath, data)
    monkeypatch.setattr(prompts.PromptBuilder, "build", counting_build)
    monkeypatch.setattr(shards_mod.DatasetWriter, "write_file", watching_write)
    cfg = tiny_config(tmp_path / "ds")
    m = run_prepare(cfg, progress=False)
    rows = cfg.data.shard_rows
    assert len(m["shards"]) >= 4 and max(ahead) == rows             # this shard's rows, no more
    assert sum(m["counts"]["train"].values()) > 3 * rows
    assert set(m["stages"]) == {"read", "protocol", "cf", "rows"} and all(v["s"] >= 0 for v in m["stages"].values())


def test_prepare_killed_mid_split_leaves_no_complete_dataset(tmp_path, monkeypatch):
    from ckf_dist.data import prompts

    real_build, calls = prompts.PromptBuilder.build, {"n": 0}

    def dies_later(self, s):
        calls["n"] += 1
        if calls["n"] == 150:
            raise KeyboardInterrupt("killed")
        return real_build(self, s)
    monkeypatch.setattr(prompts.PromptBuilder, "build", dies_later)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tiny_config(out), progress=False)
    assert list((out / "train").glob("part-*.parquet")) and not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="unfinished `ckf prepare`"):
        ShardStream(str(out), "train")
