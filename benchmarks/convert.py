"""Turn JSON-lines records of the earlier benchmark scripts into result files of the tasks (idempotent).

`python -m benchmarks.convert FILE.jsonl [...]` (default: every `benchmarks/results/**/*.jsonl`). A record goes to the
task whose `default_training_params.json` has its setup, into the experiment of its method and learning rate, created
from `LEGACY_METHODS` if missing. APT records made by another parametrisation than the installed one get experiments
of their own (`-parametrisation-v<N>`), which the runner does not rerun. `--check RESULTS.md` compares the figures of
a results page in the earlier format (every table with `lr` columns or a best-lr column) with the converted results.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import statistics
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

from peft_apt import APTConfig, APTLayer

from . import report
from .records import make_result, result_name, write_result
from .run import load_experiment

BENCHMARKS = Path(__file__).resolve().parent
TASKS = BENCHMARKS / "tasks"
IMAGE_SETUP = {"size": 0, "n_train": 0, "n_test": 0, "adapted_layers": 0, "epochs": 0, "batch_size": 0,
               "warmup_ratio": 0.0, "weight_decay": 0.0}  # fmt: skip
TEXT_SETUP = {"block_size": 0, "steps": 0, "batch_size": 0, "eval_blocks": 0}
CURRENT_APT_KEY = "b8886981146f"  # the causal-LM records' key of APTConfig() at the installed parametrisation
APT_KEY_VERSIONS = {"34e6a7e2d047": 1, "d0457ea65ccd": 0}
NOT_S = [name for name in APTLayer.adapter_layer_names if name != "apt_s"]


def _lora(r, targets, causal=False):
    alpha = 2 * r
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, **_causal(causal))


def _causal(causal):
    return {"task_type": "CAUSAL_LM"} if causal else {}


def _ablation(study, **change):
    return {"design_study": study, "init_ablation": change}


# earlier method name -> (experiment name without the lr, PEFT config or None, training parameters)
LEGACY_METHODS = {
    "head-only": ("head-only/", None, {"baseline": "head-only"}),
    "full": ("full/", None, {"baseline": "full"}),
    "LoRA r=4": ("lora/r4-qv", _lora(4, ["q_proj", "v_proj"]), {}),
    "LoRA r=4 (q only)": ("lora/r4-q", _lora(4, ["q_proj"]), {"design_study": "which change short runs reward"}),
    "LoRA r=4 (v only)": ("lora/r4-v", _lora(4, ["v_proj"]), {"design_study": "which change short runs reward"}),
    "deep prompt p=10": ("deep-prompt/p10", None, {"baseline": "deep-prompt", "num_prompts": 10}),
    "deep prompt p=50": ("deep-prompt/p50", None, {"baseline": "deep-prompt", "num_prompts": 50}),
    "APT p=50": ("apt/p50", APTConfig(num_prompts=50, r=4), {}),
    "APT p=200": ("apt/p200", APTConfig(num_prompts=200, r=4), {}),
    "APT p=200, reference optimiser": ("apt/p200-reference-optimiser", APTConfig(), {"optimiser": "reference",
                                       "design_study": "optimiser"}),  # fmt: skip
    "APT p=200 fixed s": ("apt/p200-fixed-s", APTConfig(), {"train_only": NOT_S,
                          "design_study": "which change short runs reward"}),  # fmt: skip
    "APT p=50 reference init": ("apt/p50-reference-init", APTConfig(num_prompts=50, init_weights="reference"),
                                {"design_study": "initialisation"}),  # fmt: skip
    "APT p=50 W1 var 1/d": ("apt/p50-w1-var-1-over-d", APTConfig(num_prompts=50), _ablation("initialisation",
                            small_W1=True)),  # fmt: skip
    "APT p=200 W1 var 1/d": ("apt/p200-w1-var-1-over-d", APTConfig(), _ablation("initialisation", small_W1=True)),
    "APT p=200 W1 var 1/d P/c std .02": ("apt/p200-w1-var-1-over-d-prompt-std-0.02", APTConfig(),
                                         _ablation("initialisation", small_W1=True, trained_prompt_std=0.02)),
    **{
        f"APT p=200 P/c std .{std}": (f"apt/p200-prompt-std-0.{std}", APTConfig(),
                                      _ablation("initialisation", trained_prompt_std=float(f"0.{std}")))
        for std in ("025", "04", "05", "08", "16")
    },
    **{
        f"APT p=200 term {ratio} P/c std {std}": (f"apt/p200-term-{ratio}-prompt-std-{std}", APTConfig(),
                                                 _ablation("initialisation", trained_prompt_std=float(std),
                                                           term_ratio=float(ratio)))
        for ratio in ("3e-3", "1e-2", "3e-2") for std in ("0.08", "0.32", "1")
    },
    # the causal-LM benchmark
    "APT": ("apt/default", APTConfig(task_type="CAUSAL_LM"), {}),
    "LoRA r=8 (q, v)": ("lora/r8-qv", _lora(8, ["q_proj", "v_proj"], True), {}),
    "LoRA r=8 (q)": ("lora/r8-q", _lora(8, ["q_proj"], True), {"design_study": "which change short runs reward"}),
    "LoRA r=8 (v)": ("lora/r8-v", _lora(8, ["v_proj"], True), {"design_study": "which change short runs reward"}),
    "prompt tuning p=20": ("prompt-tuning/p20", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                           prompt_tuning_init="SAMPLE_VOCAB"), {}),  # fmt: skip
    "prefix tuning p=20": ("prefix-tuning/p20", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20), {}),
    "APT, reference optimiser": ("apt/default-reference-optimiser", APTConfig(task_type="CAUSAL_LM"),
                                 {"optimiser": "reference", "design_study": "optimiser"}),
    "APT, beta2 0.98": ("apt/default-beta2-0.98", APTConfig(task_type="CAUSAL_LM"),
                        {"adam_betas": [0.9, 0.98], "design_study": "optimiser"}),
    "APT p=20": ("apt/p20", APTConfig(task_type="CAUSAL_LM", num_prompts=20), {"design_study": "hyper-parameters"}),
    "APT r=16": ("apt/r16", APTConfig(task_type="CAUSAL_LM", r=16), {"design_study": "hyper-parameters"}),
    "APT r=64": ("apt/r64", APTConfig(task_type="CAUSAL_LM", r=64), {"design_study": "hyper-parameters"}),
    "APT dropout .1": ("apt/dropout-0.1", APTConfig(task_type="CAUSAL_LM", apt_dropout=0.1),
                       {"design_study": "hyper-parameters"}),
}  # fmt: skip
# where the causal-LM benchmark used a name of the image one
CAUSAL_LM_METHODS = {
    "APT p=50": ("apt/p50", APTConfig(task_type="CAUSAL_LM", num_prompts=50), {"design_study": "hyper-parameters"})
}


def lr_tag(lr: float) -> str:
    """0.01 -> `1e-2`, 0.0055 -> `5.5e-3`."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def legacy_method(record: dict, source: Path) -> tuple[str, PeftConfig | None, dict]:
    """(experiment name, PEFT config, training parameters) of a record of the earlier scripts, read from `source`."""
    if "variant" in record:  # the causal-LM design sweep's constants
        ratio, std, w2, reference, *trained = record["variant"].split(",")
        name = f"apt/constants-{ratio}-{std}-{w2}" + ("-reference-optimiser" if reference == "1" else "")
        params = {"design_study": "parametrisation constants", "apt_constants": {"initial_term_ratio": float(ratio),
                  "trained_prompt_std_ratio": float(std), "key_map_factor": float(w2)}}  # fmt: skip
        if reference == "1":
            params["optimiser"] = "reference"
        if trained:
            name += "-train-" + trained[0].replace("+", "-").replace("apt_", "")
            params["train_only"] = trained[0].split("+")
        if record.get("prompt_init", "random") != "random":
            name += f"-prompts-from-{record['prompt_init']}"
            params["prompt_init"] = record["prompt_init"]
        return name, APTConfig(task_type="CAUSAL_LM"), params
    method = record["method"]
    methods = CAUSAL_LM_METHODS if "perplexity" in record and method in CAUSAL_LM_METHODS else LEGACY_METHODS
    name, config, params = methods[method]
    params = dict(params)
    version = apt_version(record)
    if version is not None and version != 3:
        name += f"-parametrisation-v{version}"
        params["apt_parametrisation"] = version
    if source.parent.name == "attention-change":
        name += "-attention-change"
        params.update(design_study="attention change", measure_attention_change=True)
    if "initial_term_ratio" in record:
        name += "-calibrated-without-multiplier"
        params.update(design_study="initialisation", apt_parametrisation="calibrated without multiplier")
    return name, config, params


def apt_version(record: dict) -> int | None:
    """The parametrisation an APT record was made with (records without the field: version 1); None if not APT."""
    if not (record.get("method") or "APT").startswith("APT"):
        return None
    if "config_key" in record:
        return 3 if record["config_key"] not in APT_KEY_VERSIONS else APT_KEY_VERSIONS[record["config_key"]]
    return record.get("apt_parametrisation", 1)


@functools.cache
def task_setups() -> dict[tuple, Path]:
    setups = {}
    for path in sorted(TASKS.glob("*/default_training_params.json")):
        params = json.loads(path.read_text())
        fields = TEXT_SETUP if params["trainer"] == "causal_lm" else IMAGE_SETUP
        setups[tuple((key, params.get(key, default)) for key, default in fields.items())] = path.parent
    return setups


def task_of(record: dict) -> Path | None:
    setup = record.get("setup") or {"block_size": 64, "steps": record["steps"], "batch_size": 4, "eval_blocks": 32}
    fields = TEXT_SETUP if "perplexity" in record else IMAGE_SETUP
    return task_setups().get(tuple((key, setup.get(key, default)) for key, default in fields.items()))


def ensure_experiment(task_dir: Path, name: str, config: PeftConfig | None, params: dict) -> Path:
    folder = task_dir / "experiments" / name
    if not folder.exists():
        folder.mkdir(parents=True)
        if config is not None:
            config.save_pretrained(str(folder))
        (folder / "training_params.json").write_text(json.dumps(params, indent=1) + "\n")
    return folder


def meta_of(record: dict) -> dict:
    """Command, machine and versions from a record's `environment` lines (None where the record kept none)."""
    lines = dict(re.findall(r"- (\w+): (.*)", record.get("environment", "")))
    versions = dict(re.findall(r"(Python|torch|transformers|peft) ([^\s,]+)", lines.get("Versions", "")))
    command = lines.get("Command", "").strip("`") or None
    if command is None and "dataset" in record and "environment" not in record and "variant" not in record:
        command = f"python -m benchmarks.quality --datasets {record['dataset']}"
    versions = {key.lower(): value for key, value in versions.items()}
    return {"command": command, "machine": lines.get("Machine"), "package_versions": versions or None}


METRIC_KEYS = ("accuracy", "final_train_loss", "cosine_to_frozen", "separation", "frozen_separation", "perplexity",
               "frozen_perplexity", "first_train_loss", "last_train_loss", "diverged", "attention_change_train",
               "attention_change_held_out", "initial_term_ratio", "initial_feature_cosine")  # fmt: skip


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


def convert_record(record: dict, source: Path) -> Path | None:
    """Write a record's result file unless it exists; its path, or None when no task has its setup."""
    task_dir = task_of(record)
    if task_dir is None:
        return None
    base, config, params = legacy_method(record, source)
    experiment = f"{base}lr{lr_tag(record['lr'])}" if base.endswith("/") else f"{base}-lr{lr_tag(record['lr'])}"
    folder = ensure_experiment(task_dir, experiment, config, {"lr": record["lr"], **params})
    path = task_dir / "results" / result_name(experiment, record.get("dataset"), record["seed"])
    if path.exists():
        return path
    train_params, peft_config = load_experiment(folder)
    train_params.update(dataset=record.get("dataset"), tiny=False)
    train_params.pop("datasets", None), train_params.pop("seeds", None)
    metrics = {key: record[key] for key in METRIC_KEYS if key in record}
    metrics.update({key: value for key, value in record.items() if key.startswith("term_")})
    steps = train_params.get("steps")
    seconds = record.get("seconds") or (record["seconds_per_step"] * steps if "seconds_per_step" in record else None)
    train_info = {
        "metrics": metrics,
        "train_losses": None,
        "train_time_s": round(seconds, 2) if seconds is not None else None,
        "peak_memory_bytes": None,
        "trainable_params": record["trainable_parameters"],
        "adapter_file_bytes": None,
        "added_forward_flops": added_flops(folder),
    }
    config = json.loads(json.dumps(peft_config.to_dict(), default=sorted)) if peft_config else None
    result = make_result(task=task_dir.name, experiment=experiment, dataset=record.get("dataset"), seed=record["seed"],
                         train_params=train_params, peft_config=config, train_info=train_info,
                         meta_info=meta_of(record))  # fmt: skip
    result["run_info"]["created_at"] = None
    write_result(path, result)
    return path


# the sections of the earlier results page and the tasks that hold their records
SECTION_TASKS = {
    "quality": "image-50-steps-last-2-blocks-no-warm-up",
    "quality-full": "image-224-px-50-steps",
    "quality-recipe": "image-50-steps-last-2-blocks",
    "quality-recipe-12-blocks": "image-50-steps",
    "few-shot": "image-few-shot",
    "few-shot-16-per-class": "image-few-shot-16-per-class",
    "quality-500-steps": "image-500-steps",
    "causal-lm": "causal-lm-30-steps",
    "causal-lm-300-steps": "causal-lm-300-steps",
}


def check(page: Path) -> None:
    """Print, per section of an earlier results page, how many of its figures the converted results reproduce."""
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
    """The converted results' figure for a cell of an earlier table (None for columns not derived from records):
    the metric's mean ± std at a rate, the best rate, trainable parameters, added MFLOPs; in the tables of training
    losses and of features, their means."""
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
    match = re.fullmatch(r"(?:(\w+) )?(best lr|accuracy|lr ([\d.e-]+)|perplexity at best lr)", column)
    if column == "trainable params":
        return f"{report.first(task.results, label)['train_info']['trainable_params']:,}"
    if column == "added MFLOPs / image":
        return f"{report.first(task.results, label)['train_info']['added_forward_flops'] / 1e6:.2f}"
    if match is None:
        return None
    by_lr = report.sweeps(task, task.results, match[1] or dataset).get(label, {})
    lr = float(match[3] or row.get("lr", 0)) or (task.best_lr(by_lr) if by_lr else None)
    if lr not in by_lr:
        return ""
    return f"{lr:g}" if match[2] == "best lr" else task.cell(by_lr[lr])


def legacy_label(task, method: str) -> str | None:
    """The label of an earlier method name in a task: its newest APT parametrisation there."""
    causal = task.params["trainer"] == "causal_lm" and method in CAUSAL_LM_METHODS
    methods = CAUSAL_LM_METHODS if causal else LEGACY_METHODS
    if method not in methods:
        return None
    base = methods[method][0].rstrip("/")
    labels = {report.split_lr(r["run_info"]["experiment"])[0] for r in task.results}
    return next((base + suffix for suffix in ("", "-parametrisation-v2", "-parametrisation-v1",
                 "-parametrisation-v0") if base + suffix in labels), None)  # fmt: skip


def same_figures(shown: str, expected: str) -> bool:
    """Equal as shown, reading the earlier `± 0.0 (n=1)` as `(n=1)` and dropping the earlier `(n=2)` after a std."""
    shown = re.sub(r" ± [\d.]+ \(n=1\)", " (n=1)", shown)
    return re.sub(r"( ± [\d.]+) \(n=\d+\)", r"\1", shown) == expected


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, default=sorted((BENCHMARKS / "results").rglob("*.jsonl")))
    parser.add_argument("--check", type=Path, help="a results page in the earlier format to compare with")
    args = parser.parse_args(argv)
    if args.check:
        return check(args.check)
    unplaced = {}
    for path in args.files:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if convert_record(record, path) is None:
                key = json.dumps(record.get("setup"), sort_keys=True)
                unplaced[key] = unplaced.get(key, 0) + 1
    for setup, count in unplaced.items():
        print(f"{count} records of a setup no task has: {setup}")


if __name__ == "__main__":
    main()
