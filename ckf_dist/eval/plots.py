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

    columns = {**report.get("results", {}), **report.get("baselines", {})}
    tasks = [t for t in MAIN_METRIC if any(t in report.get("results", {}).get(v, {}) for v in report.get("results", {}))]
    width = 0.8 / max(1, len(columns))
    for j, (name, res) in enumerate(columns.items()):
        vals = [res.get(t, {}).get("all", {}).get(MAIN_METRIC[t]) for t in tasks]
        vals = [v if isinstance(v, (int, float)) and v is not None and math.isfinite(v) else 0.0 for v in vals]
        if any(vals):
            ax_bar.bar([i + j * width for i in range(len(tasks))], vals, width, label=name)
    ax_bar.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
    ax_bar.set_xticklabels([f"{t}\n{MAIN_METRIC[t]}" for t in tasks])
    ax_bar.set_title("test metrics (all users)")
    ax_bar.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
