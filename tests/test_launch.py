"""`ckf submit` / `ckf jobs` without a cluster: planning, secrets, upload contents, exit codes.

The real Ray head tests are in test_launch_ray.py; here a fake Jobs client stands in where a
cluster would answer, so every branch of the exit-status logic runs in milliseconds.
"""

from __future__ import annotations

import argparse
import io
import re
import shlex
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from ckf_dist.launch import cli as launch_cli
from ckf_dist.launch.client import LaunchError, connect, resolve_address
from ckf_dist.launch.follow import EXIT_STOPPED, follow_job
from ckf_dist.launch.redact import Redactor, find_secrets
from ckf_dist.launch.runtime_env import DEFAULT_EXCLUDES, build_runtime_env, choose_working_dir, upload_preview
from ckf_dist.launch.submit import build_entrypoint, make_submission_id, plan_submission, submit

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small ckf-dist-shaped project with the things an upload must and must not carry."""
    root = tmp_path / "proj"
    for rel, text in {
        "pyproject.toml": "[project]\nname='x'\n",
        "ckf_dist/__init__.py": "",
        "ckf_dist/data/__init__.py": "# the package's data module: must be uploaded\n",
        "configs/run.yaml": "run_name: My_Run.v2\ntrain:\n  storage: s3://bucket/ckpt\ndata:\n  output: s3://bucket/data\n",
        "data/raw.csv": "big raw data\n",
        "runs/ckpt/step_1/x": "checkpoint\n",
        ".venv/lib/site.py": "venv\n",
        "model.safetensors": "weights\n",
        ".env": "AWS_SECRET_ACCESS_KEY=hunter2hunter2\n",
        "keys/id.pem": "-----BEGIN PRIVATE KEY-----\n",
        "sub/.git/HEAD": "ref\n",
    }.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


# --------------------------------------------------------------------------- ids, addresses


def test_submission_id_is_derived_from_run_name_and_unique():
    ids = {make_submission_id("My_Run.v2") for _ in range(50)}
    assert len(ids) == 50
    for i in ids:
        assert re.fullmatch(r"my-run-v2-[0-9a-f]{6}", i), i
    long = make_submission_id("x" * 200)
    assert len(long) <= 63 and re.fullmatch(r"[a-z0-9-]+", long)
    assert make_submission_id("???").startswith("ckf-")


def test_resolve_address_forms(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert resolve_address(None) == "http://127.0.0.1:8265"
    assert resolve_address("head") == "http://head:8265"
    assert resolve_address("head:9000") == "http://head:9000"
    assert resolve_address("https://ray.example.com/") == "https://ray.example.com"
    with pytest.raises(LaunchError, match="Ray Client address"):
        resolve_address("ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address: not a Jobs API URL
    assert resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert resolve_address(None) == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.2:8265")
    assert resolve_address(None) == "http://10.0.0.2:8265"
    assert resolve_address("http://explicit:8265") == "http://explicit:8265"


def test_unreachable_address_names_it_and_suggests_ray_start(monkeypatch):
    # RAY_ADDRESS would silently win inside Ray's client; the explicit address must be used.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(LaunchError) as info:
        connect(url)
    text = str(info.value)
    assert url in text and "ray start --head" in text and "127.0.0.1" in text
    assert "RAY_ADDRESS" not in text and ":1 " not in text


def test_gcs_port_gets_a_hint():
    with pytest.raises(LaunchError, match="GCS port"):
        connect("http://127.0.0.1:6379")


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("data, key", [
    ({"train": {"extra_env": {"AWS_SECRET_ACCESS_KEY": "abc"}}}, "train.extra_env.AWS_SECRET_ACCESS_KEY"),
    ({"data": {"storage_options": {"password": "pw"}}}, "data.storage_options.password"),
    ({"model": {"hf_token": "x"}}, "model.hf_token"),
    ({"train": {"storage": "s3://AKIAABCDEFGHIJKLMNOP@bucket/x"}}, "train.storage"),
    ({"train": {"storage": "https://user:pass@host/ckpt"}}, "train.storage"),
    ({"eval": {"note": "-----BEGIN RSA PRIVATE KEY-----"}}, "eval.note"),
])
def test_find_secrets_flags_credentials(data, key):
    found = find_secrets(data)
    assert found and found[0].startswith(key), found


def test_find_secrets_leaves_ordinary_fields_alone():
    data = {"data": {"tokenizer": "smollm2", "pad_token": "<pad>", "output": "s3://bucket/data"},
            "train": {"forward_env": ["AWS_SECRET_ACCESS_KEY"], "extra_env": {"AWS_SESSION_TOKEN": ""}}}
    assert find_secrets(data) == []


def test_redactor_masks_across_chunk_boundaries():
    r = Redactor(["s3cr3t-value-123", "ab"])  # too-short values are not masked (would hit words)
    out = r.feed("start s3cr3t-va") + r.feed("lue-123 end\nlab ") + r.feed("AKIAABCDEFGHIJKLMNOP\n") + r.flush()
    assert "s3cr3t" not in out and "AKIA" not in out
    assert out == "start **** end\nlab ****\n"


def test_plan_refuses_a_config_with_credentials(project):
    cfg = project / "configs" / "run.yaml"
    cfg.write_text("run_name: r\ntrain:\n  extra_env:\n    AWS_SECRET_ACCESS_KEY: hunter2\n")
    with pytest.raises(LaunchError, match=r"run.yaml.*train.extra_env.AWS_SECRET_ACCESS_KEY"):
        plan_submission(cfg)


def test_plan_refuses_credentials_in_overrides(project):
    with pytest.raises(LaunchError, match="train.extra_env.GITHUB_TOKEN"):
        plan_submission(project / "configs/run.yaml", ["train.extra_env.GITHUB_TOKEN=ghp_" + "a" * 36])


def test_env_passthrough_by_name_only(project, monkeypatch):
    monkeypatch.setenv("CKF_T_SECRET", "value-of-the-secret")
    plan = plan_submission(project / "configs/run.yaml", env_names=["CKF_T_SECRET"])
    assert plan.runtime_env["env_vars"]["CKF_T_SECRET"] == "value-of-the-secret"
    assert "value-of-the-secret" not in plan.entrypoint + str(plan.metadata)
    with pytest.raises(LaunchError, match="by name only"):
        plan_submission(project / "configs/run.yaml", env_names=["CKF_T_SECRET=x"])
    monkeypatch.delenv("CKF_T_SECRET")
    with pytest.raises(LaunchError, match="--env CKF_T_SECRET: not set"):
        plan_submission(project / "configs/run.yaml", env_names=["CKF_T_SECRET"])


def test_runtime_env_file_with_a_credential_is_refused(project, tmp_path):
    f = tmp_path / "renv.yaml"
    f.write_text("env_vars:\n  AWS_SECRET_ACCESS_KEY: abc\n")
    with pytest.raises(LaunchError, match="renv.yaml.*AWS_SECRET_ACCESS_KEY"):
        plan_submission(project / "configs/run.yaml", runtime_env_file=f)


def test_config_errors_name_the_key(project):
    from ckf_dist.config import ConfigError

    with pytest.raises(ConfigError, match="train.lrr"):
        plan_submission(project / "configs/run.yaml", ["train.lrr=3"])


# --------------------------------------------------------------------------- runtime_env, upload


def test_plan_uses_project_root_and_relative_config(project):
    plan = plan_submission(project / "configs/run.yaml", ["train.lr=3e-4"])
    assert plan.working_dir == project.resolve()
    assert plan.config_relpath == "configs/run.yaml"
    args = shlex.split(plan.entrypoint)
    assert args[:5] == ["python", "-m", "ckf_dist.cli", "train", "configs/run.yaml"]
    assert "train.lr=3e-4" in args and "train.address=auto" in args and "train.forward_env=[]" in args
    assert plan.submission_id.startswith("my-run-v2-")
    assert plan.metadata["ckf_run_name"] == "My_Run.v2"
    assert plan.warnings == []  # object-store URLs: nothing to warn about
    assert plan.runtime_env["env_vars"]["PYTHONUNBUFFERED"] == "1"


def test_user_overrides_of_job_defaults_win():
    ep = build_entrypoint("train", "c.yaml", ["train.address=10.0.0.1:6379"])
    assert ep.count("train.address") == 1 and "10.0.0.1:6379" in ep
    assert "train.address" not in build_entrypoint("prepare", "c.yaml", [])
    # A job default whose key the installed config does not have is left out, not sent to fail remotely.
    ep = build_entrypoint("train", "c.yaml", [], known={"train.address"})
    assert "train.address=auto" in ep and "forward_env" not in ep


def test_relative_storage_warns(project):
    cfg = project / "configs" / "run.yaml"
    plan = plan_submission(cfg, ["train.storage=runs/ckpt"])
    assert any("train.storage" in w for w in plan.warnings)


def test_local_cluster_makes_relative_paths_absolute(project, monkeypatch):
    monkeypatch.chdir(project)
    (project / "tok").mkdir()
    plan = plan_submission(project / "configs/run.yaml", ["train.storage=runs/ckpt", "data.tokenizer=tok",
                                                          "eval.output=/abs/eval"], local_cluster=True)
    args = shlex.split(plan.entrypoint)
    assert f"train.storage={project.resolve()}/runs/ckpt" in args
    assert f"data.tokenizer={project.resolve()}/tok" in args          # an existing local folder
    assert "model.backbone" not in plan.entrypoint                     # "smollm2" is a name, not a path
    assert "data.output=s3://bucket/data" not in plan.entrypoint       # URLs untouched
    assert args.count("eval.output=/abs/eval") == 1                    # already absolute: left alone
    assert plan.warnings == []


def test_config_outside_working_dir_is_an_error(project, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(LaunchError, match="inside the uploaded working dir"):
        choose_working_dir(project / "configs/run.yaml", other)


def test_config_outside_a_project_uploads_its_folder(tmp_path):
    cfg = tmp_path / "solo" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text("run_name: solo\n")
    assert choose_working_dir(cfg) == cfg.parent.resolve()


def _uploaded(root: Path, excludes) -> set[str]:
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: set[str] = set()
    _dir_travel(root, [_get_excludes(root, list(excludes))], lambda p: p.is_file() and files.add(
        p.relative_to(root).as_posix()), include_gitignore=True)
    return files


def test_upload_keeps_code_and_drops_data_venvs_weights_secrets(project):
    renv = build_runtime_env(project, excludes=["keys/"])
    files = _uploaded(project, renv["excludes"])
    assert {"pyproject.toml", "ckf_dist/__init__.py", "ckf_dist/data/__init__.py", "configs/run.yaml"} <= files
    for dropped in ("data/raw.csv", "runs/ckpt/step_1/x", ".venv/lib/site.py", "model.safetensors", ".env",
                    "keys/id.pem", "sub/.git/HEAD"):
        assert dropped not in files, dropped
    assert upload_preview(project, renv["excludes"])[0] == len(files)


def test_upload_of_this_repository_is_small():
    n, size = upload_preview(REPO, list(DEFAULT_EXCLUDES))
    assert 0 < n < 2000 and size < 50 * 2**20, (n, size)


def test_pip_and_image_are_exclusive(project, tmp_path):
    req = tmp_path / "req.txt"
    req.write_text("torch==2.13.0\nrequests\n")
    plan = plan_submission(project / "configs/run.yaml", pip=str(req))
    assert plan.runtime_env["pip"]["packages"] == ["torch==2.13.0", "requests"]
    assert any("requests" in w and "pinned" in w for w in plan.warnings)
    with pytest.raises(LaunchError, match="image_uri"):
        build_runtime_env(project, pip=str(req), image_uri="img:1")


def test_runtime_env_file_is_merged(project, tmp_path):
    f = tmp_path / "renv.yaml"
    f.write_text("excludes: [/notebooks/]\nenv_vars:\n  HF_HUB_OFFLINE: '1'\n")
    plan = plan_submission(project / "configs/run.yaml", runtime_env_file=f)
    assert "/notebooks/" in plan.runtime_env["excludes"] and "/.venv" not in plan.runtime_env["excludes"]
    assert plan.runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_cluster_runtime_env_file_is_accepted_by_ray(project):
    from ray.runtime_env import RuntimeEnv

    plan = plan_submission(project / "configs/run.yaml", runtime_env_file=REPO / "cluster/runtime_env.yaml")
    RuntimeEnv(**{k: v for k, v in plan.runtime_env.items() if k != "working_dir"})


# --------------------------------------------------------------------------- follow / exit status


class FakeClient:
    """Stands in for JobSubmissionClient: a scripted status sequence and a log."""

    def __init__(self, statuses, log, exit_code=None, message=""):
        self.statuses = list(statuses)
        self.log = log
        self.info = SimpleNamespace(status=statuses[-1], driver_exit_code=exit_code, message=message)
        self.submitted = {}

    def submit_job(self, **kw):
        self.submitted = kw
        return kw["submission_id"]

    def get_job_status(self, job_id):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    async def tail_job_logs(self, job_id):
        half = len(self.log) // 2
        yield self.log[:half]
        yield self.log[half:]

    def get_job_logs(self, job_id):
        return self.log

    def get_job_info(self, job_id):
        return self.info


def _follow(client, secrets=()):
    out, err = io.StringIO(), io.StringIO()
    rc = follow_job(client, "job-1", redact=Redactor(secrets), out=out, err=err, tail_lines=2, poll_s=0.01)
    return rc, out.getvalue(), err.getvalue()


def test_follow_success_returns_zero_and_streams_masked_log():
    log = "[ckf] step 1/2 | loss 1.0\nkey=s3cr3t-value\n[ckf] step 2/2 | loss 0.5\n"
    rc, out, err = _follow(FakeClient(["PENDING", "RUNNING", "SUCCEEDED"], log), ["s3cr3t-value"])
    assert rc == 0
    assert out == log.replace("s3cr3t-value", "****")
    assert "RUNNING" in err and "SUCCEEDED" in err and "last" not in err


def test_follow_failure_returns_driver_code_and_prints_tail():
    log = "a\nb\nCKF_BOOM: bad data\n"
    rc, out, err = _follow(FakeClient(["RUNNING", "FAILED"], log, exit_code=7,
                                      message="Job entrypoint command failed with exit code 7, last available logs"))
    assert rc == 7
    assert "last 2 lines" in err and "CKF_BOOM: bad data" in err and "\na\n" not in err
    assert "FAILED (exit code 7)" in err and "last available logs" not in err


def test_follow_failure_without_exit_code_and_stopped():
    rc, _, err = _follow(FakeClient(["FAILED"], "", exit_code=None, message="runtime_env setup failed\npip: no such package"))
    assert rc == 1 and "runtime_env setup failed" in err and "no such package" in err
    rc, _, err = _follow(FakeClient(["RUNNING", "STOPPED"], "x\n"))
    assert rc == EXIT_STOPPED and "STOPPED" in err


def test_progress_line_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out, err = io.StringIO(), Tty()
    log = "[ckf] step 1/4 | loss 2.0\n[ckf] step 3/4 | loss 0.75\n"
    client = FakeClient(["RUNNING", "RUNNING", "SUCCEEDED"], log)
    assert follow_job(client, "job-1", out=out, err=err, poll_s=0.01) == 0
    text = err.getvalue()
    assert "\r\x1b[K[job-1] RUNNING" in text and "step 3/4 (75%) | loss 0.75" in text
    assert out.getvalue() == log  # the live line never lands in the log stream


def test_submit_with_fake_client_sends_the_plan(project, monkeypatch):
    monkeypatch.setenv("CKF_T_SECRET", "value-of-the-secret")
    client = FakeClient(["SUCCEEDED"], "value-of-the-secret\n")
    out, err = io.StringIO(), io.StringIO()
    rc = submit(project / "configs/run.yaml", "http://h:8265", ["train.lr=1e-3"], env_names=["CKF_T_SECRET"],
                client=client, out=out, err=err)
    assert rc == 0
    assert client.submitted["submission_id"].startswith("my-run-v2-")
    assert client.submitted["runtime_env"]["working_dir"] == str(project.resolve())
    assert "value-of-the-secret" not in out.getvalue() + err.getvalue()
    assert "CKF_T_SECRET=****" in err.getvalue()
    rc = submit(project / "configs/run.yaml", "http://h:8265", client=client, follow=False, out=out, err=err)
    assert rc == 0 and out.getvalue().strip().endswith(client.submitted["submission_id"])


# --------------------------------------------------------------------------- CLI surface


def _parser():
    p = argparse.ArgumentParser(prog="ckf")
    sub = p.add_subparsers(dest="command")
    launch_cli.add_cli(sub)
    return p


def test_cli_registers_submit_and_jobs():
    p = _parser()
    a = p.parse_args(["submit", "c.yaml", "--address", "http://h:8265", "--env", "A", "--env", "B",
                      "--set", "train.lr=1", "--no-follow"])
    assert a.func is launch_cli.cmd_submit and a.env == ["A", "B"] and a.overrides == ["train.lr=1"] and a.no_follow
    assert p.parse_args(["jobs", "list"]).func is launch_cli.cmd_jobs_list
    assert p.parse_args(["jobs", "logs", "j1", "-f"]).follow
    assert p.parse_args(["jobs", "stop", "j1"]).func is launch_cli.cmd_jobs_stop
    assert p.parse_args(["jobs", "status", "j1"]).func is launch_cli.cmd_jobs_status
    with pytest.raises(SystemExit):
        p.parse_args(["submit", "c.yaml", "--pip", "r.txt", "--image-uri", "i"])


def test_cli_user_error_is_one_line_and_status_2(project, capsys):
    rc = launch_cli.main(["submit", str(project / "configs/run.yaml"), "--address", f"127.0.0.1:{_free_port()}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("ckf: error: cannot reach the Ray Jobs API") and "Traceback" not in err
    rc = launch_cli.main(["submit", str(project / "configs/run.yaml"), "--set", "train.nope=1"])
    assert rc == 2 and "train.nope" in capsys.readouterr().err


def test_main_ckf_parser_has_launch_commands():
    cli = pytest.importorskip("ckf_dist.cli")
    p = cli.build_parser()
    assert p.parse_args(["submit", "c.yaml"]).func is launch_cli.cmd_submit
    assert p.parse_args(["jobs", "list"]).func is launch_cli.cmd_jobs_list
