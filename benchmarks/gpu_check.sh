#!/usr/bin/env bash
# APT's correctness and cost on one GPU, in one call of under 4 minutes (benchmarks/GPU_RUN.md says more):
#   1. correctness: an APT layer of ViLT-B's size against the float64 reference, on CUDA, fp32 and bf16 autocast
#      (tests/test_device_numerics.py), up to 60 s;
#   2. cost: ViLT-B/32's 12 encoder layers alone under bf16 autocast, batch 64 (targets), 8 and 256, a profiler table
#      and torch.compile of the whole stack (benchmarks/efficiency_layers.py), up to 175 s: a further batch size or
#      compiled model starts only if expected to end within 150 s, and what was measured is written after every phase.
# Run from the repository root. For a machine without network, wheels in .whl/ (aenum, peft, transformers, regex)
# are installed first, into $SITE (/tmp/site).
#     bash benchmarks/gpu_check.sh
#     DEVICE=cpu TINY=1 PYTHON=/path/to/venv/python bash benchmarks/gpu_check.sh    # the same path on CPU, tiny sizes
# Writes numerics.log, efficiency_layers.log, efficiency_layers.json, profile.txt and RESULTS.md (its section) to
# $OUT when set, else outputs/gpu-check. Exits non-zero if a step failed; every step runs.
set -uo pipefail
DEVICE=${DEVICE:-cuda}
OUTPUT=${OUT:-outputs/gpu-check}
mkdir -p "$OUTPUT"
start=$SECONDS
. benchmarks/gpu_env.sh

DEVICE=$DEVICE "$PYTHON" - <<'PY' || { echo "gpu_check: needs torch (with CUDA for DEVICE=cuda), transformers>=5, peft>=0.18 and aenum" >&2; exit 2; }
import os
import peft, torch, transformers
import peft_apt
if os.environ["DEVICE"] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(0), f"CUDA {torch.version.cuda}", end=", ")
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__},",
      f"peft_apt from {os.path.dirname(peft_apt.__file__)}")
PY
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv || true; fi

# the tiny CPU dry run shares its cores with other work: only its time limits are loose
if [ -n "${TINY:-}" ]; then limits=(600 600); else limits=(60 175); fi
status=0
timeout "${limits[0]}" "$PYTHON" -m pytest tests/test_device_numerics.py -q -p no:cacheprovider 2>&1 | tee "$OUTPUT/numerics.log" \
    || { status=$?; echo "gpu_check: the numerics check failed ($status); timings follow anyway" >&2; }
echo "gpu_check: numerics done at $((SECONDS - start)) s"

options=(--device "$DEVICE" --output-dir "$OUTPUT" --deadline 150)
if [ -n "${TINY:-}" ]; then options+=(--tiny --threads 1); fi
timeout "${limits[1]}" "$PYTHON" -m benchmarks.efficiency_layers "${options[@]}" 2>&1 | tee "$OUTPUT/efficiency_layers.log" \
    || { status=$?; echo "gpu_check: the benchmark failed or timed out ($status)" >&2; }
echo "gpu_check: done at $((SECONDS - start)) s, status $status"
exit "$status"
