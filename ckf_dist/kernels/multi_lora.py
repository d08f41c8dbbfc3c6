"""Fused Multi-LoRA op: ``multi_lora_triton`` (Triton kernels tied by one autograd.Function).

Contract (docs/architecture.md, shared with ``ckf_dist.model.multi_lora.multi_lora_torch``)::

    multi_lora_triton(x [N, in], a_shared [rs, in] | None, b_shared [out, rs] | None,
                      a_task [T, rt, in] | None, b_task [T, out, rt] | None,
                      task_ids [N] int64, scale_shared, scale_task) -> delta [N, out]

    delta[n] = scale_shared * B_s @ A_s @ x[n] + scale_task * B_t[k] @ A_t[k] @ x[n],  k = task_ids[n]

Passes over the big tensors (x, dy, dx: N x hidden): forward reads x once and writes y
once; backward reads dy twice (dX path, dB) and x once (dA) and writes dX once. Everything
in between lives in rank space (N x (rs+rt) fp32, a few MB). See ``_triton_multi_lora.py``.

Extras beyond the contract (keyword-only, optional):
* ``out=``: accumulate the delta into an existing tensor (the frozen base output,
  ``F.linear(x, W)``) in place and return it: the base add is fused into the expand
  store, saving a full extra read+write of y compared with ``base + delta``. The tensor
  must be a fresh result nobody else reads (it is marked dirty for autograd).
* ``task_ids`` may be a :class:`~ckf_dist.kernels.routing.Routing` from
  ``make_routing(task_ids, T)``, built once per batch and shared by every layer.
* ``config=``: a :class:`KernelConfig` (tile sizes, splits), for benchmarking.

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

from .routing import BlockTable, Routing, cdiv, make_routing

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

    block_m: int = 0       # sorted rows per program (one task per block)
    block_k: int = 64      # shrink tile along the reduced (hidden) dimension
    block_n: int = 64      # expand tile along the written dimension
    block_d: int = 64      # weight-gradient tile along hidden
    split: int = 0         # programs per row block along hidden (fills the GPU at small N)
    chunk: int = 0         # sorted rows per weight-gradient partial
    num_warps: int = 0     # 0: 8 for block_m >= 64 (4 warps spill registers there on sm_90), else 4
    num_stages: int = 3


_MOD = None


def _kernels():
    """Import the kernel module, (re)loading it if the interpreter mode changed since."""
    global _MOD
    msg = ("multi_lora_triton needs triton (pip install 'triton>=3.0' or the 'gpu' extra); "
           "use ckf_dist.model.multi_lora.multi_lora_torch instead")
    if not _has_triton():
        raise RuntimeError(msg)
    mode = interpret_mode()
    if _MOD is None or _MOD[0] != mode:
        try:
            mod = importlib.import_module(f"{__package__}._triton_multi_lora")
        except ImportError as e:
            raise RuntimeError(f"{msg} ({e})") from e
        if _MOD is not None:
            mod = importlib.reload(mod)       # triton.jit picks interpreter or GPU at definition
        _MOD = (mode, mod)
    return _MOD[1]


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2                              # interpreter: small, still exercises the splits
    if str(device) not in _SMS:
        _SMS[str(device)] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[str(device)]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _resolve(cfg: KernelConfig, n_rows: int, dims: tuple[int, int], device) -> dict:
    """Fill the automatic fields. Heuristics to be tuned on a GPU (bench/multilora_gpu.py)."""
    bm = cfg.block_m or (64 if n_rows >= 8192 else 32 if n_rows >= 1024 else 16)
    target = 4 * _sm_count(device)            # ~4 programs per SM
    row_blocks = cdiv(max(n_rows, 1), bm)
    if cfg.split:
        split = cfg.split
    else:
        most = max(1, cdiv(max(dims), max(cfg.block_k, cfg.block_n)) // 4)   # >= 4 tiles per split
        split = max(1, min(cdiv(target, row_blocks), most))
    chunk = cfg.chunk or max(bm, min(1024, _pow2(cdiv(max(n_rows, 1), 16))))
    chunk = cdiv(chunk, bm) * bm
    warps = cfg.num_warps or (8 if bm >= 64 else 4)
    return dict(bm=bm, split=split, chunk=chunk, warps=warps)


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _rank_pad(r: int) -> int:
    return max(16, _pow2(r))


class _Ctx:
    """Static facts of one call shared by the launchers (shapes, flags, constexprs)."""

    def __init__(self, x, a_s, a_t, b_s, b_t, routing: Routing, cfg: KernelConfig):
        self.n, self.n_in = x.shape
        self.n_out = b_s.shape[0] if b_s is not None else b_t.shape[1]
        self.rs = a_s.shape[0] if a_s is not None else 0
        self.rt = a_t.shape[1] if a_t is not None else 0
        self.rc = self.rs + self.rt
        self.has_s, self.has_t = a_s is not None, a_t is not None
        self.routing, self.cfg = routing, cfg
        self.device = x.device
        self.auto = _resolve(cfg, self.n, (self.n_in, self.n_out), x.device)
        k = _kernels()
        import triton.language as tl
        interp = interpret_mode()
        self.compute = tl.float32 if (interp or x.dtype == torch.float32) else \
            {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[x.dtype]
        self.prec = "ieee" if self.compute == tl.float32 else "tf32"
        self.k = k
        self.common = dict(HAS_S=self.has_s, HAS_T=self.has_t, PERMUTED=routing.perm is not None,
                           RS_P=_rank_pad(self.rs), RT_P=_rank_pad(self.rt), COMPUTE=self.compute,
                           PREC=self.prec, num_warps=self.auto["warps"], num_stages=cfg.num_stages)
        self.perm = routing.perm if routing.perm is not None else self.dummy

    @property
    def dummy(self):
        return _dummy(self.device, torch.int64)


_DUMMIES: dict = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached 1-element tensor: a placeholder pointer for absent operands (never read)."""
    key = (str(device), dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return _DUMMIES[key]


def _blocks(c: "_Ctx", block: int) -> BlockTable:
    """The routing's block table for ``block`` rows per program, built by one Triton launch
    (cached on the Routing, so a Routing reused across layers pays for it once)."""
    r = c.routing
    key = ("triton", block)
    if key not in r._tables:
        n_prog = cdiv(r.n_rows, block) + min(r.n_tasks, r.n_rows)
        table = torch.empty((n_prog, 3), dtype=torch.int32, device=c.device)
        first = torch.empty(r.n_tasks, dtype=torch.int32, device=c.device)
        last = torch.empty_like(first)
        total = torch.empty(1, dtype=torch.int32, device=c.device)
        c.k._route_kernel[(n_prog,)](r.counts, r.seg_start, r.n_tasks, block, table, first, last, total,
                                     num_warps=1)
        r._tables[key] = BlockTable(block, n_prog, table, first, last, total)
    return r._tables[key]


def _w(t, idx, w_dummy):
    """Pointer + strides of a weight view; idx picks which strides the kernel reads."""
    if t is None:
        return (w_dummy,) + (0,) * len(idx)
    return (t,) + tuple(t.stride(i) for i in idx)


def _low_rank_pass(c: _Ctx, m: torch.Tensor, k_dim: int, ws, wt, out_dim: int, y, scales,
                   save_h: bool, accum: bool) -> torch.Tensor | None:
    """shrink(M over k_dim) then expand(into y over out_dim). ws/wt: (tensor, strides...)
    for shrink as (r, k) and for expand as (n, r). Returns the saved fp32 H or None."""
    bm, split = c.auto["bm"], c.auto["split"]
    blocks = _blocks(c, bm)
    tiles = cdiv(k_dim, c.cfg.block_k)
    per = cdiv(tiles, min(split, tiles))
    s_k = cdiv(tiles, per)
    p = _new((s_k, c.n, c.rc), torch.float32, c.device)
    (wss, s_r, s_k_), (wtt, t_t, t_r, t_k) = ws[0], wt[0]
    c.k._shrink_kernel[(blocks.n_programs, s_k)](
        m, m.stride(0), m.stride(1), wss, s_r, s_k_, wtt, t_t, t_r, t_k,
        p, c.perm, blocks.table, c.n, k_dim, c.rs, c.rt, c.rc, per, BM=bm, BK=c.cfg.block_k,
        **c.common)
    h = _new((c.n, c.rc), torch.float32, c.device) if save_h else p
    tiles_n = max(1, cdiv(out_dim, c.cfg.block_n))
    per_n = cdiv(tiles_n, min(split, tiles_n)) if out_dim else 1
    s_n = cdiv(tiles_n, per_n) if out_dim else 1
    (wse, e_n, e_r), (wte, f_t, f_n, f_r) = ws[1], wt[1]
    c.k._expand_kernel[(blocks.n_programs, s_n)](
        p, s_k, h, y, y.stride(0), y.stride(1), wse, e_n, e_r, wte, f_t, f_n, f_r,
        c.perm, blocks.table, c.n, out_dim, c.rs, c.rt, c.rc, float(scales[0]), float(scales[1]),
        per_n, SAVE_H=save_h, ACCUM=accum, BM=bm, BN=c.cfg.block_n, **c.common)
    return h if save_h else None


def _weight_grads(c: _Ctx, m: torch.Tensor, h: torch.Tensor, d: int, shared_t, task_t):
    """Segment-sorted dW: per-chunk partials of M^T H, then in-order sums per task.

    shared_t/task_t: destination tensors (or None) and how (d, r) map onto them, given as
    (tensor, stride_t, stride_d, stride_r)."""
    blocks = _blocks(c, c.auto["chunk"])
    n_chunks = blocks.n_programs
    ps = _new((n_chunks, d, c.rs), torch.float32, c.device) if c.has_s else c.dummy
    pt = _new((n_chunks, d, c.rt), torch.float32, c.device) if c.has_t else c.dummy
    bd = c.cfg.block_d
    c.k._dw_kernel[(n_chunks, cdiv(d, bd))](
        m, m.stride(0), m.stride(1), h, ps, pt, c.perm, blocks.table, d, c.rs, c.rt, c.rc,
        BM=c.auto["bm"], BD=bd, **c.common)
    block = 1024 if c.device.type == "cuda" else 256
    zero = _dummy(c.device, torch.int32)      # the shared adapter sums chunks [0, total)
    for part, dest, r, first, last, n_seg in (
            (ps, shared_t, c.rs, zero, blocks.total, 1),
            (pt, task_t, c.rt, blocks.first, blocks.last, c.routing.n_tasks)):
        if dest is None:
            continue
        out, so_t, so_d, so_r = dest
        c.k._seg_sum_kernel[(n_seg, cdiv(d * r, block))](
            part, first, last, out, so_t, so_d, so_r, d * r, r, BLOCK=block,
            num_warps=4)


class _MultiLoraFn(torch.autograd.Function):
    """Inputs ``(out, x, a_s, b_s, a_t, b_t, ...)``: ``out`` (the tensor accumulated into, or
    None) comes first because autograd's in-place-on-a-view handling (CopySlices) takes a
    Function's first input as the modified one, e.g. ``out=y.view(-1, d)``."""

    @staticmethod
    def forward(ctx, out, x, a_s, b_s, a_t, b_t, routing, scale_s, scale_t, cfg):
        c = _Ctx(x, a_s, a_t, b_s, b_t, routing, cfg)
        accum = out is not None
        y = out if accum else _new((c.n, c.n_out), x.dtype, x.device)
        need_h = ctx.needs_input_grad[3] or ctx.needs_input_grad[5]    # H only feeds dB
        h = None
        if c.n:
            d = c.dummy
            h = _low_rank_pass(
                c, x, c.n_in,
                ws=(_w(a_s, (0, 1), d), _w(b_s, (0, 1), d)),          # shrink (r, k) / expand (n, r)
                wt=(_w(a_t, (0, 1, 2), d), _w(b_t, (0, 1, 2), d)),
                out_dim=c.n_out, y=y, scales=(scale_s, scale_t), save_h=need_h, accum=accum)
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
        need = ctx.needs_input_grad[1:6] + ctx.needs_input_grad[:1]   # x, a_s, b_s, a_t, b_t, out
        need_dx, need_a, need_b = need[0], need[1] or need[3], need[2] or need[4]
        dx = da_s = db_s = da_t = db_t = None
        T = c.routing.n_tasks
        if need[1]:
            da_s = _new(a_s.shape, torch.float32, x.device)
        if need[2]:
            db_s = _new(b_s.shape, torch.float32, x.device)
        if need[3]:
            da_t = _new(a_t.shape, torch.float32, x.device)
        if need[4]:
            db_t = _new(b_t.shape, torch.float32, x.device)
        if need_dx:
            dx = _new(x.shape, x.dtype, x.device)
        if c.n == 0:
            for g in (dx, da_s, db_s, da_t, db_t):
                if g is not None:
                    g.zero_()
        else:
            if c.has_t and T != a_t.shape[0]:
                raise AssertionError("routing/task weight mismatch")
            if need_b:      # dB = dy^T H  (H already carries the scale)
                _weight_grads(c, dy, h, c.n_out,
                              None if db_s is None else (db_s, 0, c.rs, 1),
                              None if db_t is None else (db_t, c.n_out * c.rt, c.rt, 1))
            if need_dx or need_a:
                d = c.dummy
                dxo = dx if need_dx else d.view(1, 1)
                dh = _low_rank_pass(
                    c, dy, c.n_out,
                    ws=(_w(b_s, (1, 0), d), _w(a_s, (1, 0), d)),     # shrink W=B^T, expand W=A^T
                    wt=(_w(b_t, (0, 2, 1), d), _w(a_t, (0, 2, 1), d)),
                    out_dim=c.n_in if need_dx else 0, y=dxo, scales=ctx.scales,
                    save_h=need_a, accum=False)
                if need_a:  # dA = dH^T x
                    _weight_grads(c, x, dh, c.n_in,
                                  None if da_s is None else (da_s, 0, 1, c.n_in),
                                  None if da_t is None else (da_t, c.rt * c.n_in, 1, c.n_in))
        cast = (lambda g, w: None if g is None else g.to(w.dtype))
        d_out = dy if need[5] else None
        return (d_out, dx, cast(da_s, a_s), cast(db_s, b_s), cast(da_t, a_t), cast(db_t, b_t),
                None, None, None, None)


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
    if not (x.is_cuda or interpret_mode()):
        raise RuntimeError("multi_lora_triton runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1, "
                           f"for tests); got a {x.device} tensor: use "
                           "ckf_dist.model.multi_lora.multi_lora_torch instead")
    _kernels()                                # clear error now if triton is missing
    n_tasks = a_task.shape[0] if a_task is not None else 1
    if isinstance(task_ids, Routing):
        routing = task_ids
        if routing.n_rows != x.shape[0] or (a_task is not None and routing.n_tasks != n_tasks):
            raise ValueError(f"multi_lora: routing built for {routing.n_rows} rows x {routing.n_tasks} "
                             f"tasks, called with {x.shape[0]} rows x {n_tasks} tasks")
    else:
        routing = make_routing(task_ids if a_task is not None else None, n_tasks,
                               n_rows=x.shape[0], device=x.device)
    if out is not None and (out.shape != (x.shape[0], (b_shared if b_shared is not None else b_task)
                                          .shape[-2]) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"multi_lora: out must be [N, out] of x's dtype/device, got {tuple(out.shape)} "
                         f"{out.dtype}")
    cast = (lambda w: None if w is None else w.to(x.dtype))
    return _MultiLoraFn.apply(out, x, cast(a_shared), cast(b_shared), cast(a_task), cast(b_task),
                              routing, float(scale_shared), float(scale_task),
                              config or KernelConfig())
