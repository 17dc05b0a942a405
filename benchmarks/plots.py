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
    """Methods are matched on their family name, so `APT p=50` and `apt/p50` look like `APT`."""
    for family, style in STYLE.items():
        if method.lower().replace("-", " ").startswith(family.lower().replace("-", " ")):
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


def plot_best_vs_flops(panels: Mapping[str, Mapping[str, tuple[float, float]]], path: Path, metric: str) -> None:
    """The paper's Figure 1, one panel per dataset: each method's best-rate metric against the forward GFLOPs it adds
    to the frozen model (`panels`: {title: {method: (added GFLOPs, metric)}}). APT's claim is to sit at the top left."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels.items()):
        for method, (x, y) in points.items():
            ax.plot([x], [y], linestyle="none", **style_of(method))
            ax.annotate(method, (x, y), textcoords="offset points", xytext=(7, 5), fontsize=8)
        ax.set(xlabel="added forward GFLOPs per sample", ylabel=metric, title=title)
        ax.grid(True, alpha=0.3)
        ax.margins(0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
