"""``ckf plan``: its memory prediction against the tensor bytes a real training step holds, and
its tables on the presets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from conftest import free_port  # noqa: E402

from ckf_dist.config import config_from_dict, config_to_dict, dump_config  # noqa: E402
from ckf_dist.train import memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(str(p) for p in (ROOT / "configs").glob("*.yaml"))


def small_llama(folder: Path, layers: int = 4) -> str:
    """A random Llama backbone folder (hidden 256, the SmolLM2 vocabulary): activations weigh as
    much as the weights, unlike the 64-wide tiny models."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if not (folder / "config.json").is_file():
        config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)


def probe(cfg, tmp: Path) -> dict:
    """One training step of ``cfg`` in a fresh process (tests/memory_probe.py): its peak bytes."""
    config, out = tmp / f"{cfg.run_name}.yaml", tmp / f"{cfg.run_name}.json"
    config.write_text(dump_config(cfg))
    env = dict(os.environ, CKF_PROBE_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_probe.py"), str(config), str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


CASES = {
    # backbone, micro-batch, gradient checkpointing, LoRA dropout
    "tiny": ("tiny-llama", 4, False, 0.0),
    "small": ("small", 8, False, 0.0),
    "small-checkpointed-dropout": ("small", 8, True, 0.1),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_prediction_is_within_20_percent_of_a_measured_training_step(case, prepared_dataset, tmp_path_factory):
    backbone, micro, ckpt, dropout = CASES[case]
    tmp = tmp_path_factory.mktemp(f"plan-{case}")
    if backbone == "small":
        backbone = small_llama(tmp_path_factory.getbasetemp() / "small-llama")
    d = config_to_dict(prepared_dataset.cfg)
    d.update(run_name=f"plan-{case}")
    d["model"].update(backbone=backbone, gradient_checkpointing=ckpt)
    d["model"]["lora"].update(dropout=dropout)
    d["train"].update(num_workers=1, zero_stage=2, micro_batch_size=micro, grad_accum=1, storage=str(tmp / "ckpt"))
    cfg = config_from_dict(d, "<test_plan>")
    measured = probe(cfg, tmp)
    manifest = prepared_dataset.manifest
    counts = memory.count_model(cfg, manifest["n_users"], manifest["n_items"])
    shape = memory.Shape(micro, measured["length"], measured["answer"])
    est = memory.estimate(counts, cfg, 1, shape)
    static = sum(est[k] for k in ("frozen weights", "trainable weights", "fp32 masters"))
    # the parameter side is exact: the model and DeepSpeed's flat partitions before the step
    assert abs(static - measured["static"]) <= 0.01 * measured["static"], (static, measured)
    ratio = est["total"] / measured["peak"]
    assert 0.8 <= ratio <= 1.2, (ratio, {k: round(v / 1e6, 2) for k, v in est.items()}, measured)
    # and the activations are a real part of it in the small cases
    if case != "tiny":
        assert est["activations"] > 0.25 * est["total"]


def test_plan_prints_a_table_per_preset(capsys):
    from ckf_dist.stages.plan import run_plan

    plans = run_plan(PRESETS, [], None, 80.0)
    text = capsys.readouterr().out
    assert len(plans) == len(PRESETS) >= 5
    for path, p in zip(PRESETS, plans):
        assert f"{Path(path).name}: " in text
        configured = next(m for m in p["modes"].values() if m["configured"])
        assert configured["bytes"]["total"] == pytest.approx(sum(v for k, v in configured["bytes"].items()
                                                                  if k != "total"))
    assert text.count("largest micro-batch") == len(PRESETS)
    llama7 = plans[[Path(p).name for p in PRESETS].index("llama2-7b-8gpu.yaml")]
    assert llama7["frozen"] > 6.7e9 and 2.5e7 < llama7["trainable"] < 3.5e7          # Llama-2-7B + CKF adapters
    ckpt = llama7["modes"]["checkpointing"]
    assert ckpt["bytes"]["frozen weights"] == pytest.approx(llama7["frozen"] * 2)     # bf16, replicated by ZeRO-2
    assert ckpt["bytes"]["activations"] < llama7["modes"]["no checkpointing"]["bytes"]["activations"] / 5


def test_largest_micro_batch_is_the_edge_of_the_budget(prepared_dataset):
    cfg = config_from_dict(dict(config_to_dict(prepared_dataset.cfg), model={"backbone": "tiny-llama"}), "<t>")
    counts = memory.count_model(cfg, 48, 40)
    shape = memory.Shape(1, 256, 8)
    budget = 2e9
    m = memory.largest_micro_batch(counts, cfg, 2, shape, budget)
    total = lambda mb: memory.estimate(counts, cfg, 2, memory.Shape(mb, 256, 8))["total"]  # noqa: E731
    assert m >= 1 and total(m) <= budget < total(m + 1)
    assert memory.largest_micro_batch(counts, cfg, 2, shape, 1e3) == 0


def test_ckf_plan_command(tmp_path):
    proc = subprocess.run([str(Path(sys.executable).parent / "ckf"), "plan", str(ROOT / "configs" / "llama2-70b-zero3.yaml"),
                           "--gpus", "16", "--gpu-memory", "40", "--mfu", "0.4", "--peak-tflops", "989"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on 16 GPU(s), ZeRO-3" in proc.stdout and "(in 40 GiB)" in proc.stdout and "tokens/s" in proc.stdout
