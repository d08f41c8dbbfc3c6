"""Shared fixtures: a real S3 server (moto) on loopback, and a small prepared dataset.

- ``s3_server`` (session): starts ``python -m moto.server -H 127.0.0.1 -p <free port>`` and
  sets ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION=us-east-1`` and test credentials in
  ``os.environ`` for the session (s3fs, boto3 and pyarrow all honour them); yields the
  endpoint URL; the server is stopped on teardown.
- ``make_bucket`` (session): ``make_bucket(name) -> "s3://name"``; also importable as
  ``from conftest import make_bucket`` (it needs ``s3_server`` to be running).
- ``s3_url`` (function): a fresh, empty bucket as ``s3://ckf-test-<random>``.
- ``prepared_dataset`` (session): a tiny synthetic dataset prepared with the SmolLM2
  tokenizer into a temp folder; a :class:`PreparedDataset` (url, manifest, cfg).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

S3_ENV = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"moto server exited with {proc.returncode}: {tail}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"moto server did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def make_bucket(name: str) -> str:
    """Create bucket ``name`` on the running test S3 server; returns ``s3://name``."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        raise RuntimeError("make_bucket needs the s3_server fixture (AWS_ENDPOINT_URL is not set)")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session", autouse=True)
def _ray_without_token_auth():
    """Ray (>= 2.52) turns token auth on for a new local cluster and writes ~/.ray/auth_token,
    after which every later `ray start` on the machine requires the token. The tests' clusters
    are loopback-only and short-lived: keep them independent of whatever ran before."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        yield


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    """Start a moto S3 server on a free loopback port (output to ``log``); ``(process, endpoint URL)``."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, proc, log)
    except RuntimeError:
        proc.kill()
        raise
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Endpoint URL of a moto S3 server on 127.0.0.1, with the AWS_* environment set for the session.

    The server logs one line per request. Its output goes to a file, never to a pipe: a pipe
    nobody drains fills after a few hundred requests and the server then blocks mid-response,
    which the clients see as read timeouts."""
    proc, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "server.log")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
                mp.setenv(k, v)
            yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session", name="make_bucket")
def make_bucket_fixture(s3_server):
    """``make_bucket(name) -> "s3://name"`` on the session's S3 server."""
    return make_bucket


@pytest.fixture
def s3_url(s3_server) -> str:
    """A fresh empty bucket, as ``s3://ckf-test-<random>``."""
    return make_bucket(f"ckf-test-{uuid.uuid4().hex[:12]}")


@dataclass
class PreparedDataset:
    url: str
    manifest: dict
    cfg: object            # the CKFConfig it was prepared with


TINY_DATA = {
    "source": "synthetic", "synthetic_users": 48, "synthetic_items": 40, "synthetic_interactions_per_user": 12,
    "max_history": 5, "n_candidates": 5, "shard_rows": 32, "max_review_tokens": 12, "cold_user_fraction": 0.15,
}


def tiny_config(output: str, **data_overrides):
    """The tiny synthetic config used by ``prepared_dataset`` (other tests may vary it)."""
    from ckf_dist.config import config_from_dict

    data = dict(TINY_DATA, output=str(output), **data_overrides)
    return config_from_dict({"run_name": "tiny", "seed": 7, "data": data, "cf": {"epochs": 30, "patience": 5}}, "<tests>")


@pytest.fixture(scope="session")
def prepared_dataset(tmp_path_factory) -> PreparedDataset:
    """A tiny synthetic dataset (48 users, 40 items, all four tasks) prepared once per session."""
    from ckf_dist.stages.prepare import run_prepare

    out = Path(tmp_path_factory.mktemp("prepared")) / "tiny"
    cfg = tiny_config(out)
    manifest = run_prepare(cfg, overwrite=False, progress=False)
    return PreparedDataset(str(out), manifest, cfg)


# --------------------------------------------------------------------------- checkpoints (consolidate/evaluate)


def make_checkpoint(storage_url: str, dataset, *, run: str = "ckpt-run", step: int = 4, backbone: str = "tiny-llama",
                    config_backbone: str | None = None, export: bool = True, zero_shards: bool = False,
                    seed: int = 0, use_cf_slots: bool = True, randomize_bridge: bool = False):
    """Commit a checkpoint in the trainer's layout (``checkpoint.store``) for a tiny CKF model.

    The model (``backbone``, on ``dataset``'s CF tables) gets random non-zero adapters; the
    checkpoint holds ``export/trainable.safetensors`` (fp32) when ``export``, real single-process
    DeepSpeed ZeRO-2 shards under ``ds/`` when ``zero_shards``, ``config.yaml`` (naming
    ``config_backbone`` when given), ``metrics.jsonl``, per-rank file lists, manifest, marker.
    Returns ``(CheckpointRef, model)``.
    """
    import json
    import posixpath
    import shutil
    import tempfile

    import torch

    from ckf_dist.checkpoint import store
    from ckf_dist.storage import open_url
    from ckf_dist.config import config_to_dict, dump_config
    from ckf_dist.data import load_cf_tables
    from ckf_dist.data.shards import dataset_fingerprint
    from ckf_dist.model import build_ckf_model, load_backbone, save_trainable
    from ckf_dist.model.testing import randomize_adapters, randomize_bridge as shake_bridge

    cfg = tiny_config(dataset.url)
    cfg.run_name, cfg.model.backbone, cfg.train.export_dtype = run, backbone, "float32"
    cfg.model.bridge.use_cf_slots = use_cf_slots
    bb, _ = load_backbone(cfg.model)
    cf = load_cf_tables(dataset.url)
    model = build_ckf_model(cfg.model, bb, torch.from_numpy(cf["user"]), torch.from_numpy(cf["item"]), n_tasks=4)
    randomize_adapters(model, seed=seed, std=0.2)
    if randomize_bridge:
        shake_bridge(model, seed=seed + 1)
    model.eval()
    stage = Path(tempfile.mkdtemp(prefix="ckf-test-ckpt-"))
    name = store.step_dir_name(step)
    try:
        if zero_shards:
            _save_zero_shards(model, stage / "ds", name)
        if export:
            save_trainable(model, stage / "export" / "trainable.safetensors")
        if config_backbone:
            cfg.model.backbone = config_backbone
        (stage / "config.yaml").write_text(dump_config(cfg))
        rows = [{"step": s, "loss": 3.0 / s, "loss_text": 2.5 / s, "loss_cf": 3.5 / s, "lr": 1e-4, "w": 1 - s / step}
                for s in range(1, step + 1)]
        (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (stage / "state").mkdir()
        (stage / "state" / "rank_00000.json").write_text(json.dumps({"rank": 0, "step": step}))
        listing = store.hash_tree(stage)
        (stage / "files").mkdir()
        (stage / "files" / "rank_00000.json").write_text(json.dumps(listing))
        fs, root = open_url(storage_url)
        path = posixpath.join(root, run, name)
        for p in sorted(stage.rglob("*")):
            if p.is_file():
                dst = posixpath.join(path, p.relative_to(stage).as_posix())
                fs.makedirs(posixpath.dirname(dst), exist_ok=True)
                fs.put_file(str(p), dst)
        manifest = json.loads(json.dumps({
            "step": step, "total_steps": step, "world_size": 1, "run_name": run, "config": config_to_dict(cfg),
            "dataset": {"url": dataset.url, "tokenizer": dataset.manifest["tokenizer"],
                        "answer_tokens": dataset.manifest["answer_tokens"],
                        "fingerprint": dataset_fingerprint(dataset.manifest)},
            "zero_stage": 2, "export_dtype": "float32", "versions": {}, "metrics": rows[-1]}))
        store.commit(fs, path, manifest, 1)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return store.resolve_checkpoint(f"{storage_url.rstrip('/')}/{run}/{name}"), model


def _save_zero_shards(model, ds_dir: Path, tag: str) -> None:
    """Single-process DeepSpeed ZeRO-2 engine over ``model``'s trainable params; ``save_checkpoint`` like the trainer."""
    import deepspeed
    import torch

    import torch.distributed as dist

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    owns_group = not (dist.is_available() and dist.is_initialized())
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        try:
            deepspeed.init_distributed(dist_backend="gloo")
            params = [p for p in model.parameters() if p.requires_grad]
            config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                      "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-4),
                                                   config=config, model_parameters=params)
            engine.save_checkpoint(str(ds_dir), tag=tag, exclude_frozen_parameters=True, save_latest=True)
            engine.destroy()
        finally:
            if owns_group and dist.is_initialized():
                dist.destroy_process_group()


def pytest_addoption(parser):
    parser.addoption("--run-guard", action="store_true", help="also run tests marked guard (tens of minutes)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-guard"):
        return
    skip = pytest.mark.skip(reason="guard: the full-size interpreter sweep; run with --run-guard")
    for item in items:
        if "guard" in item.keywords:
            item.add_marker(skip)
