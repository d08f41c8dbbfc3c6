"""Benchmark: scoring K sequential-task candidates per user, as ``ckf evaluate`` does.

Compares, in one run (interleaved rounds; the minimum time per path; same users, same model):
  full     one full forward (prompt + candidate) per candidate: K prompt forwards per user (naive)
  shared   sequential_logliks(method="shared"): the prompt once per user, its K candidates
           batched from the cached keys/values
  packed   sequential_logliks(method="packed"): B users per forward, each row packed as its
           prompt followed by its K candidates under a 4-D tree mask (what ``ckf evaluate`` runs)

All three must give the same log-likelihoods (max |diff| printed, fp32 tolerance 1e-4).
Data: a synthetic dataset prepared into a temp folder (sequential task only, K candidates, real
SmolLM2 tokenizer, so prompts have realistic lengths). Writes bench/results/eval_scoring.json.

    python bench/eval_scoring.py [--backbone smollm2|tiny-llama] [--users 16] [--k 10] [--batch 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from ckf_dist.config import config_from_dict
from ckf_dist.data import load_cf_tables
from ckf_dist.data.collate import collate
from ckf_dist.stages.prepare import run_prepare
from ckf_dist.model.scoring import sequential_logliks
from ckf_dist.stages.evaluate import load_test_rows
from ckf_dist.model import ModelConfig, build_ckf_model, load_backbone
from ckf_dist.model.testing import randomize_adapters


def prepare(out: Path, users: int, k: int) -> tuple[str, dict]:
    data = {"source": "synthetic", "synthetic_users": max(users + 20, 60), "synthetic_items": 120,
            "synthetic_interactions_per_user": 15, "max_history": 10, "n_candidates": k, "shard_rows": 512,
            "cold_user_fraction": 0.1, "output": str(out),
            "task_weights": {"ctr": 0.0, "sequential": 1.0, "rating": 0.0, "review": 0.0}}
    cfg = config_from_dict({"run_name": "bench", "seed": 3, "data": data, "cf": {"epochs": 5}}, "<bench>")
    return str(out), run_prepare(cfg, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8, help="users per batch on the packed path")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stream", default="cf", choices=["cf", "text"])
    ap.add_argument("--out", default="bench/results/eval_scoring.json")
    args = ap.parse_args()

    url, manifest = prepare(Path(tempfile.mkdtemp(prefix="ckf-bench-eval-")) / "data", args.users, args.k)
    rows = load_test_rows(url, 0, 0)["sequential"][:args.users]
    pad = manifest["tokenizer"]["pad_id"]
    cfg = ModelConfig(backbone=args.backbone)
    backbone, _ = load_backbone(cfg)
    cf = load_cf_tables(url, manifest=manifest)
    model = build_ckf_model(cfg, backbone, torch.from_numpy(cf["user"]), torch.from_numpy(cf["item"])).eval()
    randomize_adapters(model, seed=0, std=0.02)
    batches = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
    batches = [(collate(b, pad), [[list(map(int, c)) for c in r["cand_ids"]] for r in b]) for b in batches]
    n_cands = sum(len(c) for _, cands in batches for c in cands)
    prompt_len = sum(int(r[f"{'cf' if args.stream == 'cf' else 'text'}_prompt_len"]) for r in rows) / len(rows)

    def run(path: str) -> list[torch.Tensor]:
        out = []
        for batch, cands in batches:
            out += sequential_logliks(model, batch, cands, args.stream, method=path)
        return out

    paths = ("full", "shared", "packed")
    results = {p: run(p) for p in paths}                     # warm-up, and the answers to compare
    diffs = {p: max(float((a - b).abs().max()) for a, b in zip(results[p], results["full"])) for p in paths}
    times: dict[str, list[float]] = {p: [] for p in paths}
    torch.set_num_threads(torch.get_num_threads())
    for _ in range(args.rounds):
        for p in paths:
            t0 = time.perf_counter()
            run(p)
            times[p].append(time.perf_counter() - t0)
    best = {p: min(t) for p, t in times.items()}
    rate = {p: n_cands / best[p] for p in paths}
    report = {
        "backbone": args.backbone, "users": len(rows), "k": args.k, "batch": args.batch, "stream": args.stream,
        "mean_prompt_tokens": round(prompt_len, 1), "candidates": n_cands, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "seconds": {p: [round(t, 4) for t in ts] for p, ts in times.items()},
        "candidates_per_s": {p: round(r, 1) for p, r in rate.items()},
        "users_per_s": {p: round(len(rows) / best[p], 2) for p in paths},
        "speedup_vs_full": {p: round(rate[p] / rate["full"], 2) for p in paths},
        "max_abs_diff_vs_full": diffs, "same_ranking": all(
            torch.equal(a.argsort(), b.argsort()) for a, b in zip(results["packed"], results["full"])),
    }
    print(f"{args.backbone}, {len(rows)} users x K={args.k} candidates, prompts ~{prompt_len:.0f} tokens, "
          f"{torch.get_num_threads()} threads, {args.stream} stream")
    for p in paths:
        print(f"  {p:8s} {len(rows) / best[p]:7.2f} users/s {rate[p]:9.1f} candidates/s  ({best[p]:.3f} s)  "
              f"x{rate[p] / rate['full']:.2f} vs full"
              f"  max|diff| {diffs[p]:.2e}")
    assert max(diffs.values()) < 1e-4, f"scores differ beyond fp32 tolerance: {diffs}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
