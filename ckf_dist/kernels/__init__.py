"""Fused Triton kernels for Multi-LoRA (imports nothing else of ckf_dist).

Importable without triton: the Triton code loads lazily on the first call of
``multi_lora_triton`` or ``linear_multi_lora_triton`` (the frozen projection's GEMM with
the adapters fused into its epilogue). Use ``triton_available()`` to decide between this op and the torch
path; on CPU the op runs only under ``TRITON_INTERPRET=1`` (tests).
"""

from .linear_lora import linear_multi_lora_triton
from .multi_lora import KernelConfig, interpret_mode, multi_lora_triton, triton_available
from .reference import multi_lora_naive, multi_lora_reference
from .routing import Routing, make_routing

__all__ = ["multi_lora_triton", "linear_multi_lora_triton", "triton_available", "interpret_mode", "KernelConfig",
           "Routing", "make_routing", "multi_lora_reference", "multi_lora_naive"]
