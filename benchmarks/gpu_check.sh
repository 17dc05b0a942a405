#!/usr/bin/env bash
# The efficiency benchmark on a GPU, in under 5 minutes: CUDA timings (synchronised), bf16 by default.
# Run from the repository root on a machine with a CUDA build of torch, transformers and peft:
#     bash benchmarks/gpu_check.sh            # bf16;  DTYPE=fp32 bash benchmarks/gpu_check.sh for fp32
# Writes RESULTS.md and efficiency.png to $OUT (the device runner's output folder) or benchmarks/gpu/.
set -euo pipefail
PYTHON=${PYTHON:-python3}
DTYPE=${DTYPE:-bf16}
OUTPUT=${OUT:-benchmarks/gpu}

"$PYTHON" - <<'PY' || { echo "gpu_check: needs torch with CUDA, transformers>=5 and peft>=0.18 in \$PYTHON" >&2; exit 2; }
import peft, torch, transformers
assert torch.cuda.is_available(), "no CUDA device"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__},",
      torch.cuda.get_device_name(0))
PY
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv || true

time timeout 280 "$PYTHON" -m benchmarks.efficiency --device cuda --dtype "$DTYPE" --batch-size 32 \
    --repetitions 20 --bridgetower-repetitions 10 --sweep-repetitions 10 \
    --sweep-tokens 64 185 400 800 1600 --output-dir "$OUTPUT"
