"""``ckf plan``: what a config needs per GPU before any GPU is rented.

For each config: the exact trainable and frozen parameter counts (the model built on the meta
device), the per-GPU memory by component at the config's micro-batch and length
(:mod:`ckf_dist.train.memory`), with and without gradient checkpointing, and the largest
micro-batch that fits a given GPU. With ``--mfu`` and ``--peak-tflops`` it also predicts
tokens/s from the training FLOPs (forward and input-gradient backward through the frozen
backbone, about 4 x parameters per token; the LoRA weight gradients are negligible).
"""

from __future__ import annotations

import copy
from pathlib import Path

from ckf_dist.config import CKFConfig
from ckf_dist.train import memory

OVERHEAD_GIB = 1.0      # CUDA context, NCCL and cuBLAS workspaces, allocator slack: a stated margin
USERS_ITEMS = (14_000, 25_000)   # when no prepared dataset is at hand: the paper's Amazon Books scale


def _cf_sizes(cfg: CKFConfig) -> tuple[int, int, str]:
    """(users, items, where from): the prepared dataset's CF tables, else the paper's scale."""
    from ckf_dist.data import read_dataset_manifest
    from ckf_dist.errors import DataError

    try:
        manifest, _, _ = read_dataset_manifest(cfg.data.output)
    except (DataError, OSError, ValueError):
        return USERS_ITEMS[0], USERS_ITEMS[1], "Amazon Books scale (no prepared dataset at data.output)"
    users, items = manifest.get("n_users"), manifest.get("n_items")
    if not users or not items:
        return USERS_ITEMS[0], USERS_ITEMS[1], "Amazon Books scale (the manifest has no CF sizes)"
    return int(users), int(items), f"the dataset at {cfg.data.output}"


def plan(cfg: CKFConfig, gpus: int | None = None, gpu_memory_gib: float = 80.0, length: int | None = None,
         mfu: float | None = None, peak_tflops: float | None = None) -> dict:
    """The numbers ``ckf plan`` prints, as a dict (JSON-able)."""
    gpus = gpus or cfg.train.num_workers
    users, items, cf_from = _cf_sizes(cfg)
    counts = memory.count_model(cfg, users, items)
    streams = 2 if cfg.model.bridge.use_cf_slots else 1
    shape = memory.Shape(cfg.train.micro_batch_size, length or cfg.data.max_length, memory.answer_tokens(cfg), streams)
    budget = (gpu_memory_gib - OVERHEAD_GIB) * memory.GiB
    out = {"backbone": cfg.model.backbone_id or cfg.model.backbone, "gpus": gpus, "zero_stage": cfg.train.zero_stage,
           "dtype": cfg.model.dtype, "micro_batch": shape.micro_batch, "length": shape.length,
           "answer_tokens": shape.answer, "cf_tables": cf_from, "trainable": counts.trainable, "frozen": counts.frozen,
           "gpu_memory_gib": gpu_memory_gib, "overhead_gib": OVERHEAD_GIB, "modes": {}}
    for ckpt in (cfg.model.gradient_checkpointing, not cfg.model.gradient_checkpointing):
        c = copy.deepcopy(cfg)
        c.model.gradient_checkpointing = ckpt
        est = memory.estimate(counts, c, gpus, shape)
        out["modes"]["checkpointing" if ckpt else "no checkpointing"] = {
            "bytes": est, "configured": ckpt == cfg.model.gradient_checkpointing,
            "largest_micro_batch": memory.largest_micro_batch(counts, c, gpus, shape, budget)}
    if mfu and peak_tflops:
        flops_per_token = 4.0 * (counts.frozen + counts.trainable) * streams
        out["tokens_per_s"] = mfu * peak_tflops * 1e12 * gpus / flops_per_token
        out["mfu"], out["peak_tflops"] = mfu, peak_tflops
    return out


def format_plan(name: str, p: dict) -> str:
    """One preset's table: memory per GPU by component, for both activation modes."""
    modes = list(p["modes"])
    head = (f"{name}: {p['backbone']} on {p['gpus']} GPU(s), ZeRO-{p['zero_stage']}, {p['dtype']}, "
            f"micro-batch {p['micro_batch']} x {p['length']} tokens (answers <= {p['answer_tokens']})\n"
            f"  parameters: {p['trainable']:,} trainable, {p['frozen']:,} frozen (CF tables: {p['cf_tables']})\n")
    width = max(len(k) for k in p["modes"][modes[0]]["bytes"]) + 2
    lines = [f"  {'GiB per GPU':<{width}}" + "".join(f"{m + (' *' if p['modes'][m]['configured'] else ''):>20}"
                                                    for m in modes)]
    for key in p["modes"][modes[0]]["bytes"]:
        lines.append(f"  {key:<{width}}" + "".join(f"{memory.gib(p['modes'][m]['bytes'][key]):>20}" for m in modes))
    lines.append(f"  {'+ runtime margin':<{width}}" + "".join(f"{p['overhead_gib']:>20.2f}" for _ in modes))
    fit = "".join(f"{p['modes'][m]['largest_micro_batch']:>20}" for m in modes)
    lines.append(f"  {'largest micro-batch':<{width}}{fit}   (in {p['gpu_memory_gib']:g} GiB)")
    tail = "  * the config's setting (model.gradient_checkpointing)\n"
    if "tokens_per_s" in p:
        tail += (f"  predicted: {p['tokens_per_s']:,.0f} tokens/s over {p['gpus']} GPU(s) at MFU {p['mfu']:g} of "
                 f"{p['peak_tflops']:g} TFLOP/s each\n")
    return head + "\n".join(lines) + "\n" + tail


def run_plan(paths: list[str], overrides: list[str], gpus: int | None, gpu_memory_gib: float,
             length: int | None = None, mfu: float | None = None, peak_tflops: float | None = None) -> list[dict]:
    """Plan every config in ``paths``; prints one table each and returns the plans."""
    from ckf_dist.config import load_config

    plans = []
    for path in paths:
        p = plan(load_config(path, overrides), gpus, gpu_memory_gib, length, mfu, peak_tflops)
        print(format_plan(Path(path).name, p), flush=True)
        plans.append(p)
    return plans
