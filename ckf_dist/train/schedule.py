"""What one optimizer step is made of, as pure functions: the parameter groups, each group's LR
schedule, the answer-token masking, and the seed of each micro-batch's dropout."""

from __future__ import annotations

import numpy as np

from ckf_dist.contract import IGNORE_INDEX, STREAMS


def param_groups(model) -> dict[str, list]:
    """The trainable parameters by optimizer group: ``lora`` (adapters) and ``bridge`` (when present)."""
    groups: dict[str, list] = {"lora": [], "bridge": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["bridge" if name.startswith("bridge.") else "lora"].append(p)
    return {g: ps for g, ps in groups.items() if ps}


def mask_answer_eos(batch: dict, eos_id: int) -> dict:
    """The batch with every end-of-sequence label ignored (``train.loss_eos: false``)."""
    out = dict(batch)
    for stream in STREAMS:
        lab = batch[f"{stream}_labels"]
        out[f"{stream}_labels"] = lab.masked_fill(lab == eos_id, IGNORE_INDEX)
    return out


def group_lr_lambda(group: str, total_steps: int, tcfg):
    """The LR multiplier of one group: warm-up/decay, times w(t) (lora) or 1 - w(t) (bridge) under
    ``train.curriculum: lr``."""
    from ckf_dist.model import curriculum_weight

    base = lr_lambda(total_steps, tcfg.warmup_ratio)
    if tcfg.curriculum != "lr":
        return base
    if group == "lora":
        return lambda step: base(step) * curriculum_weight(step, total_steps)
    return lambda step: base(step) * (1.0 - curriculum_weight(step, total_steps))


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to zero."""
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return fn


def micro_seed(seed: int, step: int, index: int) -> int:
    """The torch seed of micro-batch ``index`` of the global batch of ``step`` (rank x grad_accum +
    micro): dropout is the same whichever rank and world size run it."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])
