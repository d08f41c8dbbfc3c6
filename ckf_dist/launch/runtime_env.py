"""The Ray ``runtime_env`` of a submitted run: code to upload, what to leave out, environment.

The working directory is uploaded to the cluster on every submission (Ray caps a package
at a few hundred MiB), so prepared data, checkpoints, virtual environments, weights and
secret files are excluded. Patterns are gitignore-style and relative to the working
directory; a leading ``/`` anchors a pattern to its top, which matters here: ``/data``
drops a top-level data folder but keeps the ``ckf_dist/data`` package.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from ckf_dist.launch.client import LaunchError
from ckf_dist.launch.redact import find_secrets, is_secret_name

DEFAULT_EXCLUDES: tuple[str, ...] = (
    # version control, environments, caches
    ".git", ".venv", "venv/", "/env/", "__pycache__/", "*.pyc", ".pytest_cache/", ".mypy_cache/",
    ".ruff_cache/", "*.egg-info/", ".cache/", "/build/", "/dist/", ".ipynb_checkpoints/",
    # data, runs, checkpoints, results (they live in object storage, not in the upload)
    "/data/", "/datasets/", "/runs/", "/checkpoints/", "/artifacts/", "/outputs/", "/wandb/",
    "/bench/results/", "*.parquet", "*.arrow", "*.safetensors", "*.gguf", "*.bin", "*.pt",
    "*.pth", "*.ckpt", "*.tar", "*.tar.gz", "*.zip",
    # secret files: credentials come from the environment or the cluster, never the upload
    ".env", ".env.*", "*.pem", "*.key", ".aws/", ".ssh/", ".netrc", "credentials.json",
)

# Set for every job unless the user's runtime_env says otherwise: without it Python
# block-buffers the driver's stdout into the job log and `ckf submit` shows nothing for minutes.
DEFAULT_ENV_VARS = {"PYTHONUNBUFFERED": "1"}


def find_project_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` holding this project (pyproject.toml + ckf_dist/)."""
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "ckf_dist" / "__init__.py").is_file():
            return folder
    return None


def choose_working_dir(config: Path, working_dir: str | Path | None = None) -> Path:
    """``working_dir`` if given, else the project containing ``config``, else its folder."""
    config = config.resolve()
    if working_dir:
        wd = Path(working_dir).expanduser().resolve()
        if not wd.is_dir():
            raise LaunchError(f"--working-dir {working_dir}: not a folder")
    else:
        wd = find_project_root(config.parent) or config.parent
    if not config.is_relative_to(wd):
        raise LaunchError(
            f"{config}: the config must be inside the uploaded working dir {wd} "
            "(the job reads it from there); move it or pass --working-dir"
        )
    return wd


def load_runtime_env_file(path: str | Path) -> dict:
    """Read a runtime_env YAML (e.g. cluster/runtime_env.yaml), refusing embedded credentials."""
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"--runtime-env {path}: file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LaunchError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise LaunchError(f"{path}: expected a mapping of runtime_env fields, got {type(data).__name__}")
    secrets = find_secrets(data)
    if secrets:
        raise LaunchError(
            f"{path}: refusing a runtime_env that holds credentials: {'; '.join(secrets)}. "
            "Pass them from your environment by name with --env NAME, or better, give the "
            "cluster an identity (IAM role, workload identity, Kubernetes Secret)."
        )
    return data


def passthrough_env(names: list[str], environ: dict | None = None) -> dict[str, str]:
    """``{NAME: value}`` for each name the user opted in with ``--env NAME``, from the local env."""
    environ = os.environ if environ is None else environ
    out = {}
    for name in names:
        if "=" in name:
            raise LaunchError(
                f"--env {name.split('=', 1)[0]}=...: pass variables by name only (the value is "
                "read from your environment), so that it never lands in your shell history"
            )
        if name not in environ:
            raise LaunchError(f"--env {name}: not set in your environment")
        out[name] = environ[name]
    return out


def unpinned_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a pip file that pin no exact version (``==``, ``@ URL`` or a wheel)."""
    loose = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        if "==" not in line and "@" not in line and not line.endswith(".whl"):
            loose.append(line)
    return loose


def build_runtime_env(
    working_dir: Path | None,
    *,
    base: dict | None = None,
    env: dict[str, str] | None = None,
    excludes: list[str] | tuple[str, ...] = (),
    pip: str | None = None,
    image_uri: str | None = None,
    ship_package: bool = False,
) -> dict:
    """Compose the runtime_env dict: ``base`` (a runtime_env file) + working dir + excludes +
    pass-through env vars + pinned pip requirements or a container image."""
    renv = dict(base or {})
    if working_dir is not None:
        renv["working_dir"] = str(working_dir)
    renv["excludes"] = list(dict.fromkeys([*DEFAULT_EXCLUDES, *renv.get("excludes", []), *excludes]))
    env_vars = {**DEFAULT_ENV_VARS, **{str(k): str(v) for k, v in (renv.get("env_vars") or {}).items()}}
    env_vars.update(env or {})
    renv["env_vars"] = env_vars
    if pip:
        if not Path(pip).is_file():
            raise LaunchError(f"--pip {pip}: requirements file not found")
        renv["pip"] = {"packages": _read_requirements(Path(pip)), "pip_check": False}
    if image_uri:
        renv["image_uri"] = image_uri
    if "image_uri" in renv and ("pip" in renv or "conda" in renv or "uv" in renv):
        raise LaunchError("runtime_env: a container image (image_uri) cannot be combined with pip/conda/uv; "
                          "bake the requirements into the image instead")
    if ship_package:
        import ckf_dist

        renv["py_modules"] = [*renv.get("py_modules", []), str(Path(ckf_dist.__file__).parent)]
    return renv


def _read_requirements(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            if line.startswith(("-r", "-c", "--requirement", "--constraint")):
                raise LaunchError(f"{path}: nested '{line}' is not supported; list the pinned packages directly")
            lines.append(line)
    return lines


def env_summary(env_vars: dict[str, str], passed: dict[str, str]) -> str:
    """One line naming the environment variables a job gets, never their secret values."""
    parts = []
    for k, v in env_vars.items():
        parts.append(f"{k}=****" if k in passed or is_secret_name(k) else f"{k}={v}")
    return ", ".join(parts)


def upload_preview(working_dir: Path, excludes: list[str]) -> tuple[int, int] | None:
    """(files, bytes) that Ray will upload for ``working_dir``, honouring excludes and
    .gitignore; None when Ray's (private) packaging helpers are unavailable."""
    try:
        from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    except ImportError:  # pragma: no cover - depends on Ray internals
        return None
    stats = [0, 0]

    def count(path: Path) -> None:
        if path.is_file():
            stats[0] += 1
            stats[1] += path.stat().st_size

    quiet = logging.getLogger("ckf_dist.launch.upload_preview")
    quiet.setLevel(logging.WARNING)  # Ray logs every ignore file it honours at INFO
    try:
        _dir_travel(working_dir, [_get_excludes(working_dir, list(excludes))], count,
                    include_gitignore=True, logger=quiet)
    except TypeError:  # pragma: no cover - older signature without include_gitignore
        return None
    return stats[0], stats[1]
