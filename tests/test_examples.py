"""Smoke tests: each example's --tiny mode runs end to end in a subprocess, offline, for a few steps."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--tiny", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_causal_lm_tiny_learns_generates_and_reloads(tmp_path):
    out = run_example(
        "causal_lm.py",
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "30",
        "--learning_rate",
        "1e-2",
        "--disable_tqdm",
        "true",
    )
    first, last = map(float, re.search(r"first logged ([\d.]+), last logged ([\d.]+)", out).groups())
    assert last < first - 0.1
    perplexity = {name: float(value) for name, value in re.findall(r"held-out perplexity (\w+): ([\d.]+)", out)}
    assert perplexity["after"] < 0.8 * perplexity["before"]
    assert perplexity["reloaded"] == perplexity["after"]
    before, after = re.search(r"before: '(.*)'\nafter:  '(.*)'", out).groups()
    assert before and after and before != after
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_quickstart_tiny_trains_head_only_and_apt_saves_and_reloads(tmp_path):
    out = run_example("quickstart.py", "--output_dir", str(tmp_path), "--disable_tqdm", "true")
    assert out.splitlines()[0].startswith("Model: a tiny random DINOv2")  # what it adapts comes first
    accuracy = {name.strip(): float(value) for name, value in re.findall(r"^  (\w[\w -]+?) +([01]\.\d{3})$", out, re.M)}
    assert set(accuracy) == {"majority class", "head-only", "APT before training", "APT after training", "APT reloaded"}
    assert accuracy["majority class"] == pytest.approx(0.5, abs=0.02)  # textile: half nominal
    assert accuracy["APT reloaded"] == accuracy["APT after training"]
    assert out.count("'train_runtime'") == 2  # head-only, then APT, each through Trainer
    assert "trainable params: " in out
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any(".apt_prompt" in key for key in keys) and any(".classifier." in key for key in keys)


@pytest.fixture(scope="module")
def dreambooth_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dreambooth")
    out = run_example(
        "stable_diffusion_dreambooth.py",
        "--with_prior_preservation",
        "--max_train_steps",
        "3",
        "--output_dir",
        str(folder),
    )
    return folder, out


def test_dreambooth_tiny_trains_with_prior_preservation_and_saves(dreambooth_adapter):
    folder, out = dreambooth_adapter
    assert len(re.findall(r"step \d+: loss [\d.]+", out)) == 3
    assert len(list((folder / "class_images").glob("*.png"))) == 2
    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}


def test_dreambooth_tiny_samples_with_the_saved_adapter(dreambooth_adapter, tmp_path):
    folder, _ = dreambooth_adapter
    out = run_example("stable_diffusion_dreambooth.py", "--adapter_dir", str(folder), "--output_dir", str(tmp_path))
    assert "saved 2 samples" in out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["sample_0.png", "sample_1.png"]
