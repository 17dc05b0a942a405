"""Build the benchmark pages from the result files: `python -m benchmarks.report`.

Writes benchmarks/RESULTS.md (per task the methods at their best learning rate, and their plot against the FLOPs they
add), each task's RESULTS.md (every rate, seed, training loss, command line and machine),
benchmarks/DESIGN_STUDIES.md (experiments with `design_study`, APT parametrisations other than the installed one, and
the tasks kept off the front page), the table "Where APT trails LoRA" in the top-level README and the tables between
`<!-- BEGIN <task> breakdown -->` markers in docs/ (every rate of the task with the metric's parts and the runs' own
cost measurements). The cost task, whose results are measurements per model rather than one metric per method, has
pages of its own (the end of this file).
Nothing is measured here: every figure comes from `tasks/*/results/*.json`.
"""

from __future__ import annotations

import importlib
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import matplotlib

from peft_apt import APTConfig

from .records import read_results

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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
    "answer_image_attention": "answer's attention on the image",
    "aligned_answer_image_attention": "aligned model's",
    "answer_attention_change": "answer's attention moved (TV)",
}
RUN_COSTS = {  # what a run measured of its own cost: (column, scale, format)
    "training_memory_bytes": ("training memory MB", 1e-6, "{:.0f}"),
    "step_time_ratio": ("training step", 1, "{:.2f}x"),
    "inference_time_ratio": ("inference", 1, "{:.2f}x"),
}
DOCS = BENCHMARKS.parent / "docs"
BREAKDOWN = re.compile(r"(<!-- BEGIN (\S+) breakdown -->\n).*?(<!-- END \2 breakdown -->)", re.S)
STYLE = {  # of the methods in the plots, matched on their family name: `apt/p50` and `APT (analytic)` look like `APT`
    "APT": dict(color="tab:red", marker="*", markersize=14),
    "deep prompt": dict(color="tab:blue", marker="o", markersize=8),
    "LoRA": dict(color="tab:green", marker="s", markersize=8),
    "head-only": dict(color="tab:gray", marker="^", markersize=8),
    "full": dict(color="black", marker="D", markersize=8),
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
    def is_cost(self) -> bool:
        return self.params["trainer"] == "cost"

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

    def best_mean(self, by_lr: dict[float, list[float]]) -> float:
        return statistics.mean(by_lr[self.best_lr(by_lr)])

    def cell(self, values: list[float], *notes: str) -> str:
        """`mean ± std` over seeds, then the `notes` in parentheses, `n=1` first for a single run."""
        digits = self.trainer.METRIC_DIGITS
        if len(values) == 1:
            text, notes = f"{values[0]:.{digits}f}", ("n=1", *notes)
        else:
            text = f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
        return f"{text} ({', '.join(notes)})" if notes else text


def load_tasks() -> list[Task]:
    tasks = []
    for path in sorted((BENCHMARKS / "tasks").glob("*/default_training_params.json")):
        params = json.loads(path.read_text())
        trainer = importlib.import_module(f"benchmarks.{params['trainer']}")
        tasks.append(Task(path.parent, params, trainer, read_results(path.parent)))
    return tasks


def markdown_table(header: list[str], rows: list[list], left: int = 1) -> list[str]:
    """The lines of a markdown table whose first `left` columns are aligned left and the others right."""
    rule = "|" + "---|" * left + "---:|" * (len(header) - left)
    return [f"| {' | '.join(header)} |", rule, *(f"| {' | '.join(map(str, row))} |" for row in rows)]


def split_lr(experiment: str) -> tuple[str, float]:
    """`apt/p200-lr1e-2` -> (`apt/p200`, 0.01); `head-only/lr1e-2` -> (`head-only`, 0.01)."""
    label, lr = re.fullmatch(r"(.*?)[-/]?lr([\d.e+-]+)", experiment).groups()
    return label, float(lr)


def training_loss(result: dict) -> float | None:
    metrics = result["train_info"]["metrics"]
    return metrics.get("last_train_loss", metrics.get("final_train_loss"))


def is_main(result: dict) -> bool:
    return study_of(result) is None


def sweeps(task: Task, results: list[dict], dataset: str | None, value=None) -> dict[str, dict[float, list[float]]]:
    """{method label: {lr: [value per seed]}} of one dataset (the task's metric unless `value` says otherwise)."""
    table = {}
    for result in results:
        if result["run_info"]["dataset"] == dataset:
            label, lr = split_lr(result["run_info"]["experiment"])
            table.setdefault(label, {}).setdefault(lr, []).append((value or task.scaled)(result))
    return {label: dict(sorted(by_lr.items())) for label, by_lr in sorted(table.items())}


def best_lr(by_lr: dict[float, list[float]], higher_is_better: bool = True) -> float:
    """The rate a sweep settled on: the best mean among the rates run with the most seeds (sweeps run one seed per
    rate, then more seeds at the best one, whose mean may fall below a one-seed neighbour's)."""
    most = max(len(values) for values in by_lr.values())
    chosen = [lr for lr, values in by_lr.items() if len(values) == most]
    return (max if higher_is_better else min)(chosen, key=lambda lr: statistics.mean(by_lr[lr]))


def best_cell(task: Task, by_lr: dict[float, list[float]] | None) -> str:
    """`86.3 ± 3.5 (lr 0.01)`, `32.8 (n=1, lr 0.01)` at the best rate; empty for a method that did not run."""
    if not by_lr:
        return ""
    lr = task.best_lr(by_lr)
    return task.cell(by_lr[lr], f"lr {lr:g}")


def datasets_of(task: Task) -> list[str | None]:
    return task.params.get("datasets") or [None]


def first(results: list[dict], label: str) -> dict:
    return next(r for r in results if split_lr(r["run_info"]["experiment"])[0] == label)


def step_time_ratios(task: Task, tasks: list[Task]) -> dict[str, float]:
    """{method folder: training step / head-only's} from the cost-task results measured on this task's model at its
    image size."""
    ratios = {}
    for result in (result for other in tasks for result in other.results):
        measured, params = result["train_info"]["metrics"].get("step_time_ratio"), result["run_info"]["train_params"]
        same_setup = all(params.get(key) == task.params.get(key) for key in ("model", "size"))
        if same_setup and isinstance(measured, dict):
            ratios.update(measured)
    return ratios


def best_table(task: Task, results: list[dict], tasks: list[Task]) -> list[str]:
    """Each method at its best rate per dataset, with what it costs."""
    per_dataset = {dataset: sweeps(task, results, dataset) for dataset in datasets_of(task)}
    ratios = step_time_ratios(task, tasks)
    rows = []
    for label in sorted({label for table in per_dataset.values() for label in table}):
        info = first(results, label)["train_info"]
        flops, ratio = info["added_forward_flops"], ratios.get(label.split("/")[0])
        adapter_bytes = info["adapter_file_bytes"] or 4 * info["trainable_params"]  # where not measured: fp32
        rows.append([label, *(best_cell(task, table.get(label)) for table in per_dataset.values())])
        rows[-1] += [f"{info['trainable_params']:,}", f"{adapter_bytes / 1e6:.2f}"]
        rows[-1] += [f"{flops / 1e9:.3g}", f"{ratio:.2f}x" if ratio else ""]
    metric = f"{task.trainer.METRIC}{' %' if task.trainer.METRIC_SCALE == 100 else ''}"
    header = ["method", *(f"{dataset or metric} at the best lr" for dataset in per_dataset)]
    return markdown_table(header + ["trainable params", "adapter MB", "added GFLOPs", "step vs head-only"], rows)


def lr_table(task: Task, table: dict[str, dict[float, list[float]]], cell=None) -> list[str]:
    """One row per method, one column per learning rate."""
    lrs = sorted({lr for by_lr in table.values() for lr in by_lr})
    cell = cell or task.cell
    rows = [[label, *(cell(by_lr[lr]) if lr in by_lr else "" for lr in lrs)] for label, by_lr in table.items()]
    return markdown_table(["method", *(f"lr {lr:g}" for lr in lrs)], rows)


def runs_by_rate(results: list[dict]) -> dict[tuple[str, str, float], list[dict]]:
    """{(method label, dataset or "", lr): [result per seed]}, sorted."""
    runs = {}
    for r in results:
        label, lr = split_lr(r["run_info"]["experiment"])
        runs.setdefault((label, r["run_info"]["dataset"] or "", lr), []).append(r)
    return dict(sorted(runs.items()))


def diagnostics_table(results: list[dict]) -> list[str]:
    """Means over the seeds that recorded them of the runs' diagnostics, per method, dataset and rate."""
    runs = {key: [r["train_info"]["metrics"] for r in group] for key, group in runs_by_rate(results).items()}
    keys = [key for key in DIAGNOSTICS if any(key in m for metrics in runs.values() for m in metrics)]
    if not keys:
        return []
    rows = []
    for (label, dataset, lr), metrics in runs.items():
        recorded = [[m[k] for m in metrics if k in m] for k in keys]  # runs older than a diagnostic lack it
        means = [f"{statistics.mean(values):.3f}" if values else "" for values in recorded]
        rows.append([label, dataset, f"{lr:g}", *means])
    return markdown_table(["method", "dataset", "lr", *(DIAGNOSTICS[k] for k in keys)], rows, left=2)


def breakdown_table(task: Task) -> list[str]:
    """Every method and rate: the metric and its parts (`accuracy_shape`, ...) as mean ± std over seeds, the final
    training loss, and what the run cost (its own measurements, from the seeds that took them). A task with datasets
    has a row per dataset."""
    metrics = list(dict.fromkeys(m for r in task.results for m in r["train_info"]["metrics"]))
    parts = [m for m in metrics if m.startswith(f"{task.trainer.METRIC}_")]
    costs = [key for key in RUN_COSTS if key in metrics]
    scale = task.trainer.METRIC_SCALE
    rows = []
    for (label, dataset, lr), group in runs_by_rate(task.results).items():
        recorded = [[r["train_info"]["metrics"].get(key) for r in group] for key in (task.trainer.METRIC, *parts)]
        measured = [[scale * v for v in values if v is not None] for values in recorded]
        cells = [task.cell(values).removesuffix(" (n=1)") if values else "" for values in measured]
        losses = [loss for r in group if (loss := training_loss(r)) is not None]
        info, seeds = group[0]["train_info"], "/".join(str(r["run_info"]["seed"]) for r in group)
        adapter = info["adapter_file_bytes"]
        row = [f"{label}, {dataset}" if dataset else label, f"{lr:g}", seeds, *cells]
        row += [f"{statistics.mean(losses):.2f}" if losses else "", f"{info['trainable_params']:,}"]
        row += [f"{adapter / 1e6:.2f}" if adapter else "", f"{info['added_forward_flops'] / 1e9:.3f}"]
        for key in costs:
            _, factor, form = RUN_COSTS[key]
            taken = [r["train_info"]["metrics"][key] for r in group if r["train_info"]["metrics"].get(key)]
            row.append(form.format(factor * statistics.mean(taken)) if taken else "")
        rows.append(row)
    header = ["method", "lr", "seeds", f"{task.trainer.METRIC} %" if scale == 100 else task.trainer.METRIC]
    header += [part.removeprefix(f"{task.trainer.METRIC}_") for part in parts]
    header += ["final training loss", "trainable params", "adapter MB", "added GFLOPs"]
    return markdown_table(header + [RUN_COSTS[key][0] for key in costs], rows, left=3)


def write_docs_breakdowns(tasks: list[Task]) -> None:
    """Fills each `<!-- BEGIN <task> breakdown -->` block of docs/*.md with that task's `breakdown_table`."""
    by_name = {task.name: task for task in tasks}
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()

        def table(match: re.Match) -> str:
            return match[1] + "\n".join(breakdown_table(by_name[match[2]])) + "\n" + match[3]

        if (filled := BREAKDOWN.sub(table, text)) != text:
            page.write_text(filled)


def answer(task: Task, results: list[dict]) -> str:
    """One line: APT's default against LoRA, each at its best rate, per dataset."""
    parts = []
    for dataset in datasets_of(task):
        table = sweeps(task, results, dataset)
        apt, lora = default_apt(results), next((label for label in table if label.startswith("lora/")), None)
        if apt in table and lora:
            ours, theirs, digits = task.best_mean(table[apt]), task.best_mean(table[lora]), task.trainer.METRIC_DIGITS
            parts.append(f"{dataset + ' ' if dataset else ''}{ours:.{digits}f} against {theirs:.{digits}f}")
    better = "higher" if task.trainer.HIGHER_IS_BETTER else "lower"
    metric = f"{task.trainer.METRIC}, {better} is better"
    return f"APT's default against LoRA, each at its best rate ({metric}): {'; '.join(parts)}."


def default_apt(results: list[dict]) -> str | None:
    """The label of the experiments that run `APTConfig()`'s prompts and rank."""
    default = APTConfig()
    for r in results:
        config = r["run_info"]["peft_config"] or {}
        shape = (config.get("num_prompts"), config.get("r"))
        if config.get("peft_type") == "APT" and shape == (default.num_prompts, default.r):
            return split_lr(r["run_info"]["experiment"])[0]
    return None


def style_of(method: str) -> dict:
    for family, style in STYLE.items():
        if method.lower().replace("-", " ").startswith(family.lower().replace("-", " ")):
            return style
    return dict(color="tab:purple", marker="P", markersize=8)


def plot(task: Task, results: list[dict]) -> str:
    """The paper's Figure 1, one panel per dataset: each method's best-rate metric against the forward GFLOPs it adds
    to the frozen model (APT's claim is to sit at the top left); its file name."""
    panels = {}
    for dataset in datasets_of(task):
        for label, by_lr in sweeps(task, results, dataset).items():
            flops = first(results, label)["train_info"]["added_forward_flops"]
            panels.setdefault(dataset or task.trainer.METRIC, {})[label] = (flops / 1e9, task.best_mean(by_lr))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels.items()):
        for method, (x, y) in points.items():
            ax.plot([x], [y], linestyle="none", **style_of(method))
            ax.annotate(method, (x, y), textcoords="offset points", xytext=(7, 5), fontsize=8)
        ax.set(xlabel="added forward GFLOPs per sample", ylabel=task.trainer.METRIC, title=title)
        ax.grid(True, alpha=0.3)
        ax.margins(0.15)
    fig.tight_layout()
    fig.savefig(task.folder / "best-vs-flops.png", dpi=100)
    plt.close(fig)
    return "best-vs-flops.png"


def front_page_section(task: Task, tasks: list[Task]) -> list[str]:
    if task.is_cost:
        return [f"## {task.name}", "", cost_summary(task.results), ""]
    results = [r for r in task.results if is_main(r)]
    intro = f"{task.params['description']}. [Every run](tasks/{task.name}/RESULTS.md)."
    lines = [f"## {task.name}", "", intro, "", f"**{answer(task, results)}**", "", *best_table(task, results, tasks)]
    return [*lines, "", f"![{task.name}](tasks/{task.name}/{plot(task, results)})", ""]


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


def versions(meta_info: dict) -> str:
    return ", ".join(f"{package} {version}" for package, version in (meta_info["package_versions"] or {}).items())


def runs_table(task: Task) -> list[str]:
    """Every run: its metric, training time and the machine and command it ran with."""
    machines, commands, rows = {}, {}, []
    for r in task.results:
        run, meta, seconds = r["run_info"], r["meta_info"], r["train_info"]["train_time_s"]
        machine = machines.setdefault(f"{meta['machine'] or 'not recorded'}; {versions(meta)}", len(machines) + 1)
        command = commands.setdefault(meta["command"] or "not recorded", len(commands) + 1)
        value = f"{task.scaled(r):.{task.trainer.METRIC_DIGITS + 1}f}"
        rows.append([run["experiment"], run["dataset"] or "", run["seed"], value, seconds, machine, command])
    header = ["experiment", "dataset", "seed", task.trainer.METRIC, "train s", "machine", "command"]
    lines = markdown_table(header, rows, left=2)
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
    rows = []
    for task in (task for task in front_page_tasks(tasks) if not task.is_cost):
        main = [r for r in task.results if is_main(r)]
        for dataset in datasets_of(task):
            table = sweeps(task, main, dataset)
            labels = [default_apt(main)] + [next((x for x in table if x.startswith(p)), None) for p in ROLES]
            digits = task.trainer.METRIC_DIGITS
            cells = [f"{task.best_mean(table[label]):.{digits}f}" if label in table else "" for label in labels]
            frozen = main[0]["train_info"]["metrics"].get("frozen_perplexity")
            cells[-1] = cells[-1] or (f"{frozen:.2f} (frozen)" if frozen else "")
            setting = f"{task.name}{', ' + dataset if dataset else ''}"
            rows.append([f"[{setting}](benchmarks/tasks/{task.name}/RESULTS.md)", f"{task.steps} steps", *cells])
    return markdown_table(["setting", "budget", "APT", "LoRA", "deep prompt", "head-only / frozen"], rows, left=2)


def write_readme_table(tasks: list[Task]) -> None:
    text = README.read_text()
    if TRAILS_BEGIN in text:
        head, rest = text.split(TRAILS_BEGIN, 1)
        table = "\n".join(trails_table(tasks))
        README.write_text(f"{head}{TRAILS_BEGIN}\n{table}\n{TRAILS_END}{rest.split(TRAILS_END, 1)[1]}")


COST_INTRO = """# cost

What each method adds to a frozen model, with random weights at the real sizes (cost does not depend on them). Per
sample: the parameters it trains besides the task head, forward FLOPs (torch's FlopCounterMode: matmuls, attention,
convolutions; LoRA unmerged), training-step FLOPs (forward and backward), the activation bytes autograd saves for
backward (a deterministic proxy of training memory), and two time ratios measured interleaved in one process,
medians over the repetitions: inference against the frozen model's forward, and the training step (forward,
backward, AdamW) against head-only training's (the frozen model and its trained head, or the frozen model's forward
and loss where there is no head). CPU times are the process's CPU time with one thread; absolute times only beside
their machine. Run an experiment with `python -m benchmarks.run benchmarks/tasks/cost/experiments/<method>/<name>`."""
COST_PLOT = "cost-sweeps.png"  # beside the cost task's page
SWEPT_LAYER = "vilt-b32-layers"  # the one-layer sweeps of the plot: how each cost grows with p and n
PLOT_NAMES = {"apt": "APT", "deep-prompt": "deep prompt", "lora": "LoRA"}  # as the plots style them


def count(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{prefix}{unit}"
    return f"{value:.0f}{unit}"


def method_of(result: dict) -> str:
    return result["run_info"]["experiment"].split("/")[0]


def cost_label(result: dict) -> str:
    """`apt/llava-1.5-7b-p200` -> `apt p200`: the method and what its experiment sets beyond the model."""
    method, name = result["run_info"]["experiment"].split("/")
    return f"{method} {name.removeprefix(result['run_info']['train_params']['model']).strip('-')}".strip()


def points(result: dict) -> list[dict]:
    """The measured points of a cost result: one per value of its sweep, or its metrics."""
    metrics = result["train_info"]["metrics"]
    return metrics.get("points", [metrics])


def by_model(results: list[dict]) -> dict[str, list[dict]]:
    """Cost results grouped by model and, where it is not the CPU, device."""
    groups = {}
    for result in results:
        params = result["run_info"]["train_params"]
        device = "" if params["device"] == "cpu" else f" ({params['device']})"
        groups.setdefault(params["model"] + device, []).append(result)
    return groups


def setting(result: dict, point: dict) -> str:
    sweep = result["train_info"]["metrics"].get("sweep")
    return f"{sweep}={point[sweep]}" if sweep else ""


def ratio(result: dict, point: dict, key: str) -> str:
    value = point.get(key, {}).get(method_of(result))
    return "" if value is None else f"{value:.3f}x"


def frozen_ms(result: dict, point: dict) -> str:
    return f"{1e3 * statistics.median(point['times_s']['frozen_forward']):.1f}" if "times_s" in point else ""


COST_COLUMNS = {  # header: cell of (result, point)
    "experiment": lambda r, p: r["run_info"]["experiment"],
    "setting": setting,
    "added params": lambda r, p: count(p.get("trainable_params")),
    "added fwd FLOPs": lambda r, p: count(p["added_forward_flops"]),
    "by APT's formula": lambda r, p: count(p["apt_formula_flops"]) if p["apt_formula_flops"] else "",
    "fwd FLOPs x frozen": lambda r, p: f"{1 + p['added_forward_flops'] / p['frozen_forward_flops']:.3f}x",
    "train-step FLOPs": lambda r, p: count(p["train_step_flops"]),
    "saved for backward": lambda r, p: count(p.get("saved_for_backward_bytes"), "B"),
    "inference x frozen": lambda r, p: ratio(r, p, "inference_time_ratio"),
    "step x head-only": lambda r, p: ratio(r, p, "step_time_ratio"),
    "frozen fwd ms": frozen_ms,
    "peak step memory": lambda r, p: count(p.get("peak_bytes", {}).get("train_step"), "B"),
    "compile s": lambda r, p: f"{sum(p['compile_s'].values()):.1f}" if "compile_s" in p else "",
}
SUMMARY_COLUMNS = {  # the front page's
    "model": lambda r, p: r["run_info"]["train_params"]["model"],
    "method": lambda r, p: cost_label(r),
    **{header: COST_COLUMNS[header] for header in ("added fwd FLOPs", "inference x frozen", "step x head-only")},
}


def text_table(header: list[str], rows: list[list]) -> str:
    """A cost table: every column aligned left, a newline after the last row."""
    return "\n".join(markdown_table(header, rows, left=len(header))) + "\n"


def cost_table(rows: list[tuple[dict, dict]], columns: dict) -> str:
    """A row per (result, point), a column per entry of `columns` that is not empty in every row."""
    cells = [[cell(result, point) for cell in columns.values()] for result, point in rows]
    keep = [i for i in range(len(columns)) if any(row[i] for row in cells)]
    return text_table([list(columns)[i] for i in keep], [[row[i] for i in keep] for row in cells])


def model_section(model: str, results: list[dict]) -> str:
    """One model's table (a row per experiment and sweep value), then where and how it was measured."""
    table = cost_table([(result, point) for result in results for point in points(result)], COST_COLUMNS)
    metas = [result["meta_info"] for result in results]
    where = sorted({f"- {meta['machine']}; {versions(meta)}; `{meta['command']}`" for meta in metas})
    return f"### {model}\n\n{points(results[0])[0]['setting']}\n\n" + table + "\n" + "\n".join(where)


def sweeps_plot(folder: Path, results: list[dict]) -> bool:
    """The one-layer sweeps' added FLOPs (APT's by its formula dashed) and training step (x head-only) against p and
    n, a column per swept variable; False if there are none."""
    sweeps = {}
    for result in results:
        metrics, method = result["train_info"]["metrics"], method_of(result)
        key = metrics.get("sweep")
        if result["run_info"]["train_params"]["model"] != SWEPT_LAYER or key not in ("num_prompts", "tokens"):
            continue
        sweep = sweeps.setdefault(key, dict(flops={}, step={}))
        sweep["values"] = [point[key] for point in metrics["points"]]
        sweep["flops"][PLOT_NAMES[method]] = [point["added_forward_flops"] / 1e9 for point in metrics["points"]]
        sweep["step"][PLOT_NAMES[method]] = [point["step_time_ratio"][method] for point in metrics["points"]]
        if method == "apt":
            sweep["flops"]["APT (analytic)"] = [point["apt_formula_flops"] / 1e9 for point in metrics["points"]]
    if not sweeps:
        return False
    fig, axes = plt.subplots(2, len(sweeps), figsize=(5.5 * len(sweeps), 8), squeeze=False)
    for column, (variable, sweep) in enumerate(sweeps.items()):
        for row, (key, ylabel) in enumerate([("flops", "added forward GFLOPs"), ("step", "training step / frozen")]):
            ax = axes[row][column]
            for method, values in sweep[key].items():
                style = dict(style_of(method))
                style["markersize"] = style["markersize"] * 0.6
                linestyle = "--" if method.endswith("(analytic)") else "-"
                ax.plot(sweep["values"], values, linestyle=linestyle, label=method, **style)
            ax.set(xlabel=variable, ylabel=ylabel)
            if key == "flops":
                ax.set(yscale="log", title=f"one ViLT-B layer, by {variable}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / COST_PLOT, dpi=120)
    plt.close(fig)
    return True


def llava_table(results: list[dict]) -> str:
    """Added forward GFLOPs per sample on LLaVA-1.5-7B at each sequence length (image tokens + text tokens)."""
    llava = [r for r in results if r["run_info"]["train_params"]["model"] == "llava-1.5-7b"]
    if not llava:
        return ""
    columns = [points(result) for result in llava]  # per method, a point per length
    rows = []
    for same_length in zip(*columns):
        first, frozen = same_length[0], same_length[0]["frozen_forward_flops"]
        added = [point["added_forward_flops"] for point in same_length]
        rows.append([f"{first['image_tokens']} + {first['text_tokens']}", f"{frozen / 1e9:,.0f}"])
        rows[-1] += [f"{flops / 1e9:.2f} ({100 * flops / frozen:.2f}%)" for flops in added]
    per_token = []  # the cost is linear in the tokens n: a + b*n, read from the shortest and the longest sequence
    for low, *_, high in columns:
        slope = (high["added_forward_flops"] - low["added_forward_flops"]) / (high["text_tokens"] - low["text_tokens"])
        per_token.append(f"{slope / 1e6:.1f} M")
    header = ["tokens (image + text)", "frozen GFLOPs", *(f"{cost_label(r)} added GFLOPs" for r in llava)]
    return text_table(header, [*rows, ["per further token", "", *per_token]])


def cost_summary(results: list[dict]) -> str:
    """The front page's cost section: what each method adds on LLaVA-1.5-7B and the measured step-time ratios."""
    models = ("llava-1.5-scaled", "vilt-b32")
    rows = [(result, points(result)[0]) for model in models for result in by_model(results).get(model, [])]
    return (
        "Added forward FLOPs per sample on LLaVA-1.5-7B (576 image tokens + text; APT p=200 on the language model's "
        "attentions, LoRA r=8 on q and v, prefix tuning 200 virtual tokens):\n\n"
        + llava_table(results)
        + "\nInference against the frozen model, training step against head-only's, each measured interleaved in one "
        "process (CPU time, 1 thread):\n\n" + cost_table(rows, SUMMARY_COLUMNS)
    )


def cost_page(folder: Path, results: list[dict]) -> str:
    """The cost task's page: every model's table, the LLaVA table, and the plot of the one-layer sweeps."""
    parts = [COST_INTRO]
    if not any(result["run_info"]["train_params"]["device"] == "cuda" for result in results):
        parts.append(
            "The GPU experiments (`*/vilt-b32-layers-gpu-*`) have no results yet: `bash benchmarks/gpu_check.sh`"
            " on an H100 or H200 measures them (benchmarks/GPU_RUN.md)."
        )
    parts.append("## LLaVA-1.5-7B, added forward FLOPs per sample\n\n" + llava_table(results))
    if sweeps_plot(folder, results):
        parts.append(f"## How costs grow\n\n![cost sweeps]({COST_PLOT})")
    parts += [model_section(model, group) for model, group in by_model(results).items()]
    return "\n\n".join(parts) + "\n"


def main() -> None:
    tasks = load_tasks()
    (BENCHMARKS / "RESULTS.md").write_text(front_page(tasks))
    for task in (task for task in tasks if task.results):
        page = cost_page(task.folder, task.results) if task.is_cost else task_page(task, tasks)
        (task.folder / "RESULTS.md").write_text(page)
    design = BENCHMARKS / "DESIGN_STUDIES.md"
    kept = CALIBRATION.search(design.read_text()) if design.exists() else None
    design.write_text(design_page(tasks, kept.group(0) if kept else ""))
    write_readme_table(tasks)
    write_docs_breakdowns(tasks)


if __name__ == "__main__":
    main()
