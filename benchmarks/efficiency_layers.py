"""
APT's cost on a GPU: the 12 encoder layers of a ViLT-B/32-sized model timed alone.

A whole ViLT on a GPU is dominated by its CPU-bound patch sampling, which hides what the adapters cost; so the layers
run alone, on random hidden states (batch B, n=185 tokens, d=768, random weights: cost does not depend on them), under
bf16 autocast with fp32 weights as `Trainer --bf16` runs them. Methods: frozen, LoRA r=4 on query/value, APT p=200 and
p=50 (APTConfig defaults otherwise), deep prompt (VPT-deep: p tokens joined to every layer's input) p=200 and p=50. Per
batch size: inference (no_grad) and training step (forward, backward, AdamW on the trainable parameters) in interleaved
repetitions, medians of per-repetition ratios (inference to the frozen layers, steps to LoRA), FLOPs, and peak CUDA
memory above what was allocated before. At the first batch size also: a torch.profiler table of the top kernels of a
step, and torch.compile of the whole stack (frozen, LoRA, APT; compile time reported apart and excluded from the
timings). The targets (`gpu_targets`) are judged at the first batch size.

    python -m benchmarks.efficiency_layers --device cuda             # what benchmarks/gpu_check.sh runs
    python -m benchmarks.efficiency_layers --device cpu --tiny       # every code path, in seconds
    python -m benchmarks.efficiency_layers --report-only RUN.json    # RESULTS.md's section again, from a run's JSON

Writes efficiency_layers.json, profile.txt and a RESULTS.md section to --output-dir ($OUT when set), after every
phase, so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
import transformers as T
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from .cost import (
    Backbone,
    LayerStack,
    Variant,
    benchmark_backbone,
    inference,
    interleaved_times,
    judge,
    make_variant,
    median_ratio,
    peak_memory,
    synchronize,
    target,
    timed,
    training_step,
)
from .cost_tables import backbone_markdown, targets_markdown
from .markdown import RESULTS_PATH, environment, markdown_table, write_section

RECORD = "efficiency_layers.json"
PROFILE = "profile.txt"
COMPILED_METHODS = ("frozen", "LoRA", "APT")
PROFILED_METHODS = ("APT", "LoRA")


def gpu_targets(large: int, small: int) -> list[tuple[str, str, float, str]]:
    """What APT should cost on a GPU, against the frozen layers, LoRA and deep prompts, for p=`large` (200) and
    p=`small` (50)."""
    return [
        target("infer_apt_base", large, 1.06, "max"),
        target("infer_apt_base", small, 1.03, "max"),
        target("step_apt_lora", large, 1.07, "max"),
        target("step_apt_lora", small, 1.03, "max"),
        target("step_deep_apt", large, 2.0, "min"),
        target("step_deep_apt", small, 1.2, "min"),
        target("peak_apt_lora", large, 1.05, "max"),
        target("peak_apt_lora", small, 1.05, "max"),
    ]


def vilt_layers(args: argparse.Namespace, batch_size: int, device: torch.device) -> Backbone:
    """ViLT-B/32's encoder layers (d=768, 12 heads, 12 layers, intermediate 3072) on random hidden states."""
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    config = T.ViltConfig(**small) if args.tiny else T.ViltConfig()
    autocast = {"bf16": torch.bfloat16, "none": None}[args.autocast]
    torch.manual_seed(0)
    with device:  # made where they run: quick, even at ViLT-B size
        layers = [T.models.vilt.modeling_vilt.ViltLayer(config) for _ in range(config.num_hidden_layers)]
        hidden_states = torch.randn(batch_size, args.tokens, config.hidden_size)
    return Backbone(
        f"batch {batch_size}",
        f"{config.num_hidden_layers} ViLT layers (d={config.hidden_size}, {config.num_attention_heads} heads, "
        f"intermediate {config.intermediate_size}), batch {batch_size}, {args.tokens} tokens, fp32 weights"
        + (f", {args.autocast} autocast" if autocast else ""),
        LayerStack(layers, hidden_states, autocast),
        {},
        "head",
        [f"layers.{i}" for i in range(config.num_hidden_layers)],
        ["query", "value"],
        config.hidden_size,
        apt_targets=["attention"],
    )


def repetitions_for(batch_size: int, args: argparse.Namespace) -> int:
    """About the same time per batch size: fewer repetitions at larger batches, more (at most 3x) at smaller."""
    scaled = round(args.repetitions * args.batch_sizes[0] / batch_size)
    return max(min(args.repetitions, 5), min(3 * args.repetitions, scaled))


def method_variant(backbone: Backbone, method: str, prompts: int) -> Variant:
    return make_variant(backbone, method, prompts if method == "APT" else 0)


def profile_step(variant: Variant, device: torch.device, steps: int, rows: int = 15) -> dict:
    """Where a training step's time goes: the top kernels by self CUDA time (on CPU, the top operators by self CPU
    time), per step, with torch.profiler's own table for the details."""
    for _ in range(2):
        training_step(variant)
    synchronize(device)
    cuda = device.type == "cuda"
    with torch.profiler.profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as profiler:
        for _ in range(steps):
            training_step(variant)
        synchronize(device)
    averages = profiler.key_averages()
    events = [e for e in averages if e.device_type == (DeviceType.CUDA if cuda else DeviceType.CPU)]

    def self_time(event) -> float:  # microseconds
        return event.self_device_time_total if cuda else event.self_cpu_time_total

    total = sum(self_time(e) for e in events)
    top = sorted(events, key=self_time, reverse=True)[:rows]
    return dict(
        method=variant.name,
        steps=steps,
        unit="kernel" if cuda else "operator",
        total_ms=total / 1e3 / steps,
        launches=sum(e.count for e in events) / steps,
        top=[
            dict(
                name=e.key,
                calls=e.count / steps,
                ms=self_time(e) / 1e3 / steps,
                share=self_time(e) / total if total else 0.0,
            )
            for e in top
        ],
        table=averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows),
    )


def set_recompile_limit(limit: int) -> None:
    """12 layers of one class: room for a graph per layer where dynamo breaks the graph inside them."""
    config = torch._dynamo.config
    setattr(config, "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit", limit)


def compiled_run(backbone: Backbone, args: argparse.Namespace, device: torch.device, started: float) -> dict:
    """torch.compile of the whole layer stack, interleaved with the same methods eager. Compile time is the first
    inference and the first step (they compile separate graphs), reported apart and never timed again."""
    from torch._dynamo.utils import counters

    set_recompile_limit(64)
    eager, compiled, compile_seconds, graph_breaks, skipped = [], [], {}, {}, []
    for method in COMPILED_METHODS:
        variant = method_variant(backbone, method, args.prompts[0])
        # the next model's compile should take at most twice the longest so far (frozen compiles one graph only)
        longest = max((sum(seconds.values()) for seconds in compile_seconds.values()), default=0.0)
        if not fits(args, started, 2 * longest):
            skipped.append(variant.name)
            continue
        module = variant.model.get_base_model() if hasattr(variant.model, "get_base_model") else variant.model
        function = torch.compile(module, backend=args.compile_backend)
        twin = dataclasses.replace(
            variant, name=f"{variant.name} compiled", forward=lambda function=function: function()
        )
        breaks = sum(counters["graph_break"].values())
        compile_seconds[twin.name] = {"infer": timed(lambda: inference(twin), device)["wall"]}
        if twin.steps:
            compile_seconds[twin.name]["step"] = timed(lambda: training_step(twin), device)["wall"]
        graph_breaks[twin.name] = sum(counters["graph_break"].values()) - breaks
        eager.append(variant)
        compiled.append(twin)
    times = interleaved_times(eager + compiled, args.compile_repetitions, device, args.warmup) if compiled else {}
    rows = {}
    for variant, twin in zip(eager, compiled):
        for each in (variant, twin):
            rows[each.name] = compiled_row(each, variant, twin, times, device)
    return dict(
        rows=rows,
        compile_seconds=compile_seconds,
        graph_breaks=graph_breaks,
        skipped=skipped,
        repetitions=args.compile_repetitions,
        backend=args.compile_backend,
    )


def compiled_row(each: Variant, variant: Variant, twin: Variant, times: dict, device: torch.device) -> dict:
    """One of an eager `variant` and its compiled `twin`: per kind, median ms, the ratio to the reference of the same
    mode (frozen, LoRA) and, compiled, to eager; peak step memory."""
    row = {}
    for kind, reference in (("infer", "frozen"), ("step", "LoRA")):
        if not times[each.name][kind]["wall"]:
            continue
        same_kind = f"{reference} compiled" if each is twin else reference
        row[kind] = dict(
            ms=1e3 * statistics.median(times[each.name][kind]["wall"]),
            vs_reference=median_ratio(times, kind, each.name, same_kind, "wall") if same_kind in times else None,
            vs_eager=median_ratio(times, kind, twin.name, variant.name, "wall") if each is twin else None,
        )
    row["peak"] = peak_memory(lambda: training_step(each), device) if each.steps else None
    return row


def fits(args: argparse.Namespace, started: float, estimate: float) -> bool:
    """Whether a phase expected to take `estimate` seconds ends before the deadline."""
    return args.deadline is None or time.perf_counter() - started + estimate <= args.deadline


def print_targets(record: dict) -> None:
    first = record["batch_sizes"][0]
    device = torch.device(record["device_type"])
    for item in judge(gpu_targets(*record["prompts"]), record["batches"][str(first)]["summary"], device):
        print(
            f"{'PASS' if item['holds'] else 'FAIL'} {item['description']}: {item['value']:.3f} "
            f"(target {item['target']}, batch {first})",
            flush=True,
        )


def across_batches_markdown(record: dict) -> str:
    """Every target's median at every batch size measured (judged at the first only)."""
    device = torch.device(record["device_type"])
    measured = [b for b in record["batch_sizes"] if str(b) in record["batches"]]
    judged = {
        b: {
            item["description"]: item
            for item in judge(gpu_targets(*record["prompts"]), record["batches"][str(b)]["summary"], device)
        }
        for b in measured
    }
    table = []
    for description, *_ in gpu_targets(*record["prompts"]):
        if not any(description in judged[b] for b in measured):
            continue  # peak memory off CUDA
        cells = []
        for b in measured:
            item = judged[b].get(description)
            cells.append("" if item is None else f"{item['value']:.3f}" + ("" if item["holds"] else " (missed)"))
        target = next((judged[b][description]["target"] for b in measured if description in judged[b]), "")
        table.append([description, target, *cells])
    return markdown_table(["ratio", "target", *(f"batch {b}" for b in measured)], table)


def compiled_markdown(compiled: dict) -> str:
    header = [
        "method",
        "compile s (inference + step)",
        "graph breaks",
        "inference ms",
        "x frozen (same mode)",
        "x eager",
        "step ms",
        "x LoRA (same mode)",
        "x eager",
        "peak step memory",
    ]
    table = []
    for name, row in compiled["rows"].items():
        seconds = compiled["compile_seconds"].get(name)
        line = [
            name,
            " + ".join(f"{s:.1f}" for s in seconds.values()) if seconds else "",
            str(compiled["graph_breaks"].get(name, "")),
        ]
        for kind in ("infer", "step"):
            cell = row.get(kind)
            line += (
                ["", "", ""]
                if cell is None
                else [
                    f"{cell['ms']:.2f}",
                    "" if cell["vs_reference"] is None else f"{cell['vs_reference']:.3f}",
                    "" if cell["vs_eager"] is None else f"{cell['vs_eager']:.3f}",
                ]
            )
        line.append("" if row["peak"] is None else f"{row['peak'] / 2**30:.2f} GiB")
        table.append(line)
    skipped = (
        f" Skipped (would end past the deadline): {', '.join(compiled['skipped'])}." if compiled["skipped"] else ""
    )
    return (
        f"`torch.compile(backend={compiled['backend']!r})` of the whole stack; {compiled['repetitions']} "
        f"interleaved repetitions with the same methods eager; compile time (first inference, first step) "
        f"excluded from the times.{skipped}\n\n" + markdown_table(header, table)
    )


def profile_markdown(profile: dict) -> str:
    unit = profile["unit"]
    table = [
        [f"`{item['name'][:90]}`", f"{item['calls']:.0f}", f"{item['ms']:.3f}", f"{100 * item['share']:.1f}%"]
        for item in profile["top"]
    ]
    return (
        f"{profile['method']}: {profile['total_ms']:.2f} ms of {unit} time and {profile['launches']:.0f} "
        f"{unit}s per step (mean of {profile['steps']} steps).\n\n"
        + markdown_table([unit, "calls / step", "ms / step", "share"], table)
    )


def report_markdown(record: dict) -> str:
    device = torch.device(record["device_type"])
    first = record["batch_sizes"][0]
    parts = [
        f"## Efficiency on {record['device_name']}: ViLT-B/32's encoder layers alone "
        "(`benchmarks/efficiency_layers.py`)",
        record["environment"] + f"- Setup: {record['description']}. Methods: frozen, LoRA r=4 on "
        "query/value, APT (APTConfig defaults, p as named), deep prompt (VPT-deep, p tokens joined to every layer's "
        "input). Inference: no_grad; training step: forward, backward, AdamW step on the trainable parameters. "
        + (
            "Times are CUDA-synchronised wall times"
            if device.type == "cuda"
            else "Times are CPU times (wall times in brackets)"
        )
        + "; ratios are medians [quartiles] of per-repetition ratios of interleaved runs in one "
        "process. Peak memory: torch.cuda.max_memory_allocated above what was allocated before, with every variant "
        "warm. The FLOP ratio (deterministic) is the floor a ratio of times would reach if every FLOP cost the same.",
    ]
    if str(first) in record["batches"]:
        parts += [
            f"### Targets at batch {first}",
            targets_markdown(
                gpu_targets(*record["prompts"]),
                record["batches"][str(first)]["summary"],
                device,
                title=f"target (batch {first})",
            ),
            "### The same ratios at every batch size",
            across_batches_markdown(record),
        ]
    for batch in record["batch_sizes"]:
        result = record["batches"].get(str(batch))
        if result is not None:
            parts.append(backbone_markdown(f"Batch {batch}", result["description"], result, device))
    if record["skipped"]:
        parts.append(f"Skipped (would end past the deadline): {', '.join(record['skipped'])}.")
    if record.get("profiles"):
        parts.append(f"### Where a training step's time goes (batch {first}, torch.profiler)")
        parts += [profile_markdown(profile) for profile in record["profiles"]]
    if record.get("compiled"):
        parts += [f"### torch.compile (batch {first})", compiled_markdown(record["compiled"])]
    return "\n\n".join(parts)


def write_outputs(record: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / RECORD).write_text(json.dumps(record, indent=1))
    if record.get("profiles"):
        (output / PROFILE).write_text("\n\n".join(f"{p['method']}\n{p['table']}" for p in record["profiles"]))
    write_section(record["section"], report_markdown(record), output / RESULTS_PATH.name)


def new_record(args: argparse.Namespace, device: torch.device, target_backbone: Backbone) -> dict:
    """The run's JSON record before anything is measured: what a report needs to say how it was measured."""
    first = args.batch_sizes[0]
    return dict(
        section=f"efficiency-layers-{device.type}",
        environment=environment(device),
        device_type=device.type,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        description=target_backbone.description.replace(
            f"batch {first}", "batch " + ", ".join(map(str, args.batch_sizes))
        ),
        prompts=args.prompts,
        batch_sizes=args.batch_sizes,
        batches={},
        skipped=[],
        profiles=[],
        compiled=None,
        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    )


def measure(args: argparse.Namespace) -> dict:
    """Every batch size that fits before the deadline (the profile at the first), then torch.compile; the outputs
    are rewritten after every phase."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    first = args.batch_sizes[0]
    target_backbone = vilt_layers(args, first, device)
    record = new_record(args, device, target_backbone)
    first_seconds = 0.0
    for batch in args.batch_sizes:
        # about as many seconds of timed runs per batch size; the untimed passes (FLOPs, memory) grow with it
        if batch != first and not fits(args, started, first_seconds * max(1.0, batch / first / 2)):
            record["skipped"].append(f"batch {batch}")
            continue
        phase = time.perf_counter()
        backbone = target_backbone if batch == first else vilt_layers(args, batch, device)
        measure_batch(record, batch, backbone, args, device)
        del backbone
        first_seconds = first_seconds or time.perf_counter() - phase
        print(f"batch {batch}: {time.perf_counter() - started:.0f} s", flush=True)
        write_outputs(record, args.output_dir)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.compile_backend != "none":
        record["compiled"] = compiled_run(target_backbone, args, device, started)
        print(f"torch.compile: {time.perf_counter() - started:.0f} s", flush=True)
        write_outputs(record, args.output_dir)
    return record


def measure_batch(record: dict, batch: int, backbone: Backbone, args: argparse.Namespace, device: torch.device) -> None:
    """Every method at one batch size into `record`; at the first, the targets' verdicts and the step profiles."""
    result = benchmark_backbone(
        backbone,
        args.prompts,
        repetitions_for(batch, args),
        device,
        baselines=("frozen", "LoRA"),
        warmup=args.warmup,
    )
    record["batches"][str(batch)] = dict(description=backbone.description, **result)
    if batch == args.batch_sizes[0]:
        print_targets(record)
        for method in PROFILED_METHODS:
            record["profiles"].append(
                profile_step(method_variant(backbone, method, args.prompts[0]), device, args.profile_steps)
            )


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny layers and sizes, one repetition: a smoke run")
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[64, 8, 256],
        help="the first is where targets are judged, the profile and torch.compile run",
    )
    parser.add_argument("--tokens", type=int, default=185)
    parser.add_argument("--prompts", type=int, nargs=2, default=[200, 50], help="p: large, small")
    parser.add_argument("--autocast", choices=["bf16", "none"], default="bf16")
    parser.add_argument(
        "--repetitions",
        type=int,
        default=20,
        help="interleaved repetitions at the first batch size; others get about the same time",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed interleaved rounds first")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--compile-backend", default="inductor", help="'none' skips torch.compile")
    parser.add_argument("--compile-repetitions", type=int, default=10)
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds from the start: a further batch size or compiled model begins only if it is "
        "expected to end by then (from the first batch size's time, and the longest compile so far)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="default: $OUT when set, else outputs/efficiency-layers; with --report-only, benchmarks/",
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="RUN_JSON",
        help="write the RESULTS.md section from a run's JSON (to benchmarks/RESULTS.md by default)",
    )
    return parser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    args = argument_parser().parse_args(argv)
    if args.report_only:
        args.output_dir = args.output_dir or RESULTS_PATH.parent
        return args
    args.output_dir = args.output_dir or Path(os.environ.get("OUT") or "outputs/efficiency-layers")
    if args.tiny:
        args.batch_sizes, args.tokens, args.prompts = [4, 2, 8], 16, [8, 2]
        args.repetitions = args.compile_repetitions = args.profile_steps = args.warmup = 1
        if args.compile_backend == "inductor":
            args.compile_backend = "aot_eager"  # dynamo and AOTAutograd as on a GPU, without a C++ build
    return args


def main() -> None:
    args = parse_args()
    if args.report_only:
        record = json.loads(args.report_only.read_text())
        write_section(record["section"], report_markdown(record), args.output_dir / RESULTS_PATH.name)
        print_targets(record)
    else:
        measure(args)


if __name__ == "__main__":
    main()
