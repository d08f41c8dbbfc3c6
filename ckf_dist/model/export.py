"""Export: the trainable state as safetensors, and one standard peft LoRA folder per task.

A task's peft adapter holds the task-shared adapter plus that task's adapter. Where both sit
on one module their ranks are concatenated (A stacked on rows, B on columns):

    s_s B_s A_s x + s_t B_t A_t x = [s_s B_s | s_t B_t] [A_s ; A_t] x            (7)

with the scales folded into B, so every module uses lora_alpha = r (scaling 1) and ranks that
differ between modules go in ``rank_pattern``/``alpha_pattern``. An adapter that owns only a
slice of a fused qkv output (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) gets zero rows
of B outside its slice, so plain peft reproduces it exactly.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ckf_dist.model.backbone import family_of
from ckf_dist.storage import atomic_dir, atomic_file

PEFT_WEIGHTS = "adapter_model.safetensors"


def save_trainable(model, path) -> None:
    """Write ``model.trainable_state_dict()`` (bridge + adapters) to one safetensors file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "ckf-trainable", "n_tasks": str(model.n_tasks)})


def load_trainable(model, path) -> None:
    """Load a file written by :func:`save_trainable` into ``model`` (names and shapes checked)."""
    model.load_trainable_state_dict(load_file(str(path)))


def _full_b(b: torch.Tensor, index: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """B with ``out_features`` rows: ``b`` placed at ``index`` rows, zeros elsewhere (fused qkv slice)."""
    if index is None:
        return b
    full = b.new_zeros(out_features, b.shape[1])
    full[index.to(b.device)] = b
    return full


def task_adapter_weights(model, task: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> merged ``(A [r, in], B [out, r])`` of shared + task ``task``, scales folded in (eq. 7)."""
    merged = {}
    for layer in model.lora_layers():
        a_parts, b_parts = [], []
        with torch.no_grad():
            if layer.shared is not None:
                a_parts.append(layer.lora_shared_A.float())
                b_parts.append(_full_b(layer.lora_shared_B.float() * layer.shared.scale, layer.shared_index,
                                       layer.out_features))
            if layer.task is not None:
                a_parts.append(layer.lora_task_A[task].float())
                b_parts.append(_full_b(layer.lora_task_B[task].float() * layer.task.scale, layer.task_index,
                                       layer.out_features))
        merged[layer.name] = (torch.cat(a_parts).cpu(), torch.cat(b_parts, dim=1).cpu())
    return merged


def _pattern_key(name: str) -> str:
    """The part of a module name after its layer index (``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``)."""
    parts = name.split(".")
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[numeric[-1] + 1:]) if numeric else name


def _rank_config(ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """The most common rank and a pattern for modules that differ (keys by role suffix when unambiguous)."""
    default = Counter(ranks.values()).most_common(1)[0][0]
    by_key: dict[str, set[int]] = {}
    for name, r in ranks.items():
        by_key.setdefault(_pattern_key(name), set()).add(r)
    pattern = {}
    for name, r in ranks.items():
        if r == default:
            continue
        key = _pattern_key(name)
        # a suffix key is safe only when every module it matches has the same rank
        pattern[key if len(by_key[key]) == 1 else re.escape(name)] = r
    return default, pattern


def _targets(model, names: list[str]) -> list[str]:
    """peft target_modules: role suffixes when they match exactly the adapted modules, else full names."""
    keys = sorted({_pattern_key(n) for n in names})
    wanted = set(names)
    others = [n for n, _ in model.backbone.named_modules() if n not in wanted]
    if any(n == k or n.endswith("." + k) for n in others for k in keys):
        return sorted(names)
    return keys


def export_peft(model, out_dir, base_model_name_or_path: str = "", tasks: list[int] | None = None) -> dict:
    """Write ``out_dir/<task name>/`` (adapter_config.json + adapter_model.safetensors) per task.

    Each folder loads with plain ``PeftModel.from_pretrained(backbone, folder)`` and reproduces
    the CKF model's text-only logits for that task. Returns ``{task name: folder}``.
    """
    from peft import LoraConfig

    out_dir = Path(out_dir)
    family = family_of(model.backbone)
    base_name = base_model_name_or_path or model.cfg.backbone
    folders = {}
    for t in (tasks if tasks is not None else range(model.n_tasks)):
        merged = task_adapter_weights(model, t)
        ranks = {name: a.shape[0] for name, (a, _) in merged.items()}
        r, pattern = _rank_config(ranks)
        config = LoraConfig(
            r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern),   # alpha = r: scaling 1
            target_modules=_targets(model, list(merged)), lora_dropout=model.cfg.lora.dropout, bias="none",
            fan_in_fan_out=family.conv1d, task_type="CAUSAL_LM", base_model_name_or_path=base_name,
            inference_mode=True)
        weights = {}
        for name, (a, b) in merged.items():
            weights[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
            weights[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        folder = out_dir / model.task_names[t]
        with atomic_dir(folder) as tmp:
            config.save_pretrained(str(tmp))
            save_file(weights, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
            (tmp / "ckf_task.json").write_text(json.dumps({"task": model.task_names[t], "task_id": t}) + "\n")
        folders[model.task_names[t]] = folder
    return folders
