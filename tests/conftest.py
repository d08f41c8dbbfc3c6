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


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}: {proc.stderr.read().decode(errors='replace')[-2000:]}")
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


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on 127.0.0.1, with the AWS_* environment set for the session."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    try:
        _wait_for_port(port, proc)
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
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
    from ckf_dist.data.prepare import run_prepare

    out = Path(tmp_path_factory.mktemp("prepared")) / "tiny"
    cfg = tiny_config(out)
    manifest = run_prepare(cfg, overwrite=False, progress=False)
    return PreparedDataset(str(out), manifest, cfg)
