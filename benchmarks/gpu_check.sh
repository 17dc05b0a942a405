#!/usr/bin/env bash
# APT's correctness and cost on one GPU, in one call of about 5 minutes (benchmarks/GPU_RUN.md says more):
#   1. correctness: an APT layer of ViLT-B's size against the float64 reference, on CUDA, fp32 and bf16 autocast
#      (tests/test_device_numerics.py), up to 60 s;
#   2. cost: the cost task's GPU experiments through the runner: ViLT-B/32's 12 encoder layers alone under bf16
#      autocast at batch 64, 8 and 256, then torch.compile at batch 64, up to 240 s; each experiment's result file is
#      written when it ends, so a run cut short keeps what it measured.
# Run from the repository root. For a machine without network, wheels in .whl/ are installed first (gpu_env.sh).
#     bash benchmarks/gpu_check.sh
#     TINY=1 PYTHON=/path/to/venv/python bash benchmarks/gpu_check.sh    # the same path on the CPU, tiny sizes
# Copies the logs and result files to $OUT when set, else outputs/gpu-check. Exits non-zero if a step failed.
set -uo pipefail
OUTPUT=${OUT:-outputs/gpu-check}
mkdir -p "$OUTPUT"
. benchmarks/gpu_env.sh
if [ -z "${TINY:-}" ]; then nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv || true; fi

status=0
timeout 60 "$PYTHON" -m pytest tests/test_device_numerics.py -q -p no:cacheprovider 2>&1 | tee "$OUTPUT/numerics.log" \
    || { status=$?; echo "gpu_check: the numerics check failed ($status); the cost follows anyway" >&2; }

task=benchmarks/tasks/cost
experiments=(apt/vilt-b32-layers-gpu-p200 lora/vilt-b32-layers-gpu-r4-qv apt/vilt-b32-layers-gpu-p50
    deep-prompt/vilt-b32-layers-gpu-p200 deep-prompt/vilt-b32-layers-gpu-p50
    apt/vilt-b32-layers-gpu-p200-compiled lora/vilt-b32-layers-gpu-r4-qv-compiled)
timeout 240 "$PYTHON" -m benchmarks.run "${experiments[@]/#/$task/experiments/}" ${TINY:+--tiny} 2>&1 \
    | tee "$OUTPUT/cost.log" || { status=$?; echo "gpu_check: the cost run failed or timed out ($status)" >&2; }
cp "$task/${TINY:+temporary_}results/"*--vilt-b32-layers-gpu-* "$OUTPUT/"
echo "gpu_check: done, status $status"
exit "$status"
