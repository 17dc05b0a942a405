"""The fine-tuning examples end to end on tiny models: they learn, checkpoints hold only the adapter and resume
exactly, and two processes under `accelerate launch` train like one process on their combined batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import clip_image_classification  # noqa: E402
import vilt_vqa  # noqa: E402

ACCELERATE = Path(sys.executable).with_name("accelerate")
CPU_2PROC = ROOT / "examples" / "accelerate" / "cpu_2proc.yaml"
QUIET = ["--disable_tqdm", "true", "--report_to", "none", "--max_eval_samples", "64"]


pytestmark = pytest.mark.usefixtures("one_thread")


def losses(checkpoint: Path) -> list[float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def assert_adapter_at_top(output_dir: Path):
    assert (output_dir / "adapter_config.json").is_file()
    assert json.loads((output_dir / "adapter_config.json").read_text())["peft_type"] == "APT"
    keys = load_file(output_dir / "adapter_model.safetensors").keys()
    assert keys and all(".apt_" in key or ".classifier." in key for key in keys)
    assert "import peft_apt" in (output_dir / "README.md").read_text()


# the tiny examples' runs that must learn: 250 steps of 32
LEARNING_RUN = ["--tiny", "--max_steps", "250", "--per_device_train_batch_size", "32", "--disable_tqdm", "true"]


def test_tiny_vqa_learns_beyond_what_the_question_alone_gives(tmp_path, capsys):
    metrics = vilt_vqa.main([*LEARNING_RUN, "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "trainable params" in out and "Final VQA accuracy" in out
    evaluation = vilt_vqa.tiny_vqa_records(400, seed=1)
    label2id = {a: i for i, a in enumerate(sorted({a for kind in vilt_vqa.ANSWERS.values() for a in kind}))}
    text_only = vilt_vqa.baselines(vilt_vqa.tiny_vqa_records(2000, seed=0), evaluation, label2id)
    assert metrics["eval_vqa_accuracy"] > text_only["most frequent answer per question"] + 0.1
    assert_adapter_at_top(tmp_path)


def test_tiny_clip_learns_digits(tmp_path, capsys):
    metrics = clip_image_classification.main([*LEARNING_RUN, "--output_dir", str(tmp_path)])
    assert "Final accuracy" in capsys.readouterr().out
    assert metrics["eval_accuracy"] > 0.25  # chance: 0.1
    assert_adapter_at_top(tmp_path)


def test_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    run = ["--tiny", "--max_steps", "6", "--save_steps", "3", "--logging_steps", "1", *QUIET]
    vilt_vqa.main([*run, "--output_dir", str(tmp_path / "straight")])
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    files = {path.name for path in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not any(name.startswith(("model", "pytorch_model")) for name in files)
    keys = load_file(checkpoint / "adapter_model.safetensors").keys()
    assert keys and all(".apt_" in key or ".classifier." in key for key in keys)

    vilt_vqa.main([*run, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", str(checkpoint)])

    straight, resumed = losses(tmp_path / "straight" / "checkpoint-6"), losses(tmp_path / "resumed" / "checkpoint-6")
    assert len(straight) == 6 and resumed == straight
    expected, actual = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("straight", "resumed"))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def launch_two_processes(script: str, output_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [
        str(ACCELERATE),
        "launch",
        "--config_file",
        str(CPU_2PROC),
        str(ROOT / "examples" / script),
        "--tiny",
        "--output_dir",
        str(output_dir),
        *QUIET,
        *args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) ran (MULTI_CPU" in result.stdout
    assert "adapter identical on all processes" in result.stdout
    assert "process group destroyed" in result.stdout  # before exit, not by the interpreter's teardown
    assert "unused parameters" not in result.stderr
    return result


def test_two_processes_train_like_one_on_their_combined_batch(tmp_path):
    """Each process takes half of one process's batch: the logged losses (means over the global batch, not doubled)
    and the saved adapter must match the single process run."""
    run = ["--max_steps", "8", "--logging_steps", "1"]
    launch_two_processes("vilt_vqa.py", tmp_path / "two", *run, "--per_device_train_batch_size", "8")
    one = ["--tiny", "--output_dir", str(tmp_path / "one"), *QUIET, *run, "--per_device_train_batch_size", "16"]
    vilt_vqa.main(one)

    two, one = losses(tmp_path / "two" / "checkpoint-8"), losses(tmp_path / "one" / "checkpoint-8")
    assert len(two) == 8
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-3, atol=0)
    assert_adapter_at_top(tmp_path / "two")
    expected, actual = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("one", "two"))
    assert all(torch.allclose(expected[key], actual[key], atol=1e-5) for key in expected)


def test_clip_example_runs_in_two_processes(tmp_path):
    launch_two_processes("clip_image_classification.py", tmp_path, "--max_steps", "4")
    assert_adapter_at_top(tmp_path)
