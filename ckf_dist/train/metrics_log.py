"""Per-step training metrics: JSONL + TensorBoard on rank 0, and a readable terminal line."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    """Collects step metrics on rank 0; other ranks keep only the last row (for ``ray.train.report``)."""

    def __init__(self, cfg, rank: int):
        self.rank = rank
        self.every = max(1, cfg.train.log_every)
        self.rows: list[dict] = []
        self.last: dict = {}
        self.t_start = time.perf_counter()
        self.dir = Path(cfg.train.log_dir) / cfg.run_name
        self._tb = None
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "metrics.jsonl").write_text("")  # a resume rewrites it from the checkpoint
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def step(self, step: int, total: int, stats: dict, **extra) -> None:
        """Record one optimizer step; print a line every ``log_every`` steps and at the end."""
        row = {"step": step, **{k: round(float(v), 6) for k, v in stats.items()},
               **{k: round(float(v), 6) for k, v in extra.items()}}
        self.last = row
        if self.rank != 0:
            return
        self.rows.append(row)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k.replace(".", "/"), v, step)
        if step % self.every == 0 or step == total:
            elapsed = time.perf_counter() - self.t_start
            eta = elapsed / max(1, len(self.rows)) * (total - step)
            parts = [f"step {step}/{total}", f"loss {row.get('loss', float('nan')):.4f}"]
            if "loss_cf" in row:        # a text-only run (no bridge) has no CF stream to show
                parts.append(f"text {row['loss_text']:.3f} cf {row['loss_cf']:.3f} w {row.get('w', 0):.2f}")
            parts += [f"lr {row['lr']:.2e}", f"{row['samples_per_s']:.1f} samples/s",
                      f"{row['tokens_per_s']:.0f} tok/s", f"eta {eta:.0f}s"]
            print("[ckf] " + " | ".join(parts), flush=True)

    def restore(self, ref) -> None:
        """After a resume, continue the log from the checkpoint's copy (rows up to its step)."""
        if self.rank != 0:
            return
        path = f"{ref.path}/metrics.jsonl"
        if not ref.fs.exists(path):
            return
        with ref.fs.open(path, "r") as f:
            self.rows = [json.loads(line) for line in f if line.strip()]
        self.rows = [r for r in self.rows if r["step"] <= ref.step]
        (self.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def jsonl_text(self) -> str:
        """The log so far as JSONL (stored inside each checkpoint)."""
        return "".join(json.dumps(r) + "\n" for r in self.rows)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
