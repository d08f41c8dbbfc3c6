#!/usr/bin/env bash
# Fused Multi-LoRA on one GPU: correctness, then timing, then one CKF training step.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default: $OUT if set (device machine), else bench/out
#
# Installs nothing and needs no network: python3 with torch, triton and transformers (the
# GPU image has them). Each part runs in its own process under a time limit, so a crash or
# a hang in one still leaves the others' results; all merge into OUT_DIR/multilora_gpu.json
# and the short table is printed last. Budget: ~5-8 minutes on an H100/H200 (limits 140+170+200 s).
# Smoke test of the same code on CPU (no GPU): python bench/multilora_gpu.py --cpu-smoke
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT_DIR="${1:-${OUT:-$REPO/bench/out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
EXTRA="${GPU_CHECK_ARGS:-}"      # e.g. --cpu-smoke to rehearse this script on a CPU machine
RES="$OUT_DIR/multilora_gpu.json"
rm -f "$RES"
cd "$REPO"

echo "== device and software"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
    --format=csv 2>&1 | head -3 || echo "nvidia-smi unavailable"
"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/env.txt"
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton MISSING:", e)
try:
    import transformers; print("transformers", transformers.__version__)
except Exception as e:
    print("transformers MISSING:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "SMs", p.multi_processor_count, "mem GiB", round(p.total_memory / 2**30, 1),
          "L2 MB", round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
else:
    print("NO CUDA DEVICE")
EOF

status=0
run_part() {   # name, time limit (s): one process per part, its log under OUT_DIR
    local part="$1" limit="$2"
    echo "== $part (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$PY" bench/multilora_gpu.py --parts "$part" --out "$RES" \
        --no-report $EXTRA > "$OUT_DIR/$part.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT_DIR/$part.log"
    if [ "$rc" -ne 0 ]; then echo "!! $part exited with $rc (124/137: time limit)"; status=1; fi
}

# Limits sum to 510 s (+10 s kill grace each), inside one 600 s device command. The first
# calls of the fused projection compile its GEMM and autotune it (6 tiles) per shape.
run_part correctness "${LIMIT_CORRECTNESS:-140}"
run_part timing "${LIMIT_TIMING:-170}"
run_part train "${LIMIT_TRAIN:-200}"

echo
echo "== summary ($OUT_DIR)"
"$PY" bench/multilora_gpu.py --report "$RES" $EXTRA || status=1
exit $status
