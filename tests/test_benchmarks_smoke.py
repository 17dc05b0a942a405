"""The benchmark scripts beside the runner still run end to end, on tiny models."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(module: str, *arguments: str) -> str:
    try:
        return subprocess.run(
            [sys.executable, "-m", module, *arguments],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
            timeout=300,  # a hang guard (120 s was hit under load)
        ).stdout
    except subprocess.CalledProcessError as error:
        pytest.fail(f"{module} {' '.join(arguments)} failed:\n{error.stderr[-3000:]}")


def test_accuracy_plot(tmp_path):
    from types import SimpleNamespace

    from benchmarks import report

    def result(experiment: str, flops: float, accuracy: float) -> dict:
        run_info = {"experiment": experiment, "dataset": "digits"}
        return {"run_info": run_info, "train_info": {"metrics": {"accuracy": accuracy}, "added_forward_flops": flops}}

    results = [result("apt/p200-lr1e-2", 0.9e9, 0.709), result("deep-prompt/p200-lr1e-2", 5.1e9, 0.693)]
    trainer = SimpleNamespace(METRIC="accuracy", HIGHER_IS_BETTER=True, METRIC_SCALE=100)
    task = report.Task(tmp_path, {"datasets": ["digits"]}, trainer, results)
    assert report.plot(task, results) == "best-vs-flops.png"
    assert (tmp_path / "best-vs-flops.png").stat().st_size > 0


def test_calibration_tiny_writes_its_block_and_keeps_the_page(tmp_path):
    page = tmp_path / "DESIGN_STUDIES.md"
    page.write_text("# Design studies\n\nkept\n")
    run_benchmark("benchmarks.calibration", "--tiny", "--output", str(page))
    run_benchmark("benchmarks.calibration", "--tiny", "--output", str(page))  # rewrites the block, keeps the rest
    text = page.read_text()
    assert text.startswith("# Design studies\n\nkept\n") and text.count("<!-- BEGIN calibration -->") == 1
    for expected in ("tiny Llama", "tiny DINOv2, digits", "default, calibrated for a LayerNorm-sized X", "Command:"):
        assert expected in text
