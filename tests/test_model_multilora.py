"""Multi-LoRA op and layer: the fast mixed-batch path against a per-task reference loop."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from ckf_dist.model.lora_ops import LoraWeights, linear_per_sample_lora, lora_dropout, per_sample_lora
from ckf_dist.model.multi_lora import AdapterSpec, LoraRouting, MultiLoraLinear, multi_lora_torch


def reference_loop(x, a_s, b_s, a_t, b_t, task_ids, s_s, s_t):
    """Straightforward reference: loop over tasks, each task's rows through its own adapter."""
    out = torch.zeros(x.shape[0], (b_s if b_s is not None else b_t[0]).shape[0], dtype=x.dtype)
    if a_s is not None:
        out = out + s_s * (x @ a_s.t() @ b_s.t())
    if a_t is not None:
        for t in range(a_t.shape[0]):
            rows = (task_ids == t).nonzero().squeeze(-1)
            out = out.index_add(0, rows, s_t * (x[rows] @ a_t[t].t() @ b_t[t].t()))
    return out


def _weights(n_in=24, n_out=20, rs=4, rt=3, n_tasks=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(True)  # noqa: E731
    return mk(rs, n_in), mk(n_out, rs), mk(n_tasks, rt, n_in), mk(n_tasks, n_out, rt)


@pytest.mark.parametrize("kinds", ["both", "shared", "task"])
def test_op_matches_reference_outputs_and_grads(kinds):
    torch.manual_seed(0)
    a_s, b_s, a_t, b_t = _weights()
    if kinds == "shared":
        a_t = b_t = None
    if kinds == "task":
        a_s = b_s = None
    x = torch.randn(37, 24, dtype=torch.float64, requires_grad=True)
    task_ids = torch.randint(0, 4, (37,))
    task_ids[:4] = torch.arange(4)          # every task present
    g_out = torch.randn(37, 20, dtype=torch.float64)
    params = [p for p in (x, a_s, b_s, a_t, b_t) if p is not None]

    fast = multi_lora_torch(x, a_s, b_s, a_t, b_t, task_ids, 0.5, 2.0)
    grads_fast = torch.autograd.grad(fast, params, g_out)
    ref = reference_loop(x, a_s, b_s, a_t, b_t, task_ids, 0.5, 2.0)
    grads_ref = torch.autograd.grad(ref, params, g_out)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    for gf, gr in zip(grads_fast, grads_ref):
        torch.testing.assert_close(gf, gr, rtol=1e-12, atol=1e-12)
    if a_t is not None:   # every task adapter receives a gradient (the reference script trained only one)
        for t in range(4):
            assert grads_fast[-1][t].abs().sum() > 0 and grads_fast[-2][t].abs().sum() > 0


def test_op_rejects_no_adapter():
    with pytest.raises(ValueError, match="neither"):
        multi_lora_torch(torch.randn(2, 3), None, None, None, None, torch.zeros(2, dtype=torch.long), 1.0, 1.0)


def _layer(base, shared_index=None, task_index=None, dropout=0.0):
    routing = LoraRouting()
    layer = MultiLoraLinear(base, "proj", 3, AdapterSpec(4, 8.0, shared_index), AdapterSpec(2, 4.0, task_index),
                            dropout, routing)
    return layer, routing


def test_layer_starts_as_base_and_routes_per_sample():
    torch.manual_seed(0)
    base = nn.Linear(16, 12).double().requires_grad_(False)
    layer, routing = _layer(base)
    x = torch.randn(5, 7, 16, dtype=torch.float64)
    ids = torch.tensor([0, 2, 1, 2, 0])
    with routing.active(ids):
        torch.testing.assert_close(layer(x), base(x))          # B = 0 at init
        nn.init.normal_(layer.lora_shared_B)
        nn.init.normal_(layer.lora_task_B)
        y = layer(x)
    for i, t in enumerate(ids.tolist()):                       # per-sample reference
        ref = base(x[i]) + 2.0 * x[i] @ layer.lora_shared_A.t() @ layer.lora_shared_B.t() \
            + 2.0 * x[i] @ layer.lora_task_A[t].t() @ layer.lora_task_B[t].t()
        torch.testing.assert_close(y[i], ref)


def test_layer_without_task_ids_is_an_error():
    layer, _ = _layer(nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match="without task ids"):
        layer(torch.randn(1, 2, 4))


def test_fused_slices_touch_only_their_outputs():
    """Conv1D (GPT-2 layout, weight [in, out]) with task on outputs 0..5 and shared on 6..17."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(18, 8).double().requires_grad_(False)
    layer, routing = _layer(base, shared_index=torch.arange(6, 18), task_index=torch.arange(0, 6))
    nn.init.normal_(layer.lora_task_B)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with routing.active(torch.tensor([0, 1, 2])):
        diff = layer(x) - base(x)
    assert diff[..., :6].abs().min() > 0 and diff[..., 6:].abs().max() == 0   # shared B still zero
    nn.init.normal_(layer.lora_shared_B)
    with torch.no_grad():
        layer.lora_task_B.zero_()
    with routing.active(torch.tensor([0, 1, 2])):
        diff = layer(x) - base(x)
    assert diff[..., :6].abs().max() == 0 and diff[..., 6:].abs().min() > 0


def test_detach_mode_gives_no_adapter_grads_but_input_grads():
    torch.manual_seed(0)
    layer, routing = _layer(nn.Linear(8, 8).requires_grad_(False))
    nn.init.normal_(layer.lora_task_B)
    x = torch.randn(2, 3, 8, requires_grad=True)
    with routing.active(torch.tensor([0, 1]), detach=True):
        layer(x).sum().backward()
    assert all(p.grad is None for n, p in layer.named_parameters() if "lora" in n)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dropout_applies_only_in_training():
    torch.manual_seed(0)
    layer, routing = _layer(nn.Linear(8, 8), dropout=0.5)
    nn.init.normal_(layer.lora_task_B)
    x = torch.randn(2, 3, 8)
    with routing.active(torch.tensor([0, 1])):
        layer.eval()
        assert torch.equal(layer(x), layer(x))
        layer.train()
        assert not torch.equal(layer(x), layer(x))


def test_fused_kernel_import_failure_falls_back_to_torch(monkeypatch):
    """On a tensor the kernel does not take (CPU) or when the kernel is missing, the torch path runs."""
    layer, _ = _layer(nn.Linear(4, 4))
    assert layer.backend_for(torch.randn(1, 4)) == "torch-token"           # CPU tensor: torch paths
    assert layer.backend_for(torch.randn(1, 2, 4)) == "torch-sample"
    from ckf_dist.model import multi_lora

    monkeypatch.setattr(multi_lora, "_kernel_device", lambda x: True)     # a device the kernels take...
    monkeypatch.setitem(sys.modules, "ckf_dist.kernels", None)           # ...but the import fails
    assert multi_lora._triton_op() is None
    layer.fused_kernels = True                                           # (setting it drops the choices made)
    assert layer.backend_for(torch.randn(1, 2, 4)) == "torch-sample"
    monkeypatch.setitem(sys.modules, "ckf_dist.kernels", types.SimpleNamespace(
        multi_lora_triton=object(), triton_available=lambda: False))    # present but cannot run here
    assert multi_lora._triton_op() is None


def test_peft_style_init():
    layer, _ = _layer(nn.Linear(64, 8))
    bound = 1.0 / 64 ** 0.5   # kaiming_uniform(a=sqrt(5)) on fan_in=64
    assert layer.lora_task_A.abs().max() <= bound and layer.lora_task_A.abs().max() > 0.5 * bound
    assert layer.lora_task_B.abs().max() == 0 and layer.lora_shared_B.abs().max() == 0


@pytest.mark.parametrize("kinds", ["both", "shared", "task"])
@pytest.mark.parametrize("with_base", [True, False])
def test_per_sample_path_equals_reference(kinds, with_base):
    """The batched per-sample path (used for [B, L, in] activations) == the reference loop, grads included."""
    a_s, b_s, a_t, b_t = _weights()
    if kinds == "shared":
        a_t = b_t = None
    if kinds == "task":
        a_s = b_s = None
    x = torch.randn(6, 5, 24, dtype=torch.float64, requires_grad=True)
    sample_ids = torch.tensor([3, 0, 1, 3, 2, 0])
    base = torch.randn(6, 5, 20, dtype=torch.float64, requires_grad=True) if with_base else None
    g_out = torch.randn(6, 5, 20, dtype=torch.float64)
    params = [p for p in (x, a_s, b_s, a_t, b_t, base) if p is not None]
    fast = per_sample_lora(x, LoraWeights(a_s, b_s, a_t, b_t, 0.5, 2.0), sample_ids, base_out=base)
    grads_fast = torch.autograd.grad(fast, params, g_out)
    ref = reference_loop(x.reshape(-1, 24), a_s, b_s, a_t, b_t, sample_ids.repeat_interleave(5), 0.5, 2.0)
    ref = ref.view(6, 5, 20) + (base if with_base else 0)
    grads_ref = torch.autograd.grad(ref, params, g_out)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    for gf, gr in zip(grads_fast, grads_ref):
        torch.testing.assert_close(gf, gr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kinds", ["both", "shared", "task"])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_one_op_projection_equals_base_plus_reference(kinds, layout):
    """linear_per_sample_lora (the projection and its adapters in one autograd op, the dropout
    mask applied inside) == base + reference loop on the dropped input, grads of x and of every
    adapter included; a bias and a Conv1D ([in, out]) weight too."""
    a_s, b_s, a_t, b_t = _weights()
    if kinds == "shared":
        a_t = b_t = None
    if kinds == "task":
        a_s = b_s = None
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 24, generator=g, dtype=torch.float64)
    bias = torch.randn(20, generator=g, dtype=torch.float64)
    keep = (torch.rand(6, 5, 24, generator=g) > 0.3).double()
    x = torch.randn(6, 5, 24, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([3, 0, 1, 3, 2, 0])
    g_out = torch.randn(6, 5, 20, generator=g, dtype=torch.float64)
    params = [p for p in (x, a_s, b_s, a_t, b_t) if p is not None]
    w_arg = w.t().contiguous() if layout == "conv1d" else w
    adapters = LoraWeights(a_s, b_s, a_t, b_t, 0.5, 2.0)
    fast = linear_per_sample_lora(x, w_arg, bias, keep, adapters, ids, weight_in_out=layout == "conv1d")
    grads_fast = torch.autograd.grad(fast, params, g_out)
    xd = (x * keep).reshape(-1, 24)
    ref = (x @ w.t() + bias) + reference_loop(xd, a_s, b_s, a_t, b_t, ids.repeat_interleave(5), 0.5, 2.0).view(6, 5, 20)
    grads_ref = torch.autograd.grad(ref, params, g_out)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    for gf, gr in zip(grads_fast, grads_ref):
        torch.testing.assert_close(gf, gr, rtol=1e-12, atol=1e-12)
    assert (grads_fast[0] != g_out @ w).any()               # the adapters' dX is in x's gradient
    x_frozen = x.detach()                                    # no input grad asked: adapters still train
    ga = torch.autograd.grad(linear_per_sample_lora(x_frozen, w_arg, None, None, adapters, ids,
                                                    weight_in_out=layout == "conv1d"), params[1:], g_out)
    assert all(t.abs().sum() > 0 for t in ga)


def test_one_op_projection_refuses_trainable_base_and_bad_shapes():
    a_s, b_s, a_t, b_t = _weights()
    x, ids = torch.randn(2, 3, 24, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="frozen"):
        linear_per_sample_lora(x, torch.randn(20, 24, dtype=torch.float64, requires_grad=True), None, None,
                               LoraWeights(a_s, b_s, a_t, b_t, 1.0, 1.0), ids)
    with pytest.raises(ValueError, match=r"\[B, L, in\]"):
        linear_per_sample_lora(x, torch.randn(20, 24, dtype=torch.float64), None, None,
                               LoraWeights(a_s, b_s, a_t, b_t, 1.0, 1.0), ids[:1])


def _grad_fn_names(y):
    names, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            todo.extend(nxt for nxt, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("placement", ["task", "shared", "shared+task"])
def test_layer_one_op_path_equals_separate_path_with_dropout(placement):
    """A layer whose adapters write all outputs over a frozen base runs as one op (CPU); with the
    same seed it gives the separate path's outputs and grads, dropout masks included."""
    torch.manual_seed(0)
    base = nn.Linear(32, 24).double().requires_grad_(False)
    routing = LoraRouting()
    shared = AdapterSpec(4, 8.0) if "shared" in placement else None
    task = AdapterSpec(3, 6.0) if "task" in placement else None
    layer = MultiLoraLinear(base, "proj", 3, shared, task, 0.3, routing, fused_kernels=False).train()
    for name, p in layer.named_parameters():
        if "lora" in name:
            nn.init.normal_(p)
    x = torch.randn(5, 7, 32, dtype=torch.float64, requires_grad=True)
    g_out = torch.randn(5, 7, 24, dtype=torch.float64)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    results = []
    for one_op in (True, False):
        layer.fuse_base_gemm = one_op
        torch.manual_seed(1)
        with routing.active(torch.tensor([0, 2, 1, 2, 0])):
            y = layer(x)
        assert ("_LinearPerSampleLoraBackward" in _grad_fn_names(y)) == one_op
        results.append((y, torch.autograd.grad(y, params, g_out)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_layer_one_op_path_only_where_it_fits():
    """Sliced outputs (fused qkv), a trainable bias and a hooked base module keep the separate path."""
    from transformers.pytorch_utils import Conv1D

    def uses_one_op(layer, routing, n_in):
        with routing.active(torch.tensor([0, 1])):
            return "_LinearPerSampleLoraBackward" in _grad_fn_names(layer(torch.randn(2, 3, n_in)))

    layer, routing = _layer(nn.Linear(8, 6).requires_grad_(False))
    assert uses_one_op(layer, routing, 8)
    layer, routing = _layer(Conv1D(18, 8).requires_grad_(False), torch.arange(6, 18), torch.arange(0, 6))
    assert not uses_one_op(layer, routing, 8)
    layer, routing = _layer(Conv1D(18, 8).requires_grad_(False))
    assert uses_one_op(layer, routing, 8)
    base = nn.Linear(8, 6).requires_grad_(False)
    base.bias.requires_grad_(True)
    layer, routing = _layer(base)
    assert not uses_one_op(layer, routing, 8)
    base = nn.Linear(8, 6).requires_grad_(False)
    seen = []
    base.register_forward_pre_hook(lambda module, args: seen.append(1))
    layer, routing = _layer(base)
    assert not uses_one_op(layer, routing, 8) and seen == [1]
    base = nn.Linear(8, 6).requires_grad_(False)
    base.register_full_backward_hook(lambda module, gin, gout: None)
    layer, routing = _layer(base)
    assert not uses_one_op(layer, routing, 8)
    layer, routing = _layer(nn.Linear(8, 6).requires_grad_(False))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(2))
    try:
        assert not uses_one_op(layer, routing, 8) and 2 in seen
    finally:
        handle.remove()
    assert uses_one_op(layer, routing, 8)


@pytest.mark.parametrize("conv1d", [False, True])
def test_one_op_output_allows_in_place_ops(conv1d):
    """The one-op layer's output is a tensor of its own, with a bias too: in-place ops on it (an
    output hook, in-place dropout) work and backpropagate as on the separate path."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = (Conv1D(6, 8) if conv1d else nn.Linear(8, 6)).double().requires_grad_(False)
    layer, routing = _layer(base)
    nn.init.normal_(layer.lora_task_B)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for one_op in (True, False):
        layer.fuse_base_gemm = one_op
        with routing.active(torch.tensor([0, 1])):
            y = layer(x)
        y.mul_(2.0)
        grads.append(torch.autograd.grad(y.square().sum(), [x, layer.lora_task_B]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_per_sample_and_per_token_layers_agree():
    """The layer's two torch paths ([B, L, in] batched per sample; [B, in] per token) agree, grads included."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(18, 8).double().requires_grad_(False)
    for shared_index, task_index in ((None, None), (torch.arange(6, 18), torch.arange(0, 6))):
        layer, routing = _layer(base, shared_index, task_index)
        nn.init.normal_(layer.lora_shared_B)
        nn.init.normal_(layer.lora_task_B)
        params = [layer.lora_shared_A, layer.lora_shared_B, layer.lora_task_A, layer.lora_task_B]
        x = torch.randn(4, 5, 8, dtype=torch.float64)
        g_out = torch.randn(4, 5, 18, dtype=torch.float64)
        with routing.active(torch.tensor([2, 0, 1, 2])):
            y3 = layer(x)                                                  # per-sample path
            g3 = torch.autograd.grad(y3, params, g_out)
            y2 = torch.stack([layer(x[:, i]) for i in range(5)], 1)       # 2-D input: per-token op
            g2 = torch.autograd.grad(y2, params, g_out)
        torch.testing.assert_close(y2, y3)
        for a, b in zip(g2, g3):
            torch.testing.assert_close(a, b)
        assert all(g.abs().sum() > 0 for g in g3)


def test_lora_dropout_keeps_one_minus_p_and_scales():
    torch.manual_seed(0)
    x = torch.ones(400, 500)
    xd, scale = lora_dropout(x, 0.1, True)
    assert scale == pytest.approx(1 / 0.9, rel=1e-4)
    assert set(xd.unique().tolist()) == {0.0, 1.0}
    assert abs(xd.mean().item() - 0.9) < 0.005
    assert abs(xd[:, ::2].mean().item() - 0.9) < 0.005 and abs(xd[:, 1::2].mean().item() - 0.9) < 0.005
    odd = torch.ones(3, 7, 5)                         # odd element count: shapes still line up
    assert lora_dropout(odd, 0.5, True)[0].shape == odd.shape
    pairs = xd.view(-1, 2)                            # the two halves of one draw are independent
    both = ((pairs[:, 0] == 0) & (pairs[:, 1] == 0)).float().mean().item()
    assert abs(both - 0.01) < 0.003
    assert lora_dropout(x, 0.1, False) == (x, 1.0)
    torch.manual_seed(3)                              # the mask follows torch's seed: reproducible, and new per call
    m1 = lora_dropout(x, 0.1, True)[0]
    m2 = lora_dropout(x, 0.1, True)[0]
    torch.manual_seed(3)
    assert torch.equal(lora_dropout(x, 0.1, True)[0], m1) and not torch.equal(m1, m2)
    for p in (0.05, 0.3, 0.5, 0.9):                   # every 16-bit lane of a draw drops at rate p, at any p
        xd, scale = lora_dropout(x, p, True)
        for half in (xd[:, 0::4], xd[:, 1::4], xd[:, 2::4], xd[:, 3::4]):
            assert abs((half == 0).float().mean().item() - p) < 0.006, (p, (half == 0).float().mean())
        assert scale == pytest.approx(1 / (1 - p), rel=1e-3)


def test_kernel_wiring_uses_the_per_token_contract(monkeypatch):
    """Where the fused kernel applies (CUDA), the layer calls it with the contract's arguments."""
    torch.manual_seed(0)
    layer, routing = _layer(nn.Linear(8, 10).double().requires_grad_(False), dropout=0.0)
    nn.init.normal_(layer.lora_shared_B)
    nn.init.normal_(layer.lora_task_B)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    ids = torch.tensor([1, 2, 0])
    with routing.active(ids):
        expected = layer(x)                               # per-sample torch path
    calls = []

    def spy(x2, a_s, b_s, a_t, b_t, task_ids, s_s, s_t):
        calls.append((tuple(x2.shape), task_ids.tolist(), s_s, s_t))
        return multi_lora_torch(x2, a_s, b_s, a_t, b_t, task_ids, s_s, s_t)

    from ckf_dist.model import multi_lora
    monkeypatch.setattr(multi_lora, "_kernel_device", lambda _x: True)
    monkeypatch.setattr(multi_lora, "_triton_op", lambda name="multi_lora_triton":
                        spy if name == "multi_lora_triton" else None)
    layer.fused_kernels = True                            # re-decide under the patched device
    assert layer.backend_for(x) == "fused"
    with routing.active(ids):
        got = layer(x)
    torch.testing.assert_close(got, expected)
    assert calls == [((12, 8), [1] * 4 + [2] * 4 + [0] * 4, 2.0, 2.0)]
