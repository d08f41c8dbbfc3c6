"""The short table of bench/multilora_gpu.py results (gpu_check.sh prints it last).

Pure formatting of the results JSON: no torch, no GPU, so a results file fetched from a
device machine can be read anywhere (``python bench/multilora_gpu.py --report FILE``).
"""

from __future__ import annotations

import math


def report(res):
    """The short table (gpu_check.sh prints it last)."""
    lines = []
    c = res.get("correctness")
    if c and c.get("unfinished"):
        lines.append(f"correctness: UNFINISHED after {len(c['rows'])} cases "
                     f"({sum(r['passed'] for r in c['rows'])} passed)")
    elif c:
        worst = {}
        for row in c["rows"]:
            worst[row["dtype"]] = max(worst.get(row["dtype"], 0.0), max(row["fused"]))
        for row in c.get("gemm_rows", []):
            key = row["dtype"] + " (fused GEMM)"
            worst[key] = max(worst.get(key, 0.0), max(row["fused_gemm"]))
        lines.append("correctness: " + ("PASS" if c["passed"] else "FAIL") + "  worst rel err (fused): " +
                     ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + f"; out= {c['out_accumulate']:.1e}; "
                     f"deterministic {c['deterministic']}")
    ce = res.get("ceilings")
    if ce:
        lines.append(f"device {ce['device']}: measured bf16 matmul {ce['matmul_tflops']:.0f} TFLOP/s, "
                     f"copy {ce['copy_gbs']:.0f} GB/s")
    tm = res.get("timing")
    if tm:
        lines.append("tokens  path                fwd ms  f+b ms  layer/base(f+b)  naive/path(f+b)  delta f+b GB/s(%copy)")
        for row in tm["rows"]:
            tt = row["timings"]
            base_fb = tt["layer:base"][1]
            for name in ("base", "fused_gemm", "fused_gemm_ps", "fused_gemm_ps_drop", "torch_ps_drop", "fused",
                         "fused_ps", "fused_out", "fused_routing", "torch", "naive"):
                if f"layer:{name}" not in tt:            # results of older runs
                    continue
                f, fb = tt[f"layer:{name}"]
                bw = ""
                if f"lora:{name}" in tt:
                    gbs = row["bytes_lora_fb_min"] / tt[f"lora:{name}"][1] / 1e6
                    bw = f"{gbs:7.0f} ({100 * gbs / ce['copy_gbs']:.0f}%)" if ce else f"{gbs:.0f}"
                lines.append(f"{row['tokens']:6d}  {name:18s} {f:7.3f} {fb:7.3f}  {fb / base_fb:15.3f}  "
                             f"{tt['layer:naive'][1] / fb:15.2f}  {bw}")
            tf = 2 * row["flops_base_fwd"] / base_fb / 1e9
            lines.append(f"        base f+b {tf:.0f} TFLOP/s" + (f" ({100 * tf / ce['matmul_tflops']:.0f}% of "
                                                               "measured matmul)" if ce else ""))
            if "gemm:triton" in tt:
                g, cb = tt["gemm:triton"][0], tt["gemm:cublas"][0]
                lines.append(f"        fused_gemm's GEMM alone (fwd, no adapter) {g:.3f} ms vs cuBLAS {cb:.3f} ms: "
                             f"{g / cb:.3f}x")
    sw = res.get("sweep")
    if sw:
        good = [r for r in sw["results"] if "fwd_bwd_ms" in r and math.isfinite(r["fwd_bwd_ms"])]
        if good:
            best = min(good, key=lambda r: r["fwd_bwd_ms"])
            lines.append(f"sweep @ {sw['tokens']} tokens: default {good[0]['fwd_bwd_ms']:.3f} ms, best "
                         f"{best['fwd_bwd_ms']:.3f} ms with {best['config']}")
    tp = res.get("train_partial")
    if tp and not res.get("train"):                          # the train part hit its time limit
        lines.append(f"CKF step UNFINISHED; partial results: {tp}")
    tr = res.get("train")
    if tr:
        ag = tr["fused_vs_torch"]
        nan = float("nan")
        parts = [f"CKF step (bf16, fused, grad ckpt, B={tr['batch']}, {tr['tokens_per_step']} tokens): "
                 f"{tr['step_s']:.2f} s, {tr['tokens_per_s']:.0f} tok/s, MFU {100 * tr['mfu_vs_989']:.1f}% of 989 TFLOP/s"
                 + (f" / {100 * tr['mfu_vs_measured']:.1f}% of measured" if tr.get("mfu_vs_measured") else ""),
                 f"peak {tr['peak_mem_gib']:.1f} GiB", f"fused calls/step {tr['fused_calls_per_step']}"]
        if tr.get("side_op_step_s"):
            parts.append(f"separate adapter op {tr['side_op_step_s']:.2f} s")
        parts.append(f"torch path {tr['torch_path_step_s']:.2f} s; dropout-0 agreement: loss fused/"
                     f"fused_gemm/token/torch {ag['loss_fused']:.4f}/{ag.get('loss_fused_gemm', nan):.4f}/"
                     f"{ag.get('loss_token', nan):.4f}/{ag['loss_torch']:.4f}")
        parts.append(f"grads rel diff fused-torch {ag['grad_rel_diff']:.1e}, fused_gemm-torch "
                     f"{ag.get('grad_rel_fused_gemm_vs_torch', nan):.1e}, fused-token "
                     f"{ag.get('grad_rel_fused_vs_token', nan):.1e}, token-torch (bf16 noise floor) "
                     f"{ag.get('grad_rel_token_vs_torch', nan):.1e}")
        lines.append(", ".join(parts) + (f"  !! {tr['warning']}" if "warning" in tr else ""))
    bi = res.get("bisect")
    if bi:
        lines.append("bisect " + str(tuple(bi["case"])) + ": " + "; ".join(
            f"{r['variant']} {r.get('dtype')} {'ok' if r['ok'] else 'FAIL ' + str(r.get('error', ''))[:80]}"
            for r in bi["rows"]))
    for key in ("correctness_error", "timing_error", "train_error", "bisect_error"):
        if key in res:
            last = [ln for ln in res[key].strip().splitlines() if ln and not ln[0].isspace()]
            lines.append(f"{key}: {last[-1] if last else res[key][-300:]}")
    print("\n".join(lines))
