"""Triton kernels of the fused Multi-LoRA op. Imported lazily by ``multi_lora.py`` only.

Four kernels serve the forward and the backward pass, because the two passes have the
same two shapes of work (``W`` is a shared ``[R, K]``-like matrix plus a per-task one, and
only the strides differ):

* ``_shrink_kernel``  P[s] = M[rows, k-range(s)] @ W^T, for the shared and the row's task
  adapter together: one pass over M (x in the forward, dy in the backward), the two
  ranks kept in two fp32 accumulators (i.e. concatenated along rank). The reduction
  dimension K (hidden, up to 8192) is split over ``grid[1]`` programs so that a small
  batch still fills the GPU; the partial sums land in a tiny fp32 buffer [S, N, rs+rt].
* ``_expand_kernel``  Y[rows, n-range(s)] (+)= sum_s(P)*scale @ W^T: sums the partials,
  scales them, optionally saves the scaled rank-space activations H (needed by the
  weight gradients), then writes both adapters' contributions to Y in one pass.
  Forward: M=x, W=A (shrink) and W=B (expand) -> delta. Backward: M=dy, W=B^T (shrink)
  and W=A^T (expand) -> dX, with H = dH (the scaled gradient in rank space).
* ``_dw_kernel``  per (row chunk, column tile): M[chunk rows]^T @ H[chunk rows] into a
  per-chunk fp32 partial, for the shared and the task adapter from one load of M.
* ``_seg_sum_kernel`` sums the chunk partials of each task segment (and of all chunks
  for the shared adapter) into the weight gradient.

Why a segment-sorted reduction rather than atomics for dA/dB: the rows arrive sorted by
task, so each chunk belongs to one task; the per-chunk partials are small (#chunks x D x r
fp32, ~20 MB at 16k tokens x 4096 x r=32, vs 134 MB for dy itself) and are summed in a
fixed order, so the gradients are deterministic run to run (atomics are not) and free of
contention (the shared adapter would see every chunk add into the same D x r floats).
The alternative of accumulating dB inside the dX pass would need a partial per row block
(as large as dy) or atomics, for the price it saves: one extra read of dy.

All products accumulate in fp32 (``tl.dot`` with an fp32 accumulator); fp32 inputs use
``input_precision="ieee"`` (not tf32) so the fp32 path meets 1e-5 relative error. Rank
dimensions are padded to a power of two >= 16 (``tl.dot`` minimum) and masked.
Sorted-row coordinates index P/H; original rows (through PERM) index M and Y.

Only Triton builtins are used (``tl.full``, not ``tl.zeros``/``tl.sum``, which are
``@triton.jit`` functions of ``triton.language.standard``): those library functions are
fixed as compiled-mode at ``import triton``, so avoiding them lets these kernels run
under ``TRITON_INTERPRET=1`` even when something (transformers does) imported triton
before the variable was set. Loop variables are cast with ``tl.cast`` because the
interpreter hands them over as Python ints.
"""

import triton
import triton.language as tl


@triton.jit
def _rows(PERM, TABLE, pid, BM: tl.constexpr, PERMUTED: tl.constexpr):
    """Sorted offsets, their mask and the original rows of block ``pid``."""
    start = tl.load(TABLE + pid * 3 + 1)
    end = tl.load(TABLE + pid * 3 + 2)
    offs = start + tl.arange(0, BM)
    mask = offs < end
    if PERMUTED:
        rows = tl.load(PERM + offs, mask=mask, other=0).to(tl.int64)
    else:
        rows = offs.to(tl.int64)
    return offs, mask, rows


@triton.jit
def _shrink_kernel(M, stride_mm, stride_mk, WS, sws_r, sws_k, WT, swt_t, swt_r, swt_k,
                   P, PERM, TABLE, N_ROWS, K, RS, RT, RC, TILES_PER_SPLIT,
                   HAS_S: tl.constexpr, HAS_T: tl.constexpr, PERMUTED: tl.constexpr,
                   RS_P: tl.constexpr, RT_P: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                   COMPUTE: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    task = tl.load(TABLE + pid * 3)
    if tl.load(TABLE + pid * 3 + 1) >= tl.load(TABLE + pid * 3 + 2):
        return                                   # padding program past the real blocks
    offs, mask_m, rows = _rows(PERM, TABLE, pid, BM, PERMUTED)
    r_s = tl.arange(0, RS_P)
    r_t = tl.arange(0, RT_P)
    acc_s = tl.full((BM, RS_P), 0.0, dtype=tl.float32)
    acc_t = tl.full((BM, RT_P), 0.0, dtype=tl.float32)
    m_rows = M + rows[:, None] * stride_mm
    wt = WT + task.to(tl.int64) * swt_t
    k_lo = split * TILES_PER_SPLIT * BK
    k_hi = tl.minimum(k_lo + TILES_PER_SPLIT * BK, K)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + tl.arange(0, BK)
        mask_k = kk < k_hi
        x = tl.load(m_rows + kk[None, :] * stride_mk, mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0).to(COMPUTE)
        if HAS_S:
            w = tl.load(WS + r_s[None, :] * sws_r + kk[:, None] * sws_k,
                        mask=(r_s[None, :] < RS) & mask_k[:, None], other=0.0).to(COMPUTE)
            acc_s = tl.dot(x, w, acc_s, input_precision=PREC)
        if HAS_T:
            w = tl.load(wt + r_t[None, :] * swt_r + kk[:, None] * swt_k,
                        mask=(r_t[None, :] < RT) & mask_k[:, None], other=0.0).to(COMPUTE)
            acc_t = tl.dot(x, w, acc_t, input_precision=PREC)
    p = P + split.to(tl.int64) * N_ROWS * RC + offs[:, None].to(tl.int64) * RC
    if HAS_S:
        tl.store(p + r_s[None, :], acc_s, mask=mask_m[:, None] & (r_s[None, :] < RS))
    if HAS_T:
        tl.store(p + RS + r_t[None, :], acc_t, mask=mask_m[:, None] & (r_t[None, :] < RT))


@triton.jit
def _expand_kernel(P, N_SPLITS, H, Y, stride_ym, stride_yn, WS, sws_n, sws_r,
                   WT, swt_t, swt_n, swt_r, PERM, TABLE, N_ROWS, NOUT, RS, RT, RC,
                   scale_s, scale_t, TILES_PER_SPLIT,
                   HAS_S: tl.constexpr, HAS_T: tl.constexpr, PERMUTED: tl.constexpr,
                   SAVE_H: tl.constexpr, ACCUM: tl.constexpr,
                   RS_P: tl.constexpr, RT_P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   COMPUTE: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    task = tl.load(TABLE + pid * 3)
    if tl.load(TABLE + pid * 3 + 1) >= tl.load(TABLE + pid * 3 + 2):
        return
    offs, mask_m, rows = _rows(PERM, TABLE, pid, BM, PERMUTED)
    r_s = tl.arange(0, RS_P)
    r_t = tl.arange(0, RT_P)
    ms = mask_m[:, None] & (r_s[None, :] < RS)
    mt = mask_m[:, None] & (r_t[None, :] < RT)
    # sum the shrink partials of this block's rows (fp32, a few KB, L2-resident)
    h_s = tl.full((BM, RS_P), 0.0, dtype=tl.float32)
    h_t = tl.full((BM, RT_P), 0.0, dtype=tl.float32)
    p = P + offs[:, None].to(tl.int64) * RC
    for s in range(0, N_SPLITS):
        ps = p + tl.cast(s, tl.int64) * N_ROWS * RC
        if HAS_S:
            h_s += tl.load(ps + r_s[None, :], mask=ms, other=0.0)
        if HAS_T:
            h_t += tl.load(ps + RS + r_t[None, :], mask=mt, other=0.0)
    h_s = h_s * scale_s
    h_t = h_t * scale_t
    if SAVE_H:
        if split == 0:
            hp = H + offs[:, None].to(tl.int64) * RC
            if HAS_S:
                tl.store(hp + r_s[None, :], h_s, mask=ms)
            if HAS_T:
                tl.store(hp + RS + r_t[None, :], h_t, mask=mt)
    hs = h_s.to(COMPUTE)
    ht = h_t.to(COMPUTE)
    wt = WT + task.to(tl.int64) * swt_t
    y_rows = Y + rows[:, None] * stride_ym
    n_lo = split * TILES_PER_SPLIT * BN
    n_hi = tl.minimum(n_lo + TILES_PER_SPLIT * BN, NOUT)
    for n0 in range(n_lo, n_hi, BN):
        nn = n0 + tl.arange(0, BN)
        mask_n = nn < n_hi
        acc = tl.full((BM, BN), 0.0, dtype=tl.float32)
        if HAS_S:
            w = tl.load(WS + nn[None, :] * sws_n + r_s[:, None] * sws_r,
                        mask=(r_s[:, None] < RS) & mask_n[None, :], other=0.0).to(COMPUTE)
            acc = tl.dot(hs, w, acc, input_precision=PREC)
        if HAS_T:
            w = tl.load(wt + nn[None, :] * swt_n + r_t[:, None] * swt_r,
                        mask=(r_t[:, None] < RT) & mask_n[None, :], other=0.0).to(COMPUTE)
            acc = tl.dot(ht, w, acc, input_precision=PREC)
        yp = y_rows + nn[None, :] * stride_yn
        m2 = mask_m[:, None] & mask_n[None, :]
        if ACCUM:                                # fused base add: y = base + delta
            acc += tl.load(yp, mask=m2, other=0.0).to(tl.float32)
        tl.store(yp, acc.to(Y.dtype.element_ty), mask=m2)


@triton.jit
def _dw_kernel(M, stride_mm, stride_md, G, PS, PT, PERM, TABLE, D, RS, RT, RC,
               HAS_S: tl.constexpr, HAS_T: tl.constexpr, PERMUTED: tl.constexpr,
               RS_P: tl.constexpr, RT_P: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
               COMPUTE: tl.constexpr, PREC: tl.constexpr):
    chunk = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = tl.load(TABLE + chunk * 3 + 1)
    end = tl.load(TABLE + chunk * 3 + 2)
    if start >= end:
        return
    offs_d = pid_d * BD + tl.arange(0, BD)
    mask_d = offs_d < D
    r_s = tl.arange(0, RS_P)
    r_t = tl.arange(0, RT_P)
    acc_s = tl.full((BD, RS_P), 0.0, dtype=tl.float32)
    acc_t = tl.full((BD, RT_P), 0.0, dtype=tl.float32)
    for m0 in range(start, end, BM):
        om = m0 + tl.arange(0, BM)
        mask_m = om < end
        if PERMUTED:
            rows = tl.load(PERM + om, mask=mask_m, other=0).to(tl.int64)
        else:
            rows = om.to(tl.int64)
        mt = tl.load(M + rows[None, :] * stride_mm + offs_d[:, None] * stride_md,
                     mask=mask_d[:, None] & mask_m[None, :], other=0.0).to(COMPUTE)   # [BD, BM]
        g = G + om[:, None].to(tl.int64) * RC
        if HAS_S:
            gs = tl.load(g + r_s[None, :], mask=mask_m[:, None] & (r_s[None, :] < RS),
                         other=0.0).to(COMPUTE)
            acc_s = tl.dot(mt, gs, acc_s, input_precision=PREC)
        if HAS_T:
            gt = tl.load(g + RS + r_t[None, :], mask=mask_m[:, None] & (r_t[None, :] < RT),
                         other=0.0).to(COMPUTE)
            acc_t = tl.dot(mt, gt, acc_t, input_precision=PREC)
    md = mask_d[:, None]
    if HAS_S:
        ps = PS + chunk.to(tl.int64) * D * RS + offs_d[:, None] * RS + r_s[None, :]
        tl.store(ps, acc_s, mask=md & (r_s[None, :] < RS))
    if HAS_T:
        pt = PT + chunk.to(tl.int64) * D * RT + offs_d[:, None] * RT + r_t[None, :]
        tl.store(pt, acc_t, mask=md & (r_t[None, :] < RT))


@triton.jit
def _seg_sum_kernel(P, FIRST, LAST, OUT, so_t, so_d, so_r, DR, R, BLOCK: tl.constexpr):
    """OUT[seg] = sum of chunk partials FIRST[seg]..LAST[seg]-1, in order (deterministic)."""
    seg = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < DR
    c0 = tl.load(FIRST + seg)
    c1 = tl.load(LAST + seg)
    acc = tl.full((BLOCK,), 0.0, dtype=tl.float32)
    for c in range(c0, c1):
        acc += tl.load(P + tl.cast(c, tl.int64) * DR + offs, mask=mask, other=0.0)
    d = offs // R
    r = offs % R
    tl.store(OUT + seg.to(tl.int64) * so_t + d * so_d + r * so_r, acc.to(OUT.dtype.element_ty),
             mask=mask)


@triton.jit
def _route_kernel(COUNTS, SEG_START, T, BLOCK_ROWS, TABLE, FIRST, LAST, TOTAL):
    """Block table of one block size in a single launch (vs ~25 small torch ops per call).

    Program g scans the T per-task counts in order and keeps the (task, start, end) of the
    block it falls in; program 0 also writes each task's block range and the total.
    Padding programs past the total get an empty range (start = end = 0).
    """
    pid = tl.program_id(0)
    acc = pid * 0
    task = pid * 0
    start = pid * 0
    end = pid * 0
    for t in range(0, T):
        c = tl.load(COUNTS + t).to(tl.int32)
        s0 = tl.load(SEG_START + t).to(tl.int32)
        nb = (c + BLOCK_ROWS - 1) // BLOCK_ROWS
        if pid == 0:
            tl.store(FIRST + t, acc)
            tl.store(LAST + t, acc + nb)
        inside = (pid >= acc) & (pid < acc + nb)
        first_row = s0 + (pid - acc) * BLOCK_ROWS
        task = tl.where(inside, t, task)
        start = tl.where(inside, first_row, start)
        end = tl.where(inside, tl.minimum(first_row + BLOCK_ROWS, s0 + c), end)
        acc += nb
    tl.store(TABLE + pid * 3, task)
    tl.store(TABLE + pid * 3 + 1, start)
    tl.store(TABLE + pid * 3 + 2, end)
    if pid == 0:
        tl.store(TOTAL, acc)
