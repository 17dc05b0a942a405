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
`benchmarks/gpu_check.sh`) times its encoder layers alone, under bf16 autocast, as issue #11 asks.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import transformers as T
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from peft_apt import APTConfig, APTLayer

from .baselines import DeepPrompts
from .plots import plot_cost_sweeps
from .results import RESULTS_PATH, environment, markdown_table, write_section

RANK = 4
SECTION = "efficiency"
TEXT_TOKENS = 40


# What each ratio in a benchmark's summary compares; its key there is `{name}_{p}`.
RATIOS = {
    "apt_vs_analytic": "APT added FLOPs / analytic sum of 4*n*p*d",
    "apt_vs_deep_flops": "APT added FLOPs / deep prompt's",
    "step_apt_lora": "training step APT / LoRA",
    "step_deep_apt": "training step deep prompt / APT",
    "infer_apt_base": "inference APT / frozen",
    "peak_apt_lora": "peak step memory APT / LoRA",
}


def target(ratio: str, p: int, bound: float, kind: str) -> tuple[str, str, float, str]:
    """(what, summary key, bound, kind), kind being "max", "min" or "within" (1 +/- bound)."""
    return f"{RATIOS[ratio]} (p={p})", f"{ratio}_{p}", bound, kind


def targets(large: int, small: int) -> list[tuple[str, str, float, str]]:
    """The issue's targets on ViLT on a CPU, for p=`large` (200) and p=`small` (50)."""
    return [
        target("apt_vs_analytic", large, 0.05, "within"),
        target("apt_vs_deep_flops", large, 0.18, "max"),
        # Not below 1.054, the deterministic FLOP ratio of the two steps: APT's backward adds 8*n*p*d per layer.
        target("step_apt_lora", large, 1.07, "max"),
        target("step_apt_lora", small, 1.01, "max"),
        target("step_deep_apt", large, 2.0, "min"),
        target("infer_apt_base", large, 1.045, "max"),
    ]


@dataclass
class Backbone:
    """A frozen model with its inputs and where each method attaches."""

    name: str
    description: str
    model: nn.Module
    inputs: dict
    head: str
    prompt_layers: list[str]
    lora_targets: list[str] | str
    hidden_size: int
    apt_targets: Optional[list[str]] = None  # None: the defaults for the model type
    input_needs_grad: bool = False  # a layer cut out of a network: backward still has to reach its input


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


@dataclass
class Variant:
    """One method applied to a copy of the frozen model, with what it takes to run and train it."""

    name: str
    model: nn.Module
    forward: Callable[[], torch.Tensor]
    added_params: int = 0
    steps: bool = False  # whether a training step means anything (the frozen model has nothing to train)
    optimizer: Optional[torch.optim.Optimizer] = None
    apt_inputs: list[tuple[int, int, int]] = field(default_factory=list)  # (tokens, p, d) per APT call


def logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def share_frozen_copy(model: nn.Module, keep: str) -> nn.Module:
    """A copy that shares every parameter and buffer outside `keep` (so variants cost no extra memory, inputs held
    as buffers included) and owns `keep`."""
    kept = model.get_submodule(keep)
    own = {id(t) for t in [*kept.parameters(), *kept.buffers()]}
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in own}
    return copy.deepcopy(model, memo)


def make_variant(backbone: Backbone, method: str, num_prompts: int = 0) -> Variant:
    """method is one of: frozen, head-only, LoRA, deep prompt, APT."""
    model = share_frozen_copy(backbone.model, backbone.head)
    model.requires_grad_(False)
    if method == "LoRA":
        config = LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules=backbone.lora_targets, modules_to_save=[backbone.head]
        )
        model = get_peft_model(model, config)
    elif method == "APT":
        config = APTConfig(
            num_prompts=num_prompts, r=RANK, target_modules=backbone.apt_targets, modules_to_save=[backbone.head]
        )
        model = get_peft_model(model, config)
    elif method == "deep prompt":
        layers = [model.get_submodule(path) for path in backbone.prompt_layers]
        model.deep_prompts = DeepPrompts(layers, num_prompts, backbone.hidden_size, init_bound=0.02)
    if method in ("head-only", "deep prompt"):
        model.get_submodule(backbone.head).requires_grad_(True)
    name = f"{method} p={num_prompts}" if num_prompts else method
    variant = Variant(name, model, lambda: logits(model(**backbone.inputs)))
    trainable = {path: p for path, p in model.named_parameters() if p.requires_grad}
    variant.added_params = sum(p.numel() for path, p in trainable.items() if backbone.head not in path.split("."))
    variant.steps = method != "frozen" or backbone.input_needs_grad
    if trainable:
        variant.optimizer = torch.optim.AdamW(trainable.values(), lr=1e-4)
    return variant


def record_apt_inputs(variant: Variant) -> list:
    """Hooks that log, per APT layer call, the numbers the analytic cost 4*n*p*d needs."""
    handles = []
    for module in variant.model.modules():
        if isinstance(module, APTLayer):

            def log(module, args, kwargs):
                query = kwargs.get(module.query_argument, args[0] if args else None)
                variant.apt_inputs.append((query.shape[:-1].numel(), module.num_prompts["default"], query.shape[-1]))

            handles.append(module.register_forward_pre_hook(log, with_kwargs=True))
    return handles


@torch.no_grad()
def forward_flops(variant: Variant) -> int:
    variant.model.eval()
    variant.apt_inputs.clear()
    handles = record_apt_inputs(variant)
    with FlopCounterMode(display=False) as counter:
        variant.forward()
    for handle in handles:
        handle.remove()
    return counter.get_total_flops()


def training_step_flops(variant: Variant) -> int:
    """FLOPs of a forward and backward in training mode: what a step's time would be if every FLOP cost the same."""
    variant.model.train()
    with FlopCounterMode(display=False) as counter:
        variant.forward().float().square().mean().backward()
    variant.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def saved_activation_bytes(variant: Variant) -> int:
    """Bytes of the distinct tensors autograd keeps for backward, weights and buffers excluded (training mode)."""
    model = variant.model.train()
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in fixed:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = variant.forward()  # kept alive until counted, so no storage is freed and reused meanwhile
    total = sum(saved.values())
    del output
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Wall time and this process's CPU time of `run`. On a CPU shared with other jobs, CPU time of a single-threaded
    run is the stable measure: it leaves out the time the scheduler gave to others."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    synchronize(device)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


@torch.no_grad()
def inference(variant: Variant) -> None:
    variant.model.eval()
    variant.forward()


def training_step(variant: Variant) -> None:
    variant.model.train()
    loss = variant.forward().float().square().mean()
    loss.backward()
    if variant.optimizer:
        variant.optimizer.step()
        variant.optimizer.zero_grad(set_to_none=True)


def peak_memory(run: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak CUDA memory of `run` above what was allocated before it; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    return torch.cuda.max_memory_allocated(device) - before


def drop_out_of_memory(variants: list[Variant], device: torch.device) -> tuple[list[Variant], list[str]]:
    """The variants whose training step (or inference) fits in CUDA memory, and the names of those that did not."""
    if device.type != "cuda":
        return variants, []
    fitting, dropped = [], []
    for variant in variants:
        try:
            training_step(variant) if variant.steps else inference(variant)
            fitting.append(variant)
        except torch.cuda.OutOfMemoryError:
            dropped.append(variant.name)
            if variant.optimizer:
                variant.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return fitting, dropped


def interleaved_times(variants: list[Variant], repetitions: int, device: torch.device, warmup: int = 1) -> dict:
    """
    {variant: {"infer" or "step": {"wall" or "cpu": [...]}}}, one entry per repetition.

    Each repetition times every variant once, in an order rotated from one repetition to the next, so drifts in
    machine load hit all variants alike and cancel in the per-repetition ratios. `warmup` untimed rounds come first.
    """
    times = {v.name: {kind: {"wall": [], "cpu": []} for kind in ("infer", "step")} for v in variants}
    for repetition in range(-warmup, repetitions):
        shift = max(repetition, 0) % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            measured = {"infer": timed(lambda: inference(variant), device)}
            if variant.steps:
                measured["step"] = timed(lambda: training_step(variant), device)
            for kind, clocks in measured.items():
                for clock, seconds in clocks.items():
                    if repetition >= 0:
                        times[variant.name][kind][clock].append(seconds)
    return times


def clocks(device: torch.device) -> list[str]:
    """The clocks to report, the one targets are judged on first: CPU time on CPU, wall time on CUDA."""
    return ["cpu", "wall"] if device.type == "cpu" else ["wall"]


def ratios(times: dict, kind: str, numerator: str, denominator: str, clock: str) -> list[float]:
    """Per-repetition ratios: both timings of a pair come from the same repetition, under the same load."""
    return [a / b for a, b in zip(times[numerator][kind][clock], times[denominator][kind][clock])]


def median_ratio(times: dict, kind: str, numerator: str, denominator: str, clock: str) -> float:
    return statistics.median(ratios(times, kind, numerator, denominator, clock))


def to_device(backbone: Backbone, device: torch.device, dtype: torch.dtype) -> None:
    backbone.model.to(device=device, dtype=dtype)
    backbone.inputs = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in backbone.inputs.items()
    }


def benchmark_backbone(
    backbone: Backbone,
    prompt_counts: list[int],
    repetitions: int,
    device: torch.device,
    baselines: tuple[str, ...] = ("frozen", "head-only", "LoRA"),
    warmup: int = 1,
) -> dict:
    """
    Every method on `backbone`: `baselines` (frozen first), then deep prompt and APT for each p. Inference times are
    relative to the frozen model, training steps to head-only where it is among the baselines, else to LoRA. Peak
    CUDA memory is measured once every variant is warm.
    """
    backbone.model.requires_grad_(False).eval()
    specs = [(method, 0) for method in baselines]
    specs += [(method, p) for p in prompt_counts for method in ("deep prompt", "APT")]
    variants, out_of_memory = drop_out_of_memory([make_variant(backbone, method, p) for method, p in specs], device)
    references = {"infer": "frozen", "step": "head-only" if "head-only" in baselines else "LoRA"}
    rows = {}
    for variant in variants:
        flops = forward_flops(variant)
        analytic = sum(4 * tokens * p * d for tokens, p, d in variant.apt_inputs)
        rows[variant.name] = dict(
            params=variant.added_params,
            flops=flops,
            analytic=analytic,
            step_flops=training_step_flops(variant) if variant.steps else None,
            saved=saved_activation_bytes(variant),
        )
    times = interleaved_times(variants, repetitions, device, warmup)
    for variant in variants:
        rows[variant.name]["infer_peak"] = peak_memory(lambda: inference(variant), device)
        rows[variant.name]["peak"] = peak_memory(lambda: training_step(variant), device) if variant.steps else None
    for name, row in rows.items():
        row["added_flops"] = row["flops"] - rows["frozen"]["flops"]
        for kind, reference in references.items():
            if times[name][kind]["wall"]:
                row[kind] = {
                    clock: (
                        1e3 * statistics.median(times[name][kind][clock]),
                        median_ratio(times, kind, name, reference, clock),
                    )
                    for clock in clocks(device)
                }
    summary = {}
    for p in prompt_counts:
        apt, deep = f"APT p={p}", f"deep prompt p={p}"
        if apt not in rows:
            continue
        summary[f"apt_vs_analytic_{p}"] = rows[apt]["added_flops"] / rows[apt]["analytic"]
        if deep in rows:
            summary[f"apt_vs_deep_flops_{p}"] = rows[apt]["added_flops"] / rows[deep]["added_flops"]
        if "LoRA" in rows and rows[apt]["peak"] is not None:
            summary[f"peak_apt_lora_{p}"] = rows[apt]["peak"] / rows["LoRA"]["peak"]
        for key, kind, numerator, denominator in [
            (f"step_apt_lora_{p}", "step", apt, "LoRA"),
            (f"step_deep_apt_{p}", "step", deep, apt),
            (f"infer_apt_base_{p}", "infer", apt, "frozen"),
        ]:
            if numerator not in rows or denominator not in rows:
                continue
            summary[key] = {clock: ratios(times, kind, numerator, denominator, clock) for clock in clocks(device)}
            flops = "step_flops" if kind == "step" else "flops"
            summary[key]["FLOPs"] = [rows[numerator][flops] / rows[denominator][flops]]
    return dict(rows=rows, summary=summary, repetitions=repetitions, references=references, out_of_memory=out_of_memory)


class LayerStack(nn.Module):
    """
    Transformer layers run one after the other on fixed hidden states (a buffer, so variants share it), as a model
    without inputs. The hidden states need grad where the layers stand in the middle of a network. With `autocast`
    the forward runs under `torch.autocast` in that dtype, weights staying as they are, as `Trainer --bf16` does.
    """

    def __init__(self, layers: list[nn.Module], hidden_states: torch.Tensor, autocast: Optional[torch.dtype] = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = nn.Identity()
        self.register_buffer("hidden_states", hidden_states, persistent=False)
        self.autocast = autocast

    def forward(self) -> torch.Tensor:
        hidden_states = self.hidden_states
        with (
            torch.autocast(hidden_states.device.type, dtype=self.autocast)
            if self.autocast
            else contextlib.nullcontext()
        ):
            for layer in self.layers:
                output = layer(hidden_states)
                hidden_states = output[0] if isinstance(output, tuple) else output
        return hidden_states


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


def format_count(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{prefix}{unit}"
    return f"{value:.0f}{unit}"


def format_time(measured: dict, reference: str) -> str:
    """'12 ms = 1.02x frozen (wall 1.05x)': the first clock's median and ratio, the other clock's ratio."""
    (clock, (ms, ratio)), *others = measured.items()
    text = f"{ms:.0f} ms = {ratio:.3f}x {reference}"
    return text + "".join(f" ({other} {other_ratio:.3f}x)" for other, (_, other_ratio) in others)


def backbone_markdown(title: str, description: str, result: dict, device: torch.device) -> str:
    rows, frozen = result["rows"], result["rows"]["frozen"]
    step_reference = result.get("references", {}).get("step", "head-only")
    header = [
        "method",
        "added params",
        "added fwd FLOPs",
        "fwd FLOPs vs frozen",
        "saved for backward",
        f"inference ({clocks(device)[0]} time)",
        f"training step ({clocks(device)[0]} time)",
    ]
    if device.type == "cuda":
        header += ["peak inference memory", f"peak step memory (x {step_reference})"]
    table = []
    for name, row in rows.items():
        analytic = f" (analytic {format_count(row['analytic'])})" if row["analytic"] else ""
        line = [
            name,
            format_count(row["params"]),
            format_count(row["added_flops"]) + analytic,
            f"{row['flops'] / frozen['flops']:.3f}x",
            format_count(row["saved"], "B"),
            format_time(row["infer"], "frozen"),
            format_time(row["step"], step_reference) if "step" in row else "",
        ]
        if device.type == "cuda":
            peak, reference_peak = row["peak"], rows.get(step_reference, {}).get("peak")
            line.append(format_count(row["infer_peak"], "B"))
            line.append(
                ""
                if peak is None
                else format_count(peak, "B") + (f" ({peak / reference_peak:.3f}x)" if reference_peak else "")
            )
        table.append(line)
    missing = (
        f" Out of CUDA memory, left out: {', '.join(result['out_of_memory'])}." if result.get("out_of_memory") else ""
    )
    return (
        f"### {title}\n\n{description}; frozen forward {format_count(frozen['flops'])}FLOPs. "
        f"Times: medians over {result['repetitions']} interleaved repetitions; ratios are medians of "
        f"per-repetition ratios.{missing}\n\n" + markdown_table(header, table)
    )


def format_spread(values: list[float]) -> str:
    """The median, and the quartiles of the per-repetition values when there are enough to say how noisy it is."""
    text = f"{statistics.median(values):.3f}"
    if len(values) >= 4:
        low, _, high = statistics.quantiles(values, n=4)
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def judge(targets_list: list[tuple[str, str, float, str]], summary: dict, device: torch.device) -> list[dict]:
    """Each target with its measured values per clock (the primary clock's median judged), and whether it holds;
    targets whose measurement is missing (a method out of memory) are left out."""
    primary = clocks(device)[0]
    judged = []
    for description, key, bound, kind in targets_list:
        if key not in summary:
            continue
        measured = summary[key] if isinstance(summary[key], dict) else {primary: [summary[key]]}
        value = statistics.median(measured[primary])
        holds = {"within": abs(value - 1) <= bound, "max": value <= bound, "min": value >= bound}[kind]
        target = {"within": f"1 +/- {bound}", "max": f"<= {bound}", "min": f">= {bound}"}[kind]
        judged.append(dict(description=description, measured=measured, value=value, target=target, holds=holds))
    return judged


def targets_markdown(
    targets_list: list[tuple[str, str, float, str]], summary: dict, device: torch.device, title: str = "target (ViLT)"
) -> str:
    primary, *others = clocks(device) + ["FLOPs"]
    table = [
        [
            item["description"],
            format_spread(item["measured"][primary]),
            *(format_spread(item["measured"][c]) if c in item["measured"] else "" for c in others),
            item["target"],
            "holds" if item["holds"] else "**missed**",
        ]
        for item in judge(targets_list, summary, device)
    ]
    header = [
        title,
        f"measured ({primary} time for times)",
        *(f"{c} time" if c != "FLOPs" else "FLOP ratio of the same (deterministic)" for c in others),
        "target",
        "",
    ]
    return markdown_table(header, table)


def write_report(results: list, sweeps: list, args: argparse.Namespace, device: torch.device, output: Path) -> None:
    vilt_summary = next(result["summary"] for backbone, result in results if backbone.name == "ViLT")
    plot = output / "efficiency.png"
    plot_cost_sweeps(sweeps, plot)
    sections = [
        "## Efficiency (`benchmarks/efficiency.py`)",
        environment(device) + f"- dtype: {args.dtype}; times are medians, [quartiles] of per-repetition ratios where "
        "there are enough; random weights (cost does not depend on them); p prompts, "
        f"APT and LoRA rank {RANK}; LoRA on query/value of the same layers; every trained method also trains "
        "the task head. 'saved for backward' counts the distinct activation tensors autograd keeps in a "
        "training forward (weights excluded): a deterministic proxy of training memory.",
        targets_markdown(targets(*args.prompts), vilt_summary, device),
        *(backbone_markdown(backbone.name, backbone.description, result, device) for backbone, result in results),
        f"### How costs grow\n\n![cost sweeps]({plot.name})\n\nOne ViLT-B layer, batch {args.batch_size}, its input "
        "needing grad; training step relative to the same frozen layer.\n\n" + sweeps_markdown(sweeps),
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


def main() -> None:
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
    args = parser.parse_args()
    if args.tiny:
        args.repetitions = args.bridgetower_repetitions = args.sweep_repetitions = 1
        args.prompts, args.sweep_prompts, args.sweep_tokens = [8, 2], [2, 8], [16, 32]
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
