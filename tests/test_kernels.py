"""The fused Multi-LoRA op (``multi_lora_triton``) vs an fp64 reference, on CPU under
TRITON_INTERPRET=1, with every buffer it allocates poisoned (see kernel_helpers.py).
The projection with the adapters in its GEMM is in test_kernels_linear.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from ckf_dist.kernels import KernelConfig, make_routing, multi_lora_reference, multi_lora_triton  # noqa: E402
from kernel_helpers import interpreter, make_inputs, rel, task_ids_for  # noqa: E402,F401  (interpreter: autouse)


def check(n, d_in, d_out, rs, rt, t, kind, dtype=torch.float32, tol=1e-5, config=None, seed=0,
          scales=(2.0, 0.75)):
    x, a_s, b_s, a_t, b_t, gen = make_inputs(n, d_in, d_out, rs, rt, t, dtype, seed)
    ids = task_ids_for(kind, n, t, gen)
    y = multi_lora_triton(x, a_s, b_s, a_t, b_t, ids, *scales, config=config)
    assert y.shape == (n, d_out) and y.dtype == dtype
    dy = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    leaves = [v for v in (x, a_s, b_s, a_t, b_t) if v is not None]
    grads = torch.autograd.grad(y, leaves, dy.to(dtype))
    ref = multi_lora_reference(x, a_s, b_s, a_t, b_t, ids, *scales)
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    errs = {"y": rel(y, ref)}
    names = [k for k, v in zip(("x", "a_shared", "b_shared", "a_task", "b_task"),
                               (x, a_s, b_s, a_t, b_t)) if v is not None]
    for name, g, gr, leaf in zip(names, grads, ref_grads, leaves):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, name
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient (unwritten element?)"
        if gr.norm() == 0:                      # e.g. only empty tasks' rows: must be exactly 0
            assert g.abs().max() == 0, name
            continue
        errs[name] = rel(g, gr)
    if kind == "empty" and a_t is not None:     # unused task adapters get exact zeros
        used = set(ids.tolist())
        for k in range(t):
            if k not in used:
                assert grads[names.index("a_task")][k].abs().max() == 0
                assert grads[names.index("b_task")][k].abs().max() == 0
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errs})"
    return errs


# (n, in, out, rs, rt, T, distribution): odd sizes, none a multiple of the 16/64 tiles
CASES = [
    (37, 40, 50, 8, 12, 3, "uniform"),
    (12, 33, 29, 8, 8, 12, "distinct"),
    (64, 96, 72, 16, 16, 6, "zipf"),
    (45, 57, 96, 16, 8, 4, "one"),
    (50, 48, 35, 8, 16, 5, "empty"),
    (23, 64, 64, 16, 16, 1, "one"),
    (1, 17, 19, 8, 8, 4, "uniform"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_fp64_reference_fp32(case):
    check(*case)


@pytest.mark.parametrize("config", [
    KernelConfig(block_m=16, block_k=16, block_n=16, block_d=16, block_dm=16, chunk=16),
    KernelConfig(block_m=32, block_k=32, block_n=32, block_d=32, block_dm=32, chunk=64),
    KernelConfig(block_m=64, block_k=64, block_n=64, block_d=64, block_dm=16, chunk=4096),
], ids=["many-chunks", "few-chunks", "one-chunk"])
def test_tilings_agree(config):
    """K/N loops over several tiles, and dW over one to many row chunks (in-order sums)."""
    check(61, 70, 45, 8, 16, 4, "zipf", config=config, seed=3)


@pytest.mark.parametrize("rs,rt", [(16, 0), (0, 16)], ids=["shared-only", "task-only"])
def test_single_adapter_kinds(rs, rt):
    check(29, 40, 36, rs, rt, 3, "uniform", seed=5)


def test_rank_64():
    check(20, 64, 48, 64, 32, 2, "uniform", seed=7, config=KernelConfig(block_k=32, block_n=32))


def test_fp16():
    """fp16 storage, fp32 accumulation: error ~ fp16 rounding of inputs/outputs."""
    errs = check(40, 48, 40, 8, 16, 3, "zipf", dtype=torch.float16, tol=2e-3, seed=11)
    assert errs["y"] > 0                      # really computed at fp16 storage, not a copy


def test_bf16_storage():
    """bf16 storage (the interpreter computes in fp32 after the upcast in the kernels)."""
    check(40, 48, 40, 8, 16, 3, "uniform", dtype=torch.bfloat16, tol=1e-2, seed=13)


def test_weights_in_other_dtype_are_cast():
    x, a_s, b_s, a_t, b_t, gen = make_inputs(16, 32, 24, 8, 8, 2, torch.float16, seed=2)
    a32 = a_s.detach().float().requires_grad_()
    ids = torch.randint(0, 2, (16,), generator=gen)
    y = multi_lora_triton(x, a32, b_s, a_t, b_t, ids, 1.0, 1.0)
    assert y.dtype == torch.float16
    (g,) = torch.autograd.grad(y.float().sum(), [a32])
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


def test_out_accumulates_base_and_passes_its_gradient():
    x, a_s, b_s, a_t, b_t, gen = make_inputs(33, 40, 30, 8, 8, 3, seed=4)
    w = torch.randn(30, 40, generator=gen, dtype=torch.float64).float()
    ids = torch.randint(0, 3, (33,), generator=gen)
    y = multi_lora_triton(x, a_s, b_s, a_t, b_t, ids, 2.0, 1.0, out=torch.nn.functional.linear(x, w))
    ref = torch.nn.functional.linear(x.double(), w.double()) + multi_lora_reference(
        x, a_s, b_s, a_t, b_t, ids, 2.0, 1.0)
    dy = torch.randn(33, 30, generator=gen, dtype=torch.float64)
    gx, gb = torch.autograd.grad(y, [x, b_t], dy.float())
    rx, rb = torch.autograd.grad(ref, [x, b_t], dy)
    assert rel(y, ref) < 1e-5 and rel(gx, rx) < 1e-5 and rel(gb, rb) < 1e-5


def test_out_may_be_a_view_of_the_base_output():
    """The model's pattern: base y [B, L, out], accumulate into y.view(-1, out)."""
    x, a_s, b_s, a_t, b_t, gen = make_inputs(15, 24, 20, 8, 8, 2, seed=12)
    w = torch.randn(20, 24, generator=gen, dtype=torch.float64).float()
    ids = torch.tensor([0, 1, 1]).repeat_interleave(5)
    x3 = x.view(3, 5, 24)
    y = torch.nn.functional.linear(x3, w)
    multi_lora_triton(x3.reshape(-1, 24), a_s, b_s, a_t, b_t, ids, 2.0, 1.0, out=y.view(-1, 20))
    ref = (torch.nn.functional.linear(x.double(), w.double())
           + multi_lora_reference(x, a_s, b_s, a_t, b_t, ids, 2.0, 1.0)).view(3, 5, 20)
    dy = torch.randn(3, 5, 20, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, [x, a_s, b_t], dy.float())
    want = torch.autograd.grad(ref, [x, a_s, b_t], dy)
    assert rel(y, ref) < 1e-5 and all(rel(g, r) < 1e-5 for g, r in zip(got, want))


def test_routing_object_reused_across_layers():
    x, a_s, b_s, a_t, b_t, gen = make_inputs(30, 24, 20, 8, 8, 4, seed=6)
    ids = task_ids_for("zipf", 30, 4, gen)
    routing = make_routing(ids, 4)
    y1 = multi_lora_triton(x, a_s, b_s, a_t, b_t, routing, 1.5, 0.5)
    y2 = multi_lora_triton(x, a_s, b_s, a_t, b_t, ids, 1.5, 0.5)
    assert torch.equal(y1, y2)
    with pytest.raises(ValueError, match="routing built for"):
        multi_lora_triton(x[:5], a_s, b_s, a_t, b_t, routing, 1.0, 1.0)


def test_deterministic_gradients():
    def run():
        x, a_s, b_s, a_t, b_t, gen = make_inputs(40, 32, 32, 8, 8, 2, seed=8)
        ids = torch.randint(0, 2, (40,), generator=gen)
        y = multi_lora_triton(x, a_s, b_s, a_t, b_t, ids, 1.0, 1.0,
                              config=KernelConfig(block_m=16, chunk=16, block_dm=16, block_k=16))
        return torch.autograd.grad(y.sum(), [x, a_s, b_s, a_t, b_t])
    for g1, g2 in zip(run(), run()):
        assert torch.equal(g1, g2)


def test_frozen_weights_skip_weight_gradients():
    """CF stream: LoRA weights are constants, only dx flows (no dW kernels run)."""
    x, a_s, b_s, a_t, b_t, gen = make_inputs(20, 24, 16, 8, 8, 2, seed=9)
    ids = torch.randint(0, 2, (20,), generator=gen)
    ws = [w.detach() for w in (a_s, b_s, a_t, b_t)]
    y = multi_lora_triton(x, *ws, ids, 2.0, 1.0)
    (gx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
    (rx,) = torch.autograd.grad(multi_lora_reference(x, *ws, ids, 2.0, 1.0), [x],
                                torch.ones(20, 16, dtype=torch.float64))
    assert rel(gx, rx) < 1e-5


def test_empty_batch():
    x, a_s, b_s, a_t, b_t, _ = make_inputs(0, 24, 16, 8, 8, 2)
    y = multi_lora_triton(x, a_s, b_s, a_t, b_t, torch.zeros(0, dtype=torch.int64), 1.0, 1.0)
    assert y.shape == (0, 16)
    g = torch.autograd.grad(y.sum(), [a_t])[0]
    assert torch.equal(g, torch.zeros_like(g))


def test_bad_inputs_raise_clear_errors(monkeypatch):
    x, a_s, b_s, a_t, b_t, _ = make_inputs(8, 24, 16, 8, 8, 2)
    ids = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\)"):
        multi_lora_triton(x, a_s, b_s, a_t, b_t, ids + 2, 1.0, 1.0)
    with pytest.raises(ValueError, match="task shapes"):
        multi_lora_triton(x, a_s, b_s, a_t[:, :, :5], b_t, ids, 1.0, 1.0)
    with pytest.raises(ValueError, match="both A and B"):
        multi_lora_triton(x, a_s, None, a_t, b_t, ids, 1.0, 1.0)
    with pytest.raises(ValueError, match="entries for 8 rows"):
        multi_lora_triton(x, a_s, b_s, a_t, b_t, ids[:3], 1.0, 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors.*multi_lora_torch"):
        multi_lora_triton(x, a_s, b_s, a_t, b_t, ids, 1.0, 1.0)


@pytest.mark.parametrize("layout", ["per-sample", "interleaved", "runs"])
def test_uniform_and_mixed_row_blocks(layout):
    """Row blocks holding one task (the dense fast path) and several (the per-task loop),
    in the model's per-sample layout and with tasks interleaved row by row."""
    n, t = 70, 4
    if layout == "per-sample":                 # 5 samples of 14 tokens: most blocks hold one task
        ids = torch.tensor([2, 0, 3, 0, 1]).repeat_interleave(14)
    elif layout == "interleaved":              # every block holds every task
        ids = torch.arange(n) % t
    else:                                      # runs of 3 with gaps: blocks hold 1-4 tasks, some skipped
        ids = torch.tensor([3, 3, 3, 1, 1, 1, 3, 3, 3, 0, 0, 0]).repeat(6)[:n]
    x, a_s, b_s, a_t, b_t, gen = make_inputs(n, 40, 36, 8, 16, t, seed=21)
    y = multi_lora_triton(x, a_s, b_s, a_t, b_t, ids, 1.5, 0.5,
                          config=KernelConfig(block_m=16, block_k=16, block_n=16, block_dm=16, chunk=32))
    dy = torch.randn(n, 36, generator=gen, dtype=torch.float64)
    leaves = [x, a_s, b_s, a_t, b_t]
    got = torch.autograd.grad(y, leaves, dy.float())
    ref = multi_lora_reference(x, a_s, b_s, a_t, b_t, ids, 1.5, 0.5)
    want = torch.autograd.grad(ref, leaves, dy)
    assert rel(y, ref) < 1e-5
    for name, g, w in zip(("x", "a_s", "b_s", "a_t", "b_t"), got, want):
        assert rel(g, w) < 1e-5, name


def test_routing_carries_validated_ids():
    ids = torch.tensor([1, 0, 1, 2])
    r = make_routing(ids, 3)
    assert r.n_rows == 4 and r.n_tasks == 3 and torch.equal(r.task_ids, ids)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        make_routing(ids + 1, 3)


def test_imports_without_triton():
    """ckf_dist.kernels must import (and say no) on a machine without triton."""
    code = (
        "import sys, os; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch, ckf_dist.kernels as k\n"
        "assert not k.triton_available()\n"
        "x = torch.randn(4, 8); a = torch.randn(2, 8); b = torch.randn(3, 2)\n"
        "try:\n"
        "    k.multi_lora_triton(x, a, b, None, None, torch.zeros(4, dtype=torch.long), 1.0, 1.0)\n"
        "except RuntimeError as e:\n"
        "    assert 'needs triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error without triton')\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('OK')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
