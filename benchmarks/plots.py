"""Figures of the benchmarks: cost sweeps (efficiency.py) and accuracy against added FLOPs (the paper's Figure 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "APT": dict(color="tab:red", marker="*", markersize=14),
    "deep prompt": dict(color="tab:blue", marker="o", markersize=8),
    "LoRA": dict(color="tab:green", marker="s", markersize=8),
    "head-only": dict(color="tab:gray", marker="^", markersize=8),
    "full": dict(color="black", marker="D", markersize=8),
}


def style_of(method: str) -> dict:
    """Methods are matched on their family name, so `APT p=50` looks like `APT`."""
    for family, style in STYLE.items():
        if method.startswith(family):
            return style
    return dict(color="tab:purple", marker="P", markersize=8)


def plot_cost_sweeps(sweeps: Sequence[dict], path: Path) -> None:
    """
    One column per swept variable, rows `added GFLOPs` and `training step vs frozen`, one line per method.

    Each sweep is `{"variable", "values", "title", "flops": {method: values}, "step": {method: values}}`; a method
    named `... (analytic)` is drawn dashed, so measured and predicted costs can be compared at a glance.
    """
    fig, axes = plt.subplots(2, len(sweeps), figsize=(5.5 * len(sweeps), 8), squeeze=False)
    for column, sweep in enumerate(sweeps):
        for row, (key, ylabel) in enumerate([("flops", "added forward GFLOPs"), ("step", "training step / frozen")]):
            ax = axes[row][column]
            for method, values in sweep[key].items():
                style = dict(style_of(method))
                style["markersize"] = style["markersize"] * 0.6
                linestyle = "--" if method.endswith("(analytic)") else "-"
                ax.plot(sweep["values"], values, linestyle=linestyle, label=method, **style)
            ax.set_xlabel(sweep["variable"])
            ax.set_ylabel(ylabel)
            if key == "flops":
                ax.set_yscale("log")
                ax.set_title(sweep["title"])
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_flops(
    added_gflops: Mapping[str, float],
    accuracy: Mapping[str, float],
    path: Path,
    title: str = "",
    metric: str = "accuracy (%)",
) -> None:
    """
    The paper's Figure 1: each method's accuracy against the forward FLOPs it adds to the frozen model.

    APT's claim is to sit top left (more accurate than deep prompt tuning for a fraction of its added cost); methods
    present in only one of the two mappings are skipped.
    """
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in added_gflops.keys() & accuracy.keys():
        x, y = added_gflops[method], accuracy[method]
        ax.plot([x], [y], linestyle="none", **style_of(method))
        ax.annotate(method, (x, y), textcoords="offset points", xytext=(7, 5), fontsize=9)
    ax.set_xlabel("added forward GFLOPs")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_metric_vs_lr(
    values: Mapping[str, Mapping[float, Sequence[float]]],
    path: Path,
    title: str = "",
    metric: str = "",
    reference: tuple[str, float] | None = None,
) -> None:
    """
    One line per method: the metric's mean over seeds against the learning rate (log axis), each seed as a dot.

    A sweep over learning rates shows what a single best-lr number hides: how wide each method's good range is and
    where it breaks. `reference` draws a named horizontal line, e.g. the frozen model's score.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, by_lr in values.items():
        lrs = sorted(by_lr)
        style = dict(style_of(method))
        style["markersize"] = style["markersize"] * 0.7
        ax.plot(lrs, [sum(by_lr[lr]) / len(by_lr[lr]) for lr in lrs], label=method, **style)
        for lr in lrs:
            ax.plot([lr] * len(by_lr[lr]), by_lr[lr], linestyle="none", marker=".", color=style["color"], alpha=0.5)
    if reference is not None:
        ax.axhline(reference[1], color="tab:gray", linestyle="--", label=reference[0])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
