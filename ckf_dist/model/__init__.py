"""ckf_dist.model: backbone registry/loader, bridge (meta-network), Multi-LoRA, CKFModel, scoring, peft export.

Imports neither deepspeed nor ray (nor transformers/peft until a backbone is loaded or exported).
"""

from ckf_dist.model.backbone import FAMILIES, family_of, load_backbone, tiny_backbone
from ckf_dist.model.bridge import Bridge
from ckf_dist.model.ckf import CKFModel, build_ckf_model, curriculum_weight
from ckf_dist.model.config import BridgeConfig, LoraConfig, ModelConfig
from ckf_dist.model.export import export_peft, load_trainable, save_trainable
from ckf_dist.model.multi_lora import LoraRouting, MultiLoraLinear, multi_lora_torch

__all__ = [
    "FAMILIES", "Bridge", "BridgeConfig", "CKFModel", "LoraConfig", "LoraRouting", "ModelConfig",
    "MultiLoraLinear", "build_ckf_model", "curriculum_weight", "export_peft", "family_of", "load_backbone",
    "load_trainable", "multi_lora_torch", "save_trainable", "tiny_backbone",
]
