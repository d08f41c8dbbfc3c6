"""Errors a user can act on: every storage or backbone problem is one line on stderr, quickly.

Each case runs the ``ckf`` command in a fresh process, as a user would, and checks the exit
status (2), that stderr is exactly one ``ckf: error:`` line without a traceback, that the line
names what is wrong, and for the backbone checks that the driver refuses within seconds
(before Ray or DeepSpeed start).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from ckf_dist.config import dump_config

CKF = str(Path(sys.executable).parent / "ckf")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "CKF_STORAGE_OPTIONS"}
    env.update(AWS_EC2_METADATA_DISABLED="true", **extra)     # never ask 169.254.169.254 for credentials
    return env


def _one_line_error(args: list[str], env: dict, timeout: float = 120) -> tuple[str, float]:
    started = time.monotonic()
    proc = subprocess.run([CKF, "--quiet", *args], capture_output=True, text=True, env=env, timeout=timeout)
    took = time.monotonic() - started
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckf: error: "), proc.stderr[-3000:]
    return lines[0], took


def test_consolidate_url_errors_are_one_line(tmp_path):
    out = str(tmp_path / "out")
    line, _ = _one_line_error(["consolidate", "foo://x/y", "--out", out], _env())
    assert "foo://x/y" in line and "s3://" in line
    if importlib.util.find_spec("gcsfs") is None:
        line, _ = _one_line_error(["consolidate", "gs://bucket/run", "--out", out], _env())
        assert "gs://bucket/run" in line and "pip install gcsfs" in line
    dead = f"http://127.0.0.1:{free_port()}"                  # nothing listens there
    line, took = _one_line_error(["consolidate", "s3://bucket/run", "--out", out],
                                 _env(AWS_ENDPOINT_URL=dead, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s"))
    assert "s3://bucket/run" in line and "EndpointConnectionError" in line and dead in line
    assert took < 60, took                                     # bounded retries, not a hang
    line, _ = _one_line_error(["consolidate", "s3://bucket/run", "--out", out],
                              _env(AWS_ENDPOINT_URL=dead, HOME=str(tmp_path / "home")))
    assert "s3://bucket/run" in line and "NoCredentialsError" in line and "AWS_ACCESS_KEY_ID" in line
    assert not Path(out).exists()


def _config(tmp_path, dataset, **model) -> str:
    from conftest import tiny_config

    cfg = tiny_config(dataset.url)
    cfg.model.backbone = model.get("backbone", "tiny-llama")
    cfg.train.storage = model.get("storage", str(tmp_path / "ckpt"))
    cfg.train.num_workers, cfg.train.max_steps = 1, 1
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    return str(path)


def test_train_preflight_refuses_within_seconds(prepared_dataset, tmp_path):
    """Backbone folder, family and storage are checked by the driver before Ray starts."""
    opt = tmp_path / "opt-125m"
    opt.mkdir()
    (opt / "config.json").write_text(json.dumps({"model_type": "opt", "hidden_size": 64}))
    line, took = _one_line_error(["train", _config(tmp_path, prepared_dataset, backbone=str(opt))], _env())
    assert "'opt' is not registered" in line and "llama" in line
    assert took < 10, f"an unknown family took {took:.1f}s to refuse"

    missing = tmp_path / "no-such-model"
    line, took = _one_line_error(["train", _config(tmp_path, prepared_dataset, backbone=str(missing))], _env())
    assert str(missing) in line and "never downloaded" in line and took < 10

    line, _ = _one_line_error(["train", _config(tmp_path, prepared_dataset, storage="foo://bucket/ckpt")], _env())
    assert "foo://bucket/ckpt" in line


def test_train_preflight_refuses_a_tokenizer_other_than_the_datasets(prepared_dataset, tmp_path):
    """A local backbone folder whose tokenizer differs from the dataset's fails before Ray starts."""
    from ckf_dist.model.backbone import tiny_backbone
    from ckf_dist.resources import load_tokenizer

    folder = tmp_path / "llama-other-tokenizer"
    tiny_backbone("llama").save_pretrained(folder)
    tok = copy.deepcopy(load_tokenizer("smollm2"))              # the loader's instance is shared (cached)
    tok.add_tokens(["<ckf-extra-token>"])
    tok.save_pretrained(folder)
    line, took = _one_line_error(["train", _config(tmp_path, prepared_dataset, backbone=str(folder))], _env())
    assert "tokenizer mismatch" in line and took < 20


@pytest.mark.parametrize("timeout", ["0", "soon"])
def test_bad_storage_timeout_is_named(timeout, monkeypatch):
    from ckf_dist.errors import StorageError
    from ckf_dist.storage import open_url

    monkeypatch.setenv("CKF_STORAGE_TIMEOUT", timeout)
    with pytest.raises(StorageError, match="CKF_STORAGE_TIMEOUT"):
        open_url("s3://bucket/x")


def test_object_store_requests_get_timeouts_and_bounded_retries(monkeypatch):
    from ckf_dist.storage import open_url

    monkeypatch.setenv("CKF_STORAGE_TIMEOUT", "7")
    monkeypatch.setenv("CKF_STORAGE_OPTIONS", json.dumps({"config_kwargs": {"connect_timeout": 3}}))
    fs, _ = open_url("s3://bucket/x")
    config = fs.config_kwargs if hasattr(fs, "config_kwargs") else fs.storage_options["config_kwargs"]
    assert config["read_timeout"] == 7 and config["connect_timeout"] == 3          # the user's value is kept
    assert config["retries"]["max_attempts"] == 1 and fs.retries >= 2               # one retry loop: s3fs's


def test_uploads_to_a_hung_server_time_out(tmp_path, monkeypatch):
    """A server that accepts connections and never answers (SIGSTOP): reads and uploads both fail
    within the timeout x s3fs's retries. Uploads used to wait forever on botocore's
    ``Expect: 100-continue``, which aiobotocore awaits without any timeout."""
    import signal

    import boto3
    from conftest import start_moto

    from ckf_dist.storage import open_url

    proc, endpoint = start_moto(tmp_path / "moto.log")
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                     aws_secret_access_key="s").create_bucket(Bucket="hung")
        monkeypatch.setenv("CKF_STORAGE_TIMEOUT", "1")
        monkeypatch.setenv("CKF_STORAGE_OPTIONS", json.dumps({"endpoint_url": endpoint, "key": "k", "secret": "s"}))
        fs, _ = open_url("s3://hung/x")
        fs.pipe_file("hung/x", b"before")
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            for op in (lambda: fs.cat_file("hung/x"), lambda: fs.pipe_file("hung/y", b"after" * 100)):
                started = time.monotonic()
                with pytest.raises(Exception, match="(?i)timeout"):
                    op()
                assert time.monotonic() - started < 60
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_failed_run_message_is_the_workers_own_error():
    """Ray wraps a worker's exception (per-rank failures, task errors, chains); the message unwraps it."""
    from ckf_dist.errors import StorageError
    from ckf_dist.stages.train import failure_message

    class GroupError(Exception):                   # the shape of ray.train.WorkerGroupError
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors:\n" + "\n".join(map(str, failures.values())))
            self.worker_failures = failures

    class TaskError(Exception):                    # the shape of RayTaskError: the original as .cause
        def __init__(self, cause):
            super().__init__(f"ray::RayTrainWorker failed\nTraceback ...\n{cause}")
            self.cause = cause

    own = StorageError("s3://b/run: storage unreachable or denied (ReadTimeoutError: timeout)")
    wrapped = GroupError({1: TaskError(own), 0: TaskError(RuntimeError("boom\n  at line 3"))})
    assert failure_message(wrapped) == "rank 0: RuntimeError: boom at line 3"
    assert failure_message(GroupError({1: TaskError(own)})) == f"rank 1: {own}"
    try:
        raise RuntimeError("outer") from ValueError("inner cause")
    except RuntimeError as exc:
        assert failure_message(exc) == "ValueError: inner cause"


def test_worker_error_goes_on_without_frames_and_its_traceback_to_a_file(tmp_path):
    """What a failing worker hands Ray: its own exception (type, message) with one frame and no
    chained cause, so Ray's console shows a few lines; the whole traceback is in the file."""
    import traceback

    from ckf_dist.errors import StorageError
    from ckf_dist.train.worker import traceback_to_file

    def deep(n):
        if n == 0:
            try:
                raise ConnectionError("socket reset")
            except ConnectionError as exc:
                raise StorageError("s3://b/run: storage unreachable (ConnectionError: socket reset)") from exc
        deep(n - 1)

    path = tmp_path / "logs" / "run" / "error_rank1.txt"
    with pytest.raises(StorageError) as info:
        traceback_to_file(path, deep, 5)
    exc = info.value
    assert str(exc).startswith("s3://b/run: storage unreachable")
    assert exc.__cause__ is None and exc.__suppress_context__
    printed = "".join(traceback.format_exception(exc))
    assert printed.count('File "') == 2, printed        # this test's frame and the re-raise
    assert "in deep" not in printed
    full = path.read_text()
    assert full.count("in deep") >= 3 and "ConnectionError: socket reset" in full, full
    assert "direct cause" in full
    def fails():
        raise ValueError("kept")

    with pytest.raises(ValueError) as info:              # an unwritable file: the exception goes on whole
        traceback_to_file(path / "x", fails)
    assert "in fails" in "".join(traceback.format_exception(info.value))
    assert traceback_to_file(path, max, 2, 3) == 3       # no exception: fn's result


def test_worker_setup_hook_names_a_function_ray_can_import():
    """Ray imports the hook by its dotted name in every worker process; a rename must fail here,
    not as a worker that cannot start."""
    import importlib

    from ckf_dist.stages.train import WORKER_SETUP, pin_ray_address

    module, _, name = WORKER_SETUP["worker_process_setup_hook"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is pin_ray_address
