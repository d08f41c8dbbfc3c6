"""peft export round trip: plain PeftModel.from_pretrained in a process that never imports ckf_dist."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from ckf_dist.model import ModelConfig, build_ckf_model, load_backbone
from ckf_dist.model.testing import randomize_adapters

# (name, backbone, lora overrides): default placement on four families, plus shared and task on one
# module with different ranks (concatenated ranks + rank_pattern), and a task adapter on a fused qkv
CASES = [
    ("llama", "tiny-llama", {}),
    ("qwen2", "tiny-qwen2", {}),
    ("gpt2", "tiny-gpt2", {}),
    ("gptneox", "tiny-gptneox", {}),
    ("llama-concat", "tiny-llama", {"shared_targets": ["q", "k", "v", "o"], "shared_r": 8, "shared_alpha": 16.0}),
    ("neox-task-kv", "tiny-gptneox", {"shared_targets": ["q", "o"], "task_targets": ["k", "v"], "r": 4}),
]

CHILD = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from peft import PeftModel

spec = json.load(open(sys.argv[1]))
out = {}
for case in spec:
    ids = load_file(case["inputs"])["input_ids"]
    for task in case["tasks"]:
        base = AutoModelForCausalLM.from_pretrained(case["base"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, case["adapters"] + "/" + task).eval()
        with torch.no_grad():
            out[case["name"] + "/" + task] = model(input_ids=ids).logits.contiguous()
save_file(out, sys.argv[2])
assert not any(m == "ckf_dist" or m.startswith("ckf_dist.") for m in sys.modules), "child imported ckf_dist"
"""


def test_peft_round_trip(tmp_path):
    spec, expected = [], {}
    for name, backbone, lora in CASES:
        cfg = ModelConfig(backbone=backbone, dtype="float32")
        for key, value in lora.items():
            setattr(cfg.lora, key, value)
        bb, _ = load_backbone(cfg)
        bb.save_pretrained(tmp_path / f"base-{name}")             # the untouched backbone
        model = build_ckf_model(cfg, bb, torch.randn(5, 8), torch.randn(7, 8)).eval()
        randomize_adapters(model, seed=len(name), std=0.2)
        folders = model.export_peft(tmp_path / f"adapters-{name}")
        ids = torch.randint(3, 2000, (2, 9), generator=torch.Generator().manual_seed(0))
        save_file({"input_ids": ids}, str(tmp_path / f"inputs-{name}.safetensors"))
        with torch.no_grad():
            for t, task in enumerate(folders):
                expected[f"{name}/{task}"] = model(ids, torch.ones_like(ids), torch.full((2,), t))
        spec.append({"name": name, "base": str(tmp_path / f"base-{name}"),
                     "adapters": str(tmp_path / f"adapters-{name}"),
                     "inputs": str(tmp_path / f"inputs-{name}.safetensors"), "tasks": list(folders)})
        if name == "llama-concat":   # q carries shared (r=8) + task (r=16) concatenated: rank 24 by pattern
            conf = json.loads((folders["ctr"] / "adapter_config.json").read_text())
            assert conf["r"] == 8 and conf["rank_pattern"] == {"self_attn.q_proj": 24}, conf
            assert conf["alpha_pattern"] == {"self_attn.q_proj": 24} and conf["lora_alpha"] == 8
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "child.py").write_text(CHILD)
    proc = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "spec.json"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    assert set(got) == set(expected)
    for key, logits in expected.items():
        torch.testing.assert_close(got[key], logits, rtol=0, atol=1e-5, msg=key)
    # the adapters matter: different tasks give different logits
    assert (expected["llama/ctr"] - expected["llama/rating"]).abs().max() > 1e-3


def test_fused_export_has_zero_rows_outside_the_query_slice():
    from ckf_dist.model.export import task_adapter_weights

    cfg = ModelConfig(backbone="tiny-gptneox")
    cfg.lora.shared_targets = ["o"]     # only the task adapter on query_key_value
    bb, _ = load_backbone(cfg)
    model = build_ckf_model(cfg, bb, torch.randn(3, 8), torch.randn(3, 8))
    randomize_adapters(model)
    merged = task_adapter_weights(model, 1)
    name = "gpt_neox.layers.0.attention.query_key_value"
    a, b = merged[name]
    assert a.shape == (16, 64) and b.shape == (192, 16)
    heads = b.view(4, 3, 16, 16)                 # [head, q/k/v, head_dim, r] in NeoX's per-head layout
    assert heads[:, 0].abs().min() > 0 and heads[:, 1:].abs().max() == 0
