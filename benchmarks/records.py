"""Result files of the benchmark tasks: one JSON per (experiment, dataset, seed), schema in benchmarks/README.md."""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "peft", "accelerate", "peft-apt")
RUN_INFO = ("task", "experiment", "dataset", "seed", "created_at", "status", "error", "train_params", "peft_config")
TRAIN_INFO = ("metrics", "train_losses", "train_time_s", "peak_memory_bytes", "trainable_params", "adapter_file_bytes",
              "added_forward_flops")  # fmt: skip


def machine(device: torch.device | str = "cpu") -> str:
    """The accelerator, or the CPU and torch's thread count, and the operating system."""
    device = torch.device(device)
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        name = f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    return f"{name}; {platform.system()} {platform.release()}"


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def command_line() -> str:
    """The command as typed from the repository root (`python -m benchmarks.run ...`)."""
    main = Path(sys.argv[0])
    module = ".".join(main.with_suffix("").parts[-2:]) if main.name != "-m" else "?"
    return shlex.join(["python", "-m", module, *sys.argv[1:]])


def result_name(experiment: str, dataset: str | None, seed: int) -> str:
    """`apt/p200-lr1e-2`, `digits`, 0 -> `apt--p200-lr1e-2--digits--seed0.json`."""
    parts = [*experiment.split("/"), *([dataset] if dataset else []), f"seed{seed}"]
    return "--".join(parts) + ".json"


def make_result(run_info: dict, train_info: dict, status: str = "success", error: str | None = None) -> dict:
    """A result in the suite's schema, its meta info measured now: `run_info` holds the run's `task`, `experiment`,
    `dataset`, `seed`, `train_params` and `peft_config`; `train_info` the `TRAIN_INFO` (None where not measured)."""
    created_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    run_info = {**run_info, "created_at": created_at, "status": status, "error": error}
    return {
        "run_info": {key: run_info[key] for key in RUN_INFO},
        "train_info": {key: train_info.get(key) for key in TRAIN_INFO},
        "meta_info": {
            "command": command_line(),
            "machine": machine(run_info["train_params"].get("device", "cpu")),
            "package_versions": package_versions(),
        },
    }


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")


def read_results(task_dir: Path) -> list[dict]:
    """Every result of a task, in file-name order."""
    return [json.loads(path.read_text()) for path in sorted((task_dir / "results").glob("*.json"))]
