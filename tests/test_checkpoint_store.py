"""Commit protocol of checkpoint storage: marker last, uncommitted ignored, retention, hashes."""

import json
from pathlib import Path

import pytest

from ckf_dist.checkpoint import store
from ckf_dist.storage import open_url


def _write_rank_files(root: Path, step: int, world: int, payload: bytes = b"weights") -> str:
    ckpt = root / "run" / store.step_dir_name(step)
    for rank in range(world):
        stage = ckpt / f"r{rank}"
        stage.mkdir(parents=True)
        (stage / "shard.bin").write_bytes(payload + bytes([rank]))
    # what each rank uploads: its files under their relative names plus files/rank_R.json
    listing_dir = ckpt / "files"
    listing_dir.mkdir()
    for rank in range(world):
        listing = {f"r{rank}/shard.bin": {"sha256": store.sha256_file(ckpt / f"r{rank}" / "shard.bin"),
                                          "bytes": len(payload) + 1}}
        (listing_dir / f"rank_{rank:05d}.json").write_text(json.dumps(listing))
    return str(ckpt)


def test_commit_writes_manifest_then_marker(tmp_path):
    path = _write_rank_files(tmp_path, 2, world=2)
    fs, _ = open_url(str(tmp_path))
    assert store.latest_committed(str(tmp_path), "run") is None
    store.commit(fs, path, {"step": 2, "world_size": 2}, world_size=2)
    ref = store.latest_committed(str(tmp_path), "run")
    assert ref is not None and ref.step == 2
    assert set(ref.manifest["files"]) == {"r0/shard.bin", "r1/shard.bin"}
    store.verify(ref)


def test_uncommitted_newer_checkpoint_is_ignored(tmp_path):
    fs, _ = open_url(str(tmp_path))
    store.commit(fs, _write_rank_files(tmp_path, 2, 1), {"step": 2}, 1)
    _write_rank_files(tmp_path, 4, 1)  # uploaded but never committed (crash before the marker)
    ref = store.latest_committed(str(tmp_path), "run")
    assert ref.step == 2
    with pytest.raises(store.CheckpointError, match="never committed"):
        store.resolve_checkpoint(str(tmp_path / "run" / "step_00000004"))
    assert store.resolve_checkpoint(str(tmp_path / "run")).step == 2


def test_commit_refuses_when_a_rank_file_is_missing(tmp_path):
    fs, _ = open_url(str(tmp_path))
    path = _write_rank_files(tmp_path, 2, 2)
    (Path(path) / "r1" / "shard.bin").unlink()
    with pytest.raises(store.CheckpointError, match="r1/shard.bin"):
        store.commit(fs, path, {"step": 2}, 2)
    assert not (Path(path) / store.COMMIT_MARKER).exists()
    (Path(path) / "files" / "rank_00001.json").unlink()
    with pytest.raises(store.CheckpointError, match="rank 1 did not upload"):
        store.commit(fs, path, {"step": 2}, 2)


def test_fetch_detects_corruption(tmp_path):
    fs, _ = open_url(str(tmp_path))
    path = _write_rank_files(tmp_path, 2, 1)
    store.commit(fs, path, {"step": 2}, 1)
    ref = store.latest_committed(str(tmp_path), "run")
    out = store.fetch(ref, ["r0/shard.bin"], tmp_path / "dl")
    assert (out / "r0" / "shard.bin").read_bytes() == b"weights\x00"
    (Path(path) / "r0" / "shard.bin").write_bytes(b"weightz\x00")  # same size, different bytes
    with pytest.raises(store.CheckpointError, match="sha256 mismatch"):
        store.fetch(ref, ["r0/shard.bin"], tmp_path / "dl2")
    (Path(path) / "r0" / "shard.bin").unlink()
    with pytest.raises(store.CheckpointError, match="missing"):
        store.verify(ref)


def test_retention_keeps_newest_committed_and_in_progress(tmp_path):
    fs, _ = open_url(str(tmp_path))
    for step in (2, 4, 6):
        store.commit(fs, _write_rank_files(tmp_path, step, 1), {"step": step}, 1)
    _write_rank_files(tmp_path, 3, 1)   # stale uncommitted, older than newest commit
    _write_rank_files(tmp_path, 8, 1)   # in progress, newer than newest commit
    deleted = store.apply_retention(str(tmp_path), "run", num_to_keep=2)
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert left == ["step_00000004", "step_00000006", "step_00000008"]
    assert len(deleted) == 2


def test_resolve_errors_name_the_url(tmp_path):
    with pytest.raises(store.CheckpointError, match="not found"):
        store.resolve_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(store.CheckpointError, match="neither a checkpoint"):
        store.resolve_checkpoint(str(tmp_path / "empty"))


def test_commit_on_s3_checks_every_listed_file(s3_url, tmp_path):
    """The object-store commit path (one concurrent fetch of the rank lists, one listing for sizes):
    a truncated or missing file and a missing rank list each stop the commit before the marker."""
    fs, root = open_url(s3_url)
    local = Path(_write_rank_files(tmp_path, 2, world=2))
    remote = f"{root}/run/{local.name}"
    fs.put(str(local) + "/", remote, recursive=True)
    fs.pipe(f"{remote}/r1/shard.bin", b"short")                 # same name, wrong size
    with pytest.raises(store.CheckpointError, match="r1/shard.bin: expected 8 bytes, found 5"):
        store.commit(fs, remote, {"step": 2}, 2)
    fs.rm(f"{remote}/r1/shard.bin")
    with pytest.raises(store.CheckpointError, match="r1/shard.bin: expected 8 bytes, found None"):
        store.commit(fs, remote, {"step": 2}, 2)
    fs.put_file(str(local / "r1" / "shard.bin"), f"{remote}/r1/shard.bin")
    fs.rm(f"{remote}/files/rank_00001.json")
    with pytest.raises(store.CheckpointError, match="rank 1 did not upload"):
        store.commit(fs, remote, {"step": 2}, 2)
    assert store.latest_committed(s3_url, "run") is None
    fs.pipe(f"{remote}/files/rank_00001.json", b'{"r1/shard.bin": ')     # truncated upload of the list
    with pytest.raises(store.CheckpointError, match="rank 1's file list is not valid JSON"):
        store.commit(fs, remote, {"step": 2}, 2)
    fs.put_file(str(local / "files" / "rank_00001.json"), f"{remote}/files/rank_00001.json")
    store.commit(fs, remote, {"step": 2}, 2)
    ref = store.latest_committed(s3_url, "run")
    assert ref.step == 2 and set(ref.manifest["files"]) == {"r0/shard.bin", "r1/shard.bin"}
