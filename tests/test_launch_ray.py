"""`ckf submit` / `ckf jobs` against a real Ray head on 127.0.0.1 with its dashboard.

One head for the module, started through launch/multinode/head.sh (so the script is exercised
too) in its own session, with every port and its temp dir private to this test, and stopped by
process id: other Ray clusters on the machine are never touched (no `ray stop`). The head's
environment has no AWS_* / RAY_* variables, so a job only sees what `--env` passed through.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from ckf_dist.launch import cli as launch_cli

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DASHBOARD_DEPS = ("aiohttp_cors", "opencensus", "prometheus_client", "colorful", "smart_open")

pytestmark = [pytest.mark.timeout(600), pytest.mark.ray]


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _importable(name: str) -> bool:
    if name in sys.modules:  # some (colorful) replace their module object: find_spec would raise
        return True
    return importlib.util.find_spec(name) is not None


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getsid(int(d)) == sid:
                    pids.append(int(d))
            except OSError:
                pass
    return pids


def _pids_mentioning(marker: str) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    pids.append(int(d))
            except OSError:
                pass
    return pids


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM our head's process group, then SIGKILL whatever of ours is left, by pid."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=4)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for pid in set(_session_pids(proc.pid)) | set(_pids_mentioning(temp_dir)):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    if not (VENV_BIN / "ray").exists():
        pytest.skip(f"no `ray` executable beside {sys.executable}")
    missing = [m for m in DASHBOARD_DEPS if not _importable(m)]
    assert not missing, f"the Ray dashboard (Jobs API) needs ray[default]; missing modules: {missing}"
    temp_dir = tempfile.mkdtemp(prefix="ckfray", dir="/tmp")  # short: Ray's unix sockets live under it
    gcs, dash, dash_metrics, autoscaler_metrics, *other = _free_ports(11)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env["RAY_AUTH_MODE"] = "disabled"   # loopback test head; see conftest._ray_without_token_auth
    # Ray's metrics servers use fixed default ports: private ones, so that heads never collide.
    env.update(DASHBOARD_METRIC_PORT=str(dash_metrics), AUTOSCALER_METRIC_PORT=str(autoscaler_metrics))
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    extra = dict(zip(["--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                      "--node-manager-port", "--object-manager-port", "--metrics-export-port",
                      "--runtime-env-agent-port"], other))
    cmd = ["bash", str(REPO / "launch/multinode/head.sh"), "--node-ip", "127.0.0.1", "--port", str(gcs),
           "--dashboard-port", str(dash), "--num-cpus=4", "--num-gpus=0", "--include-dashboard=true",
           "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block", *[f"{k}={v}" for k, v in extra.items()]]
    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=REPO)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/jobs/", timeout=3).read()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Ray head did not come up:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield SimpleNamespace(address=url, gcs=f"127.0.0.1:{gcs}", temp_dir=temp_dir, sid=proc.pid)
    finally:
        _stop_head(proc, temp_dir)


@pytest.fixture
def scratch_config(tmp_path) -> Path:
    """A valid config outside the repository: its folder alone is uploaded (one small file)."""
    cfg = tmp_path / "launch-test.yaml"
    cfg.write_text("run_name: launch-test\ntrain:\n  storage: s3://unused/ckpt\ndata:\n  output: s3://unused/data\n")
    return cfg


def _submitted_id(err: str) -> str:
    m = re.search(r"submitted (\S+)", err)
    assert m, err
    return m.group(1)


def test_dashboard_and_jobs_api_listen_on_loopback_only(ray_head):
    """The dashboard (HTTP + Jobs API, which runs any command it is sent) of a head started by
    head.sh with the default --dashboard-host listens on 127.0.0.1 only. (Ray's own gRPC
    services, GCS and raylet, listen on all interfaces whatever the node IP: launch/README.md
    says to keep cluster ports inside a private network.)"""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout if shutil.which("ss") else ""
    if not out:
        pytest.skip("ss not available")
    ours = set(_session_pids(ray_head.sid))
    port = ray_head.address.rsplit(":", 1)[1]
    dashboard = [line.split()[3] for line in out.splitlines()
                 if line.split()[3].rsplit(":", 1)[-1] == port and {int(p) for p in re.findall(r"pid=(\d+)", line)} & ours]
    assert dashboard, f"no listener of our head on the dashboard port {port}"
    assert all(a.startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")) for a in dashboard), dashboard


def test_failing_job_returns_its_exit_code_and_prints_the_log_tail(ray_head, scratch_config, monkeypatch, capsys):
    # Ray's client would let these override the address we pass; ours must win.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    monkeypatch.setenv("CKF_TEST_SECRET", "s3cr3t-value-123")
    script = ("import os, sys; s = os.environ['CKF_TEST_SECRET']; print('secret', s, 'len', len(s)); "
              "print('[ckf] step 1/4 | loss 2.5'); print('CKF_BOOM: shard 3 is corrupt', file=sys.stderr); sys.exit(3)")
    rc = launch_cli.main(["submit", str(scratch_config), "--address", ray_head.address, "--env", "CKF_TEST_SECRET",
                          "--entrypoint", f'python -c "{script}"', "--tail-lines", "5"])
    out, err = capsys.readouterr()
    assert rc == 3, err
    job_id = _submitted_id(err)
    assert re.fullmatch(r"launch-test-[0-9a-f]{6}", job_id)
    assert "secret **** len 16" in out          # the value reached the job and was masked on the way back
    assert "s3cr3t-value-123" not in out + err
    tail = err.split("---- last", 1)[1]
    assert "CKF_BOOM: shard 3 is corrupt" in tail
    assert f"job {job_id} FAILED (exit code 3)" in err

    # ckf jobs list | logs | status on the same job.
    assert launch_cli.main(["jobs", "list", "--address", ray_head.address]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith(job_id))
    assert "FAILED" in row and "launch-test" in row
    assert launch_cli.main(["jobs", "logs", job_id, "--address", ray_head.address, "--tail", "1"]) == 0
    logs = capsys.readouterr().out
    assert logs.strip().endswith("CKF_BOOM: shard 3 is corrupt")
    assert launch_cli.main(["jobs", "status", job_id, "--address", ray_head.address]) == 3
    assert capsys.readouterr().out.strip() == "FAILED"
    assert launch_cli.main(["jobs", "logs", "no-such-job", "--address", ray_head.address]) == 2
    assert "no job 'no-such-job'" in capsys.readouterr().err


def test_stop_a_running_job(ray_head, scratch_config, capsys):
    script = "import time; print('CKF_SLEEPING', flush=True); time.sleep(300)"
    rc = launch_cli.main(["submit", str(scratch_config), "--address", ray_head.address, "--no-follow",
                          "--entrypoint", f'python -c "{script}"'])
    out, err = capsys.readouterr()
    assert rc == 0
    job_id = out.strip().splitlines()[-1]
    from ckf_dist.launch.jobs import job_status

    deadline = time.monotonic() + 60
    while job_status(ray_head.address, job_id)[0] != "RUNNING":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.5)
    assert launch_cli.main(["jobs", "stop", job_id, "--address", ray_head.address]) == 0
    assert "STOPPED" in capsys.readouterr().err
    assert job_status(ray_head.address, job_id) == ("STOPPED", 143)
    assert launch_cli.main(["jobs", "stop", job_id, "--address", ray_head.address]) == 0
    assert "already ended" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_training_run_succeeds_and_commits_to_s3(ray_head, request, capsys):
    """The whole path: prepare and train configs/tiny-cpu.yaml as two jobs, shards and
    checkpoints on a real S3 server (moto on 127.0.0.1), credentials passed by --env."""
    endpoint = request.getfixturevalue("s3_server")
    bucket = f"ckf-launch-{uuid.uuid4().hex[:8]}"
    request.getfixturevalue("make_bucket")(bucket)
    assert os.environ.get("AWS_ENDPOINT_URL") == endpoint
    env_args = [a for k in sorted(os.environ) if k.startswith("AWS_") for a in ("--env", k)]
    run = f"launch-tiny-{uuid.uuid4().hex[:6]}"
    sets = ["--set", f"run_name={run}", "--set", f"data.output=s3://{bucket}/data",
            "--set", f"train.storage=s3://{bucket}/ckpt"]
    base = ["submit", str(REPO / "configs/tiny-cpu.yaml"), "--address", ray_head.address, *env_args, *sets]

    rc = launch_cli.main([*base, "--command", "prepare"])
    out, err = capsys.readouterr()
    assert rc == 0, out[-3000:] + err[-3000:]

    rc = launch_cli.main(base)
    out, err = capsys.readouterr()
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "SUCCEEDED" in err
    for k in env_args[1::2]:
        value = os.environ[k]
        if len(value) >= 4 and k != "AWS_DEFAULT_REGION" and "URL" not in k:
            assert value not in out + err, f"{k} leaked into the output"

    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
        Bucket=bucket, Prefix=f"ckpt/{run}/").get("Contents", [])]
    committed = [k for k in keys if k.endswith("/COMMITTED")]
    assert committed, f"no committed checkpoint under s3://{bucket}/ckpt/{run}/: {keys[:20]}"
