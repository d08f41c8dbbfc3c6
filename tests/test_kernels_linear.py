"""``linear_multi_lora_triton`` (the frozen projection's GEMM with the Multi-LoRA adapters in
its epilogue) and ``MultiLoraLinear`` through it, on CPU under TRITON_INTERPRET=1, against
an fp64 reference or the model's torch path, with every buffer the op allocates poisoned
(see kernel_helpers.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import ckf_dist.kernels.multi_lora as ml  # noqa: E402
from ckf_dist.kernels import KernelConfig, linear_multi_lora_triton, multi_lora_reference, tiles  # noqa: E402
from kernel_helpers import interpreter, make_inputs, rel, task_ids_for  # noqa: E402,F401  (interpreter: autouse)


def check_linear(n, d_in, d_out, rs, rt, t, kind, dtype=torch.float32, tol=1e-5, config=None, seed=0,
                 bias=True, separate=False, conv1d=False, masked=False, scales=(2.0, 0.75)):
    """y = x W^T + b + delta(x_lora, x * keep or x) and the gradients of x, x_lora and the
    adapters against fp64; returns the relative errors."""
    x, a_s, b_s, a_t, b_t, gen = make_inputs(n, d_in, d_out, rs, rt, t, dtype, seed)
    w64 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) * d_in ** -0.5
    # a GPT-2 Conv1D stores [in, out]: the op takes its transposed view (strides, no copy)
    w = w64.t().contiguous().to(dtype).t() if conv1d else w64.to(dtype)
    b = torch.randn(d_out, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    xl = (torch.randn(n, d_in, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
          if separate else None)
    keep = torch.rand(n, d_in, generator=gen) >= 0.25 if masked else None
    ids = task_ids_for(kind, n, t, gen)
    y = linear_multi_lora_triton(x, w, b, a_s, b_s, a_t, b_t, ids, *scales, x_lora=xl, lora_mask=keep,
                                 config=config)
    assert y.shape == (n, d_out) and y.dtype == dtype
    src = xl if separate else x if keep is None else x * keep
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()) \
        + multi_lora_reference(src, a_s, b_s, a_t, b_t, ids, *scales)
    leaves = [v for v in (x, xl, a_s, b_s, a_t, b_t) if v is not None]
    names = [k for k, v in zip(("x", "x_lora", "a_shared", "b_shared", "a_task", "b_task"),
                               (x, xl, a_s, b_s, a_t, b_t)) if v is not None]
    dy = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, dy.to(dtype))
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    errs = {"y": rel(y, ref)}
    for name, g, gr in zip(names, grads, ref_grads):
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient (unwritten element?)"
        if gr.norm() == 0:
            assert g.abs().max() == 0, name
            continue
        errs[name] = rel(g, gr)
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errs})"
    return errs


LINEAR_CASES = [  # (n, in, out, rs, rt, T, distribution): none a multiple of the 32 tiles, then exact ones
    (37, 40, 50, 8, 12, 3, "uniform"), (45, 57, 96, 16, 8, 4, "one"), (50, 48, 35, 8, 16, 5, "empty"),
    (12, 33, 29, 8, 8, 12, "distinct"), (64, 96, 64, 16, 16, 6, "zipf"), (1, 17, 19, 8, 8, 4, "uniform"),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "-".join(map(str, c)))
def test_linear_lora_matches_fp64_reference(case):
    check_linear(*case)


@pytest.mark.parametrize("rs,rt", [(16, 0), (0, 16)], ids=["shared-only", "task-only"])
def test_linear_lora_single_adapter_kinds(rs, rt):
    check_linear(29, 40, 36, rs, rt, 3, "uniform", seed=5, bias=False)


@pytest.mark.parametrize("config", [
    KernelConfig(gemm_block_m=16, gemm_block_n=16, gemm_block_k=16, gemm_group_m=2),
    KernelConfig(gemm_block_m=64, gemm_block_n=32, gemm_block_k=16, gemm_group_m=1, block_m=16),
], ids=["small-tiles", "tall-tiles"])
def test_linear_lora_tilings(config):
    """Several K steps (K a multiple of the tile, and not), grouped tile order, row tiles
    holding one task and several."""
    check_linear(70, 64, 45, 8, 16, 4, "zipf", config=config, seed=3)
    check_linear(70, 61, 45, 8, 16, 4, "zipf", config=config, seed=4)


def test_linear_lora_per_sample_and_interleaved_rows():
    ids_layouts = [torch.tensor([2, 0, 3, 0, 1]).repeat_interleave(14), torch.arange(70) % 4]
    cfg = KernelConfig(gemm_block_m=16, gemm_block_n=16, gemm_block_k=16, block_m=16)
    for ids in ids_layouts:
        x, a_s, b_s, a_t, b_t, gen = make_inputs(70, 40, 36, 8, 16, 4, seed=21)
        w = torch.randn(36, 40, generator=gen, dtype=torch.float64).float()
        y = linear_multi_lora_triton(x, w, None, a_s, b_s, a_t, b_t, ids, 1.5, 0.5, config=cfg)
        ref = torch.nn.functional.linear(x.double(), w.double()) + multi_lora_reference(
            x, a_s, b_s, a_t, b_t, ids, 1.5, 0.5)
        dy = torch.randn(70, 36, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad(y, [x, a_t, b_t], dy.float())
        want = torch.autograd.grad(ref, [x, a_t, b_t], dy)
        assert rel(y, ref) < 1e-5 and all(rel(g, r) < 1e-5 for g, r in zip(got, want))


def test_linear_lora_separate_adapter_input():
    """LoRA dropout: the base reads x, the adapters x_lora; each gets its own gradient."""
    check_linear(33, 40, 30, 8, 8, 3, "uniform", seed=6, separate=True)


@pytest.mark.parametrize("rs,rt,kind", [(8, 16, "zipf"), (16, 0, "uniform"), (0, 8, "one")],
                         ids=["both", "shared-only", "task-only"])
def test_linear_lora_dropout_mask(rs, rt, kind):
    """LoRA dropout as a keep mask: shrink of x * keep, dx = dy W + keep * (dG A), dA from x * keep."""
    check_linear(45, 61, 38, rs, rt, 4, kind, seed=15, masked=True,
                 config=KernelConfig(gemm_block_m=16, gemm_block_n=16, gemm_block_k=16, block_m=16, block_dm=16))


def test_linear_lora_conv1d_weight_layout():
    check_linear(20, 24, 36, 8, 8, 2, "uniform", seed=14, conv1d=True)


def test_linear_lora_half_precision():
    errs = check_linear(40, 48, 40, 8, 16, 3, "zipf", dtype=torch.float16, tol=2e-3, seed=11)
    assert errs["y"] > 0
    check_linear(40, 48, 40, 8, 16, 3, "uniform", dtype=torch.bfloat16, tol=1e-2, seed=13)


def test_linear_lora_frozen_adapters_give_only_dx():
    """CF stream: the adapters are constants, the input gradient still includes their path."""
    x, a_s, b_s, a_t, b_t, gen = make_inputs(20, 24, 16, 8, 8, 2, seed=9)
    w = torch.randn(16, 24, generator=gen, dtype=torch.float64).float()
    ids = torch.randint(0, 2, (20,), generator=gen)
    ws = [v.detach() for v in (a_s, b_s, a_t, b_t)]
    y = linear_multi_lora_triton(x, w, None, *ws, ids, 2.0, 1.0)
    (gx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
    ref = torch.nn.functional.linear(x.double(), w.double()) + multi_lora_reference(x, *ws, ids, 2.0, 1.0)
    (rx,) = torch.autograd.grad(ref, [x], torch.ones(20, 16, dtype=torch.float64))
    assert rel(gx, rx) < 1e-5


def test_triton_linear_is_the_plain_projection():
    from ckf_dist.kernels.linear_lora import triton_linear
    g = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((37, 45), (29, 45), (29,)))
    y = triton_linear(x.float(), w.float(), b.float())
    assert rel(y, torch.nn.functional.linear(x, w, b)) < 1e-6


def test_linear_lora_empty_batch_and_bad_inputs():
    x, a_s, b_s, a_t, b_t, _ = make_inputs(0, 24, 16, 8, 8, 2)
    w = torch.randn(16, 24)
    y = linear_multi_lora_triton(x, w, None, a_s, b_s, a_t, b_t, torch.zeros(0, dtype=torch.int64))
    assert y.shape == (0, 16)
    assert torch.equal(torch.autograd.grad(y.sum(), [b_t])[0], torch.zeros_like(b_t))
    x, a_s, b_s, a_t, b_t, _ = make_inputs(8, 24, 16, 8, 8, 2)
    ids = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError, match="must be frozen"):
        linear_multi_lora_triton(x, w.requires_grad_(), None, a_s, b_s, a_t, b_t, ids)
    w = w.detach()
    with pytest.raises(ValueError, match="write 16 outputs, the projection has 20"):
        linear_multi_lora_triton(x, torch.randn(20, 24), None, a_s, b_s, a_t, b_t, ids)
    with pytest.raises(ValueError, match=r"bias must be \[16\]"):
        linear_multi_lora_triton(x, w, torch.randn(15), a_s, b_s, a_t, b_t, ids)
    with pytest.raises(ValueError, match=r"weight must be \[out, 24\]"):
        linear_multi_lora_triton(x, w.t(), None, a_s, b_s, a_t, b_t, ids)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\)"):
        linear_multi_lora_triton(x, w, None, a_s, b_s, a_t, b_t, ids + 5)
    with pytest.raises(ValueError, match="lora_mask must be a bool/uint8 tensor"):
        linear_multi_lora_triton(x, w, None, a_s, b_s, a_t, b_t, ids, lora_mask=torch.ones(8, 24))
    with pytest.raises(ValueError, match="x_lora or lora_mask, not both"):
        linear_multi_lora_triton(x, w, None, a_s, b_s, a_t, b_t, ids, x_lora=x, lora_mask=torch.ones(8, 24) > 0)


@pytest.mark.parametrize("placement", ["task-q", "shared+task", "conv1d-shared", "dropout", "cf-stream"])
def test_model_layer_runs_the_fused_projection(monkeypatch, placement):
    """MultiLoraLinear with fused kernels (forced on CPU under the interpreter) takes the fused
    base-GEMM op, and gives the torch path's outputs and gradients (same dropout masks)."""
    from transformers.pytorch_utils import Conv1D

    import ckf_dist.kernels as K
    from ckf_dist.model import multi_lora as mml
    monkeypatch.setattr(mml, "_kernel_device", lambda x: True)
    calls = {"linear": 0}
    real = K.linear_multi_lora_triton

    def counted(*a, **k):
        calls["linear"] += 1
        return real(*a, **k)
    monkeypatch.setattr(K, "linear_multi_lora_triton", counted)
    torch.manual_seed(0)
    base = Conv1D(30, 24) if placement == "conv1d-shared" else torch.nn.Linear(24, 30, bias=placement != "task-q")
    base.requires_grad_(False)
    shared = mml.AdapterSpec(8, 16.0) if placement in ("shared+task", "conv1d-shared", "dropout", "cf-stream") else None
    task = mml.AdapterSpec(4, 8.0) if placement != "conv1d-shared" else None
    routing = mml.LoraRouting()
    layer = mml.MultiLoraLinear(base, "proj", 3, shared, task, 0.3 if placement == "dropout" else 0.0, routing)
    for p in layer.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    layer.train()
    x = torch.randn(4, 5, 24, requires_grad=True)
    ids = torch.tensor([2, 0, 2, 1])
    out = {}
    for fused in (True, False):
        layer.fused_kernels = fused
        torch.manual_seed(7)                  # the same dropout masks on both paths
        with routing.active(ids, detach=placement == "cf-stream"):
            y = layer(x)
        leaves = [x] + [p for p in layer.parameters() if p.requires_grad and placement != "cf-stream"]
        out[fused] = (y, torch.autograd.grad(y, leaves, torch.ones_like(y) * 0.1))
    assert calls["linear"] == 1
    (y1, g1), (y0, g0) = out[True], out[False]
    assert (y1 - y0).abs().max() < 1e-4
    for a, b in zip(g1, g0):
        assert (a - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item())


def test_model_layer_leaves_hooked_or_partitioned_bases_to_the_base_module(monkeypatch):
    """Under ZeRO-3 the frozen weight is gathered only in the base module's own forward (its
    hook), so a partitioned weight (DeepSpeed marks it with ``ds_id``) or any hook on the base
    keeps the separate op."""
    from ckf_dist.model import multi_lora as mml
    monkeypatch.setattr(mml, "_kernel_device", lambda x: True)
    base = torch.nn.Linear(8, 8, bias=False).requires_grad_(False)
    layer = mml.MultiLoraLinear(base, "proj", 2, mml.AdapterSpec(4, 8.0), None, 0.0, mml.LoraRouting())
    x = torch.randn(1, 3, 8)
    assert layer.backend_for(x) == "fused-linear"
    handle = base.register_forward_pre_hook(lambda mod, args: None)
    assert layer.backend_for(x) == "fused"                 # a hook added after the first call counts
    handle.remove()
    assert layer.backend_for(x) == "fused-linear"
    base.weight.ds_id = 7
    assert layer.backend_for(x) == "fused"
    layer.backend = "torch-sample"                           # forced, for benches and comparisons
    assert layer.backend_for(x) == "torch-sample"
    with pytest.raises(ValueError, match="unknown Multi-LoRA backend"):
        layer.backend = 'cuda'


def test_whole_model_with_the_fused_projection_matches_the_torch_path(monkeypatch):
    """A tiny Llama CKF model in fp32, both streams, LoRA dropout 0.1 (the same masks on both
    paths): loss and every trainable gradient through the fused projection op equal the
    torch path's."""
    from ckf_dist.model import LoraConfig, ModelConfig, build_ckf_model
    from ckf_dist.model import multi_lora as mml
    from ckf_dist.model.backbone import tiny_backbone
    from ckf_dist.model.testing import randomize_adapters, synthetic_batch
    monkeypatch.setattr(mml, "_kernel_device", lambda x: True)
    g = torch.Generator().manual_seed(0)
    cfg = ModelConfig(backbone="tiny-llama", lora=LoraConfig(r=8, alpha=16.0, dropout=0.1))
    model = build_ckf_model(cfg, tiny_backbone("llama"), torch.randn(50, 8, generator=g),
                            torch.randn(80, 8, generator=g), n_tasks=4)
    randomize_adapters(model, std=0.05)
    model.train()
    vocab = model.backbone.config.vocab_size
    batch = synthetic_batch([0, 3, 1, 2], 50, 80, vocab=vocab, prompt_len=10, answer_len=4, history_len=5, seed=1)
    calls = {"n": 0}
    real = mml._triton_op

    def counting(name="multi_lora_triton"):
        calls["n"] += name == "linear_multi_lora_triton"
        return real(name)
    monkeypatch.setattr(mml, "_triton_op", counting)

    def run(fused):
        for layer in model.lora_layers():
            layer.fused_kernels = fused
        torch.manual_seed(3)
        loss, _ = model.loss(batch, step=10, total_steps=100)
        params = model.trainable_parameters()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss, torch.cat([(gr if gr is not None else torch.zeros_like(p)).flatten()
                                for gr, p in zip(grads, params)])
    loss_t, grads_t = run(False)
    assert calls["n"] == 0
    loss_f, grads_f = run(True)
    assert calls["n"] > 0
    assert abs(loss_f.item() - loss_t.item()) < 1e-5
    assert ((grads_f - grads_t).norm() / grads_t.norm()).item() < 1e-5


def test_linear_lora_autotuned_launch_path(monkeypatch):
    """The GPU's launch path (autotune over heuristics over the kernel, the config pruner, the
    tuning key, the grid from the chosen tile) run in the interpreter, with the tuner's timing
    replaced by a stub that runs each candidate once and prefers a known tile."""
    import ckf_dist.kernels.linear_lora as ll
    tuned = ml._kernels()._gemm_lora_tuned
    ran = []

    def fake_bench(fn, quantiles=None, **_):
        fn()                                    # each candidate really runs (and must not fail)
        ran.append(1)
        t = 1.0 if len(ran) % 3 == 0 else 2.0
        return [t, t, t] if quantiles else t
    monkeypatch.setattr(ll, "TUNE_IN_INTERPRETER", True)
    monkeypatch.setitem(tuned.__dict__, "do_bench", fake_bench)
    monkeypatch.setattr(tuned, "cache", {})
    n_tiles = len(tuned.configs)
    check_linear(70, 64, 48, 8, 8, 3, "zipf", seed=31, config=KernelConfig(block_m=16, block_dm=16))
    assert len(ran) == 2 * n_tiles                                       # forward and dX keys tuned
    assert len(tuned.cache) == 2
    ran.clear()
    check_linear(70, 64, 48, 8, 8, 3, "zipf", seed=32, masked=True, config=KernelConfig(block_m=16, block_dm=16))
    kept = len(tiles.prune_gemm_tiles(tuned.configs, {}, HAS_MASK=True))
    assert len(ran) == kept < n_tiles                                    # only the masked dX key is new
