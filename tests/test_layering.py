"""The package's import layering, read from the source (AST): a violation fails with file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import ckf_dist

ROOT = Path(ckf_dist.__file__).parent
COMPONENTS = ("data", "cf", "model", "kernels", "train", "checkpoint", "eval", "launch")
# package -> packages it must never import (besides the stages and the CLI, which no component imports)
FORBIDDEN = {
    "model": ("train", "checkpoint", "eval", "launch", "cf"),
    "data": ("model", "cf", "train", "checkpoint", "eval", "launch", "kernels"),
    "cf": ("model", "train", "checkpoint", "eval", "launch", "kernels"),
    "checkpoint": ("model", "train", "eval", "data", "cf", "launch"),
    "eval": ("train", "checkpoint", "launch"),
    "train": ("eval", "launch"),
}


def _imports(path: Path):
    """(line, imported module, imported names) of every ``ckf_dist`` import in one file."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = path.relative_to(ROOT.parent).with_suffix("").parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ckf_dist":
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:                         # relative: resolve against this file's package
                base = list(pkg[:-node.level])
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "ckf_dist":
                yield node.lineno, module, [a.name for a in node.names]


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations() -> list[str]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        own = rel.parts[0] if len(rel.parts) > 1 else ""
        for line, module, names in _imports(path):
            target = _package(module)
            where = f"ckf_dist/{rel.as_posix()}:{line}: imports {module}"
            if own in COMPONENTS and (target == "stages" or module == "ckf_dist.cli"):
                out.append(f"{where} (a component imports a stage or the CLI)")
            if own == "kernels" and target != "kernels":
                out.append(f"{where} (kernels import nothing else of ckf_dist)")
            if target in FORBIDDEN.get(own, ()):
                out.append(f"{where} ({own} must not import {target})")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != own:
                out.append(f"{where} private name(s) {private} across packages")
    return out


def test_import_layering():
    assert violations() == []


def test_cli_calls_stages_only():
    allowed = {"stages", "config", "errors", "launch"}
    bad = [f"cli.py:{line}: {module}" for line, module, _ in _imports(ROOT / "cli.py")
           if _package(module) not in allowed]
    assert bad == []


def test_layering_check_catches_a_violation(tmp_path, monkeypatch):
    """The checker itself fails on a planted bad import (so an empty list means something)."""
    fake = tmp_path / "ckf_dist"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "bad.py").write_text("from ckf_dist.train.worker import Worker\nfrom ckf_dist.data.collate import _x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    found = violations()
    assert any("model must not import train" in v for v in found)
    assert any("private name" in v for v in found)
