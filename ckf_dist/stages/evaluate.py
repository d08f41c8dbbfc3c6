"""``ckf evaluate``: every method on the same test rows, per user group, with 95% intervals.

For a consolidated run (or a checkpoint URL, consolidated on the fly) the CKF model is rebuilt
and each task's test rows are scored with the deterministic heads (``ckf_dist.model.scoring``):
ctr P(Yes); rating expected digit (and greedy digit); sequential candidate log-likelihoods (the
prompts of a batch run once, every candidate continues from the cached keys/values,
:func:`ckf_dist.model.scoring.sequential_logliks`); review greedy generation.

Columns, all on the same rows of a task (docs/evaluation.md):

- ``ckf``: the run with its CF slots (the bridge's tokens in the prompt);
- ``ckf-slots-removed``: the same weights on the text prompts (not a model trained without CF);
- ``lm-prior`` (sequential): the untuned backbone ranking the same candidates, so the table
  shows what fine-tuning added;
- one column per ``--compare RUN`` (e.g. a run trained with ``model.bridge.use_cf_slots: false``,
  the paper's text-only baseline), scored on its own stream;
- the baselines of :mod:`ckf_dist.eval.baselines` (CF model, popularity, rating means and a
  rating regressor), fitted on the dataset's training side.

The dataset must be the one the run was trained on (its recorded fingerprint). Outputs: the
printed table, ``eval.json``, ``eval.txt`` and ``eval.png`` in the output folder, and per task
``rows_<task>.parquet``: every method's output on every row, with the row's groups.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ckf_dist.contract import TASKS
from ckf_dist.eval.report import format_retrieval, format_table, json_safe
from ckf_dist.eval.scoring import (TaskRows, baseline_outputs, evaluate_task, group_masks, llm_outputs, rows_table,
                                  score_rows)
from ckf_dist.progress import bar

REFERENCE = "ckf"
METHOD_NOTES = {
    "ckf": "this run, CF slots through the bridge",
    "ckf-slots-removed": "this run's weights on the text prompts (CF slots removed, not retrained)",
    "lm-prior": "the untuned backbone's likelihood of each candidate (text prompts, no adapters)",
    "popularity": "training interactions of the item",
    "global_mean": "mean training rating", "user_mean": "mean of the user's known ratings",
    "item_mean": "mean training rating of the item",
    "rating_mf": "biased MF rating regressor (ALS; for ctr, its predicted rating is the score)",
}


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

# --------------------------------------------------------------------------- the command
def _load_run(cfg, run: str, progress: bool, cf_user, cf_item):
    """(model, tokenizer, meta, consolidated folder, model config) for a consolidated folder or a checkpoint URL."""
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
    return model, tokenizer, meta, folder, model_cfg


def _score_llm(model, stream: str, name: str, rows: dict[str, list], trows: dict[str, TaskRows], ctx: dict,
               cfg, progress: bool, timings: dict) -> dict[str, dict]:
    """``{task: output}`` of one LLM method on every task's rows."""
    outs = {}
    for task, task_rows in rows.items():
        t0 = time.perf_counter()
        step = cfg.eval.batch_size
        # rows of similar prompt length share a batch (little padding); records are matched back by sample id
        ordered = sorted(task_rows, key=lambda r: (int(r[f"{stream}_prompt_len"]), int(r["sample_id"])))
        chunks = [ordered[i:i + step] for i in range(0, len(ordered), step)]
        records = []
        for chunk in bar(chunks, len(chunks), f"{name}/{task}", progress):
            records += score_rows(model, task, chunk, stream, ctx, step)
        outs[task] = llm_outputs(trows[task], records, cfg.eval.candidate_scoring)
        timings[f"{name}/{task}"] = round(time.perf_counter() - t0, 3)
    return outs


def run_evaluate(cfg, run: str, out_dir: str | Path | None = None, progress: bool = True,
                 compare: list[str] | tuple = (), compare_names: list[str] | None = None) -> dict:
    """Score every task's test rows with every method; print the table, write eval.json/.txt/.png."""
    from ckf_dist.data import load_cf_tables, load_interactions_table, read_dataset_manifest
    from ckf_dist.data.shards import check_fingerprint, dataset_fingerprint, read_dataset_file
    from ckf_dist.data.stream import check_tokenizer
    from ckf_dist.eval.baselines import Baselines, SplitLog

    started = time.perf_counter()
    e = cfg.eval
    out = Path(out_dir or e.output)
    url = cfg.data.output
    manifest, _, _ = read_dataset_manifest(url)
    cf = load_cf_tables(url, manifest=manifest)
    cf_user, cf_item = torch.from_numpy(cf["user"]), torch.from_numpy(cf["item"])
    model, tokenizer, meta, folder, model_cfg = _load_run(cfg, run, progress, cf_user, cf_item)
    check_fingerprint(meta.get("dataset_fingerprint"), manifest, url, f"run {meta.get('run_name')!r} ({run})")
    check_tokenizer(manifest, tokenizer)
    ctx = {"pad_id": int(manifest["tokenizer"]["pad_id"]), "eos_id": int(manifest["tokenizer"]["eos_id"]),
           "answer_tokens": manifest["answer_tokens"], "max_new_tokens": e.max_new_tokens, "tokenizer": tokenizer}
    rows = load_test_rows(url, e.users_per_task, cfg.seed)
    if not manifest.get("source", {}).get("has_text", True):
        rows.pop("review", None)
    trows = {t: TaskRows.from_rows(t, r) for t, r in rows.items()}

    cf_metrics = json.loads(read_dataset_file(url, "cf_metrics", manifest=manifest)) if "cf_metrics" in manifest["files"] else {}
    warm = _warm_flags(url, manifest)
    log = SplitLog.from_table(load_interactions_table(url, manifest=manifest), warm, int(manifest["n_items"]))
    cf_info = manifest.get("cf", {})
    rating_cf = cf_info.get("loss") == "rating"
    cf_name = cf_info.get("model", "cf") + ("-rating" if rating_cf else "")
    base = Baselines.fit(log, cf["user"], cf["item"], cf_name, cfg.seed)
    user_hist, item_train = log.user_history_counts(), log.item_training_counts()
    masks = {t: group_masks(tr, warm, user_hist, item_train, e.cold_user_max, e.cold_item_max) for t, tr in trows.items()}
    if progress:
        print(f"evaluate: {meta.get('run_name')} step {meta.get('step')} on {url} test split: "
              + ", ".join(f"{t} {len(r)}" for t, r in rows.items())
              + (f" rows (SAMPLE of {e.users_per_task} users per task)" if e.users_per_task else " rows (all test users)"),
              flush=True)

    timings: dict = {}
    outputs: dict[str, dict[str, dict]] = {t: {} for t in trows}      # task -> method -> output
    notes = dict(METHOD_NOTES)
    variants = {REFERENCE: "cf", "ckf-slots-removed": "text"} if model.bridge is not None else {REFERENCE: "text"}
    if model.bridge is None:
        notes[REFERENCE] = "this run (trained without CF slots: text prompts)"
    for name, stream in variants.items():
        for task, o in _score_llm(model, stream, name, rows, trows, ctx, cfg, progress, timings).items():
            outputs[task][name] = o
    n_tasks = model.n_tasks
    del model
    if e.lm_prior and "sequential" in trows:
        from ckf_dist.model import build_ckf_model, load_backbone

        prior = build_ckf_model(model_cfg, load_backbone(model_cfg)[0], cf_user, cf_item, n_tasks=n_tasks).eval()
        seq_only = {"sequential": rows["sequential"]}
        outputs["sequential"]["lm-prior"] = _score_llm(prior, "text", "lm-prior", seq_only, trows, ctx, cfg, progress,
                                                       timings)["sequential"]
        del prior
    for k, other in enumerate(compare):
        m2, _, meta2, _, _ = _load_run(cfg, other, progress, cf_user, cf_item)
        check_fingerprint(meta2.get("dataset_fingerprint"), manifest, url, f"run {meta2.get('run_name')!r} ({other})")
        name = compare_names[k] if compare_names else str(meta2.get("run_name") or Path(other).name)
        while any(name in outputs[t] for t in outputs):
            name += "'"
        stream = "cf" if m2.bridge is not None else "text"
        notes[name] = f"--compare {other} (step {meta2.get('step')}, {'CF slots' if stream == 'cf' else 'text prompts, no CF slots'})"
        for task, o in _score_llm(m2, stream, name, rows, trows, ctx, cfg, progress, timings).items():
            outputs[task][name] = o
        del m2
    notes[cf_name] = ("the dataset's CF model (biased MF fitted to the ratings, u . v = predicted rating - mean)"
                      if rating_cf else f"the dataset's CF model ({cf_name}, u . v)")
    t0 = time.perf_counter()
    results, diffs = {}, {}
    for task, tr in trows.items():
        outputs[task].update(baseline_outputs(tr, base))
        results[task], diffs[task] = evaluate_task(tr, outputs[task], masks[task], REFERENCE, e.bootstrap, cfg.seed,
                                                   e.min_group_rows)
    timings["metrics+bootstrap"] = round(time.perf_counter() - t0, 3)
    used = {m for t in outputs for m in outputs[t]}
    report = {
        "run": str(run), "consolidated": str(folder), "run_name": meta.get("run_name"), "step": meta.get("step"),
        "backbone": meta.get("backbone"), "dataset": url, "dataset_fingerprint": dataset_fingerprint(manifest),
        "users_per_task": e.users_per_task, "seed": cfg.seed,
        "options": {"candidate_scoring": e.candidate_scoring, "lm_prior": e.lm_prior, "bootstrap": e.bootstrap, "cold_user_max": e.cold_user_max,
                    "cold_item_max": e.cold_item_max, "min_group_rows": e.min_group_rows,
                    "negatives": manifest.get("data_config", {}).get("negatives", "uniform"),
                    "sequential_answer": manifest.get("data_config", {}).get("sequential_answer", "title"),
                    "split": manifest.get("data_config", {}).get("split", "leave-last-out")},
        "rows": {t: len(r) for t, r in rows.items()}, "methods": {m: d for m, d in notes.items() if m in used},
        "results": results, "diffs": diffs, "retrieval": {k: cf_metrics[k] for k in ("negatives", "test") if k in cf_metrics},
        "timings_s": timings, "seconds": round(time.perf_counter() - started, 2),
    }
    table = format_table(report)
    retrieval = format_retrieval(report["retrieval"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
    (out / "eval.txt").write_text(table + "\n" + (retrieval + "\n" if retrieval else ""))
    import pyarrow.parquet as pq

    for task, tr in trows.items():       # every method's output per row: the table's cells, recomputable
        pq.write_table(rows_table(tr, outputs[task], masks[task]), out / f"rows_{task}.parquet")
    from ckf_dist.eval.plots import draw_report

    png = draw_report(report, folder / "metrics.jsonl", out / "eval.png")
    report["png"] = str(png) if png else None
    print(table)              # the result of the command: printed even without progress output
    if retrieval:
        print(retrieval)
    print(f"wrote {out / 'eval.json'}" + (f", {png}" if png else "") + f" [{report['seconds']:.1f}s]", flush=True)
    return report


def _warm_flags(url: str, manifest: dict) -> np.ndarray:
    """The dataset's warm flag per user (users.parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ckf_dist.data.shards import read_dataset_file

    table = pq.read_table(pa.BufferReader(read_dataset_file(url, "users", manifest=manifest)))
    warm = np.zeros(int(manifest["n_users"]), dtype=bool)
    warm[table.column("user_id").to_numpy()] = table.column("warm").to_numpy(zero_copy_only=False)
    return warm
