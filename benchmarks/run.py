"""Run benchmark experiments: `python -m benchmarks.run benchmarks/tasks/<task>/experiments/<method>/<name> [...]`.

An experiment's training parameters are its task's `default_training_params.json` updated by its own optional
`training_params.json`; its PEFT config is its `adapter_config.json` (experiments without one are baselines such as
head-only training). The task's trainer (`trainer` in the parameters: a module of this package) trains once per
dataset and seed and the runner writes one result JSON per run into the task's `results/`, skipping runs already
there, so an interrupted sweep resumes where it stopped. `--tiny` runs on a tiny random model into
`temporary_results/` (a smoke test); failed runs go there too, with their error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel

import peft_apt  # noqa: F401  (registers APT with PEFT, so that its adapter_config.json loads)

from .records import make_result, result_name, write_result

# Training parameters of design-study experiments whose results are kept but that the trainers do not run: another APT
# parametrisation than the installed one, prompts drawn from the data, the attention-change measurement.
KEPT_AS_DATA = ("apt_parametrisation", "prompt_init", "measure_attention_change")


def load_experiment(experiment_dir: Path) -> tuple[Path, str, dict, PeftConfig | None]:
    """(task folder, `<method>/<name>`, merged training parameters, PEFT config or None) of an experiment folder."""
    experiment_dir = experiment_dir.resolve()
    if experiment_dir.parent.parent.name != "experiments":
        raise ValueError(f"{experiment_dir} is not a folder <task>/experiments/<method>/<name>")
    task_dir = experiment_dir.parents[2]
    params = json.loads((task_dir / "default_training_params.json").read_text())
    own = experiment_dir / "training_params.json"
    if own.exists():
        params.update(json.loads(own.read_text()))
    has_adapter = (experiment_dir / "adapter_config.json").exists()
    config = PeftConfig.from_pretrained(str(experiment_dir)) if has_adapter else None
    return task_dir, f"{experiment_dir.parent.name}/{experiment_dir.name}", params, config


def adapter_file_bytes(model) -> int | None:
    """The size of the saved adapter (safetensors) of a PEFT model; None for other models."""
    if not isinstance(model, PeftModel):
        return None
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(path.stat().st_size for path in Path(folder).rglob("*.safetensors"))


def run_once(trainer, params: dict, peft_config: PeftConfig | None, seed: int) -> dict:
    """The trainer's run with the runner's measurements: adapter size and peak accelerator memory."""
    on_cuda = str(params.get("device", "cpu")).startswith("cuda") and not params.get("tiny")  # tiny runs: on the CPU
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    outcome = trainer.run(params, peft_config, seed)
    outcome.setdefault("train_time_s", round(time.perf_counter() - start, 2))
    if on_cuda:  # the CPU has no allocator statistics
        outcome["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    if "model" in outcome:
        outcome["adapter_file_bytes"] = adapter_file_bytes(outcome.pop("model"))
    return outcome


def run_experiment(experiment_dir: Path, seeds, datasets, tiny: bool, overrides: dict | None = None) -> None:
    """Run every (dataset, seed) of an experiment whose result file does not exist yet."""
    task_dir, experiment, params, peft_config = load_experiment(experiment_dir)
    params.update(overrides or {})
    if kept := [key for key in KEPT_AS_DATA if key in params]:
        print(f"{experiment}: skipped, its results are kept as data (no trainer runs {kept})")
        return
    trainer = importlib.import_module(f"benchmarks.{params['trainer']}")
    config = json.loads(json.dumps(peft_config.to_dict(), default=sorted)) if peft_config else None
    folder = task_dir / ("temporary_results" if tiny else "results")
    for dataset in datasets or params.get("datasets") or [None]:
        for seed in seeds or params["seeds"]:
            path = folder / result_name(experiment, dataset, seed)
            if path.exists():
                continue
            run_params = {k: v for k, v in params.items() if k not in ("datasets", "seeds")}
            run_params.update(dataset=dataset, tiny=tiny, **({"device": "cpu"} if tiny else {}))
            info = dict(task=task_dir.name, experiment=experiment, dataset=dataset, seed=seed, peft_config=config)
            info["train_params"] = run_params
            try:  # a fresh config per run: get_peft_model fills in the model's defaults
                outcome = run_once(trainer, run_params, config and PeftConfig.from_peft_type(**config), seed)
            except Exception:
                failed = make_result(info, train_info={}, status="failed", error=traceback.format_exc())
                write_result(task_dir / "temporary_results" / path.name, failed)
                raise
            write_result(path, make_result(info, train_info=outcome))
            print(f"{task_dir.name} {experiment} {dataset or ''} seed {seed}: {outcome['metrics']}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", type=Path, help="experiment folders, run in this order")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the task's `seeds`")
    parser.add_argument("--datasets", nargs="+", help="default: the task's `datasets`")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model, results in temporary_results/")
    parser.add_argument(
        "--param", action="append", default=[], metavar="KEY=JSON", help="a training parameter for this machine, e.g. "
        "device='\"cuda\"' or weights='\"DIR\"' (recorded in the results)"
    )  # fmt: skip
    args = parser.parse_args(argv)
    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.param)}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    for experiment_dir in args.experiments:
        run_experiment(experiment_dir, args.seeds, args.datasets, args.tiny, overrides)


if __name__ == "__main__":
    main()
