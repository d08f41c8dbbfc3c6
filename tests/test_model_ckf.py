"""CKFModel on tiny random backbones of four families: trainable set, routing, stream isolation, curriculum."""

from __future__ import annotations

import math

import pytest
import torch

from ckf_dist.model import ModelConfig, build_ckf_model, curriculum_weight, load_backbone
from ckf_dist.model.testing import randomize_adapters, select_rows, synthetic_batch

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gptneox"]
N_USERS, N_ITEMS, D = 11, 23, 8
TASKS = [0, 1, 2, 3, 1, 0, 3, 2]


def make_model(backbone: str, dtype: str = "float64", checkpointing: bool = True, **lora):
    cfg = ModelConfig(backbone=backbone, gradient_checkpointing=checkpointing)
    cfg.lora.dropout = 0.0
    for key, value in lora.items():
        setattr(cfg.lora, key, value)
    bb, _ = load_backbone(cfg)
    bb.to(getattr(torch, dtype))
    g = torch.Generator().manual_seed(1)
    model = build_ckf_model(cfg, bb, torch.randn(N_USERS, D, generator=g), torch.randn(N_ITEMS, D, generator=g))
    randomize_adapters(model, seed=2)
    return model.train()


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def bridge_params(model):
    return {n: p for n, p in model.named_parameters() if n.startswith("bridge.")}


def grads(params):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}


@pytest.mark.parametrize("backbone", FAMILIES)
def test_only_bridge_and_lora_train(backbone):
    model = make_model(backbone, "float32")
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_train = sum(p.numel() for p in trainable.values())
    print(f"{backbone}: {n_train} trainable / {frozen} frozen parameters in {len(trainable)} tensors")
    assert trainable and all(".lora_" in n or n.startswith("bridge.") for n in trainable)
    assert set(lora_params(model)) | set(bridge_params(model)) == set(trainable)
    assert any(".lora_task_" in n for n in trainable) and any(".lora_shared_" in n for n in trainable)
    assert model.trainable_parameters() == list(trainable.values())
    # the CF tables are frozen buffers, outside the trainable (and persistent) state
    assert not any("cf_user" in n or "cf_item" in n for n in model.state_dict())


@pytest.mark.parametrize("backbone", FAMILIES)
def test_mixed_batch_routing_equals_per_task_loop(backbone):
    """One mixed batch == each task's samples run on their own, in outputs and every adapter's gradient."""
    model = make_model(backbone)
    batch = synthetic_batch(TASKS, N_USERS, N_ITEMS, seed=3)
    g = torch.Generator().manual_seed(4)
    weights = torch.randn(*batch["cf_input_ids"].shape, 64, generator=g, dtype=torch.float64)

    def objective(b, rows):   # sum of CF-stream logits (first 64 vocab entries) under fixed random weights
        logits = model(b["cf_input_ids"], b["cf_attention_mask"], b["task_ids"],
                       {k: b[k] for k in ("history", "slot_row", "slot_pos", "slot_kind", "slot_cf_id")})
        mask = b["cf_attention_mask"].unsqueeze(-1)
        return logits, (logits[..., :64] * weights[rows, : logits.shape[1]] * mask).sum()

    all_rows = torch.arange(len(TASKS))
    logits_mixed, obj = objective(batch, all_rows)
    obj.backward()
    mixed = grads(lora_params(model) | bridge_params(model))
    model.zero_grad(set_to_none=True)

    logits_ref = torch.zeros_like(logits_mixed)
    for t in range(4):
        rows = (batch["task_ids"] == t).nonzero().squeeze(-1)
        logits_t, obj_t = objective(select_rows(batch, rows), rows)
        obj_t.backward()                                   # gradients accumulate over the task loop
        logits_ref[rows] = logits_t
    ref = grads(lora_params(model) | bridge_params(model))

    mask = batch["cf_attention_mask"].bool()
    torch.testing.assert_close(logits_mixed[mask], logits_ref[mask], rtol=1e-9, atol=1e-9)
    for name in mixed:
        torch.testing.assert_close(mixed[name], ref[name], rtol=1e-8, atol=1e-10, msg=name)
    for name, grad in mixed.items():
        if ".lora_task_" in name:       # every task adapter learns (the authors' script trained only one)
            assert all(grad[t].abs().sum() > 0 for t in range(4)), name


@pytest.mark.parametrize("backbone", FAMILIES)
def test_stream_isolation(backbone):
    """Two-stream mode: CF loss leaves LoRA gradients at exactly zero; text loss leaves the bridge at zero."""
    model = make_model(backbone)     # activation checkpointing on: recompute must keep the detach
    batch = synthetic_batch(TASKS, N_USERS, N_ITEMS, seed=5)
    lora, bridge = lora_params(model), bridge_params(model)

    loss_cf, _, _ = model.stream_loss(batch, "cf", detach_lora=True)
    loss_cf.backward()
    assert all(g.abs().max() == 0 for g in grads(lora).values())
    assert all(g.abs().max() > 0 for g in grads(bridge).values())
    model.zero_grad(set_to_none=True)

    loss_text, _, _ = model.stream_loss(batch, "text")
    loss_text.backward()
    assert all(g.abs().max() == 0 for g in grads(bridge).values())
    assert sum(g.abs().sum() for g in grads(lora).values()) > 0
    text_grads = grads(lora)
    model.zero_grad(set_to_none=True)

    step, total = 30, 100                 # combined: LoRA sees exactly w * grad(L_text)
    loss, stats = model.loss(batch, step, total)
    loss.backward()
    w = curriculum_weight(step, total)
    assert stats["w"] == w
    assert math.isclose(stats["loss"], w * stats["loss_text"] + (1 - w) * stats["loss_cf"], rel_tol=1e-12)
    for name, g in grads(lora).items():   # (norm layers upcast to fp32 inside: fp32-level agreement)
        torch.testing.assert_close(g, w * text_grads[name], rtol=1e-5, atol=1e-6 * float(g.abs().max()))

    model.zero_grad(set_to_none=True)     # joint mode: the CF stream trains LoRA too
    loss_cf, _, _ = model.stream_loss(batch, "cf", detach_lora=False)
    loss_cf.backward()
    assert sum(g.abs().sum() for g in grads(lora).values()) > 0


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-gpt2"])
def test_activation_checkpointing_replays_the_dropout_masks(backbone):
    """With LoRA dropout, recomputing a checkpointed layer in backward draws the forward's masks
    again (the draws follow torch's RNG, which checkpointing restores): same loss, same gradients
    as without checkpointing; and a different seed gives different gradients (the masks matter)."""
    results = []
    for checkpointing, seed in ((True, 7), (False, 7), (False, 8)):
        model = make_model(backbone, checkpointing=checkpointing, dropout=0.3)
        batch = synthetic_batch(TASKS, N_USERS, N_ITEMS, seed=5)
        torch.manual_seed(seed)
        loss, _ = model.loss(batch, 30, 100)
        loss.backward()
        results.append((loss.detach(), grads({**lora_params(model), **bridge_params(model)})))
    (loss_ckpt, g_ckpt), (loss_plain, g_plain), (_, g_other) = results
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-12, atol=0)
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-9, atol=1e-12)
    assert any(not torch.allclose(g_other[n], g_plain[n]) for n in g_plain)


def test_loss_stats_and_answer_only():
    model = make_model("tiny-llama", checkpointing=False)
    batch = synthetic_batch(TASKS, N_USERS, N_ITEMS, seed=6)
    loss, stats = model.loss(batch, 0, 10, mode="joint")
    for stream in ("text", "cf"):
        assert stats[f"tokens_{stream}"] == (batch[f"{stream}_labels"] != -100).sum().item()
        for task in ("ctr", "sequential", "rating", "review"):
            assert f"loss_{stream}/{task}" in stats
    # changing a prompt token's label-free region changes nothing but the context; changing labels to -100 drops them
    batch2 = dict(batch)
    batch2["text_labels"] = batch["text_labels"].clone()
    batch2["text_labels"][0] = -100
    _, stats2 = model.loss(batch2, 0, 10)
    assert stats2["tokens_text"] == stats["tokens_text"] - (batch["text_labels"][0] != -100).sum().item()
    via_call, stats_call = model(batch=batch, step=0, total_steps=10, mode="joint")   # engine(batch=...) form
    assert via_call.item() == loss.item() and stats_call == stats
    with pytest.raises(ValueError, match="mode"):
        model.loss(batch, 0, 10, mode="both")
    bad = dict(batch, task_ids=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]))
    with pytest.raises(ValueError, match="task_ids"):
        model.loss(bad, 0, 10)


def test_curriculum_endpoints():
    total = 1000
    assert math.isclose(curriculum_weight(0, total), 1 / (1 + math.exp(-8)))       # ~0.99966: text first
    assert curriculum_weight(total // 2, total) == 0.5
    assert math.isclose(curriculum_weight(total, total), 1 / (1 + math.exp(8)))    # ~0.00034: CF last
    ws = [curriculum_weight(t, total) for t in range(0, total + 1, 50)]
    assert all(a > b for a, b in zip(ws, ws[1:]))
    with pytest.raises(ValueError):
        curriculum_weight(0, 0)


def test_trainable_state_round_trip_and_text_only_ablation(tmp_path):
    from ckf_dist.model import load_trainable, save_trainable

    model = make_model("tiny-gpt2", "float32", checkpointing=False)
    state = model.trainable_state_dict()
    size = sum(v.numel() * v.element_size() for v in state.values())
    assert size < 1_000_000 and all(".lora_" in k or k.startswith("bridge.") for k in state)
    save_trainable(model, tmp_path / "trainable.safetensors")
    other = make_model("tiny-gpt2", "float32", checkpointing=False)
    randomize_adapters(other, seed=9)
    load_trainable(other, tmp_path / "trainable.safetensors")
    for k, v in other.trainable_state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(KeyError, match="missing"):
        other.load_trainable_state_dict({k: v for k, v in state.items() if "bridge" not in k})

    cfg = ModelConfig(backbone="tiny-llama")
    cfg.bridge.use_cf_slots = False
    bb, _ = load_backbone(cfg)
    text_only = build_ckf_model(cfg, bb, torch.randn(3, D), torch.randn(4, D))
    assert text_only.bridge is None and not any(k.startswith("bridge") for k in text_only.trainable_state_dict())
    loss, stats = text_only.loss(synthetic_batch(TASKS, 3, 4), 0, 10)
    assert "loss_cf" not in stats and stats["loss"] == stats["loss_text"]


def test_build_preconditions():
    cfg = ModelConfig(backbone="tiny-llama")
    bb, _ = load_backbone(cfg)
    build_ckf_model(cfg, bb, torch.randn(3, D), torch.randn(4, D))
    with pytest.raises(RuntimeError, match="already"):
        build_ckf_model(cfg, bb, torch.randn(3, D), torch.randn(4, D))
    cfg2 = ModelConfig(backbone="tiny-llama")
    cfg2.lora.task_targets = ["nonexistent_proj"]
    bb2, _ = load_backbone(cfg2)
    with pytest.raises(ValueError, match="nonexistent_proj"):
        build_ckf_model(cfg2, bb2, torch.randn(3, D), torch.randn(4, D))


def test_seeded_build_starts_alike_whatever_the_rng_went_through():
    """``seed``: LoRA and bridge start from it alone (a rank that converted the backbone, or a
    ZeRO-3 load, draws from the global RNG first), and the global RNG is left as it was."""
    cfg = ModelConfig(backbone="tiny-llama")
    cf_user, cf_item = torch.randn(N_USERS, D), torch.randn(N_ITEMS, D)

    def build(history: int, seed):
        bb, _ = load_backbone(cfg)
        torch.manual_seed(0)
        torch.rand(history)                                 # what the load drew before the build
        before = torch.get_rng_state()
        model = build_ckf_model(cfg, bb, cf_user, cf_item, seed=seed)
        assert seed is None or torch.equal(torch.get_rng_state(), before)
        return model.trainable_state_dict()

    a, b = build(0, seed=7), build(1000, seed=7)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c, d = build(0, seed=None), build(1000, seed=None)     # unseeded: the history decides
    assert any(not torch.equal(c[k], d[k]) for k in c if "bridge" in k)
    e = build(0, seed=8)
    assert any(not torch.equal(a[k], e[k]) for k in a if "bridge" in k)
