"""The DeepSpeed config, generated from ours; a user's DeepSpeed JSON overrides any key."""

from __future__ import annotations

import json
from pathlib import Path

from ckf_dist.train.config import TrainConfig


from ckf_dist.errors import TrainError  # noqa: E402  (re-exported)


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in recursively (override wins)."""
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


DEEPSPEED_BUCKET = 500_000_000      # DeepSpeed's default reduce/allgather bucket, in elements


def build_deepspeed_config(cfg: TrainConfig, world_size: int, dtype: str, n_trainable: int | None = None) -> dict:
    """DeepSpeed config for ``world_size`` ranks; ``dtype`` is the model's compute dtype.

    ``n_trainable``: the trainable parameter count. ZeRO-1/2 then size their gradient buckets to
    it: DeepSpeed allocates its whole default bucket (5e8 elements: 1 GB in bf16, 2 GB in fp32)
    every step, where CKF's trainable set is ~30M at 7B (a user's DeepSpeed JSON still wins).
    """
    zero: dict = {"stage": cfg.zero_stage}
    if n_trainable and cfg.zero_stage in (1, 2):
        bucket = int(min(DEEPSPEED_BUCKET, n_trainable))
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if cfg.zero_stage == 3:
        # Trainable parameters are small: keep them gathered between steps; the frozen
        # backbone is partitioned (zero.Init at load) and gathered layer by layer.
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=False)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16", "initial_scale_power": 12},
        # Our client AdamW is used on every stage; DeepSpeed must not swap in its compiled ones.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except FileNotFoundError:
            raise TrainError(f"train.deepspeed_config: {path} not found") from None
        except json.JSONDecodeError as exc:
            raise TrainError(f"train.deepspeed_config: {path} is not valid JSON ({exc})") from None
        if not isinstance(user, dict):
            raise TrainError(f"train.deepspeed_config: {path} must hold a JSON object")
        ds = deep_merge(ds, user)
        if (ds.get("checkpoint") or {}).get("load_universal"):
            raise TrainError(f"train.deepspeed_config: {path} sets checkpoint.load_universal; ckf resumes from its own "
                             f"committed checkpoints (on any train.num_workers), not from DeepSpeed universal checkpoints")
        # Keep the batch arithmetic consistent whatever the user overrode.
        ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    return ds
