"""The PNG of ``ckf evaluate``: training curves (metrics.jsonl) and per-task metric bars (matplotlib Agg)."""

from __future__ import annotations

import json
import math
from pathlib import Path

CURVES = ("loss", "loss_text", "loss_cf")


def read_metrics_log(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl (missing file: none)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def draw_report(report: dict, metrics_log: Path, out: Path) -> Path | None:
    """Left: losses and curriculum weight w over steps; right: each task's main metric per variant/baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("evaluate: matplotlib is not installed; no PNG (pip install matplotlib)")
        return None
    from ckf_dist.eval.report import MAIN_METRIC

    rows = read_metrics_log(metrics_log)
    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5))
    if rows:
        steps = [r["step"] for r in rows]
        for key in CURVES:
            if any(key in r for r in rows):
                ax_curve.plot(steps, [r.get(key, math.nan) for r in rows], label=key)
        if any("w" in r for r in rows):
            ax_w = ax_curve.twinx()
            ax_w.plot(steps, [r.get("w", math.nan) for r in rows], "k--", alpha=0.5, label="w (text weight)")
            ax_w.set_ylabel("w")
            ax_w.set_ylim(0, 1.05)
            ax_w.legend(loc="upper center")
        ax_curve.set_xlabel("step")
        ax_curve.set_ylabel("loss")
        ax_curve.legend(loc="upper right")
    else:
        ax_curve.text(0.5, 0.5, "no metrics.jsonl", ha="center", va="center")
    ax_curve.set_title(f"training ({report.get('backbone')}, step {report.get('step')})")

    results = report.get("results", {})
    tasks = [t for t in MAIN_METRIC if t in results]
    methods = list(dict.fromkeys(m for t in tasks for m in results[t]))
    width = 0.8 / max(1, len(methods))
    for j, name in enumerate(methods):
        cells = [results[t].get(name, {}).get("all", {}).get(MAIN_METRIC[t]) or {} for t in tasks]
        vals = [c.get("value") for c in cells]
        ok = [isinstance(v, (int, float)) and math.isfinite(v) for v in vals]
        if not any(ok):
            continue
        xs = [i + j * width for i in range(len(tasks))]
        ys = [v if k else 0.0 for v, k in zip(vals, ok)]
        err = [[max(0.0, y - c.get("lo")) if k and _finite(c.get("lo")) else 0.0 for y, c, k in zip(ys, cells, ok)],
               [max(0.0, c.get("hi") - y) if k and _finite(c.get("hi")) else 0.0 for y, c, k in zip(ys, cells, ok)]]
        ax_bar.bar(xs, ys, width, yerr=err, capsize=2, label=name)
    ax_bar.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
    ax_bar.set_xticklabels([f"{t}\n{MAIN_METRIC[t]}" for t in tasks])
    ax_bar.set_title("test metrics, all rows (95% bootstrap intervals)")
    if ax_bar.get_legend_handles_labels()[0]:
        ax_bar.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
