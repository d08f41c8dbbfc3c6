"""The evaluation table: one row per (task, metric, group), one column per variant and baseline."""

from __future__ import annotations

import math

import numpy as np

from ckf_dist.contract import TASKS
from ckf_dist.eval.scoring import GROUPS

MAIN_METRIC = {"ctr": "auc", "sequential": "ndcg@5", "rating": "rmse", "review": "rougeL"}


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


def json_safe(o):
    """JSON-safe copy: NaN/inf -> null (strict JSON), numpy scalars -> Python."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
