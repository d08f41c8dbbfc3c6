"""Configuration of the CKF model: backbone, bridge (meta-network) and Multi-LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class LoraConfig:
    """Task-shared and task-specific LoRA placement and shape (paper defaults)."""

    r: int = 16
    alpha: float = 64.0
    dropout: float = 0.1
    shared_r: int = 0                 # 0: same as r
    shared_alpha: float = 0.0         # 0: same as alpha (scale = alpha / r for each adapter kind)
    shared_targets: list[str] = field(default_factory=lambda: ["k", "v", "o"])   # roles, see model.backbone
    task_targets: list[str] = field(default_factory=lambda: ["q"])
    fused_kernels: bool = True        # Triton kernels on CUDA when available; torch path elsewhere
    # a layer whose adapters write all of its outputs over a frozen, unhooked base runs the
    # projection and the adapters as one op: on CUDA with fused_kernels the Triton GEMM with
    # the expand in its epilogue (instead of cuBLAS plus the separate adapter op), elsewhere
    # one torch autograd node that writes dX once (docs/architecture.md, docs/performance.md)
    fuse_base_gemm: bool = True

    def validate(self) -> None:
        if self.r < 1:
            raise ValueError(f"r: must be >= 1, got {self.r}")
        if self.shared_r < 0:
            raise ValueError(f"shared_r: must be >= 0 (0 = same as r), got {self.shared_r}")
        if self.alpha <= 0 or self.shared_alpha < 0:
            raise ValueError(f"alpha: must be > 0 (shared_alpha >= 0), got {self.alpha}, {self.shared_alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.shared_targets and not self.task_targets:
            raise ValueError("shared_targets: no LoRA placed at all (shared_targets and task_targets are both empty)")


@dataclass
class BridgeConfig:
    """The personalized mapping bridge from CF embeddings into the LLM's input space."""

    pooling: Literal["mean", "attention"] = "mean"
    meta_hidden: int = 32
    meta_activation: Literal["relu", "none"] = "relu"   # between MetaNet's two linear layers
    personalized: bool = True         # False: a shared (non-personalized) user mapping, for ablations
    # scale of the injected slot tokens: "default" = nn.Linear's initialisation (tokens several
    # times the norm of real token embeddings); "match" = Map_U/Map_V initialised so slot tokens
    # start at the backbone's median embedding norm; "normalize" = "match", and every slot token
    # is rescaled to that norm at each forward
    slot_scale: Literal["default", "match", "normalize"] = "default"
    use_cf_slots: bool = True         # False: text-only CKF (ablation baseline)

    def validate(self) -> None:
        if self.meta_hidden < 1:
            raise ValueError(f"meta_hidden: must be >= 1, got {self.meta_hidden}")
        if self.slot_scale not in ("default", "match", "normalize"):
            raise ValueError(f"slot_scale: 'default', 'match' or 'normalize', got {self.slot_scale!r}")


@dataclass
class ModelConfig:
    """Frozen backbone plus the trainable CKF parts."""

    backbone: str = "smollm2"         # "smollm2" (embedded GGUF), a local HF folder, or "tiny-<family>" for tests
    # What exported adapters name as their base (peft's base_model_name_or_path), e.g. the hub id
    # "meta-llama/Llama-2-7b-hf" of the folder in `backbone`; "" = the folder's absolute path.
    backbone_id: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    cache_dir: str = ""               # where a converted GGUF backbone is cached; "" = ~/.cache/ckf_dist
    lora: LoraConfig = field(default_factory=LoraConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
