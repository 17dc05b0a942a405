"""
What APT costs, against deep prompt tuning, LoRA and head-only training, each measured against the frozen model.

Random weights at the real sizes (cost does not depend on the weights): ViLT-B/32 at 384x384 with 40 text tokens
(185 tokens, 12 layers) and BridgeTower-base (METER's architecture; 6 cross-modal layers per modality, where APT
and deep prompts go). Reported per method: added parameters, added forward FLOPs (torch.utils.flop_counter, so
matmuls, attention and convolutions), activation bytes saved for backward (a deterministic memory proxy), and the
wall time of a forward pass and of a training step. Times are noisy on shared machines, so every variant runs in
the same process, interleaved, and we report medians of per-repetition ratios. A sweep over the number of prompts
and the sequence length, on one ViLT-sized layer, shows how each cost grows.

    python -m benchmarks.efficiency            # CPU, writes the "efficiency" section of RESULTS.md and a PNG
    python -m benchmarks.efficiency --tiny     # seconds-long smoke run on tiny models
    python -m benchmarks.efficiency --device cuda --dtype bf16 --batch-size 32

On a GPU the whole ViLT is bound by its CPU-side patch sampling: `benchmarks/efficiency_layers.py` (run by
`benchmarks/gpu_check.sh`) times its encoder layers alone, under bf16 autocast. Both are built on the measuring
primitives of `benchmarks/cost.py`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

import torch
import transformers as T

from .cost import (
    RANK,
    Backbone,
    LayerStack,
    benchmark_backbone,
    clocks,
    forward_flops,
    interleaved_times,
    make_variant,
    median_ratio,
    target,
    to_device,
)
from .cost_tables import backbone_markdown, targets_markdown
from .markdown import RESULTS_PATH, environment, markdown_table, write_section
from .plots import plot_cost_sweeps

SECTION = "efficiency"
TEXT_TOKENS = 40
PLOT = Path("results") / "efficiency.png"  # relative to RESULTS.md's folder, beside the other plots


def targets(large: int, small: int) -> list[tuple[str, str, float, str]]:
    """The targets on ViLT on a CPU, for p=`large` (200) and p=`small` (50)."""
    return [
        target("apt_vs_analytic", large, 0.05, "within"),
        target("apt_vs_deep_flops", large, 0.18, "max"),
        # Not below 1.054, the deterministic FLOP ratio of the two steps: APT's backward adds 8*n*p*d per layer.
        target("step_apt_lora", large, 1.07, "max"),
        target("step_apt_lora", small, 1.01, "max"),
        target("step_deep_apt", large, 2.0, "min"),
        target("infer_apt_base", large, 1.045, "max"),
    ]


def vilt(tiny: bool, batch_size: int) -> Backbone:
    if tiny:
        config = T.ViltConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            image_size=64,
            patch_size=16,
            vocab_size=99,
            num_labels=10,
        )
    else:
        config = T.ViltConfig(num_labels=3129)  # ViLT-B/32, VQAv2 answer vocabulary
    config.max_image_length = -1  # keep every patch: 145 image tokens at 384x384
    model = T.ViltForQuestionAnswering(config)
    side = config.image_size
    inputs = {
        "input_ids": torch.randint(3, 99, (batch_size, TEXT_TOKENS)),
        "pixel_values": torch.randn(batch_size, 3, side, side),
    }
    return Backbone(
        "ViLT",
        f"ViLT-B/32 sized: d={config.hidden_size}, {config.num_hidden_layers} layers, {TEXT_TOKENS} text + "
        f"{(side // config.patch_size) ** 2 + 1} image tokens ({side}x{side}), batch {batch_size}",
        model,
        inputs,
        "classifier",
        [f"vilt.encoder.layer.{i}" for i in range(config.num_hidden_layers)],
        ["query", "value"],
        config.hidden_size,
    )


def bridgetower(tiny: bool, batch_size: int) -> Backbone:
    if tiny:
        small = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
        config = T.BridgeTowerConfig(
            text_config=dict(hidden_size=64, vocab_size=99, **small),
            vision_config=dict(hidden_size=64, num_hidden_layers=2, image_size=32, patch_size=8),
            hidden_size=64,
            **small,
        )
    else:
        config = T.BridgeTowerConfig()  # bridgetower-base: RoBERTa-base + CLIP ViT-B/16 at 288x288, 6 fusion layers
    model = T.BridgeTowerForImageAndTextRetrieval(config)
    side, patch = config.vision_config.image_size, config.vision_config.patch_size
    inputs = {
        "input_ids": torch.randint(3, 99, (batch_size, TEXT_TOKENS)),
        "pixel_values": torch.randn(batch_size, 3, side, side),
    }
    layers = config.num_hidden_layers
    return Backbone(
        "BridgeTower",
        f"BridgeTower-base sized: d={config.hidden_size}, {layers}+{layers} cross-modal layers "
        f"(APT on their {4 * layers} attention modules), {TEXT_TOKENS} text + {(side // patch) ** 2 + 1} image "
        f"tokens ({side}x{side}), batch {batch_size}",
        model,
        inputs,
        "itm_score",
        [f"bridgetower.cross_modal_{stream}_layers.{i}" for stream in ("text", "image") for i in range(layers)],
        r".*cross_modal_(text|image)_layers\.\d+\.(attention|crossattention)\.self\.(query|value)",
        config.hidden_size,
    )


def sweep_layer(
    vary: str, values: list[int], fixed: dict, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict:
    """How each method's added FLOPs and training-step time grow with p or n, on one ViLT-sized layer."""
    config = T.ViltConfig(hidden_size=32, num_attention_heads=2, intermediate_size=37) if args.tiny else T.ViltConfig()
    d = config.hidden_size
    flops = {"APT": [], "APT (analytic)": [], "deep prompt": [], "LoRA": []}
    step = {"APT": [], "deep prompt": [], "LoRA": []}
    for value in values:
        setting = {**fixed, vary: value}
        layer = T.models.vilt.modeling_vilt.ViltLayer(config).to(device=device, dtype=dtype)
        hidden_states = torch.randn(args.batch_size, setting["n"], d, device=device, dtype=dtype, requires_grad=True)
        backbone = Backbone(
            "layer",
            "",
            LayerStack([layer], hidden_states),
            {},
            "head",
            ["layers.0"],
            ["query", "value"],
            d,
            apt_targets=["attention"],
            input_needs_grad=True,
        )
        backbone.model.requires_grad_(False)
        variants = [make_variant(backbone, "frozen"), make_variant(backbone, "LoRA")]
        variants += [make_variant(backbone, method, setting["p"]) for method in ("deep prompt", "APT")]
        frozen = forward_flops(variants[0])
        for variant in variants[1:]:
            flops[variant.name.split(" p=")[0]].append((forward_flops(variant) - frozen) / 1e9)
        flops["APT (analytic)"].append(sum(4 * n * p * d for n, p, d in variants[-1].apt_inputs) / 1e9)
        times = interleaved_times(variants, args.sweep_repetitions, device)
        for variant in variants[1:]:
            ratio = median_ratio(times, "step", variant.name, "frozen", clocks(device)[0])
            step[variant.name.split(" p=")[0]].append(ratio)
    title = ", ".join(f"{k}={v}" for k, v in fixed.items() if k != vary)
    return dict(variable=vary, values=values, flops=flops, step=step, title=f"one ViLT-B layer, d={d}, {title}")


def write_report(results: list, sweeps: list, args: argparse.Namespace, device: torch.device, output: Path) -> None:
    vilt_summary = next(result["summary"] for backbone, result in results if backbone.name == "ViLT")
    (output / PLOT).parent.mkdir(parents=True, exist_ok=True)
    plot_cost_sweeps(sweeps, output / PLOT)
    sections = [
        "## Efficiency (`benchmarks/efficiency.py`)",
        environment(device) + f"- dtype: {args.dtype}; times are medians, [quartiles] of per-repetition ratios where "
        "there are enough; random weights (cost does not depend on them); p prompts, "
        f"APT and LoRA rank {RANK}; LoRA on query/value of the same layers; every trained method also trains "
        "the task head. 'saved for backward' counts the distinct activation tensors autograd keeps in a "
        "training forward (weights excluded): a deterministic proxy of training memory.",
        targets_markdown(targets(*args.prompts), vilt_summary, device),
        *(backbone_markdown(backbone.name, backbone.description, result, device) for backbone, result in results),
        f"### How costs grow\n\n![cost sweeps]({PLOT.as_posix()})\n\nOne ViLT-B layer, batch {args.batch_size}, its "
        "input needing grad; training step relative to the same frozen layer.\n\n" + sweeps_markdown(sweeps),
    ]
    write_section(SECTION, "\n\n".join(sections), output / RESULTS_PATH.name)


def sweeps_markdown(sweeps: list) -> str:
    parts = []
    for sweep in sweeps:
        methods = list(sweep["flops"])
        header = [sweep["variable"], *(f"{m} GFLOPs" for m in methods), *(f"{m} step" for m in sweep["step"])]
        table = [
            [
                str(value),
                *(f"{sweep['flops'][m][i]:.3f}" for m in methods),
                *(f"{sweep['step'][m][i]:.3f}x" for m in sweep["step"]),
            ]
            for i, value in enumerate(sweep["values"])
        ]
        parts.append(f"{sweep['title']}:\n\n" + markdown_table(header, table))
    return "\n".join(parts)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models and one repetition: a smoke test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 keeps timings stable when other jobs share the cores",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repetitions", type=int, default=5, help="interleaved timed repetitions on ViLT")
    parser.add_argument(
        "--bridgetower-repetitions",
        type=int,
        default=1,
        help="the same on BridgeTower, 3x the cost per repetition and no targets",
    )
    parser.add_argument("--prompts", type=int, nargs=2, default=[200, 50], help="p for the tables: large, small")
    parser.add_argument("--sweep-prompts", type=int, nargs="+", default=[10, 25, 50, 100, 200, 400])
    parser.add_argument("--sweep-tokens", type=int, nargs="+", default=[64, 185, 400, 800])
    parser.add_argument("--sweep-repetitions", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=["vilt", "bridgetower"], default=["vilt", "bridgetower"])
    parser.add_argument("--output-dir", type=Path, default=RESULTS_PATH.parent)
    args = parser.parse_args(argv)
    if args.tiny:
        args.repetitions = args.bridgetower_repetitions = args.sweep_repetitions = 1
        args.prompts, args.sweep_prompts, args.sweep_tokens = [8, 2], [2, 8], [16, 32]
    return args


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for name in args.models:
        backbone = {"vilt": vilt, "bridgetower": bridgetower}[name](args.tiny, args.batch_size)
        to_device(backbone, device, dtype)
        start = time.perf_counter()
        repetitions = args.repetitions if name == "vilt" else args.bridgetower_repetitions
        results.append((backbone, benchmark_backbone(backbone, args.prompts, repetitions, device)))
        print(f"{backbone.name}: {time.perf_counter() - start:.0f} s", flush=True)
    sweeps = [
        sweep_layer(variable, values, {"n": 185, "p": 200}, args, device, dtype)
        for variable, values in (("p", args.sweep_prompts), ("n", args.sweep_tokens))
    ]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_report(results, sweeps, args, device, args.output_dir)
    print(targets_markdown(targets(*args.prompts), results[0][1]["summary"], device))


if __name__ == "__main__":
    main()
