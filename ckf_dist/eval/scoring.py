"""Scoring test rows and turning every method's outputs into like-for-like metrics with intervals.

:func:`score_rows` runs the deterministic task heads of :mod:`ckf_dist.model.scoring` on
collated rows; :func:`llm_outputs` and :func:`baseline_outputs` turn an LLM's records and the
baselines (:mod:`ckf_dist.eval.baselines`) into one output per method **for the same rows**;
:func:`evaluate_task` computes each method's metrics per user group with 95% bootstrap
intervals, and the paired differences between the reference method and every other.

Groups (:func:`group_masks`), each reported with its n and as "too small" below
``eval.min_group_rows``:

- ``all``;
- ``warm``: users seen in training, neither user-cold nor item-cold;
- ``user-cold``: the user's known history has <= ``eval.cold_user_max`` interactions;
- ``item-cold``: the target item has <= ``eval.cold_item_max`` training interactions;
- ``unseen``: users held out of training (the CF embedding folded in, the LLM never saw them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ckf_dist.eval import bootstrap as B
from ckf_dist.metrics import (auc, bleu_stats, expected_ranking, rank_counts, rank_counts_lists, rmse_mae,
                              rouge_rows, text_metrics, uauc)

GROUPS = ("all", "warm", "user-cold", "item-cold", "unseen")
KS = (1, 5, 10)
METRICS = {"ctr": ("auc", "uauc"), "sequential": ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"),
           "rating": ("rmse", "mae", "rmse_greedy", "mae_greedy"), "review": ("bleu4", "rouge1", "rouge2", "rougeL")}
UAUC_UNDEFINED = ("no test user has both a like and a dislike among its ctr rows (under data.split: "
                  "leave-last-out each user has one test row); use data.split: temporal for UAUC")


def score_rows(model, task: str, rows: list, stream: str, ctx: dict, batch_size: int) -> list[dict]:
    """One record per row: what the task's metrics need from the model."""
    from ckf_dist.data.collate import collate
    from ckf_dist.model.scoring import ctr_scores, greedy_generate, rating_scores, sequential_logliks

    records = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collate(chunk, ctx["pad_id"])
        base = [{"sample_id": int(r["sample_id"])} for r in chunk]
        if task == "ctr":
            for rec, s in zip(base, ctr_scores(model, batch, ctx["answer_tokens"]["ctr"], stream).tolist()):
                rec["score"] = s
        elif task == "rating":
            exp, greedy = rating_scores(model, batch, ctx["answer_tokens"]["rating"], stream)
            for rec, e, g in zip(base, exp.tolist(), greedy.tolist()):
                rec["expected"], rec["greedy"] = e, g
        elif task == "sequential":
            cands = [[list(map(int, c)) for c in r["cand_ids"]] for r in chunk]
            for rec, s, c in zip(base, sequential_logliks(model, batch, cands, stream), cands):
                rec["scores"], rec["lengths"] = s.tolist(), [len(t) for t in c]
        elif task == "review":
            out = greedy_generate(model, batch, ctx["max_new_tokens"], ctx["eos_id"], stream, ctx["pad_id"])
            for rec, toks in zip(base, out):
                rec["hyp"] = ctx["tokenizer"].decode(toks, skip_special_tokens=True).strip()
        records.extend(base)
    return records


# --------------------------------------------------------------------------- rows and groups
@dataclass
class TaskRows:
    """One task's test rows as arrays (the rows every method is scored on)."""

    task: str
    sample_ids: np.ndarray
    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    cands: np.ndarray | None = None      # sequential: candidate item ids [n, C], -1 padded
    refs: list[str] | None = None        # review: reference texts

    @classmethod
    def from_rows(cls, task: str, rows: list[dict]) -> "TaskRows":
        cands = refs = None
        if task == "sequential":
            width = max(len(r["candidates"]) for r in rows)
            cands = np.full((len(rows), width), -1, dtype=np.int64)
            for k, r in enumerate(rows):
                cands[k, : len(r["candidates"])] = r["candidates"]
        if task == "review":
            refs = [str(r["answer_text"]) for r in rows]
        return cls(task, np.array([int(r["sample_id"]) for r in rows], dtype=np.int64),
                   np.array([int(r["user"]) for r in rows], dtype=np.int64),
                   np.array([int(r["item"]) for r in rows], dtype=np.int64),
                   np.array([float(r["label"]) for r in rows]), cands, refs)

    def __len__(self) -> int:
        return len(self.users)


def group_masks(tr: TaskRows, warm: np.ndarray, user_history: np.ndarray, item_training: np.ndarray,
                cold_user_max: int, cold_item_max: int) -> dict[str, np.ndarray]:
    """Row masks of the user groups (module docstring)."""
    seen = warm[tr.users]
    user_cold = user_history[tr.users] <= cold_user_max
    item_cold = item_training[tr.items] <= cold_item_max
    return {"all": np.ones(len(tr), dtype=bool), "warm": seen & ~user_cold & ~item_cold,
            "user-cold": user_cold, "item-cold": item_cold, "unseen": ~seen}


# --------------------------------------------------------------------------- method outputs
def llm_outputs(tr: TaskRows, records: list[dict], candidate_scoring: str = "sum") -> dict:
    """An LLM's records -> its output for ``tr``'s rows (records matched by sample id)."""
    by_id = {r["sample_id"]: r for r in records}
    recs = [by_id[int(s)] for s in tr.sample_ids]
    if tr.task == "ctr":
        return {"score": np.array([r["score"] for r in recs])}
    if tr.task == "rating":
        return {"pred": np.array([r["expected"] for r in recs]), "greedy": np.array([r["greedy"] for r in recs])}
    if tr.task == "sequential":
        scores = [np.asarray(r["scores"], dtype=np.float64) / (np.asarray(r["lengths"]) if candidate_scoring == "mean" else 1.0)
                  for r in recs]
        g, e = rank_counts_lists(scores, tr.labels.astype(np.int64))
        return {"greater": g, "ties": e}
    return {"hyp": [r["hyp"] for r in recs]}


def baseline_outputs(tr: TaskRows, base) -> dict[str, dict]:
    """``{method: output}`` of the baselines on ``tr``'s rows."""
    if tr.task == "ctr":
        return {m: {"score": s} for m, s in base.ctr(tr.users, tr.items).items()}
    if tr.task == "rating":
        return {m: {"pred": p} for m, p in base.rating(tr.users, tr.items).items()}
    if tr.task == "sequential":
        valid = tr.cands >= 0
        pos = tr.labels.astype(np.int64)
        out = {}
        for m, s in base.sequential(tr.users, tr.cands).items():
            g, e = rank_counts(s, valid, pos)
            out[m] = {"greater": g, "ties": e}
        return out
    return {}


# --------------------------------------------------------------------------- metrics
def _statistics(tr: TaskRows, out: dict, mask: np.ndarray, res: B.Resampler | None) -> tuple[dict, dict]:
    """(point values, bootstrap statistics) of one method on the rows of ``mask``."""
    points, stats = {}, {}
    if tr.task == "ctr":
        y, s, u = tr.labels[mask], out["score"][mask], tr.users[mask]
        points["auc"] = auc(y, s)
        stats["auc"] = B.auc_stat(y, s)
        value, n_users = uauc(u, y, s)
        points["uauc"], points["uauc_users"] = value, n_users
        if n_users and res is not None:
            stats["uauc"] = B.uauc_stat(res, y, s)
    elif tr.task == "sequential":
        width = tr.cands.shape[1]
        per = expected_ranking(out["greater"][mask], out["ties"][mask], KS)
        for k in METRICS["sequential"]:
            if k in per and not (k.startswith("hr@") and int(k[3:]) >= width):   # HR@K of K candidates is 1
                points[k] = float(per[k].mean()) if mask.any() else float("nan")
                stats[k] = B.mean_stat(per[k])
    elif tr.task == "rating":
        truth = tr.labels[mask]
        for suffix, key in (("", "pred"), ("_greedy", "greedy")):
            if key in out:
                err = out[key][mask] - truth
                for name, v in rmse_mae(truth, out[key][mask]).items():
                    points[name + suffix] = v
                stats["rmse" + suffix] = B.rmse_stat(err)
                stats["mae" + suffix] = B.mean_stat(np.abs(err))
    else:
        refs = [r for r, m in zip(tr.refs, mask) if m]
        hyps = [h for h, m in zip(out["hyp"], mask) if m]
        points.update(text_metrics(refs, hyps))
        if refs:
            stats["bleu4"] = B.bleu_stat(bleu_stats(refs, hyps))
            for k, v in rouge_rows(refs, hyps).items():
                stats[k] = B.mean_stat(v)
    return points, stats


def evaluate_task(tr: TaskRows, outputs: dict[str, dict], masks: dict[str, np.ndarray], reference: str | None,
                  n_boot: int, seed: int, min_rows: int) -> tuple[dict, dict]:
    """Every method on every group of ``tr`` with intervals; paired differences ``reference - other``.

    Returns ``(results, diffs)``: ``results[method][group] = {"n", metric: {value, lo, hi}}`` or
    ``{"n", "too_small": True}``; ``diffs[group]["A - B"][metric] = {value, lo, hi, excludes_zero}``.
    """
    results: dict = {m: {} for m in outputs}
    diffs: dict = {}
    for group, mask in masks.items():
        n = int(mask.sum())
        if n < max(1, min_rows):
            for m in outputs:
                results[m][group] = {"n": n, "too_small": True}
            continue
        res = B.Resampler(tr.users[mask], n_boot, seed, f"{tr.task}/{group}") if n_boot > 0 else None
        per = {m: _statistics(tr, out, mask, res) for m, out in outputs.items()}
        reps = B.replicate(res, {m: st for m, (_, st) in per.items()}) if res is not None else {}
        for m, (points, _) in per.items():
            cell = {"n": n}
            for k, v in points.items():
                if k == "uauc_users":
                    cell[k] = v
                elif k in reps.get(m, {}):
                    cell[k] = B.summarize(v, reps[m][k])
                else:
                    cell[k] = {"value": v, "lo": float("nan"), "hi": float("nan")}
            if tr.task == "ctr" and not points.get("uauc_users"):
                cell["uauc_undefined"] = UAUC_UNDEFINED
            results[m][group] = cell
        if reference in per:
            for m in outputs:
                if m == reference:
                    continue
                shared = [k for k in per[reference][0] if k in per[m][0] and k in reps.get(m, {})
                          and k in reps.get(reference, {})]
                diffs.setdefault(group, {})[f"{reference} - {m}"] = {
                    k: B.paired(per[reference][0][k], per[m][0][k], reps[reference][k], reps[m][k]) for k in shared}
    return results, diffs


# --------------------------------------------------------------------------- per-row output
ROW_OUTPUTS = ("score", "pred", "greedy", "greater", "ties", "hyp")    # the per-row outputs of llm/baseline_outputs


def rows_table(tr: TaskRows, outputs: dict[str, dict], masks: dict[str, np.ndarray]):
    """One task's test rows as an Arrow table: ids, label, a flag per user group, and every method's
    per-row output as ``<output>:<method>`` (ctr ``score``, rating ``pred``/``greedy``, sequential
    ``greater``/``ties`` = candidates scored above / equal to the true item, review ``hyp``), so a
    user can recompute any cell or run another paired analysis on exactly the table's rows."""
    import pyarrow as pa

    cols = {"sample_id": tr.sample_ids, "user": tr.users, "item": tr.items, "label": tr.labels}
    cols.update({f"group:{g}": np.asarray(m, dtype=bool) for g, m in masks.items()})
    for method, out in outputs.items():
        for key, values in out.items():
            if key in ROW_OUTPUTS:
                cols[f"{key}:{method}"] = values if key == "hyp" else np.asarray(values)
    return pa.table(cols)
