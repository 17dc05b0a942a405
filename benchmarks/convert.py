"""Turn JSON-lines benchmark records (one run per line, with its `setup`) into result files of the tasks.

`python -m benchmarks.convert FILE.jsonl [...]`, idempotent. A record (of an image or a causal-LM run) goes to the
task whose `default_training_params.json` has its setup, into the experiment of its method and learning rate; a
missing experiment folder is copied from another task's experiment of the same method. Records of a setup no task has
are counted and left alone. `--check PAGE` compares every figure of a results page made of sections (tables with `lr`
columns, best-lr columns, trainable parameters, added MFLOPs, training losses, feature statistics) with the converted
results.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import shutil
import statistics
from pathlib import Path

import torch
from peft import get_peft_model

from . import report
from .records import make_result, result_name, write_result
from .run import load_experiment

TASKS = Path(__file__).resolve().parent / "tasks"
IMAGE_SETUP = {"size": 0, "n_train": 0, "n_test": 0, "adapted_layers": 0, "epochs": 0, "batch_size": 0,
               "warmup_ratio": 0.0, "weight_decay": 0.0}  # fmt: skip
TEXT_SETUP = {"block_size": 0, "steps": 0, "batch_size": 0, "eval_blocks": 0}
CURRENT_PARAMETRISATION = 3
CAUSAL_LM_KEYS = {"34e6a7e2d047": 1, "d0457ea65ccd": 0}  # APTConfig()'s config keys at other parametrisations
# a record's method name -> experiment name without its learning rate
LEGACY_NAMES = {
    "head-only": "head-only/", "full": "full/", "LoRA r=4": "lora/r4-qv", "LoRA r=4 (q only)": "lora/r4-q",
    "LoRA r=4 (v only)": "lora/r4-v", "deep prompt p=10": "deep-prompt/p10", "deep prompt p=50": "deep-prompt/p50",
    "APT p=50": "apt/p50", "APT p=200": "apt/p200", "APT p=200, reference optimiser": "apt/p200-reference-optimiser",
    "APT p=200 fixed s": "apt/p200-fixed-s", "APT p=50 reference init": "apt/p50-reference-init",
    "APT p=50 W1 var 1/d": "apt/p50-w1-var-1-over-d", "APT p=200 W1 var 1/d": "apt/p200-w1-var-1-over-d",
    "APT p=200 W1 var 1/d P/c std .02": "apt/p200-w1-var-1-over-d-prompt-std-0.02",
    **{f"APT p=200 P/c std .{std}": f"apt/p200-prompt-std-0.{std}" for std in ("025", "04", "05", "08", "16")},
    **{f"APT p=200 term {ratio} P/c std {std}": f"apt/p200-term-{ratio}-prompt-std-{std}"
       for ratio in ("3e-3", "1e-2", "3e-2") for std in ("0.08", "0.32", "1")},
    "APT": "apt/default", "LoRA r=8 (q, v)": "lora/r8-qv", "LoRA r=8 (q)": "lora/r8-q", "LoRA r=8 (v)": "lora/r8-v",
    "prompt tuning p=20": "prompt-tuning/p20", "prefix tuning p=20": "prefix-tuning/p20",
    "APT, reference optimiser": "apt/default-reference-optimiser", "APT, beta2 0.98": "apt/default-beta2-0.98",
}  # fmt: skip
METRIC_KEYS = ("accuracy", "final_train_loss", "cosine_to_frozen", "separation", "frozen_separation", "perplexity",
               "frozen_perplexity", "first_train_loss", "last_train_loss", "diverged", "attention_change_train",
               "attention_change_held_out")  # fmt: skip


def lr_tag(lr: float) -> str:
    """0.01 -> `1e-2`, 0.0055 -> `5.5e-3`."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def experiment_of(record: dict) -> str:
    """`apt/p200-lr1e-2`; APT records of another parametrisation than the installed one get their own experiment."""
    base = LEGACY_NAMES[record["method"]]
    version = record.get("apt_parametrisation", 1) if record["method"].startswith("APT") else CURRENT_PARAMETRISATION
    if "config_key" in record:  # the causal-LM records name their parametrisation by the key of their config
        version = CAUSAL_LM_KEYS.get(record["config_key"], CURRENT_PARAMETRISATION)
    if version != CURRENT_PARAMETRISATION:
        base += f"-parametrisation-v{version}"
    return f"{base}{'' if base.endswith('/') else '-'}lr{lr_tag(record['lr'])}"


@functools.cache
def task_setups() -> dict[tuple, Path]:
    setups = {}
    for path in sorted(TASKS.glob("*/default_training_params.json")):
        params = json.loads(path.read_text())
        fields = {"causal_lm": TEXT_SETUP, "image_classification": IMAGE_SETUP}.get(params["trainer"], {})
        setups[tuple((key, params.get(key, default)) for key, default in fields.items())] = path.parent
    return setups


def task_of(record: dict) -> Path | None:
    fields = TEXT_SETUP if "perplexity" in record else IMAGE_SETUP
    return task_setups().get(tuple((key, record["setup"].get(key, default)) for key, default in fields.items()))


def ensure_experiment(task_dir: Path, experiment: str, lr: float) -> Path:
    """The experiment's folder, copied from another task's experiment of the same method if missing."""
    folder = task_dir / "experiments" / experiment
    if not folder.exists():
        base = experiment.rsplit("lr", 1)[0]
        templates = sorted(TASKS.glob(f"*/experiments/{base}lr*"))
        if not templates:
            raise ValueError(f"No experiment {base}lr* in any task to copy for {task_dir.name}/{experiment}")
        shutil.copytree(templates[0], folder)
        params = json.loads((folder / "training_params.json").read_text())
        (folder / "training_params.json").write_text(json.dumps({**params, "lr": lr}, indent=1) + "\n")
    return folder


def meta_of(record: dict) -> dict:
    """Command, machine and versions from a record's `environment` lines (None where the record kept none)."""
    lines = dict(re.findall(r"- (\w+): (.*)", record.get("environment", "")))
    versions = dict(re.findall(r"(Python|torch|transformers|peft) ([^\s,]+)", lines.get("Versions", "")))
    return {
        "command": lines.get("Command", "").strip("`") or None,
        "machine": lines.get("Machine"),
        "package_versions": {key.lower(): value for key, value in versions.items()} or None,
    }


@functools.cache
def added_flops(experiment_dir: Path) -> int:
    """The forward FLOPs per sample an experiment's method adds, measured as its trainer measures them."""
    params, config = load_experiment(experiment_dir)
    torch.manual_seed(0)
    if params["trainer"] == "causal_lm":
        from .causal_lm import added_forward_flops, load_base

        base, _, held_out = load_base(False, params["block_size"], 1, 1)
        return added_forward_flops(get_peft_model(copy.deepcopy(base), config), held_out[:1])
    from .image_classification import added_forward_flops, attach, load_backbone, split_backbone

    _, tail = split_backbone(load_backbone(False), params["adapted_layers"])
    hidden = torch.randn(1, (params["size"] // tail.config.patch_size) ** 2 + 1, tail.config.hidden_size)
    return added_forward_flops(tail, attach(copy.deepcopy(tail), params, config), hidden)


def convert_record(record: dict) -> Path | None:
    """Write a record's result file unless it exists; its path, or None when no task has its setup."""
    task_dir = task_of(record)
    if task_dir is None:
        return None
    experiment = experiment_of(record)
    folder = ensure_experiment(task_dir, experiment, record["lr"])
    path = task_dir / "results" / result_name(experiment, record.get("dataset"), record["seed"])
    if path.exists():
        return path
    params, peft_config = load_experiment(folder)
    params = {k: v for k, v in params.items() if k not in ("datasets", "seeds")} | {"dataset": record.get("dataset")}
    seconds = record.get("seconds") or record.get("seconds_per_step", 0) * params.get("steps", 0) or None
    train_info = {
        "metrics": {k: v for k, v in record.items() if k in METRIC_KEYS or k.startswith("term_")},
        "train_time_s": seconds and round(seconds, 2),
        "trainable_params": record["trainable_parameters"],
        "added_forward_flops": added_flops(folder),
    }
    config = json.loads(json.dumps(peft_config.to_dict(), default=sorted)) if peft_config else None
    result = make_result(task=task_dir.name, experiment=experiment, dataset=record.get("dataset"), seed=record["seed"],
                         train_params=params | {"tiny": False}, peft_config=config, train_info=train_info,
                         meta_info=meta_of(record))  # fmt: skip
    result["run_info"]["created_at"] = None
    write_result(path, result)
    return path


# the sections of a results page made of sections and the tasks that hold their records
SECTION_TASKS = {
    "quality": "image-50-steps-last-2-blocks-no-warm-up", "quality-full": "image-224-px-50-steps",
    "quality-recipe": "image-50-steps-last-2-blocks", "quality-recipe-12-blocks": "image-50-steps",
    "few-shot": "image-few-shot", "few-shot-16-per-class": "image-few-shot-16-per-class",
    "quality-500-steps": "image-500-steps", "causal-lm": "causal-lm-30-steps",
    "causal-lm-300-steps": "causal-lm-300-steps",
}  # fmt: skip


def check(page: Path) -> None:
    """Print, per section of a results page, how many of its figures the converted results reproduce."""
    tasks = {task.name: task for task in report.load_tasks()}
    for section, body in re.findall(r"<!-- BEGIN (\S+) -->(.*?)<!-- END \1 -->", page.read_text(), re.S):
        if section not in SECTION_TASKS:
            print(f"{section}: no records to compare")
            continue
        task, dataset, header, compared, wrong, losses = tasks[SECTION_TASKS[section]], None, [], 0, [], False
        for line in body.splitlines():
            if line.startswith("### ") and ": " in line:
                dataset = line.rsplit(": ", 1)[1]
            if not line.startswith("|"):
                header, losses = [], line.startswith("Training loss") if line else losses
            if not line.startswith("| ") or line.startswith("|---"):
                continue
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if cells[0] == "method":
                header = cells
                continue
            for column, shown in zip(header[1:], cells[1:]):
                expected = expected_cell(task, cells[0], column, dict(zip(header, cells)), dataset, losses)
                if shown and expected is not None:
                    compared += 1
                    if not same_figures(shown, expected):
                        wrong.append(f"{cells[0]} / {column}: {shown} vs {expected}")
        print(f"{section} -> {task.name}: {compared - len(wrong)} of {compared} figures match", *wrong, sep="\n  ")


def expected_cell(task, method: str, column: str, row: dict, dataset: str | None, losses: bool) -> str | None:
    """The converted results' figure for a cell of a section's table (None for columns not derived from records)."""
    label = legacy_label(task, method)
    if label is None:
        return None
    diagnostics = {"cosine to frozen": "cosine_to_frozen", "class separation": "separation"}
    if losses or column in diagnostics:
        key = "last_train_loss" if losses else diagnostics[column]
        lr = float(row["lr"] if "lr" in row else column.removeprefix("lr "))
        runs = [r["train_info"]["metrics"][key] for r in task.results if r["run_info"]["dataset"] == dataset
                and report.split_lr(r["run_info"]["experiment"]) == (label, lr)]  # fmt: skip
        return f"{statistics.mean(runs):.{2 if losses else 3}f}" if runs else ""
    if column in ("trainable params", "added MFLOPs / image"):
        info = report.first(task.results, label)["train_info"]
        return (
            f"{info['trainable_params']:,}"
            if column == "trainable params"
            else f"{info['added_forward_flops'] / 1e6:.2f}"
        )
    match = re.fullmatch(r"(?:(\w+) )?(best lr|accuracy|lr ([\d.e-]+)|perplexity at best lr)", column)
    if match is None:
        return None
    by_lr = report.sweeps(task, task.results, match[1] or dataset).get(label, {})
    lr = float(match[3] or row.get("lr", 0)) or (task.best_lr(by_lr) if by_lr else None)
    if lr not in by_lr:
        return ""
    return f"{lr:g}" if match[2] == "best lr" else task.cell(by_lr[lr])


def legacy_label(task, method: str) -> str | None:
    """The label of a record's method name in a task, at the newest APT parametrisation the task has."""
    if method not in LEGACY_NAMES:
        return None
    base = LEGACY_NAMES[method].rstrip("/")
    labels = {report.split_lr(r["run_info"]["experiment"])[0] for r in task.results}
    versions = ("", *(f"-parametrisation-v{v}" for v in range(CURRENT_PARAMETRISATION - 1, -1, -1)))
    return next((base + version for version in versions if base + version in labels), None)


def same_figures(shown: str, expected: str) -> bool:
    """Equal as shown, reading `± 0.0 (n=1)` as `(n=1)` and dropping an `(n=2)` after a std."""
    shown = re.sub(r" ± [\d.]+ \(n=1\)", " (n=1)", shown)
    return re.sub(r"( ± [\d.]+) \(n=\d+\)", r"\1", shown) == expected


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="JSON-lines records")
    parser.add_argument("--check", type=Path, help="a results page made of sections to compare with")
    args = parser.parse_args(argv)
    if args.check:
        return check(args.check)
    unplaced = {}
    for path in args.files:
        for record in map(json.loads, path.read_text().splitlines()):
            if convert_record(record) is None:
                key = json.dumps(record["setup"], sort_keys=True)
                unplaced[key] = unplaced.get(key, 0) + 1
    for setup, count in unplaced.items():
        print(f"{count} records of a setup no task has: {setup}")


if __name__ == "__main__":
    main()
