"""Shared by the interpreter tests of the fused kernels (test_kernels.py, test_kernels_linear.py).

The interpreter is chosen when the kernels are defined (``triton.jit`` reads the variable
then); ``ckf_dist.kernels`` defines them lazily on the first call, so the module fixture
``interpreter`` (imported by each test module, autouse there) sets ``TRITON_INTERPRET=1``
for those tests only and restores it afterwards, leaving other test modules untouched.
Every buffer the ops allocate is poisoned with NaN, so an element a kernel forgets to write
fails the comparison (NaN never compares below a tolerance) and the explicit ``isfinite``
checks.
"""

from __future__ import annotations

import pytest
import torch

import ckf_dist.kernels.multi_lora as ml

@pytest.fixture(autouse=True, scope="module")
def interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        ml.POISON_BUFFERS = True
        yield
        ml.POISON_BUFFERS = False


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref||, NaN when a has any non-finite element."""
    a = a.detach().double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def task_ids_for(kind: str, n: int, t: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "distinct":                      # every row its own task (n == t)
        return torch.randperm(t, generator=gen)[:n]
    if kind == "uniform":
        return torch.randint(0, t, (n,), generator=gen)
    if kind == "zipf":                          # P(k) ~ 1/(k+1)^2: one task dominates
        p = 1.0 / torch.arange(1, t + 1, dtype=torch.float64) ** 2
        return torch.multinomial(p, n, replacement=True, generator=gen)
    if kind == "one":                           # the whole batch is one (non-first) task
        return torch.full((n,), t - 1, dtype=torch.int64)
    if kind == "empty":                         # tasks 1 and 3.. never appear
        return torch.tensor([0, 2])[torch.randint(0, 2, (n,), generator=gen)]
    raise ValueError(kind)


def make_inputs(n, d_in, d_out, rs, rt, t, dtype=torch.float32, seed=0):
    """Fresh random inputs, no zeros; weights of realistic LoRA magnitude."""
    gen = torch.Generator().manual_seed(seed)
    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype).requires_grad_()
    x = r(n, d_in)
    a_s = r(rs, d_in, s=d_in ** -0.5) if rs else None
    b_s = r(d_out, rs, s=0.5) if rs else None
    a_t = r(t, rt, d_in, s=d_in ** -0.5) if rt else None
    b_t = r(t, d_out, rt, s=0.5) if rt else None
    return x, a_s, b_s, a_t, b_t, gen
