"""``ckf evaluate``: score the test split of every task, warm and cold, beside the baselines.

For a consolidated run (or a checkpoint URL, consolidated on the fly) the CKF model is rebuilt
and each task's test rows are scored with the deterministic heads (``ckf_dist.model.scoring``):

- ctr: P(Yes) -> AUC, UAUC;  rating: expected digit -> RMSE/MAE (and greedy digit);
- sequential: candidate log-likelihoods -> HR@k, NDCG@k (k = 1, 5, 10). The prompts of a batch run
  once; every candidate continues from the cached keys/values, all users' candidates in one
  batch (:func:`sequential_logliks`), so K candidates never cost K prompt forwards;
- review: greedy generation -> BLEU-4, ROUGE-1/2/L (when the dataset has review text).

Two variants of the same model: ``ckf`` (CF-slot prompts through the bridge) and ``text_only``
(the text prompts, no CF slots). Beside them the dataset's CF baselines (its CF model and
popularity, from ``cf/metrics.json``, computed at prepare time on its own sampled protocol).
Outputs: a printed table, ``eval.json`` and ``eval.png`` in the output folder.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ckf_dist import TASKS
from ckf_dist.eval.metrics import auc, hit_ndcg, rank_of_true, rmse_mae, text_metrics, uauc

VARIANTS = {"ckf": "cf", "text_only": "text"}   # variant -> prompt stream
GROUPS = ("all", "warm", "cold")
KS = (1, 5, 10)
MAIN_METRIC = {"ctr": "auc", "sequential": "ndcg@5", "rating": "rmse", "review": "rougeL"}


# --------------------------------------------------------------------------- progress
def _bar(iterable, total: int, desc: str, progress: bool):
    if not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:              # plain prints every ~10%
        def gen():
            step = max(1, total // 10)
            for i, x in enumerate(iterable):
                if i % step == 0:
                    print(f"  {desc}: {i}/{total}", flush=True)
                yield x
        return gen()
    return tqdm(iterable, total=total, desc=desc, leave=False)


# --------------------------------------------------------------------------- batched sequential scoring
def sequential_logliks(model, batch: dict, cand_ids: list[list[list[int]]], stream: str = "cf") -> list[torch.Tensor]:
    """Per row, log p(candidate tokens | prompt) ``[K_i]``: prompts once, all rows' candidates in one batch.

    The right-padded prompts run once with a cache; each row's cache is repeated for its K_i
    candidates, which continue at positions ``len_i + t`` with the prompt padding masked out.
    Equal (within fp32 tolerance) to :func:`ckf_dist.model.scoring.sequential_scores`.
    """
    from ckf_dist.model.ckf import output_cache
    from ckf_dist.model.scoring import _evaluating, _pad, _slots, prompt_lengths

    lengths = prompt_lengths(batch, stream)
    b = lengths.numel()
    counts = torch.tensor([len(c) for c in cand_ids])
    if any(len(c) == 0 for row in cand_ids for c in row):
        raise ValueError("cand_ids: every candidate needs at least one token")
    p = int(lengths.max())
    ids = batch[f"{stream}_input_ids"][:, :p]
    device = ids.device
    mask = (torch.arange(p, device=device)[None, :] < lengths[:, None].to(device)).long()
    task_ids = batch["task_ids"]
    with _evaluating(model):
        out = model.hidden(ids, mask, task_ids, _slots(batch, stream), use_cache=True)
        last = out.last_hidden_state[torch.arange(b, device=device), (lengths - 1).to(device)]
        first = torch.log_softmax(model.logits(last).float(), -1)                               # [B, V]
        row_of = torch.repeat_interleave(torch.arange(b), counts).to(device)                    # [N]
        cache = output_cache(out)
        cache.reorder_cache(row_of)                                                             # prompt KV per candidate
        cids, cmask = (t.to(device) for t in _pad([c for row in cand_ids for c in row], 0))
        full_mask = torch.cat([mask[row_of], cmask], dim=1)
        positions = lengths.to(device)[row_of, None] + torch.arange(cids.shape[1], device=device)[None, :]
        cont = model.hidden(cids, full_mask, task_ids[row_of], None, cache=cache, position_ids=positions,
                            use_cache=True).last_hidden_state                                  # [N, Lc, H]
        scores = first[row_of, cids[:, 0]]
        valid = cmask[:, 1:].bool()
        if valid.any():               # LM head only on real continuation tokens
            logp = torch.log_softmax(model.logits(cont[:, :-1][valid]).float(), -1)
            tok = logp.gather(-1, cids[:, 1:][valid].unsqueeze(-1)).squeeze(-1)
            scores = scores.index_add(0, torch.nonzero(valid)[:, 0], tok)
    return list(scores.cpu().split(counts.tolist()))


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


# --------------------------------------------------------------------------- scoring and metrics
def score_rows(model, task: str, rows: list, stream: str, ctx: dict, batch_size: int) -> list[dict]:
    """One record per row: user, warm and what the task's metrics need."""
    from ckf_dist.data.collate import collate
    from ckf_dist.model.scoring import ctr_scores, greedy_generate, rating_scores

    records = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collate(chunk, ctx["pad_id"])
        base = [{"user": int(r["user"]), "warm": bool(r["warm"]), "label": float(r["label"])} for r in chunk]
        if task == "ctr":
            for rec, s in zip(base, ctr_scores(model, batch, ctx["answer_tokens"]["ctr"], stream).tolist()):
                rec["score"] = s
        elif task == "rating":
            exp, greedy = rating_scores(model, batch, ctx["answer_tokens"]["rating"], stream)
            for rec, e, g in zip(base, exp.tolist(), greedy.tolist()):
                rec["expected"], rec["greedy"] = e, g
        elif task == "sequential":
            cands = [[list(map(int, c)) for c in r["cand_ids"]] for r in chunk]
            for rec, s in zip(base, sequential_logliks(model, batch, cands, stream)):
                rec["rank"] = rank_of_true(s.tolist(), int(rec["label"]))
        elif task == "review":
            out = greedy_generate(model, batch, ctx["max_new_tokens"], ctx["eos_id"], stream, ctx["pad_id"])
            for rec, toks, r in zip(base, out, chunk):
                rec["hyp"] = ctx["tokenizer"].decode(toks, skip_special_tokens=True).strip()
                rec["ref"] = str(r["answer_text"])
        records.extend(base)
    return records


def task_metrics(task: str, records: list[dict]) -> dict[str, dict]:
    """``{group: {metric: value, "n": rows}}`` for all / warm / cold users (empty groups left out)."""
    out = {}
    for group in GROUPS:
        recs = [r for r in records if group == "all" or r["warm"] == (group == "warm")]
        if not recs:
            continue
        if task == "ctr":
            labels, scores = [r["label"] for r in recs], [r["score"] for r in recs]
            u, n_users = uauc([r["user"] for r in recs], labels, scores)
            m = {"auc": auc(labels, scores), "uauc": u, "uauc_users": n_users}
        elif task == "rating":
            truth = [r["label"] for r in recs]
            m = rmse_mae(truth, [r["expected"] for r in recs])
            m.update({f"{k}_greedy": v for k, v in rmse_mae(truth, [r["greedy"] for r in recs]).items()})
        elif task == "sequential":
            m = hit_ndcg([r["rank"] for r in recs], KS)
        else:
            m = text_metrics([r["ref"] for r in recs], [r["hyp"] for r in recs])
        m["n"] = len(recs)
        out[group] = m
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


# --------------------------------------------------------------------------- table
def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def format_table(results: dict, base: dict) -> str:
    """One table: a row per (task, metric, group), a column per variant and baseline."""
    cols = list(results) + list(base)
    metric_names = {"ctr": ["auc", "uauc"], "sequential": ["hr@1", "hr@5", "ndcg@5", "ndcg@10"],   # all k in JSON
                    "rating": ["rmse", "mae"], "review": ["bleu4", "rouge1", "rouge2", "rougeL"]}
    head = f"{'task':<11}{'metric':<9}{'users':<6}{'n':>5}  " + "".join(f"{c:>12}" for c in cols)
    lines = [head, "-" * len(head)]
    tasks = [t for t in TASKS if any(t in results[v] for v in results)]
    for task in tasks:
        for metric in metric_names[task]:
            for group in GROUPS:
                vals = [results[c].get(task, {}).get(group, {}).get(metric) for c in results]
                vals += [base[c].get(task, {}).get(group, {}).get(metric) for c in base]
                if all(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
                    continue
                n = next((results[c][task][group]["n"] for c in results if group in results[c].get(task, {})), None)
                lines.append(f"{task:<11}{metric:<9}{group:<6}{n if n is not None else '-':>5}  "
                             + "".join(f"{_fmt(v):>12}" for v in vals))
    lines.append("baselines: the dataset's CF model and popularity, from `ckf prepare`, over all test users (AUC "
                 "against sampled negatives, HR/NDCG over the same candidate lists; rating: global/user mean)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command
def _load_run(cfg, run: str, progress: bool, cf_user, cf_item):
    """(model, tokenizer, meta, consolidated folder) for a consolidated folder or a checkpoint URL."""
    from ckf_dist.checkpoint.consolidate import META, consolidate, load_consolidated
    from ckf_dist.config import load_config

    folder = Path(run)
    if "://" in run or not (folder / META).is_file():
        folder = Path(tempfile.mkdtemp(prefix="ckf-eval-run-"))
        consolidate(run, folder, progress=progress)
    model_cfg = load_config(folder / "config.yaml").model
    if cfg.model.cache_dir:
        model_cfg.cache_dir = cfg.model.cache_dir
    model, tokenizer, meta = load_consolidated(folder, model_cfg, cf_user, cf_item)
    return model, tokenizer, meta, folder


def run_evaluate(cfg, run: str, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Score every task's test split with the run's model (both variants); print, write eval.json + eval.png."""
    from ckf_dist.data import load_cf_tables, read_manifest
    from ckf_dist.data.stream import check_tokenizer

    started = time.perf_counter()
    out = Path(out_dir or cfg.eval.output)
    url = cfg.data.output
    manifest, _, _ = read_manifest(url)
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
            for chunk in _bar(chunks, len(chunks), f"{variant}/{task}", progress):
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
    (out / "eval.json").write_text(json.dumps(_clean(report), indent=1, allow_nan=False) + "\n")
    (out / "eval.txt").write_text(table + "\n")
    from ckf_dist.eval.plots import draw_report

    png = draw_report(report, folder / "metrics.jsonl", out / "eval.png")
    report["png"] = str(png) if png else None
    print(table)              # the result of the command: printed even without progress output
    print(f"wrote {out / 'eval.json'}" + (f", {png}" if png else "") + f" [{report['seconds']:.1f}s]", flush=True)
    return report


def _clean(o):
    """JSON-safe copy: NaN/inf -> null (strict JSON), numpy scalars -> Python."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
