"""The cost task's pages, from its result files: `summary` for the front page, `details` for the task's page."""

from __future__ import annotations

import statistics
from pathlib import Path

from .plots import plot_cost_sweeps

PLOT = "cost-sweeps.png"  # beside the task's page
SWEPT_LAYER = "vilt-b32-layers"  # the one-layer sweeps of the plot: how each cost grows with p and n
PLOT_NAMES = {"apt": "APT", "deep-prompt": "deep prompt", "lora": "LoRA"}  # as the plots style them


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def count(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{prefix}{unit}"
    return f"{value:.0f}{unit}"


def method_of(result: dict) -> str:
    return result["run_info"]["experiment"].split("/")[0]


def label(result: dict) -> str:
    """`apt/llava-1.5-7b-p200` -> `apt p200`: the method and what its experiment sets beyond the model."""
    method, name = result["run_info"]["experiment"].split("/")
    return f"{method} {name.removeprefix(result['run_info']['train_params']['model']).strip('-')}".strip()


def points(result: dict) -> list[tuple[str, dict]]:
    """(sweep value or "", metrics) per measured point of a result."""
    metrics = result["train_info"]["metrics"]
    if "points" not in metrics:
        return [("", metrics)]
    return [(f"{metrics['sweep']}={point[metrics['sweep']]}", point) for point in metrics["points"]]


def by_model(results: list[dict]) -> dict[str, list[dict]]:
    """Results grouped by model and, where it is not the CPU, device."""
    groups = {}
    for result in results:
        params = result["run_info"]["train_params"]
        groups.setdefault(params["model"] + ("" if params["device"] == "cpu" else f" ({params['device']})"), []).append(
            result
        )
    return groups


def where(meta_info: dict) -> str:
    versions = ", ".join(f"{package} {version}" for package, version in meta_info["package_versions"].items())
    return f"- {meta_info['machine']}; {versions}; `{meta_info['command']}`"


RATIOS = ("inference_time_ratio", "step_time_ratio")  # to the frozen model's forward, to head-only's step


def ratio(point: dict, key: str, method: str) -> str:
    value = point.get(key, {}).get(method)
    return "" if value is None else f"{value:.3f}x"


COLUMNS = {  # header: cell of (method, point); columns empty in every row are left out
    "added params": lambda m, p: count(p.get("trainable_params")),
    "added fwd FLOPs": lambda m, p: count(p["added_forward_flops"]),
    "by APT's formula": lambda m, p: count(p["apt_formula_flops"]) if p["apt_formula_flops"] else "",
    "fwd FLOPs x frozen": lambda m, p: f"{1 + p['added_forward_flops'] / p['frozen_forward_flops']:.3f}x",
    "train-step FLOPs": lambda m, p: count(p["train_step_flops"]),
    "saved for backward": lambda m, p: count(p.get("saved_for_backward_bytes"), "B"),
    "inference x frozen": lambda m, p: ratio(p, "inference_time_ratio", m),
    "step x head-only": lambda m, p: ratio(p, "step_time_ratio", m),
    "frozen fwd ms": lambda m, p: (
        f"{1e3 * statistics.median(p['times_s']['frozen_forward']):.1f}" if "times_s" in p else ""
    ),  # noqa: E501
    "peak step memory": lambda m, p: count(p.get("peak_bytes", {}).get("train_step"), "B"),
    "compile s": lambda m, p: f"{sum(p['compile_s'].values()):.1f}" if "compile_s" in p else "",
}


def model_markdown(model: str, results: list[dict]) -> str:
    """One model's table (a row per experiment and sweep value), then where and how it was measured."""
    rows = [
        [result["run_info"]["experiment"], value, *(cell(method_of(result), point) for cell in COLUMNS.values())]
        for result in results
        for value, point in points(result)
    ]
    keep = [i for i in range(len(COLUMNS) + 2) if any(row[i] for row in rows)]
    header = ["experiment", "setting", *COLUMNS]
    lines = sorted({where(result["meta_info"]) for result in results})
    return (
        f"### {model}\n\n{points(results[0])[0][1]['setting']}\n\n"
        + table([header[i] for i in keep], [[row[i] for i in keep] for row in rows])
        + "\n"
        + "\n".join(lines)
    )


def sweeps_plot(task_dir: Path, results: list[dict]) -> bool:
    """The one-layer sweeps' added FLOPs and training step (x head-only) against p and n; False if there are none."""
    sweeps = {}
    for result in results:
        metrics = result["train_info"]["metrics"]
        if result["run_info"]["train_params"]["model"] != SWEPT_LAYER or metrics.get("sweep") not in (
            "num_prompts",
            "tokens",
        ):
            continue
        method, key = method_of(result), metrics["sweep"]
        sweep = sweeps.setdefault(
            key, dict(variable=key, values=[], title=f"one ViLT-B layer, by {key}", flops={}, step={})
        )
        sweep["values"] = [point[key] for point in metrics["points"]]
        name = PLOT_NAMES[method]
        sweep["flops"][name] = [point["added_forward_flops"] / 1e9 for point in metrics["points"]]
        sweep["step"][name] = [point["step_time_ratio"][method] for point in metrics["points"]]
        if method == "apt":
            sweep["flops"]["APT (analytic)"] = [point["apt_formula_flops"] / 1e9 for point in metrics["points"]]
    if sweeps:
        plot_cost_sweeps(list(sweeps.values()), task_dir / PLOT)
    return bool(sweeps)


def vlm_markdown(results: list[dict]) -> str:
    """Added forward GFLOPs per sample on LLaVA-1.5-7B at each sequence length (image tokens + text tokens)."""
    columns = {label(r): dict(points(r)) for r in results if r["run_info"]["train_params"]["model"] == "llava-1.5-7b"}
    if not columns:
        return ""
    first = next(iter(columns.values()))
    rows = []
    for setting, point in first.items():
        frozen = point["frozen_forward_flops"]
        added = [column[setting]["added_forward_flops"] for column in columns.values()]
        rows.append(
            [f"{point['image_tokens']} + {point['text_tokens']}", f"{frozen / 1e9:,.0f}"]
            + [f"{flops / 1e9:.2f} ({100 * flops / frozen:.2f}%)" for flops in added]
        )
    # the cost is linear in the tokens n: a + b*n, read from the shortest and the longest sequence
    (low, *_, high) = first
    slopes = [
        (c[high]["added_forward_flops"] - c[low]["added_forward_flops"])
        / (c[high]["text_tokens"] - c[low]["text_tokens"])
        for c in columns.values()
    ]
    rows.append(["per further token", ""] + [f"{slope / 1e6:.1f} M" for slope in slopes])
    return table(["tokens (image + text)", "frozen GFLOPs", *(f"{e} added GFLOPs" for e in columns)], rows)


def step_ratios_markdown(results: list[dict], models: tuple[str, ...]) -> str:
    """Inference (x frozen) and training step (x head-only) per method, measured interleaved in one process."""
    rows = [
        [
            model,
            label(result),
            count(point["added_forward_flops"]),
            *(ratio(point, key, method_of(result)) for key in RATIOS),
        ]
        for model, group in by_model(results).items()
        if model in models
        for result in group
        for _, point in points(result)[:1]
    ]
    return table(["model", "method", "added fwd FLOPs", "inference x frozen", "step x head-only"], rows)


def summary(task_dir: Path, results: list[dict]) -> str:
    """The front page's cost section: what each method adds on LLaVA-1.5-7B and the measured step-time ratios."""
    return (
        "Added forward FLOPs per sample on LLaVA-1.5-7B (576 image tokens + text; APT p=200 on the language model's "
        "attentions, LoRA r=8 on q and v, prefix tuning 200 virtual tokens):\n\n"
        + vlm_markdown(results)
        + "\nInference against the frozen model, training step against head-only's, each measured interleaved in one "
        "process (CPU time, 1 thread):\n\n" + step_ratios_markdown(results, ("llava-1.5-scaled", "vilt-b32"))
    )


INTRO = """# cost

What each method adds to a frozen model, with random weights at the real sizes (cost does not depend on them). Per
sample: the parameters it trains besides the task head, forward FLOPs (torch's FlopCounterMode: matmuls, attention,
convolutions; LoRA unmerged), training-step FLOPs (forward and backward), the activation bytes autograd saves for
backward (a deterministic proxy of training memory), and two time ratios measured interleaved in one process,
medians over the repetitions: inference against the frozen model's forward, and the training step (forward,
backward, AdamW) against head-only training's (the frozen model and its trained head, or the frozen model's forward
and loss where there is no head). CPU times are the process's CPU time with one thread; absolute times only beside
their machine. Run an experiment with `python -m benchmarks.run benchmarks/tasks/cost/experiments/<method>/<name>`."""


def details(task_dir: Path, results: list[dict]) -> str:
    """The task's page: every model's table, the VLM table, and the plot of the one-layer sweeps."""
    parts = [INTRO]
    if not any(result["run_info"]["train_params"]["device"] == "cuda" for result in results):
        parts.append(
            "The GPU experiments (`*/vilt-b32-layers-gpu-*`) have no results yet: `bash benchmarks/gpu_check.sh`"
            " on an H100 or H200 measures them (benchmarks/GPU_RUN.md)."
        )
    parts.append("## LLaVA-1.5-7B, added forward FLOPs per sample\n\n" + vlm_markdown(results))
    if sweeps_plot(task_dir, results):
        parts.append(f"## How costs grow\n\n![cost sweeps]({PLOT})")
    parts += [model_markdown(model, group) for model, group in by_model(results).items()]
    return "\n\n".join(parts) + "\n"
