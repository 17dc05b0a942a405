"""The benchmark scripts still run end to end, on tiny models (the benchmarks themselves are not tests)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_efficiency_tiny_writes_its_section_and_plot(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\n<!-- BEGIN quality -->\nkept\n<!-- END quality -->\n")
    try:
        subprocess.run(
            [sys.executable, "-m", "benchmarks.efficiency", "--tiny", "--output-dir", str(tmp_path)],
            cwd=ROOT, check=True, capture_output=True, text=True, timeout=120,
        )
    except subprocess.CalledProcessError as error:
        pytest.fail(f"efficiency.py --tiny failed:\n{error.stderr[-3000:]}")
    text = results.read_text()
    assert "<!-- BEGIN quality -->\nkept\n<!-- END quality -->" in text
    assert text.count("<!-- BEGIN efficiency -->") == 1
    for expected in ("### ViLT", "### BridgeTower", "APT p=8", "deep prompt p=8", "LoRA", "head-only", "Command:"):
        assert expected in text
    assert (tmp_path / "efficiency.png").stat().st_size > 0


def test_accuracy_plot(tmp_path):
    from benchmarks.plots import plot_accuracy_vs_flops

    path = tmp_path / "figure1.png"
    plot_accuracy_vs_flops({"APT p=200": 0.9, "deep prompt p=200": 5.1, "LoRA": 0.0}, {"APT p=200": 70.9,
                           "deep prompt p=200": 69.3, "LoRA": 68.4, "head-only": 60.0}, path, title="ViLT, VQAv2")
    assert path.stat().st_size > 0
