"""
What a method costs on a frozen model, measured: the primitives `benchmarks/efficiency.py` (whole models on a CPU) and
`benchmarks/efficiency_layers.py` (encoder layers alone, on a GPU) are built on.

A `Backbone` is a frozen model with its inputs and where each method attaches; `make_variant` applies one method to a
copy that shares the frozen weights. Per variant: added parameters, forward and training-step FLOPs
(torch.utils.flop_counter), activation bytes saved for backward, peak CUDA memory, and inference and training-step
times, every variant timed in the same process, interleaved, so that drifts in machine load cancel in the
per-repetition ratios. `judge` holds the summary's ratios against targets.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from peft_apt import APTConfig, APTLayer

from .baselines import DeepPrompts

RANK = 4

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
    rows = {variant.name: counted_costs(variant) for variant in variants}
    times = interleaved_times(variants, repetitions, device, warmup)
    for variant in variants:
        rows[variant.name]["infer_peak"] = peak_memory(lambda: inference(variant), device)
        rows[variant.name]["peak"] = peak_memory(lambda: training_step(variant), device) if variant.steps else None
    add_times(rows, times, references, device)
    summary = summarise_ratios(rows, times, prompt_counts, device)
    return dict(rows=rows, summary=summary, repetitions=repetitions, references=references, out_of_memory=out_of_memory)


def counted_costs(variant: Variant) -> dict:
    """The deterministic costs: added parameters, FLOPs (and APT's analytic 4*n*p*d), bytes saved for backward."""
    flops = forward_flops(variant)
    return dict(
        params=variant.added_params,
        flops=flops,
        analytic=sum(4 * tokens * p * d for tokens, p, d in variant.apt_inputs),
        step_flops=training_step_flops(variant) if variant.steps else None,
        saved=saved_activation_bytes(variant),
    )


def add_times(rows: dict, times: dict, references: dict, device: torch.device) -> None:
    """Each row's added FLOPs and, per kind and clock, (median ms, median ratio to the kind's reference)."""
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


def summarise_ratios(rows: dict, times: dict, prompt_counts: list[int], device: torch.device) -> dict:
    """The `RATIOS` per p, as `{name}_{p}`: a FLOP or memory ratio, or per clock the per-repetition time ratios with
    the deterministic FLOP ratio of the same pair beside them."""
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
    return summary


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
