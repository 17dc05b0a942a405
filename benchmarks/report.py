"""Build the benchmark pages from the result files: `python -m benchmarks.report`.

Writes benchmarks/RESULTS.md (per task the methods at their best learning rate), each task's RESULTS.md (every rate,
seed, training loss, command line and machine), benchmarks/DESIGN_STUDIES.md (experiments with `design_study`, APT
parametrisations other than the installed one, and the tasks kept off the front page) and the table "Where APT trails
LoRA" in the top-level README. Nothing is measured here: every figure comes from `tasks/*/results/*.json`.
"""

from __future__ import annotations

import importlib
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from peft_apt import APTConfig

from .plots import plot_best_vs_flops
from .records import read_results

BENCHMARKS = Path(__file__).resolve().parent
README = BENCHMARKS.parent / "README.md"
ROLES = (("lora/",), ("deep-prompt/", "prefix-tuning/"), ("head-only",))  # the rivals README's table shows
TRAILS_BEGIN, TRAILS_END = "<!-- BEGIN where-apt-trails-lora -->", "<!-- END where-apt-trails-lora -->"
CALIBRATION = re.compile(r"<!-- BEGIN calibration -->.*<!-- END calibration -->", re.S)
DIAGNOSTICS = {
    "cosine_to_frozen": "cosine to frozen",
    "separation": "class separation",
    "term_alignment_before": "APT term vs common direction, before",
    "term_alignment_after": "after",
    "term_size_before": "APT term / O, before",
    "term_size_after": "after",
    "attention_change_train": "attention change, training blocks",
    "attention_change_held_out": "held-out blocks",
    "initial_feature_cosine": "initial feature cosine",
}


@dataclass
class Task:
    folder: Path
    params: dict
    trainer: ModuleType
    results: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def steps(self) -> int:
        params = self.params
        if "epochs" in params:
            return params["epochs"] * -(-params["n_train"] // params["batch_size"])
        return params.get("steps", 0)

    def scaled(self, result: dict) -> float:
        return self.trainer.METRIC_SCALE * result["train_info"]["metrics"][self.trainer.METRIC]

    def best_lr(self, by_lr: dict[float, list[float]]) -> float:
        return best_lr(by_lr, self.trainer.HIGHER_IS_BETTER)

    def cell(self, values: list[float]) -> str:
        """`mean ± std` over seeds; `(n=1)` marks a single run."""
        digits = self.trainer.METRIC_DIGITS
        if len(values) == 1:
            return f"{values[0]:.{digits}f} (n=1)"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def load_tasks() -> list[Task]:
    tasks = []
    for path in sorted((BENCHMARKS / "tasks").glob("*/default_training_params.json")):
        params = json.loads(path.read_text())
        trainer = importlib.import_module(f"benchmarks.{params['trainer']}")
        results = [r for r in read_results(path.parent) if r["run_info"]["status"] == "success"]
        tasks.append(Task(path.parent, params, trainer, results))
    return tasks


def split_lr(experiment: str) -> tuple[str, float]:
    """`apt/p200-lr1e-2` -> (`apt/p200`, 0.01); `head-only/lr1e-2` -> (`head-only`, 0.01)."""
    label, lr = re.fullmatch(r"(.*?)[-/]?lr([\d.e+-]+)", experiment).groups()
    return label, float(lr)


def training_loss(result: dict) -> float | None:
    metrics = result["train_info"]["metrics"]
    return metrics.get("last_train_loss", metrics.get("final_train_loss"))


def is_main(result: dict) -> bool:
    params = result["run_info"]["train_params"]
    return "design_study" not in params and "apt_parametrisation" not in params


def sweeps(task: Task, results: list[dict], dataset: str | None, value=None) -> dict[str, dict[float, list[float]]]:
    """{method label: {lr: [value per seed]}} of one dataset (the task's metric unless `value` says otherwise)."""
    table = {}
    for result in results:
        if result["run_info"]["dataset"] == dataset:
            label, lr = split_lr(result["run_info"]["experiment"])
            table.setdefault(label, {}).setdefault(lr, []).append((value or task.scaled)(result))
    return {label: dict(sorted(by_lr.items())) for label, by_lr in sorted(table.items())}


def best_mean(task: Task, by_lr: dict[float, list[float]]) -> str:
    return f"{statistics.mean(by_lr[task.best_lr(by_lr)]):.{task.trainer.METRIC_DIGITS}f}"


def best_lr(by_lr: dict[float, list[float]], higher_is_better: bool = True) -> float:
    """The rate a sweep settled on: the best mean among the rates run with the most seeds (sweeps run one seed per
    rate, then more seeds at the best one, whose mean may fall below a one-seed neighbour's)."""
    most = max(len(values) for values in by_lr.values())
    chosen = [lr for lr, values in by_lr.items() if len(values) == most]
    return (max if higher_is_better else min)(chosen, key=lambda lr: statistics.mean(by_lr[lr]))


def datasets_of(task: Task) -> list[str | None]:
    return task.params.get("datasets") or [None]


def first(results: list[dict], label: str) -> dict:
    return next(r for r in results if split_lr(r["run_info"]["experiment"])[0] == label)


def adapter_mb(results: list[dict], label: str) -> str:
    """The saved adapter's size where measured, else 4 bytes (fp32) per trainable parameter."""
    info = first(results, label)["train_info"]
    size = info["adapter_file_bytes"] or 4 * info["trainable_params"]
    return f"{size / 1e6:.2f}"


def step_time_ratios(task: Task, tasks: list[Task]) -> dict[str, float]:
    """{method folder: training step / head-only's} from the cost-task results measured on this task's model."""
    ratios = {}
    for result in (result for other in tasks for result in other.results):
        measured = result["train_info"]["metrics"].get("step_time_ratio")
        if result["run_info"]["train_params"].get("model") == task.params["model"] and isinstance(measured, dict):
            ratios.update(measured)
    return ratios


def best_table(task: Task, results: list[dict], tasks: list[Task]) -> list[str]:
    """Each method at its best rate per dataset, with what it costs."""
    per_dataset = {dataset: sweeps(task, results, dataset) for dataset in datasets_of(task)}
    labels = sorted({label for table in per_dataset.values() for label in table})
    ratios = step_time_ratios(task, tasks)
    metric = f"{task.trainer.METRIC}{' %' if task.trainer.METRIC_SCALE == 100 else ''}"
    header = [f"{dataset or metric} at the best lr" for dataset in per_dataset]
    lines = [f"| method | {' | '.join(header)} | trainable params | adapter MB | added GFLOPs | step vs head-only |"]
    lines.append("|---|" + "---:|" * (len(header) + 4))
    for label in labels:
        cells = []
        for table in per_dataset.values():
            by_lr = table.get(label)
            cells.append(with_lr(task.cell(by_lr[task.best_lr(by_lr)]), task.best_lr(by_lr)) if by_lr else "")
        info = first(results, label)["train_info"]
        flops = f"{info['added_forward_flops'] / 1e9:.3g}" if info["added_forward_flops"] is not None else ""
        ratio = ratios.get(label.split("/")[0])
        lines.append(f"| {label} | {' | '.join(cells)} | {info['trainable_params']:,} | {adapter_mb(results, label)} | "
                     f"{flops} | {f'{ratio:.2f}x' if ratio else ''} |")  # fmt: skip
    return lines


def with_lr(cell: str, lr: float) -> str:
    """`86.3 ± 3.5` -> `86.3 ± 3.5 (lr 0.01)`; `32.8 (n=1)` -> `32.8 (n=1, lr 0.01)`."""
    return f"{cell[:-1]}, lr {lr:g})" if cell.endswith(")") else f"{cell} (lr {lr:g})"


def lr_table(task: Task, table: dict[str, dict[float, list[float]]], cell=None) -> list[str]:
    """One row per method, one column per learning rate."""
    lrs = sorted({lr for by_lr in table.values() for lr in by_lr})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for label, by_lr in table.items():
        cells = [(cell or task.cell)(by_lr[lr]) if lr in by_lr else "" for lr in lrs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def diagnostics_table(results: list[dict]) -> list[str]:
    """Means over seeds of the diagnostics the runs recorded, per method, dataset and rate."""
    rows = {}
    for r in results:
        label, lr = split_lr(r["run_info"]["experiment"])
        rows.setdefault((label, r["run_info"]["dataset"] or "", lr), []).append(r["train_info"]["metrics"])
    keys = [key for key in DIAGNOSTICS if any(key in m for runs in rows.values() for m in runs)]
    if not keys:
        return []
    lines = ["| method | dataset | lr | " + " | ".join(DIAGNOSTICS[k] for k in keys) + " |"]
    lines.append("|---|---|---:|" + "---:|" * len(keys))
    for (label, dataset, lr), runs in sorted(rows.items()):
        cells = [f"{statistics.mean(m[k] for m in runs):.3f}" if k in runs[0] else "" for k in keys]
        lines.append(f"| {label} | {dataset} | {lr:g} | " + " | ".join(cells) + " |")
    return lines


def answer(task: Task, results: list[dict]) -> str:
    """One line: APT's default against LoRA, each at its best rate, per dataset."""
    parts = []
    for dataset in datasets_of(task):
        table = sweeps(task, results, dataset)
        apt, lora = default_apt(results), next((label for label in table if label.startswith("lora/")), None)
        if apt in table and lora:
            ours, theirs = (statistics.mean(table[m][task.best_lr(table[m])]) for m in (apt, lora))
            digits = task.trainer.METRIC_DIGITS
            parts.append(f"{dataset + ' ' if dataset else ''}{ours:.{digits}f} against {theirs:.{digits}f}")
    better = "higher" if task.trainer.HIGHER_IS_BETTER else "lower"
    return f"APT's default against LoRA, each at its best rate ({task.trainer.METRIC}, {better} is better): " + (
        "; ".join(parts) + "."
    )


def default_apt(results: list[dict]) -> str | None:
    """The label of the experiments that run `APTConfig()`'s prompts and rank."""
    default = APTConfig()
    for r in results:
        config = r["run_info"]["peft_config"] or {}
        shape = (config.get("num_prompts"), config.get("r"))
        if config.get("peft_type") == "APT" and shape == (default.num_prompts, default.r):
            return split_lr(r["run_info"]["experiment"])[0]
    return None


def plot(task: Task, results: list[dict]) -> str:
    """The best-rate metric against the added FLOPs (the paper's Figure 1), one panel per dataset; its file name."""
    panels = {}
    for dataset in datasets_of(task):
        for label, by_lr in sweeps(task, results, dataset).items():
            flops = first(results, label)["train_info"]["added_forward_flops"] or 0
            panels.setdefault(dataset or task.trainer.METRIC, {})[label] = (
                flops / 1e9, statistics.mean(by_lr[task.best_lr(by_lr)])
            )  # fmt: skip
    plot_best_vs_flops(panels, task.folder / "best-vs-flops.png", task.trainer.METRIC)
    return "best-vs-flops.png"


def front_page_section(task: Task, tasks: list[Task]) -> list[str]:
    if hasattr(task.trainer, "summary"):
        return [f"## {task.name}", "", task.trainer.summary(task.folder, task.results), ""]
    results = [r for r in task.results if is_main(r)]
    link = f"tasks/{task.name}/RESULTS.md"
    return [
        f"## {task.name}",
        "",
        f"{task.params['description']}. [Every run]({link}).",
        "",
        f"**{answer(task, results)}**",
        "",
        *best_table(task, results, tasks),
        "",
        f"![{task.name}](tasks/{task.name}/{plot(task, results)})",
        "",
    ]


def front_page_tasks(tasks: list[Task]) -> list[Task]:
    """The tasks with results and not kept off the front page, images first, then by budget."""
    shown = [task for task in tasks if task.params.get("front_page", True) and task.results]
    return sorted(shown, key=lambda task: (task.params["trainer"] != "image_classification", task.params["trainer"],
                                           task.steps))  # fmt: skip


def front_page(tasks: list[Task]) -> str:
    shown = front_page_tasks(tasks)
    return "\n".join([
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks.report` from the result files of each task (how to run and add tasks: "
        "[README.md](README.md)). Each method at its best learning rate: mean ± std over seeds, `(n=1)` for one run. "
        "Adapter MB: the saved adapter where measured, else 4 bytes per trainable parameter. Added GFLOPs: forward "
        "FLOPs per sample the method adds to the frozen model. Step vs head-only: training-step time relative to "
        "training the head alone, measured interleaved in one process by the cost task. The studies behind APT's "
        "defaults: [DESIGN_STUDIES.md](DESIGN_STUDIES.md).",
        "",
        *(line for task in shown for line in front_page_section(task, tasks)),
    ])  # fmt: skip


def runs_table(task: Task) -> list[str]:
    """Every run: its metric, final training loss, training time and the machine and command it ran with."""
    machines, commands = {}, {}
    lines = ["| experiment | dataset | seed | " + task.trainer.METRIC + " | train s | machine | command |"]
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for r in task.results:
        run, meta = r["run_info"], r["meta_info"]
        versions = ", ".join(f"{k} {v}" for k, v in (meta["package_versions"] or {}).items())
        machine = machines.setdefault(f"{meta['machine'] or 'not recorded'}; {versions}", len(machines) + 1)
        command = commands.setdefault(meta["command"] or "not recorded", len(commands) + 1)
        seconds = r["train_info"]["train_time_s"]
        value = f"{task.scaled(r):.{task.trainer.METRIC_DIGITS + 1}f}"
        lines.append(f"| {run['experiment']} | {run['dataset'] or ''} | {run['seed']} | {value} | "
                     f"{'' if seconds is None else seconds} | {machine} | {command} |")  # fmt: skip
    lines += ["", "Machines and versions:", ""] + [f"{n}. {m}" for m, n in machines.items()]
    lines += ["", "Commands:", ""] + [f"{n}. `{c}`" for c, n in commands.items()]
    return lines


def task_page(task: Task, tasks: list[Task]) -> str:
    main = [r for r in task.results if is_main(r)]
    lines = [f"# {task.name}", "", f"{task.params['description']}.", "",
             "Run an experiment with `python -m benchmarks.run benchmarks/tasks/"
             f"{task.name}/experiments/<method>/<name>`; training parameters: `default_training_params.json`.", "",
             "## Best learning rate per method", "", *best_table(task, main, tasks)]  # fmt: skip
    for dataset in datasets_of(task):
        lines += ["", f"## Every learning rate{': ' + dataset if dataset else ''}", ""]
        lines += lr_table(task, sweeps(task, task.results, dataset))
        losses = sweeps(task, [r for r in task.results if training_loss(r) is not None], dataset, training_loss)
        lines += ["", "Training loss at the end of the run (mean over seeds; the last step's for images, the mean of "
                  "the last 5 for the causal LM), to read against the metric:", "",
                  *lr_table(task, losses, lambda values: f"{statistics.mean(values):.2f}")]  # fmt: skip
    if diagnostics := diagnostics_table(task.results):
        lines += ["", "## What the runs did", "", "Means over seeds of what each run recorded besides its metric "
                  "(benchmarks/README.md says what each is).", "", *diagnostics]  # fmt: skip
    lines += ["", "## Every run", "", *runs_table(task)]
    return "\n".join(lines) + "\n"


def design_page(tasks: list[Task], kept: str) -> str:
    """Every design study, per task: the study's experiments beside the main methods at every rate."""
    lines = ["# Design studies", "", "How APT's default parametrisation was chosen: experiments run on the tasks of "
             "[RESULTS.md](RESULTS.md) with `design_study` in their training parameters, and APT parametrisations "
             "other than the installed one. Why the defaults are what they are: "
             "[docs/initialisation.md](../docs/initialisation.md).", ""]  # fmt: skip
    studies = sorted({study_of(r) for task in tasks for r in task.results if not is_main(r)})
    for study in studies:
        lines += [f"## {study}", ""]
        for task in tasks:
            ours = [r for r in task.results if study_of(r) == study]
            if not ours:
                continue
            main = [r for r in task.results if is_main(r)]
            rivals = ("head-only", default_apt(main))
            compared = ours + [r for r in main if split_lr(r["run_info"]["experiment"])[0] in rivals]
            for dataset in sorted({r["run_info"]["dataset"] or "" for r in ours}):
                lines += [f"[{task.name}](tasks/{task.name}/RESULTS.md){', ' + dataset if dataset else ''}:", ""]
                lines += [*lr_table(task, sweeps(task, compared, dataset or None)), ""]
            if study in ("Attention change", "Initialisation") and (diagnostics := diagnostics_table(ours)):
                lines += ["What the runs recorded besides the metric (means over seeds):", "", *diagnostics, ""]
    lines += ["## Other setups", "", "Tasks kept off the front page, each with its page:", ""]
    lines += [f"- [{t.name}](tasks/{t.name}/RESULTS.md): {t.params['description']}" for t in tasks
              if not t.params.get("front_page", True)]  # fmt: skip
    return "\n".join(lines) + "\n\n" + kept + "\n"


def study_of(result: dict) -> str | None:
    params = result["run_info"]["train_params"]
    study = params.get("design_study") or ("APT parametrisation versions" if "apt_parametrisation" in params else None)
    return study and study[0].upper() + study[1:]


def trails_table(tasks: list[Task]) -> list[str]:
    """README's short table: APT, LoRA, deep prompt and head-only (or the frozen model) at their best rates."""
    lines = ["| setting | budget | APT | LoRA | deep prompt | head-only / frozen |", "|---|---|---:|---:|---:|---:|"]
    for task in (task for task in front_page_tasks(tasks) if not hasattr(task.trainer, "summary")):
        main = [r for r in task.results if is_main(r)]
        for dataset in datasets_of(task):
            table = sweeps(task, main, dataset)
            labels = [default_apt(main)]
            labels += [next((x for x in table if x.startswith(p)), None) for p in ROLES]
            cells = [best_mean(task, table[label]) if label in table else "" for label in labels]
            frozen = main[0]["train_info"]["metrics"].get("frozen_perplexity")
            cells[-1] = cells[-1] or (f"{frozen:.2f} (frozen)" if frozen else "")
            setting = f"{task.name}{', ' + dataset if dataset else ''}"
            link = f"benchmarks/tasks/{task.name}/RESULTS.md"
            lines.append(f"| [{setting}]({link}) | {task.steps} steps | " + " | ".join(cells) + " |")
    return lines


def write_readme_table(tasks: list[Task]) -> None:
    text = README.read_text()
    if TRAILS_BEGIN in text:
        head, rest = text.split(TRAILS_BEGIN, 1)
        table = "\n".join(trails_table(tasks))
        README.write_text(f"{head}{TRAILS_BEGIN}\n{table}\n{TRAILS_END}{rest.split(TRAILS_END, 1)[1]}")


def main() -> None:
    tasks = load_tasks()
    (BENCHMARKS / "RESULTS.md").write_text(front_page(tasks))
    for task in (task for task in tasks if task.results):
        details = getattr(task.trainer, "details", None)
        page = details(task.folder, task.results) if details else task_page(task, tasks)
        (task.folder / "RESULTS.md").write_text(page)
    design = BENCHMARKS / "DESIGN_STUDIES.md"
    kept = CALIBRATION.search(design.read_text()) if design.exists() else None
    design.write_text(design_page(tasks, kept.group(0) if kept else ""))
    write_readme_table(tasks)


if __name__ == "__main__":
    main()
