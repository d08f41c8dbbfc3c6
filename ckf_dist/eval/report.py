"""The evaluation table: per task and metric, a row per method, a column per user group.

Every cell of one block is on the same rows (the column's n), written ``value [lo, hi]``
with the 95% bootstrap interval; a group below ``eval.min_group_rows`` reads "too small".
Below each task, the paired differences of the reference method minus every other on the
task's main metric; ``*`` marks a difference whose interval excludes 0.
"""

from __future__ import annotations

import math

import numpy as np

from ckf_dist.contract import TASKS
from ckf_dist.eval.scoring import GROUPS

MAIN_METRIC = {"ctr": "auc", "sequential": "ndcg@5", "rating": "rmse", "review": "rougeL"}
SHOWN = {"ctr": ("auc", "uauc"), "sequential": ("hr@1", "hr@5", "ndcg@5", "mrr"), "rating": ("rmse", "mae"),
         "review": ("bleu4", "rougeL")}
TASK_NOTE = {
    "ctr": "AUC of each method's score over the like labels of the same (user, item) rows",
    "sequential": "the same candidate lists; ties by expected rank",
    "rating": "error of each method's predicted rating on the same rows",
    "review": "greedy generation vs the reference text",
}
CELL = 22


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _cell(c: dict | None, metric: str, signed: bool = False) -> str:
    if c is None:
        return "-"
    if c.get("too_small"):
        return "too small"
    m = c.get(metric)
    if m is None or _nan(m.get("value")):
        return "-"
    v = f"{m['value']:+.3f}" if signed else f"{m['value']:.3f}"
    if _nan(m.get("lo")):
        return v
    return f"{v} [{m['lo']:.2f},{m['hi']:.2f}]"


def format_table(report: dict) -> str:
    """The printed table of an evaluation report (see the module docstring)."""
    results, diffs = report["results"], report.get("diffs", {})
    names = [m for t in results for m in results[t]] + [d for t in diffs for g in diffs[t] for d in diffs[t][g]]
    label = max([20] + [len(n) + 2 for n in names])
    lines = []
    for task in [t for t in TASKS if t in results]:
        methods = results[task]
        groups = [g for g in GROUPS if any(g in methods[m] for m in methods)]
        n = {g: next((methods[m][g]["n"] for m in methods if g in methods[m]), 0) for g in groups}
        lines.append(f"{task}: {TASK_NOTE[task]}")
        head = f"  {'':<{label}}" + "".join(f"{g + ' n=' + str(n[g]):>{CELL}}" for g in groups)
        for metric in SHOWN[task]:
            cells = {m: [_cell(methods[m].get(g), metric) for g in groups] for m in methods}
            if all(c == "-" for row in cells.values() for c in row) or (
                    metric == "uauc" and all(c in ("-", "too small") for row in cells.values() for c in row)):
                if task == "ctr" and metric == "uauc":
                    reason = next((methods[m][g].get("uauc_undefined") for m in methods for g in groups
                                   if methods[m].get(g, {}).get("uauc_undefined")), None)
                    if reason:
                        lines.append(f"  uauc: not defined: {reason}")
                continue
            lines.append(f"  {metric}" + head[2 + len(metric):])
            for m in methods:
                lines.append(f"  {m:<{label}}" + "".join(f"{c:>{CELL}}" for c in cells[m]))
        main = MAIN_METRIC[task]
        pairs = [(g, name) for g in groups for name in diffs.get(task, {}).get(g, {})]
        pair_names = list(dict.fromkeys(name for _, name in pairs))
        if pair_names:
            lines.append(f"  {main}, paired difference{' (lower is better)' if main in ('rmse', 'mae') else ''}")
            for name in pair_names:
                row = []
                for g in groups:
                    d = diffs[task].get(g, {}).get(name, {}).get(main)
                    if d is None:
                        row.append("too small" if methods[next(iter(methods))].get(g, {}).get("too_small") else "-")
                    else:
                        row.append(_cell({main: d}, main, signed=True) + ("*" if d.get("excludes_zero") else " "))
                lines.append(f"  {name:<{label}}" + "".join(f"{c:>{CELL}}" for c in row))
        lines.append("")
    lines.append(_footer(report))
    return "\n".join(lines)


def _footer(report: dict) -> str:
    opts = report.get("options", {})
    sampled = report.get("users_per_task") or 0
    scope = (f"a SAMPLE of {sampled} test users per task (a smoke run: intervals are wide)" if sampled
             else "every test user of every task")
    out = [f"rows: {scope}; 95% bootstrap intervals over users ({opts.get('bootstrap', 0)} replicates, "
           f"seed {report.get('seed')}); * = the paired interval excludes 0.",
           f"groups: warm = seen in training, neither cold; user-cold = <= {opts.get('cold_user_max')} known "
           f"interactions; item-cold = target with <= {opts.get('cold_item_max')} training interactions; "
           f"unseen = users held out of training; fewer than {opts.get('min_group_rows')} rows = too small.",
           f"sequential candidates scored by the {opts.get('candidate_scoring', 'sum')} of token log-probs of "
           f"their answer ({'the option letter' if opts.get('sequential_answer') == 'letter' else 'the title'}); "
           f"negatives: {opts.get('negatives', 'uniform')}."]
    labels = report.get("methods", {})
    if labels:
        out.append("methods: " + "; ".join(f"{m} = {d}" for m, d in labels.items()))
    return "\n".join(out)


def format_retrieval(retrieval: dict) -> str:
    """The CF stage's own retrieval metrics (prepare time): its AUC against sampled negatives."""
    if not retrieval:
        return ""
    lines = [f"retrieval (the CF stage's own metric, not comparable to the table above): AUC of the test item "
             f"against {retrieval.get('negatives')} sampled unseen items, per user"]
    for who, groups in retrieval.get("test", {}).items():
        for group, m in groups.items():
            if "auc" in m:
                lines.append(f"  {who:<12}{group:<6} users {m.get('users', '-'):>5}  auc {m['auc']:.4f}")
    return "\n".join(lines)


def json_safe(o):
    """JSON-safe copy: NaN/inf -> null (strict JSON), numpy scalars -> Python."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
