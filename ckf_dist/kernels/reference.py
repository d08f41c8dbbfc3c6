"""Plain-torch references for the Multi-LoRA op (tests and benchmarks; no triton).

``multi_lora_reference`` is the definition the fused kernels are checked against: a loop
over tasks in a chosen precision (float64 by default), differentiable by autograd, so the
reference gradients come from ``backward`` on the same code. ``multi_lora_naive`` is the
"obvious" per-task loop in the input precision, the baseline the benchmark compares with.
"""

from __future__ import annotations

import torch


def multi_lora_reference(x, a_shared, b_shared, a_task, b_task, task_ids, scale_shared, scale_task,
                         dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """delta[n] = s_s * B_s A_s x[n] + s_t * B_t[task[n]] A_t[task[n]] x[n], computed in ``dtype``.

    ``dtype=None`` keeps the inputs' precision. Weights in peft layout: A ``[r, in]``,
    B ``[out, r]``; task weights stacked along a leading task dimension.
    """
    cast = (lambda t: t if t is None or dtype is None else t.to(dtype))
    x, a_s, b_s, a_t, b_t = map(cast, (x, a_shared, b_shared, a_task, b_task))
    n_out = b_s.shape[0] if b_s is not None else b_t.shape[1]
    y = x.new_zeros(x.shape[0], n_out)
    if a_s is not None:
        y = y + scale_shared * ((x @ a_s.t()) @ b_s.t())
    if a_t is not None:
        for t in range(a_t.shape[0]):
            rows = (task_ids == t).nonzero().flatten()
            if rows.numel():
                part = scale_task * ((x[rows] @ a_t[t].t()) @ b_t[t].t())
                y = y.index_add(0, rows, part)
    return y


def multi_lora_naive(x, a_shared, b_shared, a_task, b_task, task_ids, scale_shared, scale_task):
    """The per-task loop a first implementation writes: gather each task's rows, two small
    matmuls, scatter back (one host sync per task for the row list, several launches each)."""
    n_out = b_shared.shape[0] if b_shared is not None else b_task.shape[1]
    y = torch.zeros(x.shape[0], n_out, dtype=x.dtype, device=x.device)
    if a_shared is not None:
        y = y + (x @ a_shared.t()) @ b_shared.t() * scale_shared
    if a_task is not None:
        for t in range(a_task.shape[0]):
            rows = (task_ids == t).nonzero().squeeze(1)
            if rows.numel():
                y = y.index_add(0, rows, (x[rows] @ a_task[t].t()) @ b_task[t].t() * scale_task)
    return y
