"""Multi-LoRA math in pure torch: the per-token contract op and the per-sample batched path.

    delta(x) = s_s * B_s A_s x  +  s_t * B_{t(x)} A_{t(x)} x          s = alpha / r     (1)

- :func:`multi_lora_torch` is the contract op (docs/architecture.md): per-token task ids. It
  concatenates every A into one ``[rs + T*rt, in]`` matrix (one shrink GEMM), zeroes the rank
  columns of other tasks with a mask built from the task ids (scales folded into the mask) and
  expands with the concatenated B (one expand GEMM).
- :func:`per_sample_lora` is the faster path when tokens come as ``[B, L, in]`` and the task is
  per sample (a sample's id broadcast over its tokens): each sample's adapter weights are
  gathered (a few KB per sample) and one batched GEMM shrinks, one expands: no wasted rank
  columns. Its autograd function re-gathers in backward instead of saving the copies.
- :func:`linear_per_sample_lora` is the same path with the frozen base projection inside the
  op (``x W^T + bias + delta``): backward writes dX once, the base's dX GEMM accumulating into
  the adapters' masked dX. ``MultiLoraLinear`` uses it wherever the layer fits.

None of them loops over samples or tasks in Python. Weights use peft's layout (``A [r, in]``, ``B [out, r]``).
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
import torch


class LoraWeights(NamedTuple):
    """The adapters of one op of eq. (1): shared ``A [rs, in]``, ``B [out, rs]``, task ``A [T, rt, in]``,
    ``B [T, out, rt]`` (None for a kind the op does not use) and their scales (0.0 when unused)."""

    a_shared: torch.Tensor | None
    b_shared: torch.Tensor | None
    a_task: torch.Tensor | None
    b_task: torch.Tensor | None
    scale_shared: float = 0.0
    scale_task: float = 0.0

    def contract_args(self, task_ids: torch.Tensor) -> tuple:
        """The positional tail ``(a_s, b_s, a_t, b_t, task_ids, s_s, s_t)`` of the contract ops
        (:func:`multi_lora_torch` and the fused kernels)."""
        return (self.a_shared, self.b_shared, self.a_task, self.b_task, task_ids, self.scale_shared,
                self.scale_task)


def multi_lora_torch(x: torch.Tensor, a_shared: torch.Tensor | None, b_shared: torch.Tensor | None,
                     a_task: torch.Tensor | None, b_task: torch.Tensor | None, task_ids: torch.Tensor,
                     scale_shared: float, scale_task: float) -> torch.Tensor:
    """The adapter delta ``[N, out]`` of eq. (1) for per-token ``task_ids [N]``; differentiable in all inputs."""
    a_parts, b_parts = [], []
    if a_shared is not None:
        a_parts.append(a_shared)
        b_parts.append(b_shared)
    if a_task is not None:
        n_tasks, rt, d_in = a_task.shape
        a_parts.append(a_task.reshape(n_tasks * rt, d_in))
        b_parts.append(b_task.permute(1, 0, 2).reshape(b_task.shape[1], n_tasks * rt))   # [out, T*rt]
    if not a_parts:
        raise ValueError("multi_lora_torch: neither a shared nor a task adapter was given")
    a_cat = torch.cat(a_parts) if len(a_parts) > 1 else a_parts[0]
    b_cat = torch.cat(b_parts, dim=1) if len(b_parts) > 1 else b_parts[0]
    h = x @ a_cat.t()                                                    # shrink: [N, R]
    if a_task is None:
        return (h * scale_shared) @ b_cat.t()
    with torch.no_grad():   # col_scale[n, c] = scale of rank column c if token n uses it, else 0
        col_task = torch.arange(n_tasks, device=x.device).repeat_interleave(rt)           # [T*rt]
        col_scale = (task_ids.view(-1, 1) == col_task.view(1, -1)).to(h.dtype) * scale_task
        if a_shared is not None:
            shared = torch.full((1, a_shared.shape[0]), scale_shared, dtype=h.dtype, device=x.device)
            col_scale = torch.cat([shared.expand(h.shape[0], -1), col_scale], dim=1)
    return (h * col_scale) @ b_cat.t()                                   # expand: [N, out]


def _gather(w: LoraWeights, ids):
    """Per-sample ``A [B, R, in]`` and scaled ``B [B, out, R]``: the shared adapter, then the sample's task adapter."""
    a_s, b_s, a_t, b_t, s_s, s_t = w
    n = ids.shape[0]
    a, b = [], []
    if a_s is not None:
        a.append(a_s.unsqueeze(0).expand(n, -1, -1))
        b.append((b_s * s_s).unsqueeze(0).expand(n, -1, -1))
    if a_t is not None:
        a.append(a_t.index_select(0, ids))
        b.append(b_t.index_select(0, ids) * s_t)
    return torch.cat(a, 1) if len(a) > 1 else a[0], torch.cat(b, 2) if len(b) > 1 else b[0]


class _PerSampleLora(torch.autograd.Function):
    """``base_out + delta`` (or ``delta``) of eq. (1) for ``x [B, L, in]`` and per-sample ids ``[B]``."""

    @staticmethod
    def forward(ctx, base_out, x, a_s, b_s, a_t, b_t, ids, s_s, s_t):
        a, b = _gather(LoraWeights(a_s, b_s, a_t, b_t, s_s, s_t), ids)
        h = torch.bmm(x, a.transpose(1, 2))                                 # shrink: [B, L, R]
        if base_out is None:
            out = torch.bmm(h, b.transpose(1, 2))                           # expand: [B, L, out]
        elif base_out._base is None and (base_out.grad_fn is not None or not base_out.requires_grad):
            out = base_out.baddbmm_(h, b.transpose(1, 2))                   # expand, accumulated in place
            ctx.mark_dirty(out)                                             # (the base's backward needs x, not y)
        else:
            out = torch.baddbmm(base_out, h, b.transpose(1, 2))
        ctx.save_for_backward(x, h, a_s, b_s, a_t, b_t, ids)
        ctx.scales = (s_s, s_t)
        ctx.has_base = base_out is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, h, a_s, b_s, a_t, b_t, ids = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, grads = _adapter_backward(g, x, h, LoraWeights(a_s, b_s, a_t, b_t, *ctx.scales), ids, need[1], need[2:6])
        return (g if ctx.has_base and need[0] else None), gx, *grads, None, None, None


def _adapter_backward(g, x, h, w: LoraWeights, ids, need_x: bool, need_w):
    """Backward of the per-sample adapters: ``(dX of the adapters or None, (dA_s, dB_s, dA_t, dB_t))``
    for ``g = dY [B, L, out]``, the shrink's input ``x`` and its output ``h``; ``need_w`` flags the four."""
    a_s, _, a_t, b_t, s_s, s_t = w
    a, b = _gather(w, ids)                                                   # re-gathered, not saved
    gh = torch.bmm(g, b)                                                     # [B, L, R]
    gx = torch.bmm(gh, a) if need_x else None
    rs = a_s.shape[0] if a_s is not None else 0
    ga_s = gb_s = ga_t = gb_t = None
    if need_w[0] or need_w[2]:
        ga = torch.bmm(gh.transpose(1, 2), x)                                # [B, R, in]
        ga_s = ga[:, :rs].sum(0) if need_w[0] else None
        ga_t = torch.zeros_like(a_t).index_add_(0, ids, ga[:, rs:]) if need_w[2] else None
    if need_w[1] or need_w[3]:
        gb = torch.bmm(g.transpose(1, 2), h)                                 # [B, out, R]
        gb_s = gb[:, :, :rs].sum(0) * s_s if need_w[1] else None
        gb_t = torch.zeros_like(b_t).index_add_(0, ids, gb[:, :, rs:]) * s_t if need_w[3] else None
    return gx, (ga_s, gb_s, ga_t, gb_t)


class _LinearPerSampleLora(torch.autograd.Function):
    """The whole adapted projection for ``x [B, L, in]``, per-sample ids and a frozen base:
    ``y = x W^T + bias + delta(x * keep)``.

    Against the base module plus :class:`_PerSampleLora` beside it, backward writes dX once:
    the adapters' dX is masked in place and the base's dX GEMM accumulates into it
    (``addmm_``), where autograd would allocate the masked copy, the base's dX and their sum.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, keep, a_s, b_s, a_t, b_t, ids, s_s, s_t, weight_in_out):
        w = weight.t() if weight_in_out else weight                         # [out, in] (a view for Conv1D)
        # y is a tensor of its own, not a view (F.linear with a bias returns a view of its 2-D
        # result, and autograd forbids in-place ops on a view returned by a custom Function)
        y = torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, w.shape[0])
        torch.mm(x2, w.t(), out=y2) if bias is None else torch.addmm(bias, x2, w.t(), out=y2)
        xd = x if keep is None else x * keep                                 # the adapters' dropped input
        a, b = _gather(LoraWeights(a_s, b_s, a_t, b_t, s_s, s_t), ids)
        h = torch.bmm(xd, a.transpose(1, 2))                                 # shrink: [B, L, R]
        y.baddbmm_(h, b.transpose(1, 2))                                     # expand into the base's output
        need = ctx.needs_input_grad        # save only what backward reads: xd for dA, keep for dX
        ctx.save_for_backward(xd if need[4] or need[6] else None, keep if need[0] else None, h, weight,
                              a_s, b_s, a_t, b_t, ids)
        ctx.scales = (s_s, s_t)
        ctx.weight_in_out = weight_in_out
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        xd, keep, h, weight, a_s, b_s, a_t, b_t, ids = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, grads = _adapter_backward(g, xd, h, LoraWeights(a_s, b_s, a_t, b_t, *ctx.scales), ids, need[0], need[4:8])
        if gx is not None:
            if keep is not None:
                gx.mul_(keep)                                                # dropout's backward, in place
            w = weight.t() if ctx.weight_in_out else weight
            gx.view(-1, gx.shape[-1]).addmm_(g.reshape(-1, g.shape[-1]), w)  # + the base's dX, same buffer
        return gx, None, None, None, *grads, None, None, None, None


def linear_per_sample_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           keep: torch.Tensor | None, adapters: LoraWeights, sample_ids: torch.Tensor,
                           weight_in_out: bool = False) -> torch.Tensor:
    """``x W^T + bias`` plus eq. (1) on ``x * keep`` (``keep``: the float dropout mask or None) for
    ``x [B, L, in]`` with one task id per sample, as one autograd op. The weight and bias must be
    frozen (their gradients are not computed); ``weight_in_out``: a Conv1D weight ``[in, out]``."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_per_sample_lora: the base weight and bias must be frozen")
    if x.dim() != 3 or sample_ids.shape != (x.shape[0],):
        raise ValueError(f"linear_per_sample_lora: x must be [B, L, in] with ids [B], got {tuple(x.shape)} "
                         f"and {tuple(sample_ids.shape)}")
    shape = x.shape
    if adapters.a_task is None:      # shared only, no routing: all tokens as one sample (plain GEMMs)
        x, keep = x.reshape(1, -1, shape[-1]), None if keep is None else keep.reshape(1, -1, shape[-1])
        sample_ids = sample_ids.new_zeros(1)
    a_s, b_s, a_t, b_t, s_s, s_t = adapters
    y = _LinearPerSampleLora.apply(x, weight, bias, keep, a_s, b_s, a_t, b_t, sample_ids, s_s, s_t, weight_in_out)
    return y.view(*shape[:-1], y.shape[-1])


def per_sample_lora(x: torch.Tensor, adapters: LoraWeights, sample_ids: torch.Tensor,
                    base_out: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (1) for ``x [B, L, in]`` with one task id per sample; returns ``base_out + delta`` when given."""
    a_shared, b_shared, a_task, b_task, scale_shared, scale_task = adapters
    if a_task is None:      # shared only: no routing, two plain GEMMs (the add fused into the second)
        h = x.reshape(-1, x.shape[-1]) @ a_shared.t()
        b = (b_shared * scale_shared).t()
        if base_out is None:
            return (h @ b).view(*x.shape[:-1], -1)
        return torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h, b).view(base_out.shape)
    return _PerSampleLora.apply(base_out, x, a_shared, b_shared, a_task, b_task, sample_ids,
                                scale_shared, scale_task)


def lora_dropout(x: torch.Tensor, p: float, training: bool) -> tuple[torch.Tensor, float]:
    """Inverted dropout split in two: ``(x * keep, 1 / (1 - p'))``; the caller folds the scale into B.

    The keep mask compares 16 random bits per element with a threshold, so the drop
    probability is p' = round(p * 2^16) / 2^16 (within 7.7e-6 of p) and the scale uses p'
    (unbiased). On CPU the bits come from numpy's SFC64 (``random_raw``, four elements per
    64-bit draw), seeded per call by one draw from torch's CPU generator: reproducible under
    ``torch.manual_seed`` and across a checkpoint's saved RNG state, and 5x faster than torch's
    own draws, which dominate dropout on CPU (4M elements: 2.0 ms; PCG64 2.5 ms; torch 11.5 ms;
    one thread). Elsewhere the bits come from torch.
    """
    if not training or p == 0.0:
        return x, 1.0
    keep, scale = _keep_mask(x, p, as_bool=False)
    return x * keep, scale


def lora_dropout_mask(x: torch.Tensor, p: float, training: bool,
                      as_bool: bool = True) -> tuple[torch.Tensor | None, float]:
    """``(keep, scale)``: the keep mask that :func:`lora_dropout` would apply, from the same
    draws (same RNG state, same mask), for ops that apply it themselves (the fused projection
    reads ``x`` and the mask, never a dropped copy of x). Bool, or in x's dtype with
    ``as_bool=False``. ``(None, 1.0)`` when inactive."""
    if not training or p == 0.0:
        return None, 1.0
    return _keep_mask(x, p, as_bool=as_bool)


def _keep_mask(x: torch.Tensor, p: float, as_bool: bool) -> tuple[torch.Tensor, float]:
    """Keep mask of x's shape, in x's dtype (or bool), and the scale 1 / (1 - p')."""
    threshold = round(p * 65536)
    if threshold >= 65536:
        raise ValueError(f"dropout: p must be < 1, got {p}")
    n = x.numel()
    # int16 uniform on [-2^15, 2^15): P(drop) = thr / 2^16. The compare writes x's dtype directly
    # (a bool mask would be cast to x's dtype on every multiply, forward and backward).
    lowest_kept = threshold - 32768
    scale = 65536.0 / (65536 - threshold)
    if x.device.type == "cpu":
        seed = int(torch.empty((), dtype=torch.int64, device="cpu").random_())       # torch's CPU generator
        bits = _sfc64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]              # 64 random bits = 4 elements
        if as_bool:
            return torch.from_numpy(np.greater_equal(bits, lowest_kept)).view(x.shape), scale
        np_dtype = _NUMPY_FLOAT.get(x.dtype)
        if np_dtype is not None:    # numpy's compare-and-cast loop: 2x faster than torch.ge(out=float) here
            keep = np.greater_equal(bits, lowest_kept, out=np.empty(n, np_dtype), casting="unsafe")
            return torch.from_numpy(keep).view(x.shape), scale
        halves = torch.from_numpy(bits)                                               # bfloat16: no numpy dtype
    else:
        halves = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_(-2**31, 2**31)
        halves = halves.view(torch.int16)[:n]
    if as_bool:
        return halves.view(x.shape) >= lowest_kept, scale
    keep = torch.ge(halves.view(x.shape), lowest_kept, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return keep, scale


_NUMPY_FLOAT = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
_BIT_GENERATORS = threading.local()


def _sfc64(seed: int) -> np.random.SFC64:
    """This thread's SFC64, re-seeded: the generator's own 64-bit seeding (a = b = c = seed,
    counter = 1, 12 rounds discarded). It costs 3 µs where building ``SFC64(seed)`` (which
    hashes the seed through a SeedSequence) costs 9 µs hot and up to 100 µs between a layer's
    GEMMs, and it is paid once per adapted module and forward."""
    bg = getattr(_BIT_GENERATORS, "sfc64", None)
    if bg is None:
        bg = _BIT_GENERATORS.sfc64 = np.random.SFC64(0)
    bg.state = {"bit_generator": "SFC64", "state": {"state": np.array([seed, seed, seed, 1], dtype=np.uint64)},
                "has_uint32": 0, "uinteger": 0}
    bg.random_raw(12)
    return bg
