"""``ckf study``: two variants trained one after another, resumed after one, one table on the same rows."""

from __future__ import annotations

import json

import pytest

from ckf_dist.config import config_from_dict
from ckf_dist.errors import ConfigError

pytestmark = [pytest.mark.timeout(900), pytest.mark.ray]


def _study_cfg(data_url: str, tmp_path, variants):
    return config_from_dict({
        "run_name": "study", "seed": 3, "data": {"output": data_url},
        "model": {"backbone": "tiny-llama", "dtype": "float32", "lora": {"r": 4, "alpha": 16, "dropout": 0.0}},
        "train": {"num_workers": 1, "micro_batch_size": 2, "max_steps": 2, "save_every": 2, "warmup_ratio": 0.0,
                  "export_dtype": "float32", "storage": str(tmp_path / "ckpts")},
        "eval": {"users_per_task": 6, "batch_size": 6, "max_new_tokens": 2, "bootstrap": 100, "min_group_rows": 1,
                 "lm_prior": False},
        "study": {"variants": variants, "output": str(tmp_path / "study")},
    }, "<test_study>")


def test_study_resumes_after_one_variant_and_writes_one_table(prepared_dataset, tmp_path, monkeypatch):
    import ckf_dist.stages.train as train_stage
    from ckf_dist.stages.study import run_study

    cfg = _study_cfg(prepared_dataset.url, tmp_path, {"ckf": [], "text-only": ["model.bridge.use_cf_slots=false"]})
    real, calls = train_stage.run_train, []

    def interrupted(vcfg, progress=True):
        calls.append(vcfg.run_name)
        if vcfg.run_name == "study-text-only":
            raise KeyboardInterrupt("stopped during the second variant")
        return real(vcfg, progress=progress)

    monkeypatch.setattr(train_stage, "run_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, progress=False)
    state = json.loads((tmp_path / "study" / "study.json").read_text())
    assert list(state["variants"]) == ["ckf"] and calls == ["study-ckf", "study-text-only"]

    calls.clear()
    monkeypatch.setattr(train_stage, "run_train", lambda vcfg, progress=True: (calls.append(vcfg.run_name),
                                                                               real(vcfg, progress=progress))[1])
    report = run_study(cfg, progress=False)
    assert calls == ["study-text-only"]                      # the finished variant was skipped
    ctr = report["results"]["ctr"]
    assert {"ckf", "ckf-slots-removed", "text-only"} <= set(ctr)
    assert ctr["text-only"]["all"]["n"] == ctr["ckf"]["all"]["n"]          # the same rows
    assert "ckf - text-only" in report["diffs"]["ctr"]["all"]
    md = (tmp_path / "study" / "results.md").read_text()
    assert "| text-only |" in md and "vs ckf (paired)" in md and "model.bridge.use_cf_slots=false" in md
    assert (tmp_path / "study" / "eval.png").is_file()


def test_study_refuses_variants_that_change_the_dataset(prepared_dataset, tmp_path):
    from ckf_dist.stages.study import run_study

    cfg = _study_cfg(prepared_dataset.url, tmp_path, {"ckf": [], "bigger": ["data.max_history=9"]})
    with pytest.raises(ConfigError, match="study.variants.bigger: overrides data"):
        run_study(cfg, progress=False)
    with pytest.raises(ConfigError, match="reference"):
        _study_cfg(prepared_dataset.url, tmp_path, {"a": []})


def test_results_table_signs_differences_and_states_undefined_metrics():
    """Not a Ray test: the markdown of a hand-made report (variant - ckf, paired; undefined UAUC named)."""
    from ckf_dist.stages.study import results_markdown

    cell = lambda v, lo, hi: {"value": v, "lo": lo, "hi": hi}   # noqa: E731
    report = {
        "run_name": "r", "dataset": "d", "users_per_task": 0,
        "results": {"ctr": {
            "ckf": {"all": {"n": 50, "auc": cell(0.6, 0.5, 0.7), "uauc": cell(None, None, None),
                            "uauc_undefined": "each user has one ctr test row"}},
            "text-only": {"all": {"n": 50, "auc": cell(0.55, 0.45, 0.65), "uauc": cell(None, None, None)}}}},
        "diffs": {"ctr": {"all": {"ckf - text-only": {"auc": {"value": 0.05, "lo": 0.01, "hi": 0.09,
                                                                "excludes_zero": True}}}}},
    }
    state = {"variants": {"ckf": {"overrides": [], "seconds": 1.0},
                          "text-only": {"overrides": ["model.bridge.use_cf_slots=false"], "seconds": 2.0}}}
    md = results_markdown(report, "ckf", state)
    assert "every test user" in md and "### ctr auc (n = 50)" in md
    assert "| text-only | 0.550 [0.450, 0.650] | -0.050 [-0.090, -0.010] * |" in md     # text-only - ckf
    assert "### ctr uauc: undefined\n\neach user has one ctr test row" in md
    assert "| ckf | - | - |" not in md.split("uauc")[1]
