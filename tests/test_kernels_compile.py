"""The Multi-LoRA Triton kernels compile for Hopper (sm_90), with no GPU present.

Triton compiles ahead of time for an explicit target with the ptxas bundled in its wheel,
so CI catches what the interpreter cannot: type and shape errors of the real compiler,
constructs it rejects, and whether bf16 products reach the Hopper tensor cores (HGMMA in
the SASS). Register use and spills are printed (``-s``) for tuning; they are not asserted.
"""

from __future__ import annotations

import importlib.util
import subprocess
import tempfile
from pathlib import Path

import pytest

from ckf_dist.kernels import tiles

pytestmark = pytest.mark.slow   # compiles Triton kernels for sm_90 (minutes on 2 cores)

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

KERNELS = Path(__file__).resolve().parents[1] / "ckf_dist" / "kernels" / "_triton_multi_lora.py"
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
POINTERS = {"IDS": "*i64", "FLAG": "*i32", "KEEP": "*u8", "CH_LO": "*i32", "CH_HI": "*i32", "H": "*fp32",
            "GB": "*fp32", "GA": "*fp32", "PSB": "*fp32", "PTB": "*fp32", "PSA": "*fp32", "PTA": "*fp32"}
DATA = {"M", "Y", "AS", "AT", "BS", "BT", "MB", "MA", "GBS", "GBT", "GAS", "GAT", "X", "W", "BIAS", "ES", "ET"}


@pytest.fixture(scope="module")
def compiled_module():
    """A fresh, compiled-mode copy of the kernels (test_kernels.py loads the interpreted one)."""
    if not (BIN / "ptxas").exists():
        pytest.skip("triton wheel without the NVIDIA ptxas")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        spec = importlib.util.spec_from_file_location("_ckf_kernels_sm90", KERNELS)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod, ASTSource, GPUTarget("cuda", 90, 32)


def compile_sm90(env, fn, dtype: str, consts: dict, num_warps: int, num_stages: int = 3,
                 aligned: set | None = None):
    """``consts`` may also pin plain int arguments (a launch specialises ints equal to 1 to
    constants); ``aligned``: arguments the launcher marks divisible by 16 (pointers from
    torch's allocator, strides and sizes that are multiples of 16)."""
    mod, ast_source, target = env
    sig = {}
    attrs = {}
    for i, p in enumerate(fn.params):
        name = p.name
        if name in (aligned or ()):
            attrs[(i,)] = [["tt.divisibility", 16]]
        if p.is_constexpr or name in consts:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = POINTERS[name]
        elif name in DATA:
            sig[name] = f"*{dtype}"
        elif name.startswith("scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    kernel = triton.compile(ast_source(fn, sig, consts, attrs), target=target,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    regs = " ".join(w for line in usage.splitlines() if "REG:" in line for w in line.split()[:2])
    print(f"{fn.__name__} {dtype} {consts} warps={num_warps}: {regs}")
    return sass, usage


# (dtype, has_shared, has_task, block_m, warps, shared rank pad, task rank pad): what the launcher
# picks for 8k+ / <8k / 32k+ tokens; unequal ranks caught a loop-carried type change on the H200
VARIANTS = [("bf16", True, True, 32, 4, 16, 16), ("bf16", True, False, 16, 4, 16, 16),
            ("bf16", False, True, 64, 8, 16, 16), ("fp16", True, True, 16, 4, 16, 16),
            ("fp32", True, True, 32, 4, 16, 16), ("bf16", True, True, 32, 4, 16, 64),
            # rs 8 / rt 64 at < 8k tokens (fp16 faulted on the H200 with these paddings); the
            # launcher now pads both to 64 (KernelConfig.equal_rank_pad)
            ("fp16", True, True, 16, 4, 16, 64), ("fp16", True, True, 16, 4, 64, 64)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_kernels_compile_for_hopper(compiled_module, variant):
    dtype, has_s, has_t, bm, warps, rs_p, rt_p = variant
    mod = compiled_module[0]
    compute = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype]
    common = dict(HAS_S=has_s, HAS_T=has_t, RS_P=rs_p, RT_P=rt_p, COMPUTE=compute,
                  PREC="ieee" if dtype == "fp32" else "tf32")
    sass = [compile_sm90(compiled_module, mod._lora_kernel, dtype,
                         dict(common, SAVE_H=True, ACCUM=has_s and has_t, EXPAND=True, HAS_MASK=False, CHECK=has_t,
                              BM=bm, BK=128, BN=128), warps)[0],
            compile_sm90(compiled_module, mod._dw_kernel, dtype, dict(common, BM=64, BD=64, HAS_MASK=False), 4)[0],
            compile_sm90(compiled_module, mod._dw_kernel, dtype, dict(common, BM=64, BD=64, HAS_MASK=True), 4)[0]]
    if dtype != "fp32":          # half-precision products must run on the tensor cores
        assert all("HGMMA" in s or "HMMA" in s for s in sass)


def test_small_kernels_compile(compiled_module):
    for has_s, has_t in ((True, True), (True, False), (False, True)):
        compile_sm90(compiled_module, compiled_module[0]._wsum_kernel, "bf16",
                     {"HAS_S": has_s, "HAS_T": has_t, "BLOCK": 1024}, 4)


GEMM_ALIGNED = {"X", "W", "Y", "BIAS", "H", "IDS", "KEEP", "skm", "ES", "ET", "sxm", "swk", "swn", "sym", "ses_n",
                "ses_r",
                "set_t", "set_n", "set_r", "N_ROWS", "NOUT", "K", "RS", "RT", "RC", "M_BUCKET"}


# The projection GEMM with the adapters' expand in its epilogue, at every autotuner tile, as
# launched at 4096 x 4096 with r = 16 + 16 (unit strides and multiples of 16 specialised as
# a launch does): forward (x @ weight^T, the weight's rows along K) with shared + task + bias,
# shared only, task only, and the dX pass (dy @ weight, rows along N), with a dropout mask at
# the tiles the autotuner keeps for it. It must reach the
# tensor cores (HGMMA: Hopper's wgmma) and must not spill.
LAYOUTS = {"fwd": dict(sxk=1, swk=1, syn=1, ses_r=1, set_r=1, HAS_MASK=False),
           "dx": dict(sxk=1, swn=1, syn=1, ses_n=1, set_n=1, HAS_MASK=False),
           "dx-dropout": dict(sxk=1, swn=1, syn=1, ses_n=1, set_n=1, skn=1, HAS_MASK=True)}


@pytest.mark.parametrize("tile", list(range(6)), ids=lambda i: "tile%d" % i)
def test_gemm_lora_compiles_for_hopper_without_spills(compiled_module, tile):
    mod = compiled_module[0]
    assert len(tiles.GEMM_TILES) == 6, "update the parametrization to the autotuner's tiles"
    bm, bn, bk, stages, warps = tiles.GEMM_TILES[tile]
    variants = [("fwd", True, True, True), ("dx", True, True, False)]
    if tiles.fits_dropout_epilogue(bm, bn, warps):      # the autotuner prunes the others for dropout
        variants.append(("dx-dropout", True, True, False))
    if tile == 0:
        variants += [("fwd", True, False, False), ("fwd", False, True, False), ("fwd", False, False, False)]
    for layout, has_s, has_t, bias in variants:
        consts = dict(HAS_BIAS=bias, HAS_S=has_s, HAS_T=has_t, RS_P=16, RT_P=16, BM=bm, BN=bn, BK=bk,
                      GROUP_M=8, EVEN_K=True, COMPUTE=tl.bfloat16, PREC="tf32", **LAYOUTS[layout])
        aligned = GEMM_ALIGNED - set(consts)
        sass, usage = compile_sm90(compiled_module, mod._gemm_lora_kernel, "bf16", consts, warps, stages,
                                   aligned=aligned)
        assert "HGMMA" in sass, (layout, consts)
        assert "STACK:0" in usage.replace(" ", ""), f"spills at {layout} {consts}: {usage}"


SHRINK_ALIGNED = {"M", "Y", "H", "IDS", "FLAG", "KEEP", "stride_km", "AS", "AT", "BS", "BT", "stride_mm", "stride_ym",
                  "sas_r", "sat_t",
                  "sat_r", "sbs_n", "sbt_t", "sbt_n", "N_ROWS", "K", "NOUT", "RS", "RT", "RC"}


# The shrink pass of linear_multi_lora_triton (H = x A^T, no expand compiled in) at its row
# blocks (64; 128 tried), specialised as launched on x [N, 4096] with r = 16 + 16:
# products on the tensor cores, no spills.
@pytest.mark.parametrize("bm", [64, 128])
def test_shrink_pass_compiles_without_spills(compiled_module, bm):
    mod = compiled_module[0]
    for has_s, has_t, masked in ((True, True, False), (True, False, False), (False, True, False), (True, True, True)):
        consts = dict(HAS_S=has_s, HAS_T=has_t, RS_P=16, RT_P=16, COMPUTE=tl.bfloat16, PREC="tf32", SAVE_H=True,
                      ACCUM=False, EXPAND=False, HAS_MASK=masked, CHECK=has_t, BM=bm, BK=128, BN=64,
                      stride_mk=1, stride_kk=1, sas_k=1, sat_k=1, stride_yn=1, sbs_r=1, sbt_r=1)
        sass, usage = compile_sm90(compiled_module, mod._lora_kernel, "bf16", consts, 4, 3,
                                   aligned=SHRINK_ALIGNED - set(consts))
        assert "HGMMA" in sass or "HMMA" in sass, consts
        assert "STACK:0" in usage.replace(" ", ""), f"spills at {consts}: {usage}"


def test_dropout_epilogue_keeps_tiles(compiled_module):
    mod = compiled_module[0]
    cfgs = mod._gemm_lora_tuned.configs
    kept = tiles.prune_gemm_tiles(cfgs, {}, HAS_MASK=True)
    assert 0 < len(kept) < len(cfgs) and tiles.prune_gemm_tiles(cfgs, {}, HAS_MASK=False) == cfgs


DW_ALIGNED = {"MB", "GB", "PSB", "PTB", "MA", "KEEP", "GA", "PSA", "PTA", "IDS", "CH_LO", "CH_HI", "smb_m", "sma_m", "skm",
              "DB", "DA", "N_ROWS", "CHUNK", "RS", "RT", "RC"}


# The weight-gradient kernel as launched on contiguous dy / x [N, 4096] (unit strides
# specialised), with and without the dropout mask on x: tensor cores, no spills.
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "dropout-mask"])
def test_dw_kernel_compiles_without_spills(compiled_module, masked):
    mod = compiled_module[0]
    for has_s, has_t in ((True, True), (True, False), (False, True)):
        consts = dict(HAS_S=has_s, HAS_T=has_t, RS_P=16, RT_P=16, COMPUTE=tl.bfloat16, PREC="tf32", BM=64, BD=64,
                      HAS_MASK=masked, smb_d=1, sma_d=1, skd=1)
        sass, usage = compile_sm90(compiled_module, mod._dw_kernel, "bf16", consts, 4, 3,
                                   aligned=DW_ALIGNED - set(consts))
        assert "HGMMA" in sass, consts
        assert "STACK:0" in usage.replace(" ", ""), f"spills at {consts}: {usage}"
