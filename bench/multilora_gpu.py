#!/usr/bin/env python3
"""Fused Multi-LoRA on one GPU: correctness, kernel timings, and one CKF training step.

    python bench/multilora_gpu.py --parts correctness,timing,train --out results.json
    python bench/multilora_gpu.py --parts bisect --out bisect.json   # the fp16 fault case, per variant
    python bench/multilora_gpu.py --report results.json        # the short table, from the JSON
    python bench/multilora_gpu.py --cpu-smoke                  # tiny shapes, TRITON_INTERPRET=1, CPU

Parts (each merges its results into --out, so gpu_check.sh runs them as separate processes):
* correctness: fresh random inputs (no zeros), fp32/fp16/bf16, fused op and torch path vs an
  fp64 reference, output and all five gradients; every buffer the op allocates is poisoned
  with NaN; tolerances fp32 1e-5, fp16 2e-3, bf16 1e-2; determinism (bitwise) check.
* timing: the card's ceilings (a large bf16 matmul, a device copy), then CUDA-event medians
  (triton do_bench, L2 flushed between runs) at Llama-7B shapes (4096x4096, r=16, T=4,
  4k-16k tokens): base projection alone vs the fused projection (base GEMM + adapters in one
  op) / base + fused / fused(out=) / torch / naive loop, forward and forward+backward, with
  per-token uniform task ids (worst case) and, for the fused ops, per-sample ids (``_ps``:
  the model's layout); the fused projection's GEMM alone vs cuBLAS; the delta alone with its
  achieved bandwidth; a small sweep of kernel tilings (each checked against the default
  before it is timed).
* bisect: the case that faulted in fp16 on the H200 (rs 8 / rt 64), one process per config
  variant (default equal rank padding, own paddings 16/64, the latter with
  CUDA_LAUNCH_BLOCKING=1 to name the faulting launch, and with block_d 32 so that dW runs on
  mma.sync instead of wgmma): which settings fault, and where.
* train (bench/multilora_gpu_train.py): one CKF step (bf16, fused path, gradient
  checkpointing, both streams, AdamW) on a randomly initialised Llama-2-7B-shaped backbone:
  tokens/s, MFU, peak memory; the same step on the torch path for comparison.

The short table printed last comes from bench/multilora_gpu_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"          # before anything imports triton
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch                                        # noqa: E402
import torch.nn.functional as F                     # noqa: E402

import ckf_dist.kernels.multi_lora as ml            # noqa: E402
from ckf_dist.kernels import (KernelConfig, linear_multi_lora_triton, make_routing,  # noqa: E402
                              multi_lora_naive, multi_lora_reference, multi_lora_triton)
from ckf_dist.kernels.linear_lora import triton_linear  # noqa: E402
from multilora_gpu_report import report             # noqa: E402
from multilora_gpu_train import part_train          # noqa: E402

DEV = "cpu" if SMOKE else "cuda"
OUT: Path | None = None                             # results file, rewritten after every finished row


def save(res):
    if OUT is not None:
        OUT.write_text(json.dumps(res, indent=1, default=str))
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}


def torch_path():
    """The model's torch path when present; else an equivalent (concatenated A, masked rank columns)."""
    try:
        from ckf_dist.model.multi_lora import multi_lora_torch
        return multi_lora_torch, "ckf_dist.model.multi_lora.multi_lora_torch"
    except Exception:                                # noqa: BLE001 - any import problem: inline copy
        pass

    def inline(x, a_s, b_s, a_t, b_t, ids, s_s, s_t):
        t, rt, _ = a_t.shape
        a = torch.cat([a_s, a_t.reshape(t * rt, -1)])
        b = torch.cat([b_s, b_t.permute(1, 0, 2).reshape(b_t.shape[1], t * rt)], 1)
        col = torch.arange(t, device=x.device).repeat_interleave(rt)
        scale = torch.cat([torch.full((x.shape[0], a_s.shape[0]), s_s, device=x.device, dtype=x.dtype),
                           (ids[:, None] == col[None]).to(x.dtype) * s_t], 1)
        return ((x @ a.t()) * scale) @ b.t()
    return inline, "inline equivalent (ckf_dist.model.multi_lora not importable)"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, rep_ms=100) -> float:
    """Median milliseconds: triton do_bench (CUDA events, L2 flushed) on GPU; a wall clock in smoke."""
    if SMOKE:
        fn()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def make(n, d_in, d_out, rs, rt, t, dtype, dist="uniform", seed=0, grad=True):
    g = torch.Generator(device="cpu").manual_seed(seed)
    def r(*shape, s=1.0):
        v = torch.randn(*shape, generator=g, dtype=torch.float32) * s
        return v.to(device=DEV, dtype=dtype).requires_grad_(grad)
    x = r(n, d_in)
    w = [r(rs, d_in, s=d_in ** -0.5), r(d_out, rs, s=0.5)] if rs else [None, None]
    w += [r(t, rt, d_in, s=d_in ** -0.5), r(t, d_out, rt, s=0.5)] if rt else [None, None]
    if dist == "zipf":
        p = 1.0 / torch.arange(1, t + 1, dtype=torch.float64) ** 2
        ids = torch.multinomial(p, n, replacement=True, generator=g)
    elif dist == "one":
        ids = torch.full((n,), t - 1, dtype=torch.int64)
    elif dist == "empty":
        ids = torch.tensor([0, t - 1])[torch.randint(0, 2, (n,), generator=g)]
    elif dist == "distinct":
        ids = torch.randperm(t, generator=g)[:n]
    else:
        ids = torch.randint(0, t, (n,), generator=g)
    return x, w, ids.to(DEV)


def rel(a, ref) -> float:
    a = a.detach().double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def errors(op, x, w, ids, scales, dy, ref, ref_grads, **kw):
    leaves = [v for v in [x] + w if v is not None]
    y = op(x, *w, ids, *scales, **kw)
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    return [rel(y, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)], grads


def dtype_cases(shapes):
    """``(index, shape, dtype name)``: the first two shapes in fp32, fp16 and bf16, the rest in bf16."""
    for i, shp in enumerate(shapes):
        for dname in (["fp32", "fp16", "bf16"] if i < 2 else ["bf16"]):
            yield i, shp, dname


def reference_case(shp, dname, seed, base=False):
    """One correctness case: inputs, a frozen projection weight when ``base`` (else None), dy, and
    the fp64 reference output (including ``x W^T`` when ``base``) with its input and adapter grads."""
    x, w, ids = make(*shp[:6], DT[dname], dist=shp[6], seed=seed)
    base_w = (torch.randn(shp[2], shp[1], device=DEV) * shp[1] ** -0.5).to(DT[dname]) if base else None
    dy = torch.randn(shp[0], shp[2], device=DEV).to(DT[dname]).double()   # representable in dtype
    leaves = [v for v in [x] + w if v is not None]
    ref = multi_lora_reference(x, *w, ids, 2.0, 4.0)
    if base:
        ref = F.linear(x.double(), base_w.double()) + ref
    return x, w, ids, base_w, dy, ref, torch.autograd.grad(ref, leaves, dy)


def part_correctness(res):
    shapes = [(4096, 4096, 4096, 16, 16, 4, "uniform"), (1000, 1000, 3000, 8, 64, 7, "zipf"),
              (300, 8192, 8192, 16, 16, 4, "one"), (5000, 64, 64, 8, 8, 3, "empty"),
              (777, 512, 384, 16, 0, 4, "uniform"), (777, 512, 384, 0, 16, 4, "uniform"),
              (64, 256, 256, 16, 16, 64, "distinct"), (1, 4096, 4096, 16, 16, 4, "uniform")]
    if SMOKE:                                   # same cases, interpreter-sized
        shapes = [(min(n, 48), min(i, 40) + 1, min(o, 36) - 1, rs, rt, t, dist)
                  for n, i, o, rs, rt, t, dist in shapes]
    tpath, tname = torch_path()
    ml.POISON_BUFFERS = True
    rows, ok = [], True
    for i, shp, dname in dtype_cases(shapes):
        x, w, ids, _, dy, ref, ref_grads = reference_case(shp, dname, seed=100 + i)
        fe, _ = errors(multi_lora_triton, x, w, ids, (2.0, 4.0), dy, ref, ref_grads)
        te = errors(tpath, x, w, ids, (2.0, 4.0), dy, ref, ref_grads)[0] if shp[3] and shp[4] else []
        passed = all(e < TOL[dname] for e in fe)        # NaN fails
        ok &= passed
        rows.append(dict(shape=list(shp), dtype=dname, fused=fe, torch=te, passed=passed))
        res["correctness"] = dict(rows=rows, passed=False, unfinished=True)
        save(res)
        print(f"  {str(shp):42s} {dname}  fused max {max(fe):.2e}  torch max "
              f"{max(te) if te else float('nan'):.2e}  {'ok' if passed else 'FAIL'}", flush=True)
    # the projection GEMM with the adapters in its epilogue: y = x W^T + delta, against fp64
    lin_rows = []
    for i, shp, dname in dtype_cases(shapes[:4]):
        x, w, ids, base_w, dy, ref, ref_grads = reference_case(shp, dname, seed=200 + i, base=True)
        # bf16 goes through the autotuner (its launch path); fp32/fp16 take fixed tiles, which
        # keeps this part's compile time bounded on a bare machine
        cfg = None if dname == "bf16" else KernelConfig(gemm_block_m=128, gemm_block_n=128, gemm_block_k=32)
        op = (lambda x, *a, cfg=cfg, **k: linear_multi_lora_triton(x, base_w, None, *a, config=cfg, **k))
        fe, _ = errors(op, x, w, ids, (2.0, 4.0), dy, ref, ref_grads)
        passed = all(e < TOL[dname] for e in fe)
        ok &= passed
        lin_rows.append(dict(shape=list(shp), dtype=dname, fused_gemm=fe, passed=passed))
        res["correctness"] = dict(rows=rows, gemm_rows=lin_rows, passed=False, unfinished=True)
        save(res)
        print(f"  fused GEMM {str(shp):31s} {dname}  max {max(fe):.2e}  {'ok' if passed else 'FAIL'}",
              flush=True)
    # fused base add, and bitwise determinism of all gradients
    x, w, ids = make(256 if SMOKE else 2048, 64 if SMOKE else 4096, 64 if SMOKE else 4096, 16, 16, 4,
                     torch.bfloat16, seed=7)
    base_w = torch.randn(x.shape[1], x.shape[1], device=DEV).to(x.dtype) * x.shape[1] ** -0.5
    y = multi_lora_triton(x, *w, ids, 2.0, 4.0, out=F.linear(x, base_w))
    ref = F.linear(x.double(), base_w.double()) + multi_lora_reference(x, *w, ids, 2.0, 4.0)
    e_out = rel(y, ref)
    g1 = torch.autograd.grad(multi_lora_triton(x, *w, ids, 2.0, 4.0).float().square().sum(), [x] + w)
    g2 = torch.autograd.grad(multi_lora_triton(x, *w, ids, 2.0, 4.0).float().square().sum(), [x] + w)
    det = all(torch.equal(a, b) for a, b in zip(g1, g2))
    ok &= e_out < TOL["bf16"] and det
    print(f"  out= accumulate bf16 rel {e_out:.2e}; gradients bitwise deterministic: {det}", flush=True)
    ml.POISON_BUFFERS = False
    res["correctness"] = dict(rows=rows, gemm_rows=lin_rows, out_accumulate=e_out, deterministic=det,
                              passed=bool(ok),
                              torch_path=tname, tolerances=TOL)


FAULT_CASE = (1000, 1000, 3000, 8, 64, 7, "zipf")     # faulted in fp16 on the H200 (run 3), fp32 passed
BISECT = [  # (name, dtype, KernelConfig kwargs, extra env): one fresh process each (a fault poisons the context)
    ("default", "fp16", {}, {}),
    ("default", "bf16", {}, {}),
    ("own-pad", "fp16", {"equal_rank_pad": False}, {}),
    ("own-pad-blocking", "fp16", {"equal_rank_pad": False}, {"CUDA_LAUNCH_BLOCKING": "1"}),
    ("own-pad-dw-mma2", "fp16", {"equal_rank_pad": False, "block_d": 32}, {}),
    ("own-pad", "fp32", {"equal_rank_pad": False}, {}),
]


def fault_case_child(dname: str, cfg_json: str) -> int:
    """One run of FAULT_CASE (forward + backward, buffers poisoned, synchronised); prints one JSON line."""
    cfg = KernelConfig(**json.loads(cfg_json))
    ml.POISON_BUFFERS = True
    case = (48, 41, 35) + FAULT_CASE[3:] if SMOKE else FAULT_CASE
    x, w, ids = make(*case[:6], DT[dname], dist=case[6], seed=101)
    dy = torch.randn(case[0], case[2], device=DEV).to(DT[dname]).double()
    leaves = [v for v in [x] + w if v is not None]
    ref = multi_lora_reference(x, *w, ids, 2.0, 4.0)
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    sync()
    out = dict(dtype=dname, config=json.loads(cfg_json))
    try:
        fe, _ = errors(multi_lora_triton, x, w, ids, (2.0, 4.0), dy, ref, ref_grads, config=cfg)
        sync()
        out.update(ok=all(e < TOL[dname] for e in fe), errors=fe)
    except Exception as e:                             # noqa: BLE001 - report, the parent goes on
        tb = traceback.format_exc()
        out.update(ok=False, error=f"{type(e).__name__}: {e}",
                   where=[ln.strip() for ln in tb.splitlines() if "multi_lora.py" in ln][-2:])
    print("FAULT_CASE " + json.dumps(out, default=str), flush=True)
    return 0 if out["ok"] else 1


def part_bisect(res):
    """FAULT_CASE under config variants, each in its own process: which settings fault, and
    (CUDA_LAUNCH_BLOCKING=1) in which launch."""
    import subprocess
    rows = []
    for name, dname, kw, env in BISECT:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--fault-case", dname, "--fault-cfg", json.dumps(kw)] \
            + (["--cpu-smoke"] if SMOKE else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, **env})
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("FAULT_CASE ")]
            row = json.loads(line[-1][11:]) if line else dict(ok=False, error=f"rc {p.returncode}: "
                                                               + (p.stderr.strip().splitlines() or ["?"])[-1])
        except subprocess.TimeoutExpired:
            row = dict(ok=False, error="timeout 240 s")
        row["variant"] = name
        rows.append(row)
        res["bisect"] = dict(case=list(FAULT_CASE), rows=rows)
        save(res)
        print(f"  {name:18s} {dname}  {'ok' if row['ok'] else 'FAIL'}  "
              f"{max(row['errors']) if row.get('errors') else ''} {row.get('error', '')} {row.get('where', '')}",
              flush=True)


def ceilings(res):
    n = 256 if SMOKE else 8192
    a, b = (torch.randn(n, n, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    t = bench_ms(lambda: a @ b)
    src = torch.randn((1 << 14 if SMOKE else 1 << 29) // 4, device=DEV)    # 2 GiB fp32 on GPU
    dst = torch.empty_like(src)
    tc = bench_ms(lambda: dst.copy_(src))
    res["ceilings"] = dict(matmul_tflops=2 * n ** 3 / t / 1e9, copy_gbs=2 * src.numel() * 4 / tc / 1e6,
                           device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)")
    print(f"  ceilings: bf16 matmul {res['ceilings']['matmul_tflops']:.0f} TFLOP/s, "
          f"copy {res['ceilings']['copy_gbs']:.0f} GB/s", flush=True)
    del a, b, src, dst


def part_timing(res, tokens):
    ceilings(res)
    d, r, t = (64, 8, 4) if SMOKE else (4096, 16, 4)
    tpath, _ = torch_path()
    rows = []
    for n in tokens:
        x, w, ids = make(n, d, d, r, r, t, torch.bfloat16, seed=n)
        base_w = (torch.randn(d, d, device=DEV) * d ** -0.5).to(torch.bfloat16)
        dy = torch.randn(n, d, device=DEV, dtype=torch.bfloat16)
        routing = make_routing(ids, t)
        lora = {"fused": lambda: multi_lora_triton(x, *w, ids, 4.0, 4.0),
                "fused_routing": lambda: multi_lora_triton(x, *w, routing, 4.0, 4.0),
                "torch": lambda: tpath(x, *w, ids, 4.0, 4.0),
                "naive": lambda: multi_lora_naive(x, *w, ids, 4.0, 4.0)}
        # the model's layout: one task per sample, samples of 1024 tokens (uniform per-token ids, the
        # rows above, are the worst case: every row block mixes all tasks)
        ids_ps = torch.randint(0, t, (-(-n // 1024),), device=DEV).repeat_interleave(1024)[:n]
        keep = torch.rand(n, d, device=DEV) >= 0.1
        keep_x = keep.to(x.dtype)
        layer = {"base": lambda: F.linear(x, base_w),
                 # _ps first: the autotuner picks the GEMM's tiles on the first call of a shape
                 "fused_gemm_ps": lambda: linear_multi_lora_triton(x, base_w, None, *w, ids_ps, 4.0, 4.0),
                 "fused_gemm": lambda: linear_multi_lora_triton(x, base_w, None, *w, ids, 4.0, 4.0),
                 # with LoRA dropout 0.1 as the model runs it: a keep mask read by the kernels; the
                 # like-for-like torch row multiplies x by the same mask first
                 "fused_gemm_ps_drop": lambda: linear_multi_lora_triton(x, base_w, None, *w, ids_ps, 4.0, 4.0,
                                                                        lora_mask=keep),
                 "torch_ps_drop": lambda: F.linear(x, base_w) + tpath(x * keep_x, *w, ids_ps, 4.0, 4.0),
                 "fused_ps": lambda: F.linear(x, base_w) + multi_lora_triton(x, *w, ids_ps, 4.0, 4.0),
                 "fused_out": lambda: multi_lora_triton(x, *w, ids, 4.0, 4.0, out=F.linear(x, base_w))}
        layer.update({k: (lambda f=f: F.linear(x, base_w) + f()) for k, f in lora.items()})
        timings = {}
        for kind, fns in (("layer", layer), ("lora", lora)):
            for name, f in fns.items():
                inputs = [x] if name == "base" else [x] + w
                fb = (lambda f=f, inputs=inputs: torch.autograd.grad(f(), inputs, dy))
                timings[f"{kind}:{name}"] = (bench_ms(f), bench_ms(fb))
        # the GEMM of fused_gemm with no adapter, forward only, against cuBLAS (F.linear): the
        # part of fused_gemm's ratio that is the GEMM's own speed rather than the adapters
        xd = x.detach()
        timings["gemm:triton"] = (bench_ms(lambda: triton_linear(xd, base_w)), float("nan"))
        timings["gemm:cublas"] = (bench_ms(lambda: F.linear(xd, base_w)), float("nan"))
        flops_base = 2 * n * d * d
        flops_lora = 2 * n * 2 * r * (d + d)                     # shrink + expand, shared + task
        bytes_fwd = 2 * (n * d + n * d)                          # x read, y written (bf16)
        bytes_fb = bytes_fwd + 2 * (n * d + 2 * n * d)           # + dy read, x read, dx written
        row = dict(tokens=n, timings=timings, flops_base_fwd=flops_base, flops_lora_fwd=flops_lora,
                   bytes_lora_fwd_min=bytes_fwd, bytes_lora_fb_min=bytes_fb)
        rows.append(row)
        res["timing"] = dict(rows=rows, shape=dict(hidden=d, r=r, tasks=t, dtype="bf16"))
        save(res)
        print(f"  N={n}: " + ", ".join(f"{k} {v[0]:.3f}/{v[1]:.3f}" for k, v in timings.items()), flush=True)
    res["sweep"] = sweep(d, r, t, tokens[len(tokens) // 2])


def sweep(d, r, t, n):
    """Time a few tilings of the fused delta (fwd+bwd); each is first checked against the default."""
    cands = [KernelConfig()] + ([KernelConfig(block_m=16, block_k=16, block_n=16, block_d=16, block_dm=16)]
                                if SMOKE else [
        KernelConfig(block_m=16, block_k=64, block_n=64),
        KernelConfig(block_m=32, block_k=128, block_n=64),
        KernelConfig(block_m=64, block_k=64, block_n=64, num_warps=8),
        KernelConfig(block_m=16, block_k=256, block_n=128, num_stages=4),
        KernelConfig(block_d=128, block_dm=32),
        KernelConfig(block_d=32, block_dm=128)])
    x, w, ids = make(n, d, d, r, r, t, torch.bfloat16, seed=3)
    dy = torch.randn(n, d, device=DEV, dtype=torch.bfloat16)
    ref = None
    out = []
    for cfg in cands:
        try:
            f = (lambda cfg=cfg: multi_lora_triton(x, *w, ids, 4.0, 4.0, config=cfg))
            got = [f()] + list(torch.autograd.grad(f(), [x] + w, dy))
            ref = ref or got
            err = max(rel(a, b.double()) for a, b in zip(got, ref))
            fb = bench_ms(lambda: torch.autograd.grad(f(), [x] + w, dy)) if err < 1e-2 else float("nan")
            out.append(dict(config=cfg.__dict__, fwd_bwd_ms=fb, rel_vs_default=err))
        except Exception as e:                               # noqa: BLE001 - a tiling may not compile
            out.append(dict(config=cfg.__dict__, error=repr(e)[:300]))
        print(f"  sweep {out[-1]}", flush=True)
    return dict(tokens=n, results=out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="correctness,timing,train")
    ap.add_argument("--out", default="multilora_gpu.json")
    ap.add_argument("--report", metavar="JSON", help="print the table of an existing results file and exit")
    ap.add_argument("--tokens", default="")
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--prompt-len", type=int, default=0)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--no-report", action="store_true", help="skip the table at the end (gpu_check.sh)")
    ap.add_argument("--fault-case", metavar="DTYPE", help=argparse.SUPPRESS)     # child of --parts bisect
    ap.add_argument("--fault-cfg", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fault_case:
        return fault_case_child(args.fault_case, args.fault_cfg)
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return 0
    if not SMOKE and not torch.cuda.is_available():
        print("no CUDA device: use --cpu-smoke", file=sys.stderr)
        return 2
    global OUT
    out = OUT = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    tokens = [int(t) for t in args.tokens.split(",") if t] or ([64, 96] if SMOKE else [4096, 8192, 16384])
    rc = 0
    for part in args.parts.split(","):
        print(f"== {part}", flush=True)
        try:
            t0 = time.time()
            if part == "correctness":
                part_correctness(res)
                rc |= 0 if res["correctness"]["passed"] else 1
            elif part == "timing":
                part_timing(res, tokens)
            elif part == "bisect":
                part_bisect(res)
                rc |= 0 if all(r["ok"] for r in res["bisect"]["rows"] if r["variant"] == "default") else 1
            elif part == "train":
                part_train(res, args.batch or (4 if SMOKE else 8), args.prompt_len or (12 if SMOKE else 1000),
                           smoke=SMOKE, dev=DEV, save=save)
            else:
                raise ValueError(f"unknown part {part!r}")
            res.pop(f"{part}_error", None)
            print(f"   ({time.time() - t0:.0f} s)", flush=True)
        except Exception:                                    # noqa: BLE001 - record, go on with the next part
            res[f"{part}_error"] = traceback.format_exc()
            print(res[f"{part}_error"], file=sys.stderr, flush=True)
            rc |= 1
        save(res)
    if not args.no_report:
        report(res)
    return rc


if __name__ == "__main__":
    sys.exit(main())
