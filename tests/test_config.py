"""Config loading: unknown keys, wrong types, impossible values and overrides, each naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckf_dist.config import CKFConfig, ConfigError, config_from_dict, dump_config, load_config


def _write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_load():
    cfg = load_config(None)
    assert isinstance(cfg, CKFConfig)
    assert cfg.data.source == "movielens-embedded" and cfg.cf.model == "mf"


def test_yaml_values_and_types_are_applied(tmp_path):
    path = _write(tmp_path, "seed: 3\ndata:\n  kcore: 2\n  task_weights: {ctr: 2, rating: 1}\ncf:\n  lr: 1e-3\n")
    cfg = load_config(path)
    assert cfg.seed == 3 and cfg.data.kcore == 2
    assert cfg.data.task_weights == {"ctr": 2.0, "rating": 1.0}
    assert cfg.cf.lr == pytest.approx(1e-3)          # YAML 1.1 reads 1e-3 as a string: coerced


@pytest.mark.parametrize("text, key", [
    ("data:\n  kcroe: 5\n", "data.kcroe"),
    ("nonsense: 1\n", "nonsense"),
    ("cf:\n  model: mf\n  depth: 3\n", "cf.depth"),
])
def test_unknown_key_names_key_and_file(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and key in msg and "unknown key" in msg


def test_unknown_key_suggests_close_names(tmp_path):
    with pytest.raises(ConfigError, match="did you mean kcore"):
        load_config(_write(tmp_path, "data:\n  kco: 5\n"))


@pytest.mark.parametrize("text, key", [
    ("data:\n  kcore: five\n", "data.kcore"),
    ("cf:\n  lr: fast\n", "cf.lr"),
    ("data:\n  source: netflix\n", "data.source"),
    ("data:\n  task_weights: [1, 2]\n", "data.task_weights"),
    ("cf:\n  ks: 5\n", "cf.ks"),
    ("data: 3\n", "data"),
])
def test_wrong_type_names_key_and_file(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and key in msg


@pytest.mark.parametrize("text, key", [
    ("data:\n  kcore: 0\n", "data.kcore"),
    ("data:\n  n_candidates: 1\n", "data.n_candidates"),
    ("data:\n  cold_user_fraction: 1.5\n", "data.cold_user_fraction"),
    ("data:\n  task_weights: {ctr: 1, clicks: 2}\n", "data.task_weights"),
    ("data:\n  task_weights: {ctr: 0, sequential: 0, rating: 0, review: 0}\n", "data.task_weights"),
    ("data:\n  source: amazon2018\n", "data.path"),
    ("cf:\n  dim: 0\n", "cf.dim"),
    ("cf:\n  eval_negatives: 0\n", "cf.eval_negatives"),
    ("run_name: sweep[3]\n", "run_name"),
    ("train:\n  storage: s3://bucket/exp*\n", "train.storage"),
    ("train:\n  prefetch_shards: -1\n", "train.prefetch_shards"),
])
def test_impossible_value_names_key_and_file(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and key in msg


def test_overrides_apply_and_win_over_file(tmp_path):
    path = _write(tmp_path, "data:\n  kcore: 3\n")
    cfg = load_config(path, ["data.kcore=7", "cf.model=lightgcn", "data.output=s3://b/x", "data.task_weights={ctr: 1}"])
    assert cfg.data.kcore == 7 and cfg.cf.model == "lightgcn" and cfg.data.output == "s3://b/x"
    assert cfg.data.task_weights == {"ctr": 1.0}


def test_bad_override_names_key_and_source(tmp_path):
    path = _write(tmp_path, "seed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.max_history=lots"])
    assert "data.max_history" in str(err.value) and "overrides" in str(err.value)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["data.max_history"])


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "data: [\n"))


def test_dump_round_trips():
    cfg = load_config(None, ["data.kcore=4", "cf.dim=16"])
    import yaml

    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_study_variants_apply(path):
    """A typo in a shipped config (a key, a type, a value out of range, a study variant's
    override) fails here rather than in a user's first run."""
    from ckf_dist.stages.study import variant_config

    cfg = load_config(path)
    for name, overrides in (cfg.study.variants or {}).items():
        variant_config(cfg, name, overrides)
