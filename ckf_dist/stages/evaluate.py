"""``ckf evaluate``: score the test split of every task, warm and cold, beside the baselines.

For a consolidated run (or a checkpoint URL, consolidated on the fly) the CKF model is rebuilt
and each task's test rows are scored with the deterministic heads (``ckf_dist.model.scoring``):

- ctr: P(Yes) -> AUC, UAUC;  rating: expected digit -> RMSE/MAE (and greedy digit);
- sequential: candidate log-likelihoods -> HR@k, NDCG@k (k = 1, 5, 10). The prompts of a batch run
  once; every candidate continues from the cached keys/values, all users' candidates in one
  batch (:func:`ckf_dist.model.scoring.sequential_logliks`), so K candidates never cost K prompt forwards;
- review: greedy generation -> BLEU-4, ROUGE-1/2/L (when the dataset has review text).

Two variants of the same model: ``ckf`` (CF-slot prompts through the bridge) and ``text_only``
(the text prompts, no CF slots). Beside them the dataset's CF baselines (its CF model and
popularity, from ``cf/metrics.json``, computed at prepare time on its own sampled protocol).
Outputs: a printed table, ``eval.json`` and ``eval.png`` in the output folder.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ckf_dist.contract import TASKS
from ckf_dist.eval.report import format_table, json_safe
from ckf_dist.eval.scoring import score_rows, task_metrics
from ckf_dist.progress import bar


VARIANTS = {"ckf": "cf", "text_only": "text"}   # variant -> prompt stream


# --------------------------------------------------------------------------- data
def load_test_rows(url: str, users_per_task: int, seed: int) -> dict[str, list]:
    """Test rows per task; with ``users_per_task > 0`` a seeded sample of that many users per task."""
    from ckf_dist.data.stream import ShardStream

    by_task: dict[str, list] = {}
    for row in ShardStream(url, "test", shuffle_buffer=1, prefetch=0, drop_remainder=False):
        by_task.setdefault(row["task"], []).append(row)
    out = {}
    for task in [t for t in TASKS if t in by_task]:
        rows = sorted(by_task[task], key=lambda r: r["sample_id"])
        users = sorted({int(r["user"]) for r in rows})
        if 0 < users_per_task < len(users):
            rng = np.random.default_rng([seed, 2024, TASKS.index(task)])
            keep = set(rng.choice(users, size=users_per_task, replace=False).tolist())
            rows = [r for r in rows if int(r["user"]) in keep]
        out[task] = rows
    return out

def baselines(url: str, manifest: dict) -> dict:
    """The dataset's CF baselines on its test split: ``{name: {task: {group: metrics}}}``."""
    from ckf_dist.data.shards import read_dataset_file

    try:
        cf = json.loads(read_dataset_file(url, "cf_metrics", manifest=manifest))
    except Exception:  # noqa: BLE001 - an older dataset without the file: no baselines, not an error
        return {}
    test = cf.get("test", {})
    out: dict[str, dict] = {}
    for who, name in (("cf", cf.get("model", "cf")), ("popularity", "popularity")):
        groups = test.get(who, {})
        if not groups:
            continue
        out[name] = {
            "ctr": {g: {"auc": m["auc"], "n": m.get("users")} for g, m in groups.items() if "auc" in m},
            "sequential": {g: {k: v for k, v in m.items() if k.startswith(("hr@", "ndcg@"))} | {"n": m.get("users")}
                           for g, m in groups.items()},
        }
    for name, m in cf.get("rating", {}).get("test", {}).items():
        out.setdefault(name, {})["rating"] = {"all": dict(m)}
    return out

# --------------------------------------------------------------------------- the command
def _load_run(cfg, run: str, progress: bool, cf_user, cf_item):
    """(model, tokenizer, meta, consolidated folder) for a consolidated folder or a checkpoint URL."""
    from ckf_dist.contract import CONSOLIDATED_META
    from ckf_dist.stages.consolidate import consolidate, load_consolidated
    from ckf_dist.config import load_config

    folder = Path(run)
    if "://" in run or not (folder / CONSOLIDATED_META).is_file():
        folder = Path(tempfile.mkdtemp(prefix="ckf-eval-run-"))
        consolidate(run, folder, progress=progress)
    model_cfg = load_config(folder / "config.yaml").model
    if cfg.model.cache_dir:
        model_cfg.cache_dir = cfg.model.cache_dir
    model, tokenizer, meta = load_consolidated(folder, model_cfg, cf_user, cf_item)
    return model, tokenizer, meta, folder


def run_evaluate(cfg, run: str, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Score every task's test split with the run's model (both variants); print, write eval.json + eval.png."""
    from ckf_dist.data import load_cf_tables, read_dataset_manifest
    from ckf_dist.data.stream import check_tokenizer

    started = time.perf_counter()
    out = Path(out_dir or cfg.eval.output)
    url = cfg.data.output
    manifest, _, _ = read_dataset_manifest(url)
    cf = load_cf_tables(url, manifest=manifest)
    model, tokenizer, meta, folder = _load_run(cfg, run, progress, torch.from_numpy(cf["user"]),
                                               torch.from_numpy(cf["item"]))
    check_tokenizer(manifest, tokenizer)
    ctx = {"pad_id": int(manifest["tokenizer"]["pad_id"]), "eos_id": int(manifest["tokenizer"]["eos_id"]),
           "answer_tokens": manifest["answer_tokens"], "max_new_tokens": cfg.eval.max_new_tokens,
           "tokenizer": tokenizer}
    rows = load_test_rows(url, cfg.eval.users_per_task, cfg.seed)
    if not manifest.get("source", {}).get("has_text", True):
        rows.pop("review", None)
    variants = {v: s for v, s in VARIANTS.items() if s == "text" or model.bridge is not None}
    if progress:
        print(f"evaluate: {meta.get('run_name')} step {meta.get('step')} on {url} test split: "
              + ", ".join(f"{t} {len(r)}" for t, r in rows.items())
              + (f" rows (sample of {cfg.eval.users_per_task} users per task)" if cfg.eval.users_per_task else " rows"),
              flush=True)
    results: dict[str, dict] = {v: {} for v in variants}
    timings = {}
    for variant, stream in variants.items():
        for task, task_rows in rows.items():
            t0 = time.perf_counter()
            chunks = [task_rows[i:i + cfg.eval.batch_size] for i in range(0, len(task_rows), cfg.eval.batch_size)]
            records = []
            for chunk in bar(chunks, len(chunks), f"{variant}/{task}", progress):
                records += score_rows(model, task, chunk, stream, ctx, cfg.eval.batch_size)
            results[variant][task] = task_metrics(task, records)
            timings[f"{variant}/{task}"] = round(time.perf_counter() - t0, 3)
    base = baselines(url, manifest)
    table = format_table(results, base)
    report = {
        "run": str(run), "consolidated": str(folder), "step": meta.get("step"), "backbone": meta.get("backbone"),
        "dataset": url, "users_per_task": cfg.eval.users_per_task, "seed": cfg.seed,
        "rows": {t: len(r) for t, r in rows.items()}, "results": results, "baselines": base,
        "timings_s": timings, "seconds": round(time.perf_counter() - started, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
    (out / "eval.txt").write_text(table + "\n")
    from ckf_dist.eval.plots import draw_report

    png = draw_report(report, folder / "metrics.jsonl", out / "eval.png")
    report["png"] = str(png) if png else None
    print(table)              # the result of the command: printed even without progress output
    print(f"wrote {out / 'eval.json'}" + (f", {png}" if png else "") + f" [{report['seconds']:.1f}s]", flush=True)
    return report
