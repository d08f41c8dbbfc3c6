"""``ckf study``: train and evaluate an ablation grid, one table on the same test rows.

The config's ``study.variants`` maps each variant's name to ``KEY=VALUE`` overrides of the
config itself (``ckf: []`` is the config as written). The variants share the prepared dataset
(an override of ``data.*`` is an error), run one after another, and each is trained as run
``<run_name>-<variant>`` and consolidated under ``study.output/<variant>/``. A finished variant
is recorded in ``study.output/study.json`` and skipped on a rerun, so an interrupted study
resumes where it stopped; a variant interrupted mid-training resumes from its last committed
checkpoint.

Then one evaluation scores every variant on the same test rows (the reference variant as
``ckf``, every other as a ``--compare`` column named after its variant), with the paired
bootstrap intervals of :mod:`ckf_dist.eval.bootstrap`. Outputs in ``study.output``:
``eval.json``/``eval.txt``/``eval.png`` and ``results.md`` (main metric per task, each
variant's value and its paired difference from the reference).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from ckf_dist.config import CKFConfig, apply_overrides, config_from_dict, config_to_dict
from ckf_dist.errors import ConfigError
from ckf_dist.progress import log

STATE = "study.json"


def variant_config(cfg: CKFConfig, name: str, overrides: list[str]) -> CKFConfig:
    """The config of one variant: ``cfg`` with its overrides, its own run name and eval output."""
    data = config_to_dict(cfg)
    data.pop("study", None)
    apply_overrides(data, list(overrides))
    data["run_name"] = f"{cfg.run_name}-{name}"
    data.setdefault("eval", {})["output"] = str(Path(cfg.study.output) / name)
    out = config_from_dict(data, f"study variant {name!r} ({' '.join(overrides) or 'no overrides'})")
    if config_to_dict(out.data) != config_to_dict(cfg.data):
        raise ConfigError(f"study.variants.{name}: overrides data.* settings; every variant must share one "
                          f"prepared dataset (make a second study for another dataset)")
    return out


def _state(out: Path) -> dict:
    path = out / STATE
    return json.loads(path.read_text()) if path.is_file() else {"variants": {}}


def _save_state(out: Path, state: dict) -> None:
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(out / STATE)


def run_study(cfg: CKFConfig, progress: bool = True) -> dict:
    """Train/consolidate every variant not yet done, then evaluate them together; returns the report."""
    from ckf_dist.data.errors import DataError
    from ckf_dist.data.shards import read_dataset_manifest
    from ckf_dist.stages.consolidate import consolidate
    from ckf_dist.stages.evaluate import run_evaluate
    from ckf_dist.stages.prepare import run_prepare
    from ckf_dist.stages.train import run_train

    s = cfg.study
    if not s.variants:
        raise ConfigError("study.variants: empty; declare at least the reference variant (e.g. `ckf: []`)")
    configs = {name: variant_config(cfg, name, ov) for name, ov in s.variants.items()}   # all errors first
    out = Path(s.output)
    out.mkdir(parents=True, exist_ok=True)
    try:
        read_dataset_manifest(cfg.data.output)
        log(progress, f"study: reusing the prepared dataset at {cfg.data.output}")
    except DataError:
        run_prepare(cfg, overwrite=False, progress=progress)
    state = _state(out)
    for k, (name, vcfg) in enumerate(configs.items(), 1):
        done = state["variants"].get(name)
        if done and done.get("overrides") == s.variants[name] and Path(done["consolidated"]).is_dir():
            log(progress, f"study {k}/{len(configs)}: {name}: done earlier ({done['checkpoint']}), skipped")
            continue
        log(progress, f"study {k}/{len(configs)}: {name}: " + (" ".join(s.variants[name]) or "the config as written"))
        t0 = time.perf_counter()
        result = run_train(vcfg, progress=progress)
        folder = consolidate(result["checkpoint"], out / name / "consolidated", progress=progress)
        state["variants"][name] = {"overrides": s.variants[name], "run_name": vcfg.run_name,
                                   "checkpoint": result["checkpoint"], "consolidated": str(folder),
                                   "seconds": round(time.perf_counter() - t0, 1),
                                   "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        _save_state(out, state)
    ref = configs[s.reference]
    others = [n for n in configs if n != s.reference]
    report = run_evaluate(ref, state["variants"][s.reference]["consolidated"], out_dir=out, progress=progress,
                          compare=[state["variants"][n]["consolidated"] for n in others], compare_names=others)
    (out / "results.md").write_text(results_markdown(report, s.reference, state))
    log(progress, f"study: wrote {out / 'results.md'}, {out / 'eval.json'}")
    return report


def _fmt(cell: dict | None, signed: bool = False) -> str:
    if not cell or cell.get("value") is None:
        return "-"
    v = f"{cell['value']:+.3f}" if signed else f"{cell['value']:.3f}"
    if cell.get("lo") is None:
        return v
    star = " *" if cell.get("excludes_zero") else ""
    return f"{v} [{cell['lo']:.3f}, {cell['hi']:.3f}]{star}"


def results_markdown(report: dict, reference: str, state: dict) -> str:
    """The study's table: per task and main metric, each variant's value and its paired difference."""
    from ckf_dist.eval.report import json_safe

    rep = json_safe(report)
    metrics = {"ctr": ["auc", "uauc"], "sequential": ["hr@1", "ndcg@5"], "rating": ["rmse"], "review": ["rougeL"]}
    rows = (f"a sample of {rep['users_per_task']} test users per task" if rep.get("users_per_task")
            else "every test user")
    lines = [f"Study of `{rep.get('run_name')}` on `{rep.get('dataset')}`: every variant on the same test rows "
             f"({rows}), "
             f"95% bootstrap intervals over users; the last column is variant minus `ckf` (the reference "
             f"variant `{reference}`), paired over the same users; `*` = the paired interval excludes 0.", ""]
    for task, by_method in rep["results"].items():
        for metric in metrics.get(task, []):
            cells = [(by_method[m].get("all") or {}) for m in by_method]
            if not any((c.get(metric) or {}).get("value") is not None for c in cells):
                reason = next((c.get(f"{metric}_undefined") for c in cells if c.get(f"{metric}_undefined")), None)
                if reason:
                    lines += [f"### {task} {metric}: undefined", "", reason, ""]
                continue
            n = next((by_method[m]["all"].get("n") for m in by_method if "all" in by_method[m]), "-")
            lines += [f"### {task} {metric} (n = {n})", "", f"| variant | {metric} | vs ckf (paired) |", "|---|---|---|"]
            for m, groups in by_method.items():
                diff = rep.get("diffs", {}).get(task, {}).get("all", {}).get(f"ckf - {m}", {}).get(metric)
                if diff is not None:   # shown as (variant - ckf): positive = the variant is higher
                    diff = {"value": -diff["value"], "lo": -diff["hi"] if diff["hi"] is not None else None,
                            "hi": -diff["lo"] if diff["lo"] is not None else None, "excludes_zero": diff["excludes_zero"]}
                lines.append(f"| {m} | {_fmt((groups.get('all') or {}).get(metric))} | {_fmt(diff, signed=True)} |")
            lines.append("")
    lines.append("Variants (overrides of the study config):")
    for name, v in state["variants"].items():
        lines.append(f"- `{name}`: {' '.join(v['overrides']) or '(none)'} ({v.get('seconds', '?')} s to train and consolidate)")
    return "\n".join(lines) + "\n"
