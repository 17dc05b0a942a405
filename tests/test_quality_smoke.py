"""Smoke test of benchmarks/quality.py on a random tiny DINOv2: every method trains, the report and plot appear."""

import json

from benchmarks.quality import METHODS, main


def test_quality_sweep_runs_end_to_end(tmp_path):
    results = tmp_path / "RESULTS.md"
    main(
        [
            "--tiny",
            "--datasets",
            "digits",
            "--seeds",
            "0",
            "--lrs",
            "1e-3",
            "--methods",
            *METHODS,
            "--output-dir",
            str(tmp_path),
            "--results-md",
            str(results),
        ]
    )
    records = [json.loads(line) for line in (tmp_path / "quality-digits.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == sorted(METHODS)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records)
    text = results.read_text()
    assert "<!-- BEGIN quality -->" in text and "### Every learning rate: digits" in text
    assert "| default init, p=200 (APTConfig()) |" in text
    assert (tmp_path / "quality-digits.png").stat().st_size > 0
