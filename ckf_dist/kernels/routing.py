"""Row routing for the fused Multi-LoRA kernels. Pure torch, no triton.

The kernels need no sorted order and no block tables: each block of rows reads its rows'
task ids and handles the tasks it holds (one, almost always: the model routes per
sample). A :class:`Routing` is therefore only the validated per-row task ids; building one
once per batch (``make_routing``) and passing it to every layer skips the per-call
validation. Nothing here synchronises with the host on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Routing:
    """Task routing of one batch; reusable by every Multi-LoRA layer of a forward pass.

    ``task_ids`` is the contiguous int tensor ``[n_rows]`` of per-row task ids (``None``
    when there is no task adapter). Build it with :func:`make_routing` and pass it in place
    of ``task_ids``.
    """

    n_rows: int
    n_tasks: int
    task_ids: torch.Tensor | None


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
    """Validate the task ids once (``check``); ``task_ids=None``: no task adapter."""
    if task_ids is not None:
        if task_ids.dim() != 1:
            raise ValueError(f"multi_lora: task_ids must be 1-D [N], got shape {tuple(task_ids.shape)}")
        if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
            raise TypeError(f"multi_lora: task_ids must be an integer tensor, got {task_ids.dtype}")
        n_rows = task_ids.numel() if n_rows is None else n_rows
        if task_ids.numel() != n_rows:
            raise ValueError(f"multi_lora: task_ids has {task_ids.numel()} entries for {n_rows} rows")
        if check:
            check_task_ids(task_ids, n_tasks)
        return Routing(n_rows, n_tasks, task_ids.contiguous())
    if n_rows is None:
        raise ValueError("make_routing: give task_ids, or n_rows")
    return Routing(n_rows, n_tasks, None)
