"""The design sweep behind the default parametrisation, on the causal-LM benchmark's short budget.

Each variant changes the default's three constants and nothing else: the initial term's target ratio
(`INITIAL_TERM_RATIO`), the trained prompts' std relative to the reference's (`TRAINED_PROMPT_STD_RATIO`) and a factor
on W2's multiplier (`key_map_scale`), optionally with the authors' optimiser and with only some of APT's tensors
trained (the others keep their init). A variant is written `ratio,std_ratio,W2_factor,reference_optimiser[,trained]`,
e.g. `3e-3,16,1,0` (the default of parametrisation version 3) or `3e-3,16,1,0,apt_s` (only the output scale trains;
tensor names joined by `+`).
Records resume: a (variant, lr, seed, steps) already in the file is skipped. The few-shot image variants are methods
of `benchmarks.quality` (`APT p=200 term R P/c std S`).

Run from the repository root, e.g.
`python -m benchmarks.design_sweep --variants 3e-3,16,1,0 1e-2,16,1,0 --lrs 3e-3 1e-2`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
from pathlib import Path
from unittest import mock

import torch
from peft import get_peft_model

from peft_apt import APTConfig, APTLayer
from peft_apt import layer as apt_layer

from . import causal_lm_quality
from .markdown import environment

OUTPUT = Path(__file__).resolve().parent / "results" / "design" / "causal-lm-30-steps.jsonl"
DEFAULT_PROMPT_SCALE, DEFAULT_KEY_MAP_SCALE = apt_layer.calibrated_prompt_scale, apt_layer.key_map_scale


def use_variant(ratio: float, std_ratio: float, W2_factor: float) -> None:
    """Make `APTConfig()`'s default init use these constants (for the adapters created after the call)."""
    apt_layer.calibrated_prompt_scale = lambda p, d, size=None: DEFAULT_PROMPT_SCALE(p, d, size, target=ratio)
    apt_layer.TRAINED_PROMPT_STD_RATIO = std_ratio
    apt_layer.key_map_scale = lambda d: DEFAULT_KEY_MAP_SCALE(d) * W2_factor


def training_only(tensor_names: list[str]):
    """Within the block, the benchmark's adapted models train only the APT tensors named (e.g. `apt_s`)."""
    unknown = set(tensor_names) - set(APTLayer.adapter_layer_names)
    if unknown:
        raise ValueError(f"Unknown APT tensors {sorted(unknown)}: choose from {APTLayer.adapter_layer_names}")

    def adapted(model, config):
        peft_model = get_peft_model(model, config)
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad and not any(f".{tensor}." in name for tensor in tensor_names):
                parameter.requires_grad_(False)
        return peft_model

    return mock.patch.object(causal_lm_quality, "get_peft_model", adapted)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", required=True, help="ratio,std_ratio,W2_factor,reference_optimiser")
    parser.add_argument("--lrs", nargs="+", type=float, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--tiny", action="store_true", help="the causal-LM benchmark's tiny Llama: a smoke test")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    benchmark = causal_lm_quality.parse_args(["--steps", str(args.steps), *(["--tiny"] if args.tiny else [])])
    records = [json.loads(line) for line in args.output.read_text().splitlines()] if args.output.exists() else []
    done = {(r["variant"], r["lr"], r["seed"], r["steps"]) for r in records}
    base, _, train_blocks, held_out_blocks = causal_lm_quality.load_base(benchmark)
    machine = environment(torch.device("cpu"))
    for variant, lr in itertools.product(args.variants, args.lrs):
        if (variant, lr, args.seed, args.steps) in done:
            continue
        ratio, std_ratio, W2_factor, reference, *trained = variant.split(",")
        use_variant(float(ratio), float(std_ratio), float(W2_factor))
        config = APTConfig(task_type="CAUSAL_LM")
        optimiser = "reference" if reference == "1" else None
        with training_only(trained[0].split("+")) if trained else contextlib.nullcontext():
            record = causal_lm_quality.train_and_evaluate(
                config, base, train_blocks, held_out_blocks, lr, args.seed, benchmark, optimiser
            )
        record.update(variant=variant, lr=lr, seed=args.seed, steps=args.steps, environment=machine)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{variant} lr {lr:g}: perplexity {record['perplexity']:.3f}", flush=True)


if __name__ == "__main__":
    main()
