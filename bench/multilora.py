"""Benchmark: one Multi-LoRA layer, forward + backward, T tasks in one mixed batch.

Compares, in one run (interleaved rounds; ratios of the per-implementation minimum, medians kept, and
the median over rounds of ours/base within a round):
  ours   ckf_dist.model.multi_lora.MultiLoraLinear: the projection and its adapters as one autograd op
         (per-sample batched path: each sample's adapter gathered, one batched shrink GEMM, one batched
         expand GEMM into the base output; in backward the base's dX GEMM accumulates into the adapters')
  sep    the same layer with fuse_base_gemm off: the base module and the adapter op as two autograd nodes
  token  the per-token contract op multi_lora_torch (all ranks in one shrink GEMM, task mask, one expand)
  loop   (a) a loop over task sub-batches (gather rows, per-task GEMMs, scatter back)
  dense  (b) every task adapter on every token, then keep each token's own (mask and sum)
  base   (c) the frozen base linear alone: the limit any adapter implementation can reach

The input requires grad (as inside a network whose earlier layers train), the base weight is
frozen, adapter weights train. Shape: a 7B-like projection scaled to CPU (default 2048 x 2048,
2048 tokens, r = 16). Writes JSON to bench/results/multilora.json.

    python bench/multilora.py [--tokens 2048] [--dim 2048] [--rank 16] [--tasks 4] [--rounds 9]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ckf_dist.model.lora_ops import lora_dropout, multi_lora_torch
from ckf_dist.model.multi_lora import AdapterSpec, LoraRouting, MultiLoraLinear


def build(args, placement: str):
    """A frozen Linear wrapped by MultiLoraLinear (task adapters; shared too when placement == 'shared+task')."""
    torch.manual_seed(0)
    base = nn.Linear(args.dim, args.dim, bias=False).requires_grad_(False)
    routing = LoraRouting()
    shared = AdapterSpec(args.rank, 4.0 * args.rank) if placement == "shared+task" else None
    layer = MultiLoraLinear(base, "proj", args.tasks, shared, AdapterSpec(args.rank, 4.0 * args.rank),
                            args.dropout, routing, fused_kernels=False).train()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.02)
    return layer, routing


def ours(layer, routing, x, ids):
    with routing.active(ids):
        return layer(x)


def separate(layer, routing, x, ids):
    """Ours with the base module and the adapter op as two autograd nodes (``fuse_base_gemm`` off)."""
    layer.fuse_base_gemm = False
    try:
        with routing.active(ids):
            return layer(x)
    finally:
        layer.fuse_base_gemm = True


def contract_op(layer, routing, x, ids):
    """The per-token contract op (masked rank columns) on flattened tokens."""
    xd, keep = lora_dropout(x.reshape(-1, layer.in_features), layer.dropout, layer.training)
    tok = ids.repeat_interleave(x.shape[1])
    a_s, b_s = (layer.lora_shared_A, layer.lora_shared_B) if layer.shared is not None else (None, None)
    s_s = layer.shared.scale * keep if layer.shared is not None else 0.0
    delta = multi_lora_torch(xd, a_s, b_s, layer.lora_task_A, layer.lora_task_B, tok, s_s, layer.task.scale * keep)
    return layer.base(x) + delta.view(x.shape[0], x.shape[1], -1)


def _shared_delta(layer, xd, keep):
    if layer.shared is None:
        return torch.zeros(xd.shape[0], layer.out_features)
    return (layer.shared.scale * keep) * (xd @ layer.lora_shared_A.t()) @ layer.lora_shared_B.t()


def loop_over_tasks(layer, routing, x, ids):
    """(a) per-task sub-batches: the straightforward implementation (gather rows, GEMMs, scatter back)."""
    xd, keep = lora_dropout(x.reshape(-1, layer.in_features), layer.dropout, layer.training)
    tok = ids.repeat_interleave(x.shape[1])
    delta = _shared_delta(layer, xd, keep)
    for t in range(layer.n_tasks):
        rows = (tok == t).nonzero().squeeze(-1)
        part = (xd[rows] @ layer.lora_task_A[t].t()) @ layer.lora_task_B[t].t()
        delta = delta.index_add(0, rows, (layer.task.scale * keep) * part)
    return layer.base(x) + delta.view(x.shape[0], x.shape[1], -1)


def dense_then_mask(layer, routing, x, ids):
    """(b) every adapter on every token ([N, T, out]), then keep each token's own task."""
    xd, keep = lora_dropout(x.reshape(-1, layer.in_features), layer.dropout, layer.training)
    tok = ids.repeat_interleave(x.shape[1])
    t, r = layer.n_tasks, layer.task.r
    h = (xd @ layer.lora_task_A.reshape(t * r, -1).t()).view(-1, t, r)              # [N, T, r]
    every = torch.einsum("ntr,tor->nto", h, layer.lora_task_B)                      # [N, T, out]
    onehot = F.one_hot(tok, t).to(xd.dtype).unsqueeze(-1)
    delta = (layer.task.scale * keep) * (every * onehot).sum(1) + _shared_delta(layer, xd, keep)
    return layer.base(x) + delta.view(x.shape[0], x.shape[1], -1)


def base_only(layer, routing, x, ids):
    """(c) the frozen projection alone."""
    return layer.base(x)


IMPLS = {"ours": ours, "sep": separate, "token": contract_op, "loop": loop_over_tasks, "dense": dense_then_mask, "base": base_only}


def step(fn, layer, routing, x, ids, grad_out):
    x.grad = None
    layer.zero_grad(set_to_none=True)
    fn(layer, routing, x, ids).backward(grad_out)


def check_equal(args, placement):
    """All implementations agree (dropout off) before anything is timed."""
    small = argparse.Namespace(**{**vars(args), "dim": 64, "tokens": 64, "dropout": 0.0})
    layer, routing = build(small, placement)
    x = torch.randn(8, 8, 64, dtype=torch.float32)
    ids = torch.arange(8) % small.tasks
    ref = ours(layer, routing, x, ids)
    for name in ("sep", "token", "loop", "dense"):
        torch.testing.assert_close(IMPLS[name](layer, routing, x, ids), ref, rtol=1e-4, atol=1e-5)


def run(args, placement: str) -> dict:
    check_equal(args, placement)
    layer, routing = build(args, placement)
    seq = 256
    batch = args.tokens // seq
    x = torch.randn(batch, seq, args.dim, requires_grad=True)
    ids = torch.arange(batch) % args.tasks                    # mixed batch: every task present
    ids = ids[torch.randperm(batch, generator=torch.Generator().manual_seed(0))]
    grad_out = torch.randn(batch, seq, args.dim)
    times = {name: [] for name in IMPLS}
    for name, fn in IMPLS.items():                            # warm-up
        step(fn, layer, routing, x, ids, grad_out)
    for _ in range(args.rounds):                              # interleaved: shared noise hits all alike
        for name, fn in IMPLS.items():
            started = time.perf_counter()
            step(fn, layer, routing, x, ids, grad_out)
            times[name].append(time.perf_counter() - started)
    # min over interleaved rounds estimates the uncontended time (the machine is shared); medians kept too
    med = {name: min(ts) for name, ts in times.items()}
    per_round = [o / b for o, b in zip(times["ours"], times["base"])]    # same round: the same load on both
    return {"placement": placement, "min_s": med, "median_s": {n: statistics.median(ts) for n, ts in times.items()},
            "all_s": times,
            "dropout": args.dropout,
            "ratios": {"ours/base": med["ours"] / med["base"], "ours/loop": med["ours"] / med["loop"],
                       "ours/dense": med["ours"] / med["dense"], "sep/base": med["sep"] / med["base"],
                       "token/base": med["token"] / med["base"]},
            "ours/base_median_of_rounds": statistics.median(per_round)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); 1 keeps timings stable on a shared machine")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "multilora.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for dropout in sorted({args.dropout, 0.0}, reverse=True):
        for placement in ("task", "shared+task"):
            results.append(run(argparse.Namespace(**{**vars(args), "dropout": dropout}), placement))
    report = {"bench": "multilora", "config": vars(args), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}
    for r in results:
        med, rat = r["min_s"], r["ratios"]
        print(f"{r['placement']:>11} p={r['dropout']:.1f}: ours {med['ours'] * 1e3:6.1f} ms | token "
              f"{med['token'] * 1e3:6.1f} | sep {med['sep'] * 1e3:6.1f} | loop {med['loop'] * 1e3:6.1f} | dense {med['dense'] * 1e3:6.1f} | base "
              f"{med['base'] * 1e3:6.1f}  ->  ours/base {rat['ours/base']:.3f}  ours/loop {rat['ours/loop']:.3f}"
              f"  ours/dense {rat['ours/dense']:.3f}  (per-round median ours/base {r['ours/base_median_of_rounds']:.3f})  sep/base {rat['sep/base']:.3f}  token/base {rat['token/base']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
