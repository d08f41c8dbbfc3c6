"""Tile choices of the fused projection GEMM: host-side policy, no Triton code.

Kept apart from the kernels' device code (``_triton_multi_lora.py``) so the choice can be read,
tested and changed without loading Triton or re-jitting anything.
"""

from __future__ import annotations

# Tiles of the fused projection GEMM on the GPU, picked per (out, in, row bucket, layout,
# adapters, dtype) by Triton's autotuner on first use: (BM, BN, BK, stages, warps), Hopper-sized
# bf16/fp16 tiles (wgmma wants BM >= 64) with 3-4 stage pipelines; configs that do not fit
# shared memory (fp32) are skipped by the tuner. Six, to bound the first step's compile time.
GEMM_TILES = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
              (64, 256, 64, 4, 4), (128, 64, 64, 4, 4)]


def fits_dropout_epilogue(bm: int, bn: int, warps: int) -> bool:
    """The dX epilogue with a dropout mask keeps a second BM x BN fp32 accumulator: with more
    than 64 accumulator registers per thread the two no longer fit (spills at sm_90)."""
    return bm * bn <= 64 * 32 * warps


def prune_gemm_tiles(configs, named_args, **kwargs):
    if not kwargs.get("HAS_MASK"):
        return configs
    fit = [c for c in configs if fits_dropout_epilogue(c.kwargs["BM"], c.kwargs["BN"], c.num_warps)]
    return fit or configs
