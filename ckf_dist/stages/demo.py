"""``ckf demo``: prepare -> train -> consolidate -> evaluate on one config (default: the embedded
MovieLens-100k + SmolLM2-135M on this machine's CPUs).

Each stage reuses what an earlier run left behind when it is complete: a prepared dataset
with its manifest is read again rather than rebuilt, and training resumes from the run's
latest committed checkpoint (so a finished run goes straight to consolidation).
"""

from __future__ import annotations

import time
from pathlib import Path


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run_demo(config_path: str, overrides: list[str] | None = None) -> int:
    """Run the four stages; returns a process exit code."""
    from ckf_dist.stages.consolidate import consolidate
    from ckf_dist.config import load_config
    from ckf_dist.data.errors import DataError
    from ckf_dist.stages.prepare import run_prepare
    from ckf_dist.data.shards import read_dataset_manifest
    from ckf_dist.stages.evaluate import run_evaluate
    from ckf_dist.stages.train import run_train

    cfg = load_config(config_path, overrides or [])
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    _banner(f"1/4 prepare: {cfg.data.source} -> {cfg.data.output}")
    try:
        read_dataset_manifest(cfg.data.output)
        print(f"[ckf] a complete dataset is already at {cfg.data.output}: reusing it "
              f"(`ckf prepare --overwrite` rebuilds it)")
    except DataError:
        run_prepare(cfg, overwrite=False, progress=True)
    times["prepare"] = time.perf_counter() - t0

    t = time.perf_counter()
    _banner(f"2/4 train: {cfg.train.num_workers} workers, ZeRO-{cfg.train.zero_stage}, run {cfg.run_name!r}")
    result = run_train(cfg, progress=True)
    times["train"] = time.perf_counter() - t
    print(f"[ckf] checkpoint: {result['checkpoint']}")

    t = time.perf_counter()
    out = Path(cfg.eval.output)
    adapters = out / "consolidated"
    _banner(f"3/4 consolidate -> {adapters}")
    consolidate(result["checkpoint"], adapters, progress=True)
    times["consolidate"] = time.perf_counter() - t

    t = time.perf_counter()
    scope = f"a sample of {cfg.eval.users_per_task} users per task" if cfg.eval.users_per_task else "every test user"
    _banner(f"4/4 evaluate (test split, {scope}, 95% bootstrap intervals)")
    run_evaluate(cfg, str(adapters), out_dir=out, progress=True)
    times["evaluate"] = time.perf_counter() - t

    total = time.perf_counter() - t0
    _banner("done")
    print("  " + "  ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f"  | total {total:.0f}s")
    print(f"  dataset      {cfg.data.output}")
    print(f"  checkpoint   {result['checkpoint']}")
    print(f"  adapters     {adapters}/adapters/<task>  (peft LoRA folders) + bridge.safetensors")
    print(f"  evaluation   {out}/eval.json, {out}/eval.png")
    return 0
