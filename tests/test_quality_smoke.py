"""Smoke test of benchmarks/quality.py on a random tiny DINOv2: every method trains, the report and plot appear."""

import json

import pytest
import torch

from benchmarks.quality import METHODS, class_separation, main
from peft_apt.layer import PARAMETRISATION_VERSION


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
            "--weight-decay",
            "0.01",
        ]
    )
    records = [json.loads(line) for line in (tmp_path / "quality-digits.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == sorted(METHODS)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records)
    assert all(r["setup"]["weight_decay"] == 0.01 and -1 <= r["cosine_to_frozen"] <= 1 for r in records)
    assert all(r["separation"] > 0 and r["frozen_separation"] > 0 for r in records)
    head_only = next(r for r in records if r["method"] == "head-only")
    assert (
        head_only["cosine_to_frozen"] == pytest.approx(1.0)
        and head_only["separation"] == head_only["frozen_separation"]
    )
    apt = [r for r in records if r["method"].startswith("APT")]
    assert apt and all(r["apt_parametrisation"] == PARAMETRISATION_VERSION for r in apt)
    assert all(0 <= r["term_alignment_before"] <= 1 and 0 <= r["term_alignment_after"] <= 1 for r in apt)
    text = results.read_text()
    assert "<!-- BEGIN quality -->" in text and "### Every learning rate: digits" in text
    assert "### What the runs did to the features: digits" in text
    assert "| default init, p=200 (APTConfig()) |" in text
    assert "except the rows 'reference optimiser': the authors' AdamW" in text
    assert (tmp_path / "quality-digits.png").stat().st_size > 0


def test_class_separation_is_between_over_within_class_variance():
    features = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 4.0], [12.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # class means (1, 0) and (11, 4): variance across classes 50 + 8; within each class 2 + 0
    assert class_separation(features, labels) == pytest.approx(58 / 2)
