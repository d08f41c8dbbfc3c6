"""Storage that hangs: a stopped S3 server during a save ends the run in bounded time.

``ckf train`` (1 worker, tiny model) checkpoints every 10 steps to a private moto server. Once
step 10 is committed the server is frozen with SIGSTOP, so the step-20 save finds a server
that accepts connections and never answers, the way a hung endpoint behaves. With
``CKF_STORAGE_TIMEOUT=1`` every request gives up after 1 s and s3fs's bounded retries (Ray
retries the upload, its controller then fails writing its own snapshot); the run must end with
one clear last line naming the URL that timed out, and step 10 must stay committed and whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import S3_ENV, start_moto, tiny_config

from ckf_dist.checkpoint import store
from ckf_dist.config import dump_config

pytest.importorskip("ray")
pytestmark = [pytest.mark.timeout(900), pytest.mark.ray]


def test_stopped_s3_server_during_a_save_fails_the_run_and_keeps_the_last_commit(prepared_dataset, tmp_path, monkeypatch):
    import boto3

    proc, endpoint = start_moto(tmp_path / "moto.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in ("RAY_ADDRESS", "CKF_FAULT")}
    env.update(S3_ENV, AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true", CKF_STORAGE_TIMEOUT="1")
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="hang")
        cfg = tiny_config(prepared_dataset.url)
        cfg.run_name, cfg.model.backbone = "hang", "tiny-llama"
        t = cfg.train
        t.storage, t.num_workers, t.max_steps, t.save_every, t.num_to_keep = "s3://hang/ckpt", 1, 400, 10, 5
        t.max_failures, t.micro_batch_size, t.export_dtype = 0, 2, "float32"
        config = tmp_path / "hang.yaml"
        config.write_text(dump_config(cfg))
        train = subprocess.Popen([str(Path(sys.executable).parent / "ckf"), "train", str(config)], env=env,
                                 stdout=open(tmp_path / "train.out", "w"), stderr=open(tmp_path / "train.err", "w"))
        marker = f"ckpt/hang/{store.step_dir_name(10)}/{store.COMMIT_MARKER}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and train.poll() is None:
            if s3.list_objects_v2(Bucket="hang", Prefix=marker).get("KeyCount"):
                break
            time.sleep(0.2)
        assert train.poll() is None, (tmp_path / "train.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "step 10 was never committed"
        os.kill(proc.pid, signal.SIGSTOP)                     # the server hangs from here on
        stopped = time.monotonic()
        try:
            rc = train.wait(timeout=420)
        except subprocess.TimeoutExpired:
            train.kill()
            pytest.fail("the run did not end within 420 s of the storage hanging")
        took = time.monotonic() - stopped
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    try:
        err = (tmp_path / "train.err").read_text()
        assert rc == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("ckf: error: training run 'hang' failed"), err[-3000:]
        assert "timeout" in last.lower() and endpoint.split("//")[1] in last, last
        assert took < 300, f"{took:.0f}s from the hang to the error"
        # the storage options name this server, so no cached client of another test's server is reused
        monkeypatch.setenv("CKF_STORAGE_OPTIONS", json.dumps({"endpoint_url": endpoint, "key": "testing",
                                                              "secret": "testing"}))
        ref = store.latest_committed("s3://hang/ckpt", "hang")
        assert ref is not None and ref.step == 10, ref                 # the last commit stays the newest
        store.verify(ref, deep=True)                                    # and whole
        print(f"hang -> error in {took:.1f}s")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _start_train(cfg, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """``ckf train`` of ``cfg`` in the background, its output in ``tmp_path/train.out``; returns
    once its log shows step 6 (the run is training and has committed a checkpoint)."""
    config = tmp_path / f"{cfg.run_name}.yaml"
    config.write_text(dump_config(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CKF_FAULT")}
    out = tmp_path / "train.out"
    train = subprocess.Popen([str(Path(sys.executable).parent / "ckf"), "train", str(config)], env=env,
                             stdout=open(out, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "[ckf] step 6/" not in out.read_text() and train.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if train.poll() is not None or "[ckf] step 6/" not in out.read_text():
        train.kill()
        pytest.fail(f"the run did not reach step 6:\n{out.read_text()[-3000:]}")
    return train, out


def _kill_driver_and_wait(train: subprocess.Popen, procs: dict[int, str], run_dir: Path, what: str) -> None:
    """SIGKILL the driver; every process in ``procs`` (pid -> start time) must be gone within 60 s,
    and no checkpoint of ``run_dir`` committed after the kill."""
    from ckf_dist.reaper import start_time

    os.kill(train.pid, signal.SIGKILL)
    train.wait(timeout=10)
    committed = sorted(p.parent.name for p in run_dir.glob("step_*/COMMITTED"))
    deadline = time.monotonic() + 60
    alive = list(procs)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if start_time(p) == procs[p]]        # the same process, still there
        time.sleep(0.5)
    assert not alive, f"{what} still running 60 s after the driver died: {alive}"
    time.sleep(3)
    after = sorted(p.parent.name for p in run_dir.glob("step_*/COMMITTED"))
    assert after == committed                   # nothing committed once the driver is gone


def test_killing_the_driver_stops_its_workers_and_agents(prepared_dataset, tmp_path):
    """SIGKILL of `ckf train` mid-run: every Ray process it started is gone within seconds (the
    reaper), and no checkpoint is committed after the kill."""
    from ckf_dist.reaper import ray_descendants

    cfg = tiny_config(prepared_dataset.url)
    cfg.run_name, cfg.model.backbone = "orphans", "tiny-llama"
    t = cfg.train
    t.storage, t.num_workers, t.max_steps, t.save_every, t.micro_batch_size = str(tmp_path / "ckpt"), 1, 2000, 5, 2
    train, _ = _start_train(cfg, tmp_path)
    try:
        procs = ray_descendants(train.pid)
        assert len(procs) >= 4, procs              # gcs, raylet, agents, the controller and the worker
        _kill_driver_and_wait(train, procs, tmp_path / "ckpt" / "orphans", "Ray processes")
    finally:
        if train.poll() is None:
            train.kill()


def _train_workers() -> dict[int, str]:
    """pid -> start time of every Ray Train worker process on this machine."""
    from ckf_dist.reaper import start_time

    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "RayTrainWorker" in cmd:
            t = start_time(int(entry.name))
            if t is not None:
                out[int(entry.name)] = t
    return out


def test_killing_the_driver_of_a_remote_cluster_run_stops_its_workers(prepared_dataset, tmp_path):
    """`ckf train` with `train.address` (a cluster it did not start, so no reaper): SIGKILL of the
    driver ends its Ray job, and the cluster stops the job's controller and training workers
    within a minute; the cluster itself stays up and nothing is committed after the kill."""
    from ray.cluster_utils import Cluster

    others = _train_workers()                  # another training on this machine is not ours to count
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    try:
        cfg = tiny_config(prepared_dataset.url)
        cfg.run_name, cfg.model.backbone = "remote-orphans", "tiny-llama"
        t = cfg.train
        t.storage, t.num_workers, t.max_steps, t.save_every = str(tmp_path / "ckpt"), 2, 2000, 5
        t.micro_batch_size, t.address = 2, cluster.address
        train, _ = _start_train(cfg, tmp_path)
        try:
            workers = {p: t for p, t in _train_workers().items() if others.get(p) != t}
            assert len(workers) == 2, workers
            _kill_driver_and_wait(train, workers, tmp_path / "ckpt" / "remote-orphans", "training workers")
            assert cluster.head_node.remaining_processes_alive()      # the user's cluster is left running
        finally:
            if train.poll() is None:
                train.kill()
    finally:
        cluster.shutdown()
