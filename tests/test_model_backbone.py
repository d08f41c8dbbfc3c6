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


def test_converted_config_is_read_alike_by_transformers_4_and_5(tmp_path):
    """transformers 4.x reads rope_theta (default 1e4), rope_scaling and torch_dtype; 5.x writes
    rope_parameters and dtype. Our folders carry both, with the same values."""
    import json

    from transformers import AutoConfig

    from ckf_dist.model.backbone import portable_config, smollm2_folder, write_portable_config

    v5 = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100, "dtype": "float32",
          "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    fixed = portable_config(v5)
    assert fixed.get("rope_theta", 10000.0) == 100000.0          # what 4.x's LlamaConfig would read
    assert fixed.get("rope_scaling") is None and fixed["torch_dtype"] == "float32"
    scaled = portable_config(dict(v5, rope_parameters={"rope_theta": 5e5, "rope_type": "linear", "factor": 4.0}))
    assert scaled["rope_theta"] == 5e5 and scaled["rope_scaling"] == {"rope_type": "linear", "type": "linear",
                                                                       "factor": 4.0}
    assert portable_config(fixed) == fixed                           # idempotent
    (tmp_path / "config.json").write_text(json.dumps(v5))
    base = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert write_portable_config(tmp_path / "config.json") and not write_portable_config(tmp_path / "config.json")
    after = AutoConfig.from_pretrained(tmp_path).to_dict()          # transformers 5 reads the same config
    assert {k: v for k, v in after.items() if k != "_name_or_path"} == {k: v for k, v in base.items()
                                                                         if k != "_name_or_path"}
    # a cache converted before the legacy keys existed is fixed in place, without converting again
    cached = tmp_path / "cache" / "smollm2-135m-instruct"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text(json.dumps(v5))
    (cached / "model.safetensors").write_bytes(b"not touched")
    assert smollm2_folder(str(tmp_path / "cache")) == cached
    assert json.loads((cached / "config.json").read_text())["rope_theta"] == 100000.0
    assert (cached / "model.safetensors").read_bytes() == b"not touched"


def test_tiny_backbone_partitioned_under_zero3_has_the_plain_load_weights(monkeypatch):
    """A ZeRO-3 run and a ZeRO-2 run of one config train the same frozen backbone: the tiny random
    backbone built under zero.Init gets the plain load's seeded weights (zero.Init's own init draws
    other numbers; embeddings were 0.16 apart before)."""
    import deepspeed
    import torch.distributed as dist

    from ckf_dist.config import config_from_dict
    from ckf_dist.train.deepspeed_config import build_deepspeed_config

    from conftest import free_port

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    owns_group = not dist.is_initialized()
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        cfg = config_from_dict({"model": {"backbone": "tiny-llama", "dtype": "float32"},
                                "train": {"zero_stage": 3, "num_workers": 1}}, "<test>")
        plain, _ = load_backbone(cfg.model)
        partitioned, _ = load_backbone(cfg.model, zero3_config=build_deepspeed_config(cfg.train, 1, "float32"))
        assert all(hasattr(p, "ds_id") for p in partitioned.parameters())
        want = plain.state_dict()
        with deepspeed.zero.GatheredParameters(list(partitioned.parameters())):
            got = {k: v.detach().clone() for k, v in partitioned.state_dict().items()}
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
