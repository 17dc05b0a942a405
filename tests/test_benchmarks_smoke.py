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
    from benchmarks.plots import plot_best_vs_flops

    path = tmp_path / "figure1.png"
    points = {"apt/p200": (0.9, 70.9), "deep-prompt/p200": (5.1, 69.3), "lora/r4": (0.0, 68.4)}
    plot_best_vs_flops({"digits": points, "textile": points}, path, "accuracy (%)")
    assert path.stat().st_size > 0


def test_calibration_tiny_writes_its_block_and_keeps_the_page(tmp_path):
    page = tmp_path / "DESIGN_STUDIES.md"
    page.write_text("# Design studies\n\nkept\n")
    run_benchmark("benchmarks.calibration", "--tiny", "--output", str(page))
    run_benchmark("benchmarks.calibration", "--tiny", "--output", str(page))  # rewrites the block, keeps the rest
    text = page.read_text()
    assert text.startswith("# Design studies\n\nkept\n") and text.count("<!-- BEGIN calibration -->") == 1
    for expected in ("tiny Llama", "tiny DINOv2, digits", "default, calibrated for a LayerNorm-sized X", "Command:"):
        assert expected in text
