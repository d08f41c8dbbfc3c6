"""Triton kernels of the fused Multi-LoRA op. Imported lazily by ``multi_lora.py`` only.

The side op's three kernels, launched 1 (forward) + 3 (backward) times per call, with grids
sized from shapes alone (never from data on the GPU), no sort, no routing tables, no host
syncs (``_gemm_lora_kernel``, the projection GEMM with the expand in its epilogue, is
described in ``linear_lora.py``):

* ``_lora_kernel``  one program per block of ``BM`` rows, in the rows' original order:
  shrink ``H = M @ [A_s; A_t[task]]^T`` over the whole reduced dimension (both adapters
  from one load of M), scale, optionally save H (fp32, rank space), then expand
  ``Y (+)= H @ [B_s; B_t[task]]^T`` over the whole written dimension. M is read once and
  Y written once. Forward: M = x, Y = delta (or base + delta with ``out=``), H feeds dB.
  Backward: M = dy with W = B^T, then W = A^T into Y = dX; H = dG (the scaled gradient in
  rank space) feeds dA.
* ``_dw_kernel``  per (row chunk, hidden tile), for dB (M = dy, G = H) and dA (M = x,
  G = dG) in one launch: fp32 per-chunk partials of ``M^T G`` for the shared adapter and
  for every task present in the chunk.
* ``_wsum_kernel``  sums the chunk partials in chunk order into the four weight gradients
  (in the weights' dtype): deterministic, no atomics.

Routing without sorting: each row block reads its rows' task ids and reduces them to the
block's task range ``[t_lo, t_hi]``. The model routes per sample, so a block almost always
holds one task (``t_lo == t_hi``): that branch is a plain dense loop with the task's
weights (pipelined like any GEMM K-loop). A block mixing tasks loops over the tasks in its
range and keeps, per row, only its own task's product (``tl.where``), so the cost grows
with the number of distinct tasks in a block, never with T.

All products accumulate in fp32 (``tl.dot`` with an fp32 accumulator); fp32 inputs use
``input_precision="ieee"`` (not tf32). Rank dimensions are padded to a power of two >= 16
(``tl.dot`` minimum) and masked.

Only Triton builtins are used (``tl.full``, ``tl.reduce`` with combine functions defined
here; not ``tl.zeros``/``tl.sum``/``tl.max``, which are ``@triton.jit`` functions of
``triton.language.standard``): those library functions are fixed as compiled-mode at
``import triton``, so avoiding them lets these kernels run under ``TRITON_INTERPRET=1``
even when something (transformers does) imported triton before the variable was set.
Loop variables are cast with ``tl.cast`` because the interpreter hands them over as
Python ints.
"""

import triton
import triton.language as tl

from ckf_dist.kernels.tiles import GEMM_TILES, prune_gemm_tiles


@triton.jit
def _min_op(a, b):
    return tl.minimum(a, b)


@triton.jit
def _max_op(a, b):
    return tl.maximum(a, b)


@triton.jit
def _row_tasks(IDS, offs, mask, T):
    """Task of each row (-1 for masked rows and ids outside [0, T)) and the range [lo, hi]
    of the valid ones (lo = T, hi = -1 when there is none)."""
    t = tl.load(IDS + offs, mask=mask, other=-1).to(tl.int32)
    t = tl.where((t >= 0) & (t < T), t, -1)
    lo = tl.reduce(tl.where(t >= 0, t, T), 0, _min_op)
    hi = tl.reduce(t, 0, _max_op)
    return t, lo, hi


@triton.jit
def _load_kept(ptrs, keep_ptrs, mask, MASKED: tl.constexpr, COMPUTE: tl.constexpr):
    """A tile loaded in COMPUTE (0 where masked off); with MASKED, also 0 where LoRA dropout's
    keep byte is 0 (the tile of ``M * keep`` without materialising it)."""
    v = tl.load(ptrs, mask=mask, other=0.0).to(COMPUTE)
    if MASKED:
        keep = tl.load(keep_ptrs, mask=mask, other=0)
        v = tl.where(keep != 0, v, tl.full(v.shape, 0.0, dtype=COMPUTE))
    return v


@triton.jit
def _tile(m_rows, stride_mk, k_rows, stride_kk, y_rows, stride_yn, h_rows, offs, mask_m, task, t_lo, t_hi,
          AS, sas_r, sas_k, AT, sat_t, sat_r, sat_k, BS, sbs_n, sbs_r, BT, sbt_t, sbt_n, sbt_r,
          K, NOUT, RS, RT, scale_s, scale_t,
          HAS_S: tl.constexpr, HAS_T: tl.constexpr, MIXED: tl.constexpr, SAVE_H: tl.constexpr,
          ACCUM: tl.constexpr, EXPAND: tl.constexpr, HAS_MASK: tl.constexpr, RS_P: tl.constexpr,
          RT_P: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, COMPUTE: tl.constexpr,
          PREC: tl.constexpr):
    """Shrink, scale, save H, expand for one block of rows. MIXED: the block holds several
    tasks (loop over t_lo..t_hi); else every valid row has task t_lo. Without EXPAND only
    H is computed (the shrink pass of linear_multi_lora_triton: no expand code, fewer registers).
    HAS_MASK: the shrink reads M * keep (LoRA dropout's 0/1 mask, uint8, k_rows/stride_kk)."""
    r_s = tl.arange(0, RS_P)
    r_t = tl.arange(0, RT_P)
    acc_s = tl.full((BM, RS_P), 0.0, dtype=tl.float32)
    acc_t = tl.full((BM, RT_P), 0.0, dtype=tl.float32)
    at_u = AT + tl.cast(t_lo, tl.int64) * sat_t
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        mask_k = kk < K
        x = _load_kept(m_rows + kk[None, :] * stride_mk, k_rows + kk[None, :] * stride_kk,
                       mask_m[:, None] & mask_k[None, :], HAS_MASK, COMPUTE)
        if HAS_S:
            w = tl.load(AS + r_s[None, :] * sas_r + kk[:, None] * sas_k,
                        mask=(r_s[None, :] < RS) & mask_k[:, None], other=0.0).to(COMPUTE)
            acc_s = tl.dot(x, w, acc_s, input_precision=PREC)
        if HAS_T:
            if MIXED:
                for t in range(t_lo, t_hi + 1):
                    wt = tl.load(AT + tl.cast(t, tl.int64) * sat_t + r_t[None, :] * sat_r + kk[:, None] * sat_k,
                                mask=(r_t[None, :] < RT) & mask_k[:, None], other=0.0).to(COMPUTE)
                    acc_t = tl.where(task[:, None] == t, tl.dot(x, wt, acc_t, input_precision=PREC), acc_t)
            else:
                wt = tl.load(at_u + r_t[None, :] * sat_r + kk[:, None] * sat_k,
                            mask=(r_t[None, :] < RT) & mask_k[:, None], other=0.0).to(COMPUTE)
                acc_t = tl.dot(x, wt, acc_t, input_precision=PREC)
    h_s = acc_s * scale_s
    h_t = tl.where(task[:, None] >= 0, acc_t, 0.0) * scale_t       # rows without a task: 0
    if SAVE_H:
        if HAS_S:
            tl.store(h_rows + r_s[None, :], h_s, mask=mask_m[:, None] & (r_s[None, :] < RS))
        if HAS_T:
            tl.store(h_rows + RS + r_t[None, :], h_t, mask=mask_m[:, None] & (r_t[None, :] < RT))
    if EXPAND:
        _expand(y_rows, stride_yn, h_s.to(COMPUTE), h_t.to(COMPUTE), mask_m, task, t_lo, t_hi,
                BS, sbs_n, sbs_r, BT, sbt_t, sbt_n, sbt_r, NOUT, RS, RT, HAS_S, HAS_T, MIXED, ACCUM,
                RS_P, RT_P, BM, BN, COMPUTE, PREC)


@triton.jit
def _expand(y_rows, stride_yn, hs, ht, mask_m, task, t_lo, t_hi, BS, sbs_n, sbs_r, BT, sbt_t, sbt_n, sbt_r,
            NOUT, RS, RT, HAS_S: tl.constexpr, HAS_T: tl.constexpr, MIXED: tl.constexpr, ACCUM: tl.constexpr,
            RS_P: tl.constexpr, RT_P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            COMPUTE: tl.constexpr, PREC: tl.constexpr):
    """Y[rows] (+)= hs @ B_s^T + ht @ B_t[task]^T over the whole written dimension."""
    for n0 in range(0, NOUT, BN):
        nn = n0 + tl.arange(0, BN)
        mask_n = nn < NOUT
        acc = _add_expand(tl.full((BM, BN), 0.0, dtype=tl.float32), hs, ht, task, t_lo, t_hi, nn, mask_n,
                          BS, sbs_n, sbs_r, BT, sbt_t, sbt_n, sbt_r, RS, RT, HAS_S, HAS_T, MIXED,
                          RS_P, RT_P, BM, COMPUTE, PREC)
        yp = y_rows + nn[None, :] * stride_yn
        m2 = mask_m[:, None] & mask_n[None, :]
        if ACCUM:                                # fused base add: y = base + delta
            acc += tl.load(yp, mask=m2, other=0.0).to(tl.float32)
        tl.store(yp, acc.to(yp.dtype.element_ty), mask=m2)


@triton.jit
def _add_expand(acc, hs, ht, task, t_lo, t_hi, nn, mask_n, BS, sbs_n, sbs_r, BT, sbt_t, sbt_n, sbt_r, RS, RT,
                HAS_S: tl.constexpr, HAS_T: tl.constexpr, MIXED: tl.constexpr, RS_P: tl.constexpr,
                RT_P: tl.constexpr, BM: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr):
    """acc + hs @ B_s[nn]^T + ht @ B_t[task][nn]^T for one tile of written columns ``nn``
    (B as (n, r) strides). MIXED: loop over t_lo..t_hi and keep each row's own task; else
    every row uses task t_lo (rows without a task carry ht = 0)."""
    r_s = tl.arange(0, RS_P)
    r_t = tl.arange(0, RT_P)
    if HAS_S:
        w = tl.load(BS + nn[None, :] * sbs_n + r_s[:, None] * sbs_r,
                    mask=(r_s[:, None] < RS) & mask_n[None, :], other=0.0).to(COMPUTE)
        acc = tl.dot(hs, w, acc, input_precision=PREC)
    if HAS_T:
        cols = nn[None, :] * sbt_n + r_t[:, None] * sbt_r
        cmask = (r_t[:, None] < RT) & mask_n[None, :]
        if MIXED:
            for t in range(t_lo, t_hi + 1):
                wb = tl.load(BT + tl.cast(t, tl.int64) * sbt_t + cols, mask=cmask, other=0.0).to(COMPUTE)
                hm = tl.where(task[:, None] == t, ht, tl.full((BM, RT_P), 0.0, dtype=COMPUTE))
                acc = tl.dot(hm, wb, acc, input_precision=PREC)
        else:
            wb = tl.load(BT + tl.cast(t_lo, tl.int64) * sbt_t + cols, mask=cmask, other=0.0).to(COMPUTE)
            acc = tl.dot(ht, wb, acc, input_precision=PREC)
    return acc


@triton.jit
def _lora_kernel(M, stride_mm, stride_mk, KEEP, stride_km, stride_kk, Y, stride_ym, stride_yn, H, IDS, FLAG,
                 AS, sas_r, sas_k, AT, sat_t, sat_r, sat_k,
                 BS, sbs_n, sbs_r, BT, sbt_t, sbt_n, sbt_r,
                 N_ROWS, K, NOUT, RS, RT, RC, T, scale_s, scale_t,
                 HAS_S: tl.constexpr, HAS_T: tl.constexpr, SAVE_H: tl.constexpr, ACCUM: tl.constexpr,
                 EXPAND: tl.constexpr, HAS_MASK: tl.constexpr, CHECK: tl.constexpr, RS_P: tl.constexpr, RT_P: tl.constexpr, BM: tl.constexpr,
                 BK: tl.constexpr, BN: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr):
    """Y[rows] (+)= scale * (M[rows] @ A^T) @ B^T for both adapters (see module docstring).
    Shrink weights as (r, k) strides, expand weights as (n, r) strides."""
    pid = tl.program_id(0)
    offs = pid * BM + tl.arange(0, BM)
    mask_m = offs < N_ROWS
    rows = offs.to(tl.int64)
    m_rows = M + rows[:, None] * stride_mm
    k_rows = KEEP + rows[:, None] * stride_km
    y_rows = Y + rows[:, None] * stride_ym
    h_rows = H + rows[:, None] * RC
    task = tl.full((BM,), 0, dtype=tl.int32)
    t_lo = pid * 0
    t_hi = pid * 0
    if HAS_T:
        task, t_lo, t_hi = _row_tasks(IDS, offs, mask_m, T)
        if CHECK:                                # ids outside [0, T): clear the flag (asserted on host)
            raw = tl.load(IDS + offs, mask=mask_m, other=0)
            bad = mask_m & ((raw < 0) | (raw >= T))
            tl.atomic_min(FLAG + offs * 0, tl.full((BM,), 0, dtype=tl.int32), mask=bad)
    if t_lo >= t_hi:     # one task (or none) in the block: the dense fast path
        t_u = tl.minimum(tl.maximum(t_lo, 0), tl.maximum(T - 1, 0))
        _tile(m_rows, stride_mk, k_rows, stride_kk, y_rows, stride_yn, h_rows, offs, mask_m, task, t_u, t_u,
              AS, sas_r, sas_k, AT, sat_t, sat_r, sat_k, BS, sbs_n, sbs_r, BT, sbt_t, sbt_n, sbt_r,
              K, NOUT, RS, RT, scale_s, scale_t, HAS_S, HAS_T, False, SAVE_H, ACCUM, EXPAND, HAS_MASK,
              RS_P, RT_P, BM, BK, BN, COMPUTE, PREC)
    else:
        _tile(m_rows, stride_mk, k_rows, stride_kk, y_rows, stride_yn, h_rows, offs, mask_m, task, t_lo, t_hi,
              AS, sas_r, sas_k, AT, sat_t, sat_r, sat_k, BS, sbs_n, sbs_r, BT, sbt_t, sbt_n, sbt_r,
              K, NOUT, RS, RT, scale_s, scale_t, HAS_S, HAS_T, True, SAVE_H, ACCUM, EXPAND, HAS_MASK,
              RS_P, RT_P, BM, BK, BN, COMPUTE, PREC)


@triton.jit
def _gemm_lora_kernel(X, sxm, sxk, W, swk, swn, Y, sym, syn, BIAS, H, IDS, KEEP, skm, skn,
                      ES, ses_n, ses_r, ET, set_t, set_n, set_r,
                      N_ROWS, NOUT, K, RS, RT, RC, T, M_BUCKET,
                      HAS_BIAS: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr, HAS_MASK: tl.constexpr,
                      RS_P: tl.constexpr, RT_P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                      COMPUTE: tl.constexpr, PREC: tl.constexpr):
    """Y = X @ W (+ bias) + H[:, :RS] @ E_s + H[:, RS:] @ E_t[task]: the frozen projection's
    GEMM with the Multi-LoRA expand in its epilogue, so the adapter output is added to the
    accumulator in registers (no second pass over Y). X [N, K], W as (k, n) strides, H the
    scaled rank-space activations [N, RC] fp32 from the shrink pass, E_s (n, r) and E_t
    (t, n, r) strides. Forward: X = x, W = weight^T, E = B. Backward (dX): X = dy,
    W = weight, H = dG, E = A^T; with HAS_MASK (LoRA dropout) the adapters' part is multiplied
    by the keep mask (uint8 [N, NOUT]) before it is added: dx = dy W + keep * (dG A).
    M_BUCKET only keys the autotuner (unused here)."""
    pid = tl.program_id(0)
    n_m = (N_ROWS + BM - 1) // BM
    n_n = (NOUT + BN - 1) // BN
    width = GROUP_M * n_n                       # grouped order: GROUP_M row blocks share W tiles in L2
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < N_ROWS
    mask_n = offs_n < NOUT
    rows = offs_m.to(tl.int64)
    kk = tl.arange(0, BK)
    x_ptrs = X + rows[:, None] * sxm + kk[None, :] * sxk
    w_ptrs = W + kk[:, None] * swk + offs_n[None, :].to(tl.int64) * swn
    acc = tl.full((BM, BN), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            mask_k = (k0 + kk) < K
            a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a.to(COMPUTE), b.to(COMPUTE), acc, input_precision=PREC)
        x_ptrs += BK * sxk
        w_ptrs += BK * swk
    # epilogue: the adapters' expand on this tile, from rank space (a few KB per tile)
    h_rows = H + rows[:, None] * RC
    r_s = tl.arange(0, RS_P)
    r_t = tl.arange(0, RT_P)
    hs = tl.full((BM, RS_P), 0.0, dtype=COMPUTE)
    ht = tl.full((BM, RT_P), 0.0, dtype=COMPUTE)
    task = tl.full((BM,), 0, dtype=tl.int32)
    t_lo = pid * 0
    t_hi = pid * 0
    if HAS_S:
        hs = tl.load(h_rows + r_s[None, :], mask=mask_m[:, None] & (r_s[None, :] < RS), other=0.0).to(COMPUTE)
    if HAS_T:                                  # rows without a valid task hold H = 0
        ht = tl.load(h_rows + RS + r_t[None, :], mask=mask_m[:, None] & (r_t[None, :] < RT), other=0.0).to(COMPUTE)
        task, t_lo, t_hi = _row_tasks(IDS, offs_m, mask_m, T)
    if HAS_MASK:
        base = acc
        acc = tl.full((BM, BN), 0.0, dtype=tl.float32)
    if t_lo >= t_hi:                           # one task in the tile (the model routes per sample)
        t_u = tl.minimum(tl.maximum(t_lo, 0), tl.maximum(T - 1, 0))
        acc = _add_expand(acc, hs, ht, task, t_u, t_u, offs_n, mask_n, ES, ses_n, ses_r, ET, set_t, set_n, set_r,
                          RS, RT, HAS_S, HAS_T, False, RS_P, RT_P, BM, COMPUTE, PREC)
    else:
        acc = _add_expand(acc, hs, ht, task, t_lo, t_hi, offs_n, mask_n, ES, ses_n, ses_r, ET, set_t, set_n, set_r,
                          RS, RT, HAS_S, HAS_T, True, RS_P, RT_P, BM, COMPUTE, PREC)
    if HAS_MASK:
        keep = tl.load(KEEP + rows[:, None] * skm + offs_n[None, :].to(tl.int64) * skn,
                       mask=mask_m[:, None] & mask_n[None, :], other=0)
        acc = base + tl.where(keep != 0, acc, 0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rows[:, None] * sym + offs_n[None, :].to(tl.int64) * syn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dw_body(M, smm, smd, KEEP, skm, skd, G, D, d0, PS, PT, IDS, CH_LO, CH_HI, c, write_range,
             start, end, RS, RT, RC, T, TRANS: tl.constexpr, MASKED: tl.constexpr,
             HAS_S: tl.constexpr, HAS_T: tl.constexpr, RS_P: tl.constexpr, RT_P: tl.constexpr,
             BM: tl.constexpr, BD: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr):
    """Partials of M[chunk]^T G[chunk] for one hidden tile: shared into PS[c], task t into
    PT[c, t] for every t in the chunk's task range; element (d, r) at d * R + r, or at
    r * D + d with TRANS. MASKED: M is multiplied by the keep mask (uint8, KEEP strides)."""
    offs_d = d0 + tl.arange(0, BD)
    mask_d = offs_d < D
    r_s = tl.arange(0, RS_P)
    r_t = tl.arange(0, RT_P)
    acc_s = tl.full((BD, RS_P), 0.0, dtype=tl.float32)
    if HAS_T:
        c_lo = T + 0
        c_hi = T * 0 - 1
        for m0 in range(start, end, BM):
            om = m0 + tl.arange(0, BM)
            _t, lo, hi = _row_tasks(IDS, om, om < end, T)
            c_lo = tl.minimum(c_lo, lo)
            c_hi = tl.maximum(c_hi, hi)
        if write_range:
            tl.store(CH_LO + c, c_lo)
            tl.store(CH_HI + c, c_hi)
        for t in range(c_lo, c_hi + 1):
            acc_t = tl.full((BD, RT_P), 0.0, dtype=tl.float32)
            for m0 in range(start, end, BM):
                om = m0 + tl.arange(0, BM)
                mm = om < end
                tk, lo, hi = _row_tasks(IDS, om, mm, T)
                if (lo <= t) & (t <= hi):
                    rows = om.to(tl.int64)
                    mt = _load_kept(M + rows[None, :] * smm + offs_d[:, None] * smd,             # [BD, BM]
                                    KEEP + rows[None, :] * skm + offs_d[:, None] * skd,
                                    mask_d[:, None] & mm[None, :], MASKED, COMPUTE)
                    g = G + rows[:, None] * RC
                    gt = tl.load(g + RS + r_t[None, :], mask=mm[:, None] & (r_t[None, :] < RT), other=0.0)
                    gt = tl.where(tk[:, None] == t, gt, 0.0).to(COMPUTE)
                    acc_t = tl.dot(mt, gt, acc_t, input_precision=PREC)
                    if HAS_S:
                        if lo == t:                  # each row block feeds the shared adapter once
                            gs = tl.load(g + r_s[None, :], mask=mm[:, None] & (r_s[None, :] < RS),
                                         other=0.0).to(COMPUTE)
                            acc_s = tl.dot(mt, gs, acc_s, input_precision=PREC)
            pt = PT + (tl.cast(c, tl.int64) * T + tl.cast(t, tl.int64)) * D * RT
            if TRANS:
                pt = pt + r_t[None, :] * D + offs_d[:, None]
            else:
                pt = pt + offs_d[:, None] * RT + r_t[None, :]
            tl.store(pt, acc_t,
                     mask=mask_d[:, None] & (r_t[None, :] < RT))
    else:
        for m0 in range(start, end, BM):
            om = m0 + tl.arange(0, BM)
            mm = om < end
            rows = om.to(tl.int64)
            mt = _load_kept(M + rows[None, :] * smm + offs_d[:, None] * smd,
                            KEEP + rows[None, :] * skm + offs_d[:, None] * skd,
                            mask_d[:, None] & mm[None, :], MASKED, COMPUTE)
            gs = tl.load(G + rows[:, None] * RC + r_s[None, :], mask=mm[:, None] & (r_s[None, :] < RS),
                         other=0.0).to(COMPUTE)
            acc_s = tl.dot(mt, gs, acc_s, input_precision=PREC)
    if HAS_S:
        ps = PS + tl.cast(c, tl.int64) * D * RS
        if TRANS:
            ps = ps + r_s[None, :] * D + offs_d[:, None]
        else:
            ps = ps + offs_d[:, None] * RS + r_s[None, :]
        tl.store(ps, acc_s,
                 mask=mask_d[:, None] & (r_s[None, :] < RS))


@triton.jit
def _dw_kernel(MB, smb_m, smb_d, GB, DB, PSB, PTB, MA, sma_m, sma_d, KEEP, skm, skd, GA, DA, PSA, PTA,
               IDS, CH_LO, CH_HI, N_ROWS, CHUNK, TILES_B, RS, RT, RC, T,
               HAS_S: tl.constexpr, HAS_T: tl.constexpr, HAS_MASK: tl.constexpr, RS_P: tl.constexpr, RT_P: tl.constexpr,
               BM: tl.constexpr, BD: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr):
    """Grid (chunks, hidden tiles of dB then of dA). dB partials are stored (d, r) as in
    b [out, r]; dA partials (r, d) as in a [r, in], so the sums land in place. HAS_MASK: the
    dA problem's M (x) is multiplied by the keep mask (LoRA dropout)."""
    c = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, N_ROWS)
    if pid_d < TILES_B:
        _dw_body(MB, smb_m, smb_d, KEEP, skm, skd, GB, DB, pid_d * BD, PSB, PTB, IDS, CH_LO, CH_HI,
                 c, pid_d == 0, start, end, RS, RT, RC, T, False, False, HAS_S, HAS_T, RS_P, RT_P, BM, BD, COMPUTE, PREC)
    else:
        _dw_body(MA, sma_m, sma_d, KEEP, skm, skd, GA, DA, (pid_d - TILES_B) * BD, PSA, PTA, IDS, CH_LO, CH_HI,
                 c, False, start, end, RS, RT, RC, T, True, HAS_MASK, HAS_S, HAS_T, RS_P, RT_P, BM, BD, COMPUTE, PREC)


@triton.jit
def _sum_chunks(P, chunk_stride, L, OUT, n_chunks, CH_LO, CH_HI, t, blk,
                GATE: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[i] = sum over chunks c (in order) of P[c * chunk_stride + i], i < L; with GATE only
    the chunks whose task range holds t (the others have no partial for t)."""
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.full((BLOCK,), 0.0, dtype=tl.float32)
    for c in range(0, n_chunks):
        take = True
        if GATE:
            take = (tl.load(CH_LO + c) <= t) & (t <= tl.load(CH_HI + c))
        if take:
            acc += tl.load(P + tl.cast(c, tl.int64) * chunk_stride + offs, mask=mask, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _wsum_kernel(PSB, PTB, PSA, PTA, CH_LO, CH_HI, N_CHUNKS, DB, DA, RS, RT, T,
                 GBS, GBT, GAS, GAT, HAS_S: tl.constexpr, HAS_T: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (2 * (T + 1), blocks): segment s of problem p (0: dB, 1: dA); s = 0 the shared
    adapter, s = t + 1 task t. Writes the final gradients in the weights' layouts."""
    seg = tl.program_id(0)
    blk = tl.program_id(1)
    p = seg // (T + 1)
    s = seg % (T + 1)
    if s == 0:
        if HAS_S:
            if p == 0:
                _sum_chunks(PSB, DB * RS, DB * RS, GBS, N_CHUNKS, CH_LO, CH_HI, s, blk, False, BLOCK)
            else:
                _sum_chunks(PSA, DA * RS, DA * RS, GAS, N_CHUNKS, CH_LO, CH_HI, s, blk, False, BLOCK)
    else:
        if HAS_T:
            t = s - 1
            if p == 0:
                off = tl.cast(t, tl.int64) * DB * RT
                _sum_chunks(PTB + off, T * DB * RT, DB * RT, GBT + off, N_CHUNKS, CH_LO, CH_HI, t, blk,
                            True, BLOCK)
            else:
                off = tl.cast(t, tl.int64) * DA * RT
                _sum_chunks(PTA + off, T * DA * RT, DA * RT, GAT + off, N_CHUNKS, CH_LO, CH_HI, t, blk,
                            True, BLOCK)


_gemm_lora_heur = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BK"] == 0})(_gemm_lora_kernel)
_gemm_lora_tuned = triton.autotune(
    configs=[triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=st, num_warps=wp)
             for bm, bn, bk, st, wp in GEMM_TILES],
    key=["NOUT", "K", "M_BUCKET", "swk", "HAS_S", "HAS_T", "HAS_MASK"],       # swk: forward or dX layout
    prune_configs_by={"early_config_prune": prune_gemm_tiles})(_gemm_lora_heur)
