"""benchmarks/RESULTS.md, shared by several scripts: each owns one section between markers and rewrites only it."""

from __future__ import annotations

import platform
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
TITLE = "# peft-apt benchmark results\n\nEach section is written by the script it names; rerun it to refresh it.\n"


def best_lr(by_lr: dict[float, list[float]], better: Callable = max) -> float:
    """
    The learning rate a sweep settled on, from {lr: [score per seed]}: the best mean among the lrs run with the most
    seeds. Sweeps run one seed per lr and then more seeds at the best one, whose mean may then fall below a one-seed
    neighbour's; that neighbour was not the choice. `better` is `max` for accuracies, `min` for perplexities.
    """
    most_seeds = max(len(scores) for scores in by_lr.values())
    chosen = [lr for lr, scores in by_lr.items() if len(scores) == most_seeds]
    return better(chosen, key=lambda lr: statistics.mean(by_lr[lr]))


def write_section(name: str, markdown: str, path: Path = RESULTS_PATH) -> None:
    """Replace the text between this section's markers (append the section if it is new), keep everything else."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else TITLE
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def environment(device: torch.device) -> str:
    """Machine, versions and the exact command line, so a table can be reproduced and compared fairly."""
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        machine = f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    command = shlex.join([Path(sys.executable).name, "-m", module_name(), *sys.argv[1:]])
    return (
        f"- Machine: {machine}; {platform.system()} {platform.release()}\n"
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}\n"
        f"- Command: `{command}`\n"
    )


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def module_name() -> str:
    """The `python -m` name of the running script (benchmarks are run as modules from the repository root)."""
    main = Path(sys.argv[0]).resolve()
    root = Path(__file__).resolve().parent.parent
    return ".".join(main.relative_to(root).with_suffix("").parts) if main.is_relative_to(root) else main.name


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
