"""Every benchmark task's experiments run on a tiny model through the runner and write results in the schema."""

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import run

TASKS = sorted(path.parent for path in (Path(__file__).parents[1] / "benchmarks" / "tasks").glob("*/default_*.json"))
# every method of a trainer runs in the first task of that trainer; the other tasks run their first method only
TRAINERS = {task: json.loads((task / "default_training_params.json").read_text())["trainer"] for task in TASKS}
FIRST_OF_TRAINER = {trainer: next(task for task in TASKS if TRAINERS[task] == trainer) for trainer in TRAINERS.values()}
RUN_INFO = {"task", "experiment", "dataset", "seed", "created_at", "status", "error", "train_params", "peft_config"}
TRAIN_INFO = {
    "metrics", "train_losses", "train_time_s", "peak_memory_bytes", "trainable_params", "adapter_file_bytes",
    "added_forward_flops",
}  # fmt: skip
META_INFO = {"command", "machine", "package_versions"}


def one_experiment_per_method(task: Path) -> list[Path]:
    """The first experiment of each method folder that a trainer runs (not one kept as data)."""
    if not (task / "experiments").is_dir():
        pytest.fail(f"{task.name} has no experiments/ folder: a task needs at least one experiment")
    chosen = []
    for method in sorted((task / "experiments").iterdir()):
        runnable = [path for path in sorted(method.iterdir()) if not kept_as_data(path)]
        chosen += runnable[:1]
    return chosen


def kept_as_data(experiment: Path) -> bool:
    params = experiment / "training_params.json"
    return params.exists() and any(key in json.loads(params.read_text()) for key in run.KEPT_AS_DATA)


@pytest.mark.parametrize("task", TASKS, ids=[task.name for task in TASKS])
def test_every_method_of_every_task_runs_tiny_and_writes_the_schema(task, tmp_path):
    copy = tmp_path / task.name
    copy.mkdir()
    shutil.copy(task / "default_training_params.json", copy / "default_training_params.json")
    experiments = []
    chosen = one_experiment_per_method(task)
    for experiment in chosen if FIRST_OF_TRAINER[TRAINERS[task]] == task else chosen[:1]:
        target = copy / "experiments" / experiment.parent.name / experiment.name
        shutil.copytree(experiment, target)
        experiments.append(target)
    params = json.loads((task / "default_training_params.json").read_text())
    dataset = params.get("datasets", [None])[0]
    argv = [*map(str, experiments), "--tiny", "--seeds", "0", *(["--datasets", dataset] if dataset else [])]
    run.main(argv)
    results = sorted((copy / "temporary_results").glob("*.json"))
    assert len(results) == len(experiments)
    for path in results:
        result = json.loads(path.read_text())
        assert set(result) == {"run_info", "train_info", "meta_info"}
        assert set(result["run_info"]) == RUN_INFO and result["run_info"]["status"] == "success"
        assert set(result["train_info"]) == TRAIN_INFO and set(result["meta_info"]) == META_INFO
        assert result["run_info"]["task"] == task.name and result["run_info"]["train_params"]["tiny"] is True
        losses = result["train_info"]["train_losses"]
        assert (losses is None or len(losses) >= 1) and result["train_info"]["trainable_params"] >= 0
        has_adapter = (task / "experiments" / result["run_info"]["experiment"] / "adapter_config.json").exists()
        assert (result["run_info"]["peft_config"] is not None) == has_adapter
    first_written = results[0].stat().st_mtime_ns
    for path in results[1:]:
        path.unlink()
    run.main(argv)  # resumes: only the deleted runs run again
    assert sorted((copy / "temporary_results").glob("*.json")) == results
    assert results[0].stat().st_mtime_ns == first_written
