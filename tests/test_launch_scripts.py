"""The shell scripts in launch/: syntax, shellcheck, and agreement with launch/README.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
README = LAUNCH / "README.md"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
SBATCH = LAUNCH / "slurm" / "ckf-train.sbatch"


def ray_start_commands(text: str) -> list[str]:
    """Every `ray start ...` command in shell text, continuation lines joined, up to the
    end of the command (`&`, `;`, `&&`, `|` or end of line), whitespace collapsed."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        for m in re.finditer(r"\bray start\b(.*)", line):
            cmd = re.split(r"\s*;|\s(?:&&|\|\||\|)\s|\s&(?:\s|$)", "ray start" + m.group(1))[0]
            out.append(" ".join(cmd.split()).rstrip("&").strip())
    return out


def readme_section(title: str) -> str:
    text = README.read_text()
    m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"launch/README.md has no '## {title}' section"
    return m.group(1)


def code_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```(?:bash|sh)?\n(.*?)```", markdown, re.S))


def test_expected_scripts_exist():
    names = {p.relative_to(LAUNCH).as_posix() for p in SCRIPTS}
    assert {"local.sh", "multinode/head.sh", "multinode/worker.sh", "slurm/ckf-train.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
    r = subprocess.run(["shellcheck", "--severity=info", "--shell=bash", *map(str, SCRIPTS)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ray_start_extraction_handles_continuations_and_background():
    text = 'srun -w "$n" \\\n    ray start --head --port="$P" \\\n    --block &\nfoo && ray start --address=x; echo\n'
    assert ray_start_commands(text) == ['ray start --head --port="$P" --block', "ray start --address=x"]


def test_sbatch_ray_start_commands_match_readme():
    script = ray_start_commands(SBATCH.read_text())
    readme = ray_start_commands(code_blocks(readme_section("SLURM")))
    assert len(script) == 2, script
    assert script == readme, f"\nsbatch: {script}\nREADME: {readme}"
    head, worker = script
    assert "--head" in head and '--dashboard-host="$DASHBOARD_HOST"' in head and "--block" in head
    assert '--address="$head_ip:$RAY_PORT"' in worker


def _flags(cmd: str) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z-]*)", cmd))


@pytest.mark.parametrize("script, kind", [("multinode/head.sh", "--head"), ("multinode/worker.sh", "--address")])
def test_multinode_scripts_match_readme(script, kind):
    in_script = [c for c in ray_start_commands((LAUNCH / script).read_text()) if kind in c]
    in_readme = [c for c in ray_start_commands(code_blocks(readme_section("Multi-node by hand")))
                 if kind in c]
    assert len(in_script) == 1 and len(in_readme) == 1, (in_script, in_readme)
    # The README shows a concrete command (values filled in, extra args such as --num-gpus appended).
    assert _flags(in_script[0]) <= _flags(in_readme[0]), (in_script, in_readme)


def test_dashboard_defaults_to_loopback():
    for script in (LAUNCH / "multinode/head.sh", LAUNCH / "local.sh", SBATCH):
        text = script.read_text()
        assert re.search(r'DASHBOARD_HOST="\$\{DASHBOARD_HOST:-127\.0\.0\.1\}"', text), script
        assert "--dashboard-host" in text, script
    readme_head = [c for c in ray_start_commands(README.read_text()) if "--head" in c]
    assert readme_head and all("--dashboard-host" in c for c in readme_head)
    assert all("0.0.0.0" not in c for c in readme_head)


@pytest.mark.parametrize("script", ["local.sh", "multinode/head.sh", "multinode/worker.sh"])
def test_help_runs(script):
    r = subprocess.run(["bash", str(LAUNCH / script), "--help"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and "launch/" in r.stdout, r.stdout + r.stderr


def test_sbatch_refuses_bad_arguments(tmp_path):
    r = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, timeout=20, cwd=tmp_path)
    assert r.returncode != 0 and "usage" in r.stderr
    r = subprocess.run(["bash", str(SBATCH), "missing.yaml"], capture_output=True, text=True, timeout=20, cwd=tmp_path)
    assert r.returncode == 2 and "missing.yaml: config not found" in r.stderr
    (tmp_path / "c.yaml").write_text("run_name: x\n")
    r = subprocess.run(["bash", str(SBATCH), "c.yaml", "--bogus"], capture_output=True, text=True, timeout=20,
                       cwd=tmp_path)
    assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr


def test_local_sh_runs_ckf_train(tmp_path):
    fake = tmp_path / "ckf"
    fake.write_text('#!/usr/bin/env bash\necho "ARGS: $*"\n')
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(LAUNCH / "local.sh"), "configs/tiny-cpu.yaml", "--set", "train.lr=1"],
                       capture_output=True, text=True, timeout=20, env={"PATH": "/usr/bin:/bin", "CKF": str(fake)})
    assert r.returncode == 0 and r.stdout.strip() == "ARGS: train configs/tiny-cpu.yaml --set train.lr=1", r.stderr
