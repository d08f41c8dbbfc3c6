"""Frozen projection and Multi-LoRA in one op: ``linear_multi_lora_triton``.

::

    linear_multi_lora_triton(x [N, in], weight [out, in], bias [out] | None,
                             a_shared, b_shared, a_task, b_task, task_ids, scale_shared, scale_task,
                             *, x_lora=None, lora_mask=None) -> y [N, out]

    y = x @ weight^T + bias + delta(x_lora, or x * lora_mask, or x)     (delta as in multi_lora_triton)

``multi_lora_triton`` runs beside the base GEMM, so a layer pays the GEMM plus the
adapter's passes over the big tensors (x read, y read and written for the add; dy read,
dX read and written in backward). Here the adapter's expand runs in the epilogue of the
projection's own GEMM (``_gemm_lora_kernel``), on the accumulator tile in registers:

* forward: one shrink pass reads x (``H = x A^T``, rank space, fp32), then the GEMM
  ``y = x W^T + H B^T`` writes y once, with a single rounding of base + delta;
* backward: one shrink pass reads dy (``dG = dy B``), the dX GEMM
  ``dx = dy W + dG A`` writes dx once, and the weight-gradient kernels of
  ``multi_lora_triton`` read dy and x for dA/dB.

So the adapter's extra traffic is one read of x (forward) and of dy plus dy and x
(backward, the dW pass), against the GEMMs' own, with no extra write of an N x hidden
tensor. The weight and bias are frozen (no gradient; a weight that requires grad is
refused).

LoRA dropout, two ways:
* ``lora_mask`` (the model's way): dropout's 0/1 keep mask, bool or uint8 (1 byte per
  element; the 1/(1-p) factor goes into the scales). The shrink reads ``x * keep``, the dX
  epilogue adds ``keep * (dG A)``, and dA reads ``x * keep``. No dropped copy of x is made
  or saved, and nothing more is written in backward.
* ``x_lora = dropout(x)``: the base GEMM reads x and the adapters x_lora. The adapters'
  input gradient goes to x_lora: the backward shrink pass writes it (expand compiled in)
  instead of the dX epilogue, and autograd applies the mask and adds.

On the GPU the GEMM's tiles are autotuned per (out, in, row bucket, layout, adapters, mask,
dtype) on first use; under ``TRITON_INTERPRET=1`` (tests) fixed small tiles run.
``KernelConfig.gemm_block_*`` fixes the tiles (tests, benchmarks).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import multi_lora as _ml
from .multi_lora import (_DEFAULT_CFG, KernelConfig, _assert_ids, _cast, _check, _check_runnable, _Ctx,
                         _lora_pass, _pow2, _task_ids, _w, _weight_grads)
from .routing import cdiv

__all__ = ["linear_multi_lora_triton", "triton_linear"]

TUNE_IN_INTERPRETER = False
"""Testing aid: take the autotuned launch path under ``TRITON_INTERPRET=1`` too (the test
replaces the tuner's timing function; the interpreter cannot time kernels)."""


def _gemm(c: _Ctx, m, k_dim, w_kn, y, out_dim, bias, h, expand_s, expand_t, lora: bool, keep=None) -> None:
    """``y = m @ W (+ bias) (+ [keep *] H @ E^T per row's task)``, one launch; ``w_kn`` = (W, stride_k, stride_n)."""
    common = dict(c.common)
    if not lora:
        common.update(HAS_S=False, HAS_T=False)
    d32 = _ml._dummy(c.device, torch.float32)
    kp = keep if keep is not None else _ml._dummy(c.device, torch.uint8).view(1, 1)
    args = (m, m.stride(0), m.stride(1), *w_kn, y, y.stride(0), y.stride(1),
            bias if bias is not None else d32, h if h is not None else d32, c.ids, kp, kp.stride(0), kp.stride(1),
            *expand_s, *expand_t,
            c.n, out_dim, k_dim, c.rs, c.rt, c.rc, c.T, max(16, _pow2(c.n)))
    cfg = c.cfg
    if (c.interp and not TUNE_IN_INTERPRETER) or cfg.gemm_block_m:
        bm = cfg.gemm_block_m or 32
        bn = cfg.gemm_block_n or 32
        bk = cfg.gemm_block_k or 32
        grid = (cdiv(c.n, bm) * cdiv(out_dim, bn),)
        c.k._gemm_lora_heur[grid](*args, HAS_BIAS=bias is not None, HAS_MASK=keep is not None, BM=bm, BN=bn, BK=bk,
                                  GROUP_M=cfg.gemm_group_m, num_warps=cfg.num_warps or (8 if bm * bn >= 16384 else 4),
                                  num_stages=cfg.num_stages, **common)
    else:
        c.k._gemm_lora_tuned[lambda meta: (cdiv(c.n, meta["BM"]) * cdiv(out_dim, meta["BN"]),)](
            *args, HAS_BIAS=bias is not None, HAS_MASK=keep is not None, **common)


class _LinearLoraFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, xl, keep, weight, bias, a_s, b_s, a_t, b_t, ids, n_tasks, scale_s, scale_t, cfg, check):
        src = x if xl is None else xl                    # the adapters' input
        c = _Ctx(src, a_s, a_t, b_s, b_t, ids, n_tasks, cfg)
        n_out = weight.shape[0]
        y = _ml._new((c.n, n_out), x.dtype, x.device)
        h = None
        if c.n:
            d = _ml._dummy(x.device, x.dtype)
            h = _ml._new((c.n, c.rc), torch.float32, x.device)
            none2, none3 = _w(None, (0, 1), d), _w(None, (0, 1, 2), d)
            _lora_pass(c, src, c.n_in, _w(a_s, (0, 1), d), _w(a_t, (0, 1, 2), d), none2, none3,
                       d.view(1, 1), 0, (scale_s, scale_t), h, False, check, keep)  # shrink only: H
            _gemm(c, x, c.n_in, (weight, weight.stride(1), weight.stride(0)), y, n_out, bias, h,
                  _w(b_s, (0, 1), d), _w(b_t, (0, 1, 2), d), True)
        ctx.save_for_backward(src, keep, weight, a_s, b_s, a_t, b_t, h)
        ctx.c, ctx.scales, ctx.separate = c, (scale_s, scale_t), xl is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        src, keep, weight, a_s, b_s, a_t, b_t, h = ctx.saved_tensors
        c: _Ctx = ctx.c
        need = ctx.needs_input_grad
        need_x, need_xl, need_w = need[0], need[1], any(need[5:9])
        dev, dt = src.device, src.dtype
        grads = [(_ml._new(w.shape, dt, dev) if w is not None else None) for w in (a_s, b_s, a_t, b_t)] \
            if need_w else [None] * 4
        dx = _ml._new((c.n, c.n_in), dt, dev) if need_x else None
        dxl = _ml._new((c.n, c.n_in), dt, dev) if need_xl else None
        lora_dx = need_xl or (need_x and not ctx.separate)          # the adapters' input gradient
        if c.n == 0:
            for g in [dx, dxl] + grads:
                if g is not None:
                    g.zero_()
        elif need_x or need_xl or need_w:
            d = _ml._dummy(dev, dt)
            dg = _ml._new((c.n, c.rc), torch.float32, dev) if (need_w or lora_dx) else None
            if dg is not None:     # dG = dy B (scaled), and with a separate x_lora its dX = dG A here
                _lora_pass(c, dy, weight.shape[0], _w(b_s, (1, 0), d), _w(b_t, (0, 2, 1), d),
                           _w(a_s, (1, 0), d), _w(a_t, (0, 2, 1), d),
                           dxl if need_xl else d.view(1, 1), c.n_in if need_xl else 0, ctx.scales, dg,
                           False, False)
            if need_x:             # dx = dy W (+ [keep *] dG A in the epilogue when x feeds the adapters)
                fused = not ctx.separate
                _gemm(c, dy, weight.shape[0], (weight, weight.stride(0), weight.stride(1)), dx, c.n_in,
                      None, dg if fused else None, _w(a_s, (1, 0), d), _w(a_t, (0, 2, 1), d), fused, keep)
            if need_w:
                _weight_grads(c, dy, h, src, dg, grads, keep)
        da_s, db_s, da_t, db_t = grads
        wanted = (lambda g, i: g if need[i] else None)
        return (dx, dxl, None, None, None, wanted(da_s, 5), wanted(db_s, 6), wanted(da_t, 7), wanted(db_t, 8),
                None, None, None, None, None, None)


def linear_multi_lora_triton(x, weight, bias, a_shared, b_shared, a_task, b_task, task_ids,
                             scale_shared: float = 1.0, scale_task: float = 1.0, *,
                             x_lora: torch.Tensor | None = None, lora_mask: torch.Tensor | None = None,
                             config: KernelConfig | None = None) -> torch.Tensor:
    """``x @ weight^T + bias`` plus the Multi-LoRA delta of ``x_lora`` (default: x; with
    ``lora_mask``, a bool/uint8 0/1 tensor of x's shape: ``x * lora_mask``), fused (see the
    module docstring). Differentiable in x, x_lora and the adapter weights; the weight and
    bias are frozen. ``task_ids`` as in ``multi_lora_triton`` (ids or a Routing).
    """
    src = x if x_lora is None else x_lora
    _check(src, a_shared, b_shared, a_task, b_task)
    _check_runnable(x, "linear_multi_lora_triton")
    n_in = x.shape[1]
    if weight.dim() != 2 or weight.shape[1] != n_in:
        raise ValueError(f"linear_multi_lora: weight must be [out, {n_in}], got {tuple(weight.shape)}")
    n_out = weight.shape[0]
    width = (b_shared if b_shared is not None else b_task).shape[-2]
    if width != n_out:
        raise ValueError(f"linear_multi_lora: the adapters write {width} outputs, the projection has "
                         f"{n_out} (an adapter on a slice of the outputs needs multi_lora_triton)")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"linear_multi_lora: bias must be [{n_out}], got {tuple(bias.shape)}")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_multi_lora: the projection must be frozen (weight/bias with "
                         "requires_grad=False); a trained base layer needs the separate multi_lora_triton")
    if x_lora is not None and (x_lora.shape != x.shape or x_lora.dtype != x.dtype or x_lora.device != x.device):
        raise ValueError(f"linear_multi_lora: x_lora must match x ({tuple(x.shape)} {x.dtype}), got "
                         f"{tuple(x_lora.shape)} {x_lora.dtype}")
    keep = None
    if lora_mask is not None:
        if x_lora is not None:
            raise ValueError("linear_multi_lora: give x_lora or lora_mask, not both")
        if lora_mask.shape != x.shape or lora_mask.device != x.device or \
                lora_mask.dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"linear_multi_lora: lora_mask must be a bool/uint8 tensor of x's shape "
                             f"{tuple(x.shape)}, got {tuple(lora_mask.shape)} {lora_mask.dtype}")
        keep = lora_mask.view(torch.uint8) if lora_mask.dtype == torch.bool else lora_mask
    ids, n_tasks, check = _task_ids(x, a_task, task_ids)
    dt = x.dtype
    y = _LinearLoraFn.apply(x, x_lora, keep, _cast(weight, dt), _cast(bias, dt), _cast(a_shared, dt),
                            _cast(b_shared, dt), _cast(a_task, dt), _cast(b_task, dt), ids, n_tasks,
                            float(scale_shared), float(scale_task), config or _DEFAULT_CFG, check)
    if check:
        _assert_ids(x.device, n_tasks)
    return y


def triton_linear(x, weight, bias=None, *, config: KernelConfig | None = None) -> torch.Tensor:
    """``x @ weight^T + bias`` by the GEMM of ``linear_multi_lora_triton`` with no adapter
    (forward only, no autograd): how far the GEMM itself is from cuBLAS, for benchmarks."""
    _check_runnable(x, "triton_linear")
    n_out, n_in = weight.shape
    # a context needs an adapter's shapes; this one is never read (the launch drops both adapters)
    a = torch.empty(16, n_in, dtype=x.dtype, device=x.device)
    b = torch.empty(n_out, 16, dtype=x.dtype, device=x.device)
    c = _Ctx(x, a, None, b, None, None, 1, config or _DEFAULT_CFG)
    y = _ml._new((x.shape[0], n_out), x.dtype, x.device)
    if c.n:
        d = _ml._dummy(x.device, x.dtype)
        _gemm(c, x, n_in, (weight, weight.stride(1), weight.stride(0)), y, n_out, bias, None,
              _w(None, (0, 1), d), _w(None, (0, 1, 2), d), False)
    return y
