"""Typed run configuration: nested dataclasses loaded from YAML, overridden by dotted keys.

Every component owns a small dataclass (``ckf_dist.data.config.DataConfig`` and so on);
:class:`CKFConfig` nests them. Loading checks every key and type against the dataclass
fields and reports errors with the dotted key and the file they came from, e.g.
``configs/demo-cpu.yaml: train.lr: expected a float, got 'fast'``.

A section may define ``validate(self)``; it raises :class:`ValueError` with a message that
starts with the field name, and the loader prefixes the section path and the file.
"""

from __future__ import annotations

import datetime as dt

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from ckf_dist.cf.config import CFConfig
from ckf_dist.data.config import DataConfig
from ckf_dist.eval.config import EvalConfig
from ckf_dist.model.config import ModelConfig
from ckf_dist.train.config import GLOB_CHARS, TrainConfig


from ckf_dist.errors import ConfigError  # noqa: E402  (re-exported)


@dataclass
class StudyConfig:
    """An ablation grid for ``ckf study``: variant name -> its ``KEY=VALUE`` overrides of this config."""

    variants: dict[str, list[str]] = field(default_factory=dict)
    reference: str = "ckf"             # the variant every other is compared against (paired intervals)
    output: str = "runs/study"

    def validate(self) -> None:
        bad = [n for n in self.variants if not n or any(c in n for c in "/ " + GLOB_CHARS)]
        if bad:
            raise ValueError(f"variants: names must be non-empty, without '/', spaces or glob characters: {bad}")
        if self.variants and self.reference not in self.variants:
            raise ValueError(f"reference: {self.reference!r} is not one of the variants {sorted(self.variants)}")


@dataclass
class CKFConfig:
    """The whole run: data preparation, CF stage, model, training and evaluation."""

    run_name: str = "ckf-run"
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    cf: CFConfig = field(default_factory=CFConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def validate(self) -> None:
        if not self.run_name or any(c in self.run_name for c in "/" + GLOB_CHARS):
            raise ValueError(f"run_name: must be a non-empty name without '/' or the glob characters '[', ']', "
                             f"'*', '?' (it becomes a storage folder), got {self.run_name!r}")


# --------------------------------------------------------------------------- typing


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked (and losslessly converted) against the annotation ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, *_rest) = get_args(tp) or (Any,)
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (dt.date, dt.datetime)):       # YAML reads an unquoted 2014-01-01 as a date
            return value.isoformat()
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = [n for n in names if n.startswith(str(k)[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}; known keys: {', '.join(sorted(names))}")
        kwargs[k] = _coerce(v, hints[k], key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{prefix + '.' if prefix else ''}{exc}") from None
    return obj


# --------------------------------------------------------------------------- public API


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``KEY=VALUE`` overrides to a raw config mapping (in place)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: dict, source: str = "<dict>") -> CKFConfig:
    """Build and validate a :class:`CKFConfig`; errors name the key and ``source``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return _build(CKFConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CKFConfig:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if overrides:
        source += " + overrides"
        data = apply_overrides(data, list(overrides))
    return config_from_dict(data, source)


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (for YAML/JSON dumps and checkpoint manifests)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
