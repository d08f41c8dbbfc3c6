"""Fused Multi-LoRA op: ``multi_lora_triton`` (Triton kernels tied by one autograd.Function).

Contract (docs/architecture.md, shared with ``ckf_dist.model.multi_lora.multi_lora_torch``)::

    multi_lora_triton(x [N, in], a_shared [rs, in] | None, b_shared [out, rs] | None,
                      a_task [T, rt, in] | None, b_task [T, out, rt] | None,
                      task_ids [N] int64, scale_shared, scale_task) -> delta [N, out]

    delta[n] = scale_shared * B_s @ A_s @ x[n] + scale_task * B_t[k] @ A_t[k] @ x[n],  k = task_ids[n]

Launches per call: forward 1 (+1 ``_assert_async`` of the in-kernel id check for raw ids
on CUDA), backward 3 (dX, dW partials, dW sums); no sort, no host sync, grids from shapes.
Passes over the big tensors (x, dy, dx: N x hidden): forward reads x once and writes y
once; backward reads dy twice (dX path, dB) and x once (dA) and writes dX once. Everything
in between lives in rank space (N x (rs+rt) fp32, a few MB). See ``_triton_multi_lora.py``.

Extras beyond the contract (keyword-only, optional):
* ``out=``: accumulate the delta into an existing tensor (the frozen base output,
  ``F.linear(x, W)``) in place and return it: the base add is fused into the expand
  store, saving a full extra read+write of y compared with ``base + delta``. The tensor
  must be a fresh result nobody else reads (it is marked dirty for autograd).
* ``task_ids`` may be a :class:`~ckf_dist.kernels.routing.Routing` from
  ``make_routing(task_ids, T)`` (ids validated once), shared by every layer.
* ``config=``: a :class:`KernelConfig` (tile sizes, dW chunks), for benchmarking.

Dropout: the op has none. LoRA dropout applies to the adapter input only, so the caller
passes ``x_dropped = dropout(x)`` and adds the base output computed from the undropped x;
the gradient this op returns for its ``x`` argument is then d/d(x_dropped), which autograd
carries back through the dropout mask to x, next to the base path's own gradient.
``out=`` works with dropout too: it only decides where the delta is added.

Precision: fp32 / fp16 / bf16 inputs, fp32 accumulation; the rank-space activations are
kept in fp32 between kernels and rounded to the input dtype only as ``tl.dot`` operands.
Weights of another dtype than x are cast to x's dtype (as autocast would). Under
``TRITON_INTERPRET=1`` all products run in fp32 (the interpreter's bf16 math is broken).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .routing import Routing, cdiv, make_routing

__all__ = ["KernelConfig", "multi_lora_triton", "triton_available", "interpret_mode"]

POISON_BUFFERS = False
"""Testing aid: fill every buffer the op allocates with NaN, so an unwritten element shows."""


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _has_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):       # e.g. sys.modules["triton"] = None
        return False


def triton_available() -> bool:
    """Can ``multi_lora_triton`` run here? triton installed and (a CUDA GPU or the interpreter).

    Does not import triton (importing it early would fix its interpreter mode too soon).
    """
    if not _has_triton():
        return False
    return interpret_mode() or torch.cuda.is_available()


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes. 0 means automatic. Block sizes must be powers of two >= 16."""

    block_m: int = 0       # rows per program of the fused shrink+expand kernel
    block_k: int = 128     # shrink tile along the reduced (hidden) dimension
    block_n: int = 64      # expand tile along the written dimension (64: fewer registers; best in the H200 sweep)
    block_d: int = 64      # weight-gradient tile along hidden
    block_dm: int = 0      # weight-gradient tile along rows (0: 64; 16 in the interpreter)
    chunk: int = 0         # rows per weight-gradient partial (0: enough chunks to fill the GPU)
    num_warps: int = 0     # 0: 8 for block_m >= 64, else 4
    num_stages: int = 3
    equal_rank_pad: bool = True   # pad both ranks to the larger padding (see _common)
    # the projection GEMM of linear_multi_lora_triton: 0 = autotuned on the GPU (32 in the interpreter)
    gemm_block_m: int = 0
    gemm_block_n: int = 0
    gemm_block_k: int = 0
    gemm_group_m: int = 8
    shrink_block_m: int = 0   # rows per program of its shrink passes (0: 64)


_MOD = None


def _kernels():
    """Import the kernel module, (re)loading it if the interpreter mode changed since."""
    global _MOD
    mode = interpret_mode()
    if _MOD is not None and _MOD[0] == mode:
        return _MOD[1]
    msg = ("multi_lora_triton needs triton (pip install 'triton>=3.0' or the 'gpu' extra); "
           "use ckf_dist.model.multi_lora.multi_lora_torch instead")
    if not _has_triton():
        raise RuntimeError(msg)
    try:
        mod = importlib.import_module(f"{__package__}._triton_multi_lora")
    except ImportError as e:
        raise RuntimeError(f"{msg} ({e})") from e
    if _MOD is not None:
        mod = importlib.reload(mod)           # triton.jit picks interpreter or GPU at definition
    _MOD = (mode, mod)
    return mod


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2                              # interpreter: small, still exercises several chunks
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON_BUFFERS:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _rank_pad(r: int) -> int:
    return max(16, _pow2(r))


_CACHE: dict = {}


def _cached(key, make):
    v = _CACHE.get(key)
    if v is None:
        v = _CACHE[key] = make()
    return v


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached 1-element tensor: a placeholder pointer for absent operands (never read)."""
    return _cached(("dummy", device, dtype), lambda: torch.zeros(1, dtype=dtype, device=device))


def _flag(device: torch.device) -> torch.Tensor:
    """The per-device "all task ids valid" flag: 1, cleared by a kernel that sees a bad id."""
    return _cached(("flag", device), lambda: torch.ones(1, dtype=torch.int32, device=device))


class _Ctx:
    """Static facts of one call shared by the launchers (shapes, flags, tiles, constexprs)."""

    __slots__ = ("n", "n_in", "n_out", "rs", "rt", "rc", "T", "has_s", "has_t", "ids", "device",
                 "bm", "cfg", "common", "k", "interp")

    def __init__(self, x, a_s, a_t, b_s, b_t, ids, n_tasks: int, cfg: KernelConfig):
        self.n, self.n_in = x.shape
        self.n_out = b_s.shape[0] if b_s is not None else b_t.shape[1]
        self.rs = a_s.shape[0] if a_s is not None else 0
        self.rt = a_t.shape[1] if a_t is not None else 0
        self.rc = self.rs + self.rt
        self.T = n_tasks
        self.has_s, self.has_t = a_s is not None, a_t is not None
        self.device = x.device
        self.ids = ids if ids is not None else _dummy(x.device, torch.int64)
        self.cfg = cfg
        self.k = _kernels()
        self.interp = interpret_mode()
        n = self.n
        self.bm = cfg.block_m or (16 if n < 8192 else 32 if n < 32768 else 64)   # >= ~2 programs per SM
        self.common = _cached(("common", x.dtype, self.interp, self.has_s, self.has_t, self.rs, self.rt,
                               cfg.num_stages, cfg.equal_rank_pad), lambda: self._common(x.dtype))

    def _common(self, dtype):
        import triton.language as tl
        compute = tl.float32 if (self.interp or dtype == torch.float32) else \
            {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
        rs_p, rt_p = _rank_pad(self.rs), _rank_pad(self.rt)
        if self.cfg.equal_rank_pad and self.has_s and self.has_t:
            # One rank width for every tl.dot of a kernel. With unequal paddings (rs 8 -> 16
            # next to rt 64) the fp16 run on the H200 (triton 3.6) hit an illegal memory
            # access in backward while the same shapes passed in fp32 (FMA dots, no tensor
            # cores) and equal paddings passed in fp16/bf16; every access is in bounds at the
            # source level (tests/test_kernels_guard.py), so the suspect is the sm_90 lowering
            # of two MMAs of different N sharing one operand (_dw_kernel: one wgmma N=16 and
            # one N=64 on the same smem tile; _tile likewise with mma.sync). Costs only extra
            # rank columns (masked), nothing when the paddings are already equal.
            rs_p = rt_p = max(rs_p, rt_p)
        return dict(HAS_S=self.has_s, HAS_T=self.has_t, RS_P=rs_p, RT_P=rt_p,
                    COMPUTE=compute, PREC="ieee" if compute == tl.float32 else "tf32")


def _w(t, idx, w_dummy):
    """Pointer + strides of a weight view; idx picks which strides the kernel reads."""
    if t is None:
        return (w_dummy,) + (0,) * len(idx)
    return (t,) + tuple(t.stride(i) for i in idx)


def _lora_pass(c: _Ctx, m, k_dim, shrink_s, shrink_t, expand_s, expand_t, y, out_dim, scales,
               h, accum: bool, check: bool, keep: torch.Tensor | None = None) -> None:
    """One launch of the fused shrink+expand kernel over all rows (grid from shapes only);
    ``out_dim == 0``: the shrink alone (H only), compiled without the expand, on larger row blocks.
    ``keep``: LoRA dropout's 0/1 mask (uint8, m's shape): the shrink reads ``m * keep``."""
    expand = out_dim > 0
    if expand:
        bm = c.bm
        warps = c.cfg.num_warps or (8 if bm >= 64 else 4)
    else:
        bm = c.cfg.shrink_block_m or (16 if c.interp else 64)     # 64: wgmma on Hopper
        warps = c.cfg.num_warps or 4
    hh = h if h is not None else _dummy(c.device, torch.float32)
    kp = keep if keep is not None else _dummy(c.device, torch.uint8).view(1, 1)
    c.k._lora_kernel[(triton_cdiv(c.n, bm),)](
        m, m.stride(0), m.stride(1), kp, kp.stride(0), kp.stride(1), y, y.stride(0), y.stride(1), hh, c.ids,
        _flag(c.device) if check else hh, *shrink_s, *shrink_t, *expand_s, *expand_t,
        c.n, k_dim, out_dim, c.rs, c.rt, c.rc, c.T, float(scales[0]), float(scales[1]),
        SAVE_H=h is not None, ACCUM=accum, EXPAND=expand, HAS_MASK=keep is not None, CHECK=check, BM=bm, BK=c.cfg.block_k, BN=c.cfg.block_n,
        num_warps=warps, num_stages=c.cfg.num_stages, **c.common)


def triton_cdiv(a: int, b: int) -> int:
    return max(1, cdiv(a, b))


def _weight_grads(c: _Ctx, dy, h, x, dg, grads, keep: torch.Tensor | None = None) -> None:
    """dB = dy^T H and dA = dG^T x (x * keep with a dropout mask): per-chunk partials in one
    launch, then in-order sums into ``grads`` = (da_s, db_s, da_t, db_t) (absent adapters:
    None) in one launch."""
    dev = c.device
    bmd = c.cfg.block_dm or (16 if c.interp else 64)
    bd = c.cfg.block_d
    tiles_b, tiles_a = cdiv(c.n_out, bd), cdiv(c.n_in, bd)
    if c.cfg.chunk:
        chunk = cdiv(c.cfg.chunk, bmd) * bmd
    else:       # enough chunks for ~4 programs per SM, each at least one row tile
        n_chunks = max(1, min(cdiv(4 * _sm_count(dev), tiles_a + tiles_b), cdiv(c.n, bmd)))
        chunk = cdiv(cdiv(c.n, n_chunks), bmd) * bmd
    n_chunks = cdiv(c.n, chunk)
    f32, d32 = torch.float32, _dummy(dev, torch.float32)
    psb = _new((n_chunks, c.n_out, c.rs), f32, dev) if c.has_s else d32
    psa = _new((n_chunks, c.rs, c.n_in), f32, dev) if c.has_s else d32
    ptb = _new((n_chunks, c.T, c.n_out, c.rt), f32, dev) if c.has_t else d32
    pta = _new((n_chunks, c.T, c.rt, c.n_in), f32, dev) if c.has_t else d32
    lo = _new((n_chunks,), torch.int32, dev)
    hi = _new((n_chunks,), torch.int32, dev)
    warps = c.cfg.num_warps or 4
    kp = keep if keep is not None else _dummy(dev, torch.uint8).view(1, 1)
    c.k._dw_kernel[(n_chunks, tiles_b + tiles_a)](
        dy, dy.stride(0), dy.stride(1), h, c.n_out, psb, ptb,
        x, x.stride(0), x.stride(1), kp, kp.stride(0), kp.stride(1), dg, c.n_in, psa, pta,
        c.ids, lo, hi, c.n, chunk, tiles_b, c.rs, c.rt, c.rc, c.T, HAS_MASK=keep is not None,
        BM=bmd, BD=bd, num_warps=warps, num_stages=c.cfg.num_stages, **c.common)
    da_s, db_s, da_t, db_t = grads
    dx_ = _dummy(dev, dy.dtype)
    block = 256 if c.interp else 1024
    longest = max(c.n_in, c.n_out) * max(c.rs, c.rt)
    c.k._wsum_kernel[(2 * (c.T + 1), cdiv(longest, block))](
        psb, ptb, psa, pta, lo, hi, n_chunks, c.n_out, c.n_in, c.rs, c.rt, c.T,
        db_s if db_s is not None else dx_, db_t if db_t is not None else dx_,
        da_s if da_s is not None else dx_, da_t if da_t is not None else dx_,
        HAS_S=c.has_s, HAS_T=c.has_t, BLOCK=block, num_warps=4)


class _MultiLoraFn(torch.autograd.Function):
    """Inputs ``(out, x, a_s, b_s, a_t, b_t, ...)``: ``out`` (the tensor accumulated into, or
    None) comes first because autograd's in-place-on-a-view handling (CopySlices) takes a
    Function's first input as the modified one, e.g. ``out=y.view(-1, d)``."""

    @staticmethod
    def forward(ctx, out, x, a_s, b_s, a_t, b_t, ids, n_tasks, scale_s, scale_t, cfg, check):
        c = _Ctx(x, a_s, a_t, b_s, b_t, ids, n_tasks, cfg)
        accum = out is not None
        y = out if accum else _new((c.n, c.n_out), x.dtype, x.device)
        need_h = any(ctx.needs_input_grad[2:6])         # H feeds dB (all weight grads run together)
        h = None
        if c.n:
            h = _new((c.n, c.rc), torch.float32, x.device) if need_h else None
            d = _dummy(x.device, x.dtype)
            _lora_pass(c, x, c.n_in,
                       _w(a_s, (0, 1), d), _w(a_t, (0, 1, 2), d),          # shrink (r, k)
                       _w(b_s, (0, 1), d), _w(b_t, (0, 1, 2), d),          # expand (n, r)
                       y, c.n_out, (scale_s, scale_t), h, accum, check)
        if accum:
            ctx.mark_dirty(out)
        ctx.save_for_backward(x, a_s, b_s, a_t, b_t, h)
        ctx.c = c
        ctx.scales = (scale_s, scale_t)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, a_s, b_s, a_t, b_t, h = ctx.saved_tensors
        c: _Ctx = ctx.c
        need = ctx.needs_input_grad
        need_dx = need[1]
        need_w = any(need[2:6])
        dev, dt = x.device, x.dtype
        grads = [(_new(w.shape, dt, dev) if w is not None else None) for w in (a_s, b_s, a_t, b_t)] \
            if need_w else [None] * 4
        dx = _new(x.shape, dt, dev) if need_dx else None
        if c.n == 0:
            for g in [dx] + grads:
                if g is not None:
                    g.zero_()
        elif need_dx or need_w:
            d = _dummy(dev, dt)
            dg = _new((c.n, c.rc), torch.float32, dev) if need_w else None
            dxo = dx if need_dx else d.view(1, 1)
            _lora_pass(c, dy, c.n_out,
                       _w(b_s, (1, 0), d), _w(b_t, (0, 2, 1), d),          # shrink W = B^T as (r, k)
                       _w(a_s, (1, 0), d), _w(a_t, (0, 2, 1), d),          # expand W = A^T as (n, r)
                       dxo, c.n_in if need_dx else 0, ctx.scales, dg, False, False)
            if need_w:
                _weight_grads(c, dy, h, x, dg, grads)
        da_s, db_s, da_t, db_t = grads
        keep = (lambda g, i: g if need[i] else None)
        return (dy if need[0] else None, dx, keep(da_s, 2), keep(db_s, 3), keep(da_t, 4), keep(db_t, 5),
                None, None, None, None, None, None)


def _check(x, a_s, b_s, a_t, b_t):
    if x.dim() != 2:
        raise ValueError(f"multi_lora: x must be [N, in], got shape {tuple(x.shape)}")
    if (a_s is None) != (b_s is None) or (a_t is None) != (b_t is None):
        raise ValueError("multi_lora: give both A and B of an adapter, or neither")
    if a_s is None and a_t is None:
        raise ValueError("multi_lora: no adapter given (shared and task weights are all None)")
    n_in = x.shape[1]
    if a_s is not None:
        if a_s.dim() != 2 or b_s.dim() != 2 or a_s.shape[1] != n_in or b_s.shape[1] != a_s.shape[0]:
            raise ValueError(f"multi_lora: shared shapes a {tuple(a_s.shape)}, b {tuple(b_s.shape)} "
                             f"do not fit x [N, {n_in}] (want a [rs, in], b [out, rs])")
    if a_t is not None:
        if (a_t.dim() != 3 or b_t.dim() != 3 or a_t.shape[2] != n_in or b_t.shape[0] != a_t.shape[0]
                or b_t.shape[2] != a_t.shape[1]):
            raise ValueError(f"multi_lora: task shapes a {tuple(a_t.shape)}, b {tuple(b_t.shape)} "
                             f"do not fit x [N, {n_in}] (want a [T, rt, in], b [T, out, rt])")
    if a_s is not None and a_t is not None and b_s.shape[0] != b_t.shape[1]:
        raise ValueError(f"multi_lora: shared out {b_s.shape[0]} != task out {b_t.shape[1]}")
    for w in (a_s, a_t):
        if w is not None and w.shape[-2] > 256:
            raise ValueError(f"multi_lora_triton: rank {w.shape[-2]} > 256 is not supported")
    devs = {t.device for t in (x, a_s, b_s, a_t, b_t) if t is not None}
    if len(devs) != 1:
        raise ValueError(f"multi_lora: tensors on several devices {sorted(map(str, devs))}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"multi_lora_triton: x dtype {x.dtype} not supported (fp32/fp16/bf16)")


def multi_lora_triton(x, a_shared, b_shared, a_task, b_task, task_ids, scale_shared: float = 1.0,
                      scale_task: float = 1.0, *, out: torch.Tensor | None = None,
                      config: KernelConfig | None = None) -> torch.Tensor:
    """Fused Multi-LoRA delta (see module docstring). Differentiable in x and all weights.

    Raises RuntimeError when triton is missing, or when the tensors are not on CUDA and
    ``TRITON_INTERPRET=1`` is not set (then use the torch path).
    """
    _check(x, a_shared, b_shared, a_task, b_task)
    _check_runnable(x, "multi_lora_triton")
    ids, n_tasks, check = _task_ids(x, a_task, task_ids)
    if out is not None and (out.shape != (x.shape[0], (b_shared if b_shared is not None else b_task)
                                          .shape[-2]) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"multi_lora: out must be [N, out] of x's dtype/device, got {tuple(out.shape)} "
                         f"{out.dtype}")
    dt = x.dtype
    y = _MultiLoraFn.apply(out, x, _cast(a_shared, dt), _cast(b_shared, dt), _cast(a_task, dt),
                           _cast(b_task, dt), ids, n_tasks, float(scale_shared), float(scale_task),
                           config or _DEFAULT_CFG, check)
    if check:
        _assert_ids(x.device, n_tasks)
    return y


def _cast(w, dtype):
    """Weights of another dtype than x are cast to x's (as autocast would)."""
    return w if w is None or w.dtype == dtype else w.to(dtype)


def _check_runnable(x, name: str) -> None:
    if not (x.is_cuda or interpret_mode()):
        raise RuntimeError(f"{name} runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1, "
                           f"for tests); got a {x.device} tensor: use "
                           "ckf_dist.model.multi_lora.multi_lora_torch instead")
    _kernels()                                # clear error now if triton is missing


def _task_ids(x, a_task, task_ids):
    """``(ids or None, n_tasks, check)`` from raw ids or a Routing; ``check``: validate the
    ids inside the kernel and assert the flag afterwards (raw ids on CUDA)."""
    n_tasks = a_task.shape[0] if a_task is not None else 1
    check = False
    if isinstance(task_ids, Routing):
        routing = task_ids
        if routing.n_rows != x.shape[0] or (a_task is not None and routing.n_tasks != n_tasks):
            raise ValueError(f"multi_lora: routing built for {routing.n_rows} rows x {routing.n_tasks} "
                             f"tasks, called with {x.shape[0]} rows x {n_tasks} tasks")
        ids = routing.task_ids if a_task is not None else None
        if a_task is not None and ids is None:
            raise ValueError("multi_lora: routing without task ids for a call with task adapters")
    elif a_task is None:
        ids = None
    else:
        # validation on the host on CPU; on CUDA inside the kernel (a flag the caller asserts
        # asynchronously afterwards), so no extra launches and no sync
        ids = make_routing(task_ids, n_tasks, n_rows=x.shape[0], check=not x.is_cuda).task_ids
        check = x.is_cuda and ids.numel() > 0
    return ids, n_tasks, check


_DEFAULT_CFG = KernelConfig()


def _assert_ids(device, n_tasks: int) -> None:
    flag = _flag(device)
    try:
        torch._assert_async(flag, f"multi_lora: task_ids must lie in [0, {n_tasks})")
    except TypeError:                         # older torch: no message argument
        torch._assert_async(flag)
