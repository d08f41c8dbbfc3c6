"""Row routing for the segmented (SGMV-style) Multi-LoRA kernels. Pure torch, no triton.

Rows of a mixed-task batch are ordered by task with a stable argsort, so that each task
owns one contiguous *segment* of the sorted order. Kernels then work on *blocks* of at
most ``block`` sorted rows that never cross a segment boundary, so every program of a
launch multiplies its rows by exactly one task's weights (one dense ``tl.dot`` instead of
a gather of per-row weights).

Everything here stays on the device and never synchronises with the host: the number of
blocks depends on the per-task counts, so the grid is launched at a static upper bound
(``cdiv(N, block) + min(T, N)``: each non-empty segment wastes at most one partial block)
and the programs past the real block count see an empty row range and return at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class BlockTable:
    """Blocks of at most ``block`` sorted rows, none crossing a task segment.

    ``table[g] = (task, start, end)`` in sorted-row coordinates (``start == end`` for the
    padding programs past the real count); ``first[t]``/``last[t]`` (int32) delimit the
    blocks of task t, which the segmented weight-gradient reduction sums in order.
    """

    block: int
    n_programs: int
    table: torch.Tensor       # int32 [n_programs, 3]
    first: torch.Tensor       # int32 [T]
    last: torch.Tensor        # int32 [T]
    total: torch.Tensor       # int32 [1]: number of real blocks


@dataclass
class Routing:
    """Task routing of one batch; reusable by every Multi-LoRA layer of a forward pass.

    ``perm[i]`` is the original row of sorted position i (``None``: identity, when there
    is a single segment). Build it once per batch with :func:`make_routing` and pass it
    in place of ``task_ids`` to skip the per-layer argsort.
    """

    n_rows: int
    n_tasks: int
    perm: torch.Tensor | None
    counts: torch.Tensor      # int64 [T] rows per task
    seg_start: torch.Tensor   # int64 [T] first sorted row of each task
    _tables: dict = field(default_factory=dict, repr=False)

    def blocks(self, block: int) -> BlockTable:
        """Block table for ``block`` rows per program, in torch (cached per block size).

        The kernels build the same table with one Triton launch (``multi_lora._blocks``);
        this version is its reference in the tests."""
        if block not in self._tables:
            self._tables[block] = _block_table(self, block)
        return self._tables[block]


def check_task_ids(task_ids: torch.Tensor, n_tasks: int) -> None:
    """Fail on ids outside [0, n_tasks): a clear error on CPU, a device assert on CUDA.

    On CUDA a host-side check would synchronise every layer; ``torch._assert_async``
    raises at the next synchronisation instead (the message then names the condition).
    """
    if task_ids.numel() == 0:
        return
    if task_ids.is_cuda and hasattr(torch, "_assert_async"):
        lo, hi = task_ids.aminmax()
        ok = (lo >= 0) & (hi < n_tasks)
        try:
            torch._assert_async(ok, f"multi_lora: task_ids must lie in [0, {n_tasks})")
        except TypeError:                     # older torch: no message argument
            torch._assert_async(ok)
        return
    bad = (task_ids < 0) | (task_ids >= n_tasks)
    if bool(bad.any()):
        lo, hi = int(task_ids.min()), int(task_ids.max())
        raise ValueError(f"multi_lora: task_ids must lie in [0, {n_tasks}), got values in [{lo}, {hi}]")


def make_routing(task_ids: torch.Tensor | None, n_tasks: int, n_rows: int | None = None,
                 device: torch.device | None = None, check: bool = True) -> Routing:
    """Sort rows by task. ``task_ids=None`` or ``n_tasks == 1``: one segment, no sort."""
    if task_ids is not None:
        if task_ids.dim() != 1:
            raise ValueError(f"multi_lora: task_ids must be 1-D [N], got shape {tuple(task_ids.shape)}")
        if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
            raise TypeError(f"multi_lora: task_ids must be an integer tensor, got {task_ids.dtype}")
        n_rows = task_ids.numel() if n_rows is None else n_rows
        if task_ids.numel() != n_rows:
            raise ValueError(f"multi_lora: task_ids has {task_ids.numel()} entries for {n_rows} rows")
        device = task_ids.device
    if n_rows is None or device is None:
        raise ValueError("make_routing: give task_ids, or n_rows and device")
    if task_ids is None or n_tasks == 1:
        if task_ids is not None and check:
            check_task_ids(task_ids, n_tasks)
        counts = torch.full((1,), n_rows, dtype=torch.int64, device=device)
        return Routing(n_rows, 1, None, counts, torch.zeros(1, dtype=torch.int64, device=device))
    ids = task_ids.to(torch.int64)
    # stable: rows of one task keep their batch order, so results are reproducible.
    # Segment bounds by searchsorted on the sorted ids (torch.bincount would sync on CUDA).
    sorted_ids, perm = torch.sort(ids, stable=True)
    if check:
        check_task_ids(sorted_ids, n_tasks)
    tasks = torch.arange(n_tasks, device=ids.device, dtype=torch.int64)
    seg_start = torch.searchsorted(sorted_ids, tasks)
    counts = torch.searchsorted(sorted_ids, tasks, right=True) - seg_start
    return Routing(n_rows, n_tasks, perm, counts, seg_start)


def _block_table(r: Routing, block: int) -> BlockTable:
    t_count = r.n_tasks
    dev = r.counts.device
    nb = (r.counts + block - 1) // block                      # blocks per task
    cum = torch.cumsum(nb, 0)
    n_prog = cdiv(r.n_rows, block) + min(t_count, r.n_rows)   # static upper bound, no sync
    pid = torch.arange(n_prog, device=dev, dtype=torch.int64)
    task = torch.searchsorted(cum, pid, right=True)
    valid = task < t_count
    tc = task.clamp(max=t_count - 1)
    local = pid - (cum[tc] - nb[tc])
    start = r.seg_start[tc] + local * block
    end = torch.minimum(start + block, r.seg_start[tc] + r.counts[tc])
    zero = torch.zeros_like(start)
    table = torch.stack([torch.where(valid, tc, zero), torch.where(valid, start, zero),
                         torch.where(valid, end, zero)], 1).to(torch.int32).contiguous()
    return BlockTable(block, n_prog, table, (cum - nb).to(torch.int32), cum.to(torch.int32),
                      cum[-1:].to(torch.int32))
