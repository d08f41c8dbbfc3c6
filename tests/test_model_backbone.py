"""Backbone registry and loader: roles per family, fused qkv slices, local folders, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ckf_dist.model import FAMILIES, ModelConfig, build_ckf_model, load_backbone
from ckf_dist.model.backbone import tiny_backbone


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_registry_roles_name_real_modules(family):
    model = tiny_backbone(family)
    names = [n for n, _ in model.named_modules()]
    spec = FAMILIES[family]
    for role in ("q", "k", "v", "o"):
        hits = [n for n in names if n.endswith("." + spec.roles[role])]
        assert len(hits) == model.config.num_hidden_layers, (family, role)
    assert model.config.vocab_size == 49152 and model.config.hidden_size == 64


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_fused_query_slice_is_the_query_the_model_uses(family):
    """Perturb only the q-role output indices of the fused projection: only the model's query changes."""
    model = tiny_backbone(family)
    spec = FAMILIES[family]
    attn_name = spec.roles["q"]
    fused = [m for n, m in model.named_modules() if n.endswith("." + attn_name)][0]
    x = torch.randn(2, 5, 64)
    base = fused(x)
    for j, role in enumerate("qkv"):
        bumped = base.clone()
        bumped[..., spec.out_index(model.config, role)] += 1.0
        if family == "gpt2":        # GPT2Attention: c_attn(h).split(hidden, dim=2)
            parts_base, parts = base.split(64, dim=2), bumped.split(64, dim=2)
        else:                       # GPTNeoXAttention: view(..., heads, 3 * head_dim).chunk(3, -1)
            parts_base = base.view(2, 5, 4, 48).chunk(3, dim=-1)
            parts = bumped.view(2, 5, 4, 48).chunk(3, dim=-1)
        for i in range(3):
            changed = not torch.equal(parts[i], parts_base[i])
            assert changed == (i == j), (family, role, i)


def test_local_folder_frozen_and_dtype(tmp_path):
    tiny_backbone("qwen2").save_pretrained(tmp_path / "qwen")
    model, tok = load_backbone(ModelConfig(backbone=str(tmp_path / "qwen"), dtype="bfloat16"))
    assert model.config.model_type == "qwen2" and tok.vocab_size + len(tok.get_added_vocab()) >= 49152
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    built = build_ckf_model(ModelConfig(backbone=str(tmp_path / "qwen"), dtype="bfloat16"), model,
                            torch.randn(2, 4), torch.randn(2, 4))
    assert all(p.dtype == torch.bfloat16 for p in built.trainable_parameters())
    from ckf_dist.model.testing import synthetic_batch

    loss, _ = built.train().loss(synthetic_batch([0, 3], 2, 2), 1, 4)   # a bf16 step runs
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in built.trainable_parameters())


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_backbone(ModelConfig(backbone="meta-llama/Llama-2-7b-hf"))
    from transformers import AutoModelForCausalLM, BloomConfig

    AutoModelForCausalLM.from_config(BloomConfig(vocab_size=100, hidden_size=16, n_layer=1, n_head=2)) \
        .save_pretrained(tmp_path / "bloom")
    with pytest.raises(ValueError, match="not registered"):
        load_backbone(ModelConfig(backbone=str(tmp_path / "bloom")))


def test_gradient_checkpointing_is_switched_on():
    cfg = ModelConfig(backbone="tiny-llama", gradient_checkpointing=True)
    bb, _ = load_backbone(cfg)
    flag = "is_activation_checkpointing" if hasattr(bb, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert not getattr(bb, flag)
    build_ckf_model(cfg, bb, torch.randn(2, 4), torch.randn(2, 4))
    assert getattr(bb, flag)


def test_model_package_imports_without_deepspeed_or_ray():
    code = ("import sys; sys.modules['deepspeed'] = None; sys.modules['ray'] = None\n"
            "import ckf_dist.model, ckf_dist.model.scoring\n"
            "assert 'deepspeed' not in [m for m in sys.modules if sys.modules[m] is not None]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
