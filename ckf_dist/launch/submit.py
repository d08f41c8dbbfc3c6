"""``ckf submit``: run ``ckf train CONFIG`` on a Ray cluster through the Ray Jobs API.

The config is validated here first (so a typo fails on the laptop, not after an upload),
the working directory is uploaded with data/checkpoint/venv folders excluded, chosen
environment variables are passed through by name, and the job's logs are followed until
it ends. The return value is the job's exit status: 0 when it SUCCEEDED.
"""

from __future__ import annotations

import re
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ckf_dist.launch import runtime_env as renv_mod
from ckf_dist.launch.client import LaunchError, connect, resolve_address
from ckf_dist.launch.follow import EXIT_STOPPED, follow_job
from ckf_dist.launch.redact import Redactor, find_secrets, local_secret_values

# Overrides `ckf submit` adds to `ckf train` unless the user sets the key: inside a job
# RAY_ADDRESS points at the cluster ("auto" joins it), and the job's runtime_env already
# carries the environment to every worker (forwarding it again is a runtime_env conflict).
JOB_TRAIN_OVERRIDES = {"train.address": "auto", "train.forward_env": "[]"}
COMMANDS = ("train", "prepare")


@dataclass
class SubmitPlan:
    """Everything that will be sent to the cluster, built and checked before connecting."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]
    working_dir: Path | None
    config_relpath: str
    run_name: str
    passed_env: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def make_submission_id(run_name: str) -> str:
    """``<run-name>-<6 hex>``: lowercase letters, digits and dashes, at most 63 characters
    (a Kubernetes label/DNS name), unique per submission. The run name alone keys the
    checkpoints, so a resubmission resumes the run under a new submission id."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-") or "ckf"
    return f"{slug[:56].rstrip('-')}-{secrets.token_hex(3)}"


def _raw_config(path: Path, overrides: list[str]) -> dict:
    from ckf_dist.config import ConfigError, apply_overrides

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return apply_overrides(data, list(overrides)) if isinstance(data, dict) else data


def _train_keys(cfg) -> set[str]:
    import dataclasses

    return {f"train.{f.name}" for f in dataclasses.fields(cfg.train)}


# Config fields holding paths. Outputs are always paths; inputs only when they name an existing
# local file or folder ("smollm2" or "tiny-llama" are names, not paths).
LOCAL_OUTPUT_FIELDS = ("data.output", "train.storage", "train.log_dir", "eval.output")
LOCAL_INPUT_FIELDS = ("data.path", "data.meta_path", "data.tokenizer", "model.backbone", "model.cache_dir",
                      "train.deepspeed_config")


def local_path_overrides(cfg, cwd: Path | None = None) -> list[str]:
    """``KEY=/abs/path`` overrides turning the config's relative local paths (after the user's
    overrides) into absolute ones, for a cluster that runs on this machine: the job's cwd is a
    temporary copy of the upload. They go after the user's, so they win."""
    cwd = (cwd or Path.cwd()).resolve()
    out = []
    for key in (*LOCAL_OUTPUT_FIELDS, *LOCAL_INPUT_FIELDS):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section, None), name, None)
        if not isinstance(value, str) or not value or "://" in value or value.startswith(("/", "~")):
            continue
        if key in LOCAL_INPUT_FIELDS and not (cwd / value).exists():
            continue
        out.append(f"{key}={cwd / value}")
    return out


def _local_path_warnings(cfg) -> list[str]:
    out = []
    for key, value in (("data.output", cfg.data.output), ("train.storage", cfg.train.storage)):
        if value and "://" not in value and not value.startswith("/"):
            out.append(
                f"{key}={value!r} is a relative local path: on the cluster it resolves inside the "
                "job's temporary working dir of the node running it; use s3://, gs:// or a shared "
                "absolute path for anything beyond a single-node cluster"
            )
    return out


def build_entrypoint(command: str, config_relpath: str, overrides: list[str], python: str = "python",
                     known: set[str] | None = None) -> str:
    """``python -m ckf_dist.cli COMMAND CONFIG --set ...``, shell-quoted; for ``train`` adds the
    job defaults of :data:`JOB_TRAIN_OVERRIDES` (those in ``known``, when given) not set by the user."""
    args = [python, "-m", "ckf_dist.cli", command, config_relpath]
    given = {o.split("=", 1)[0].strip() for o in overrides}
    extra = [f"{k}={v}" for k, v in JOB_TRAIN_OVERRIDES.items()
             if k not in given and (known is None or k in known)] if command == "train" else []
    for o in [*overrides, *extra]:
        args += ["--set", o]
    return shlex.join(args)


def plan_submission(
    config: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    command: str = "train",
    working_dir: str | Path | None = None,
    runtime_env_file: str | Path | None = None,
    env_names: list[str] | tuple[str, ...] = (),
    excludes: list[str] | tuple[str, ...] = (),
    pip: str | None = None,
    image_uri: str | None = None,
    ship_package: bool = False,
    entrypoint: str | None = None,
    python: str = "python",
    submission_id: str | None = None,
    local_cluster: bool = False,
    environ: dict | None = None,
) -> SubmitPlan:
    """Validate the config and compose the job (entrypoint, runtime_env, id); no network.
    ``local_cluster``: the cluster runs on this machine, so relative paths in the config are
    made absolute (against the current directory) instead of warned about."""
    from ckf_dist.config import load_config

    if command not in COMMANDS:
        raise LaunchError(f"--command {command!r}: expected one of {', '.join(COMMANDS)}")
    cfg_path = Path(config)
    if not cfg_path.is_file():
        raise LaunchError(f"{config}: config file not found")
    overrides = list(overrides)
    found = find_secrets(_raw_config(cfg_path, overrides))
    if found:
        raise LaunchError(
            f"{config}: refusing to submit a config that holds credentials: {'; '.join(found)}. "
            "Configs are uploaded, stored with checkpoints and shown in the dashboard; pass "
            "credentials from your environment with --env NAME (or give the cluster an identity)."
        )
    cfg = load_config(cfg_path, overrides)  # ConfigError names the key and the file
    if local_cluster:
        overrides += local_path_overrides(cfg)
        cfg = load_config(cfg_path, overrides)

    base = renv_mod.load_runtime_env_file(runtime_env_file) if runtime_env_file else {}
    wd_hint = working_dir or base.pop("working_dir", None)
    wd = renv_mod.choose_working_dir(cfg_path, wd_hint)
    relpath = cfg_path.resolve().relative_to(wd).as_posix()
    passed = renv_mod.passthrough_env(list(env_names), environ)
    runtime_env = renv_mod.build_runtime_env(
        wd, base=base, env=passed, excludes=excludes, pip=pip, image_uri=image_uri, ship_package=ship_package
    )
    warnings = _local_path_warnings(cfg) if command == "train" else []
    if pip:
        loose = renv_mod.unpinned_requirements(pip)
        if loose:
            warnings.append(f"--pip {pip}: not pinned to exact versions: {', '.join(loose)}")
    return SubmitPlan(
        submission_id=submission_id or make_submission_id(cfg.run_name),
        entrypoint=entrypoint or build_entrypoint(command, relpath, overrides, python, _train_keys(cfg)),
        runtime_env=runtime_env,
        metadata={"ckf_run_name": cfg.run_name, "ckf_config": relpath, "ckf_command": command},
        working_dir=wd,
        config_relpath=relpath,
        run_name=cfg.run_name,
        passed_env=passed,
        warnings=warnings,
    )


def _describe(plan: SubmitPlan, address: str, redact: Redactor, err) -> None:
    print(f"ckf submit: job {plan.submission_id} -> {address}", file=err)
    print(f"  entrypoint : {redact(plan.entrypoint)}", file=err)
    if plan.working_dir is not None:
        preview = renv_mod.upload_preview(plan.working_dir, plan.runtime_env.get("excludes", []))
        size = f" ({preview[0]} files, {preview[1] / 2**20:.1f} MiB)" if preview else ""
        print(f"  working_dir: {plan.working_dir}{size}, excluding data/checkpoints/venvs/secrets", file=err)
    print(f"  env        : {renv_mod.env_summary(plan.runtime_env.get('env_vars', {}), plan.passed_env)}", file=err)
    for w in plan.warnings:
        print(f"  warning    : {w}", file=err)


def submit(
    config: str | Path,
    address: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    follow: bool = True,
    tail_lines: int = 50,
    progress: bool = True,
    out=None,
    err=None,
    client=None,
    **plan_kwargs,
) -> int:
    """Submit ``ckf train CONFIG`` to the cluster at ``address`` and (by default) follow it.

    Returns the job's exit status: 0 on SUCCEEDED; on failure the driver's exit code (or 1)
    after printing the tail of the job log. With ``follow=False`` returns 0 once submitted.
    ``plan_kwargs`` go to :func:`plan_submission` (env_names, working_dir, pip, ...).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    plan = plan_submission(config, overrides, **plan_kwargs)
    redact = Redactor([*plan.passed_env.values(), *local_secret_values()])
    url = resolve_address(address)
    client = client or connect(url)
    _describe(plan, url, redact, err)
    try:
        job_id = client.submit_job(
            entrypoint=plan.entrypoint,
            submission_id=plan.submission_id,
            runtime_env=plan.runtime_env,
            metadata=plan.metadata,
        )
    except Exception as exc:
        text = str(exc)
        if "exceeds the maximum size" in text or "too large" in text.lower():
            raise LaunchError(
                f"the working dir {plan.working_dir} is too large to upload: {text}. Exclude big "
                "files with --exclude PATTERN (gitignore style) or move them to object storage"
            ) from None
        raise LaunchError(f"submitting to {url} failed: {redact(text)}") from None
    print(f"ckf submit: submitted {job_id}", file=err)
    print(f"  logs: ckf jobs logs {job_id} --follow --address {url}", file=err)
    print(f"  stop: ckf jobs stop {job_id} --address {url}", file=err)
    if not follow:
        print(job_id, file=out)
        return 0
    start = time.monotonic()
    try:
        return follow_job(client, job_id, redact=redact, out=out, err=err, tail_lines=tail_lines,
                          progress=progress, start=start)
    except KeyboardInterrupt:
        print(f"\nckf submit: stopped following; job {job_id} keeps running on the cluster.\n"
              f"  follow again: ckf jobs logs {job_id} --follow --address {url}\n"
              f"  stop it     : ckf jobs stop {job_id} --address {url}", file=err)
        return 130


__all__ = ["EXIT_STOPPED", "SubmitPlan", "build_entrypoint", "make_submission_id", "plan_submission", "submit"]
