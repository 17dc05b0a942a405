"""Markdown tables of what `benchmarks/cost.py` measured, shared by the efficiency reports."""

from __future__ import annotations

import statistics

import torch

from .cost import clocks, judge
from .markdown import markdown_table


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


def format_spread(values: list[float]) -> str:
    """The median, and the quartiles of the per-repetition values when there are enough to say how noisy it is."""
    text = f"{statistics.median(values):.3f}"
    if len(values) >= 4:
        low, _, high = statistics.quantiles(values, n=4)
        text += f" [{low:.3f}, {high:.3f}]"
    return text


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
