"""Writer leases (one prepare per dataset folder, one train per run) and the resume-config check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_checkpoint, tiny_config

from ckf_dist.config import config_from_dict, dump_config
from ckf_dist.errors import StorageError, TrainError
from ckf_dist.lease import Lease


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    folder = str(tmp_path / "ds")
    with Lease(folder, "ckf prepare"):
        lease_file = tmp_path / ".ds.ckf-lease"
        assert json.loads(lease_file.read_text())["pid"] == os.getpid()
        with pytest.raises(StorageError, match=rf"locked by another ckf prepare \(host .*, pid {os.getpid()}"):
            Lease(folder, "ckf prepare").acquire()
    assert not lease_file.exists()                                # released
    with Lease(folder, "ckf prepare"):                            # free again
        pass


def test_a_folder_whose_parent_does_not_exist_yet(tmp_path):
    """A fresh clone has no runs/data/: the lease creates the parent (the first `make demo` failed)."""
    with Lease(str(tmp_path / "runs" / "data" / "ml-100k"), "ckf prepare"):
        assert (tmp_path / "runs" / "data" / ".ml-100k.ckf-lease").is_file()


def test_stale_leases_are_taken_over(tmp_path):
    folder = str(tmp_path / "run")
    lease_file = tmp_path / ".run.ckf-lease"
    lease_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "old", "expires": time.time() - 1}))
    with Lease(folder, "ckf train"):                              # expired
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lease_file.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "token": "old",
                                      "expires": time.time() + 600}))
    with Lease(folder, "ckf train"):                              # same host, its process is gone
        pass
    lease_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "old", "expires": time.time() + 600}))
    with pytest.raises(StorageError, match="host elsewhere"):      # live on another host: refused
        Lease(folder, "ckf train").acquire()


def test_a_lease_taken_over_stops_the_commit(tmp_path):
    lease = Lease(str(tmp_path / "ds"), "ckf prepare", ttl=0.6).acquire()
    try:
        (tmp_path / ".ds.ckf-lease").write_text(json.dumps({"token": "intruder", "expires": time.time() + 60}))
        deadline = time.time() + 5
        while not lease.lost and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(StorageError, match="taken by another ckf prepare; not committing"):
            lease.check()
    finally:
        lease.release()
    assert json.loads((tmp_path / ".ds.ckf-lease").read_text())["token"] == "intruder"   # not ours to delete


def test_lease_on_object_storage(s3_url):
    with Lease(f"{s3_url}/runs/r1", "ckf train"):
        with pytest.raises(StorageError, match="locked by another ckf train"):
            Lease(f"{s3_url}/runs/r1", "ckf train").acquire()
        with Lease(f"{s3_url}/runs/r2", "ckf train"):              # another run is independent
            pass


def test_s3_leases_are_atomic_under_a_race(s3_url, monkeypatch):
    """On S3 the lease is taken with conditional writes: a racer that read "no lease" (or a
    stale one) just before the winner wrote is refused, not silently let in; a heartbeat that
    finds another version loses the lease. (The read-back of other stores would let both in
    when the reads come before both writes.)"""
    winner = Lease(f"{s3_url}/runs/race", "ckf train", ttl=60)
    assert winner.conditional
    loser = Lease(f"{s3_url}/runs/race", "ckf train", ttl=60)
    def seen_once(value, real):
        calls = []
        return lambda: value if not calls.append(1) and len(calls) == 1 else real()

    # what the loser saw just before the winner wrote: no lease (its later reads are real)
    monkeypatch.setattr(loser, "_version", seen_once(None, loser._version))
    monkeypatch.setattr(loser, "_read", seen_once(None, loser._read))
    winner.acquire()
    try:
        with pytest.raises(StorageError, match="locked by another ckf train"):
            loser.acquire()
        assert json.loads(winner.fs.cat_file(winner.path))["token"] == winner.token    # the winner's stays
        # a stale lease raced for by two takers: the version both read is gone after the first
        winner._stop.set()
        winner._thread.join(timeout=5)
        stale = winner.etag
        winner.fs.pipe_file(winner.path, json.dumps({"host": "elsewhere", "pid": 1, "token": "old",
                                                     "expires": time.time() - 1}).encode())
        stale_version = winner._version()
        first = Lease(f"{s3_url}/runs/race", "ckf train", ttl=60).acquire()
        try:
            second = Lease(f"{s3_url}/runs/race", "ckf train", ttl=60)
            old = {"host": "elsewhere", "pid": 1, "token": "old", "expires": time.time() - 1}
            monkeypatch.setattr(second, "_read", seen_once(old, second._read))        # it read the stale lease too
            monkeypatch.setattr(second, "_version", seen_once(stale_version, second._version))
            with pytest.raises(StorageError, match="locked by another ckf train"):
                second.acquire()
            # the first holder's heartbeat only rewrites its own version: the old holder's fails
            assert winner._put_if(stale) is False
        finally:
            first.release()
    finally:
        winner._stop.set()


def test_concurrent_prepare_into_one_folder_is_refused_and_nothing_is_corrupted(tmp_path):
    from ckf_dist.data.shards import read_dataset_manifest
    from ckf_dist.data.stream import ShardStream
    from ckf_dist.stages.prepare import run_prepare

    out = tmp_path / "ds"
    cfg = tiny_config(str(out))
    cfg.cf.epochs, cfg.cf.patience = 200, 200                     # a few seconds of CF training: time to collide
    config = tmp_path / "prep.yaml"
    config.write_text(dump_config(cfg))
    first = subprocess.Popen([str(Path(sys.executable).parent / "ckf"), "--quiet", "prepare", str(config)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lease_file = tmp_path / ".ds.ckf-lease"
    deadline = time.time() + 120
    while not lease_file.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert lease_file.exists(), first.communicate()[0][-3000:]
    with pytest.raises(StorageError, match=rf"{out}: locked by another ckf prepare"):
        run_prepare(cfg, progress=False)
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 0, output[-3000:]
    manifest = read_dataset_manifest(str(out))[0]
    rows = sum(1 for _ in ShardStream(str(out), "train", shuffle_buffer=1, prefetch=0, drop_remainder=False))
    assert rows == sum(manifest["counts"]["train"].values())      # every shard read back with its sha256
    assert not lease_file.exists()


def test_resume_refuses_a_config_that_differs_where_it_matters(prepared_dataset, tmp_path):
    from ckf_dist.stages.train import check_resume

    ref, _ = make_checkpoint(str(tmp_path / "ckpts"), prepared_dataset, run="resume-run")
    cfg = config_from_dict(ref.manifest["config"], "<saved>")
    cfg.train.storage = str(tmp_path / "ckpts")
    check_resume(cfg)                                             # the same config resumes
    cfg.train.max_steps, cfg.train.save_every = 999, 7           # longer, saved more often: fine
    cfg.data.engine, cfg.data.ray_workers = "ray", 8             # how the dataset is prepared: fine
    check_resume(cfg)
    cfg.train.lr, cfg.model.lora.r = cfg.train.lr * 10, cfg.model.lora.r * 2
    with pytest.raises(TrainError, match=r"differs in 2 field\(s\).*model.lora.r: .*train.lr: "):
        check_resume(cfg)


def test_resume_on_other_workers_keeps_the_global_batch(prepared_dataset, tmp_path, capsys):
    from ckf_dist.stages.train import check_resume

    ref, _ = make_checkpoint(str(tmp_path / "ckpts"), prepared_dataset, run="elastic-run")
    saved = config_from_dict(ref.manifest["config"], "<saved>")
    want = saved.train.global_batch
    for workers in (1, 2, 4):
        cfg = config_from_dict(ref.manifest["config"], "<saved>")
        cfg.train.storage = str(tmp_path / "ckpts")
        if want % (cfg.train.micro_batch_size * workers):
            continue
        cfg.train.num_workers = workers
        out = check_resume(cfg)                                   # grad_accum follows the number of workers
        assert out.train.num_workers == workers and out.train.global_batch == want
        assert out.train.grad_accum == want // (cfg.train.micro_batch_size * workers)
    assert "keeps the global batch" in capsys.readouterr().out
    cfg = config_from_dict(ref.manifest["config"], "<saved>")
    cfg.train.storage = str(tmp_path / "ckpts")
    cfg.train.micro_batch_size, cfg.train.grad_accum = cfg.train.micro_batch_size * 2, 1
    cfg.train.num_workers = max(1, want // cfg.train.micro_batch_size)     # same product, other split: fine
    if cfg.train.global_batch == want:
        assert check_resume(cfg).train.global_batch == want
    cfg.train.num_workers = want + 1                              # no grad_accum keeps it: refused, with the sizes
    with pytest.raises(TrainError, match=rf"global batch is {want} rows"):
        check_resume(cfg)


def test_a_second_train_of_a_running_run_is_refused_before_ray_starts(prepared_dataset, tmp_path):
    """While a run's lease is held (a `ckf train` of it is running), another `ckf train` of the same
    run name is refused in seconds, as one line naming the holder, and writes nothing."""
    cfg = tiny_config(prepared_dataset.url)
    cfg.run_name, cfg.model.backbone = "busy", "tiny-llama"
    cfg.train.storage, cfg.train.num_workers, cfg.train.max_steps = str(tmp_path / "ckpt"), 1, 2
    config = tmp_path / "busy.yaml"
    config.write_text(dump_config(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with Lease(str(tmp_path / "ckpt" / "busy"), "ckf train"):
        started = time.monotonic()
        proc = subprocess.run([str(Path(sys.executable).parent / "ckf"), "--quiet", "train", str(config)],
                              capture_output=True, text=True, env=env, timeout=120)
        took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "locked by another ckf train (host " in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert took < 20, took
    assert [p.name for p in (tmp_path / "ckpt" / "busy").iterdir()] == []      # nothing written in the run
