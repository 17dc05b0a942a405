"""The benchmark scripts still run end to end, on tiny models (the benchmarks themselves are not tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from examples.tiny_models import tiny_llama, word_tokenizer

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


def test_efficiency_tiny_writes_its_section_and_plot(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\n<!-- BEGIN quality -->\nkept\n<!-- END quality -->\n")
    run_benchmark("benchmarks.efficiency", "--tiny", "--output-dir", str(tmp_path))
    text = results.read_text()
    assert "<!-- BEGIN quality -->\nkept\n<!-- END quality -->" in text
    assert text.count("<!-- BEGIN efficiency -->") == 1
    for expected in ("### ViLT", "### BridgeTower", "APT p=8", "deep prompt p=8", "LoRA", "head-only", "Command:"):
        assert expected in text
    assert (tmp_path / "results" / "efficiency.png").stat().st_size > 0


def test_efficiency_layers_tiny_measures_every_method_and_batch_size(tmp_path):
    """The GPU benchmark's code path on CPU: every phase runs and writes sane records, and --report-only rewrites
    the same section from the JSON."""
    from benchmarks.efficiency_layers import gpu_targets

    arguments = [
        "--device",
        "cpu",
        "--tiny",
        "--threads",
        "1",
        "--compile-backend",
        "eager",
        "--output-dir",
        str(tmp_path),
    ]  # dynamo alone: the quickest compile
    stdout = run_benchmark("benchmarks.efficiency_layers", *arguments)
    record = json.loads((tmp_path / "efficiency_layers.json").read_text())
    methods = ["frozen", "LoRA", "deep prompt p=8", "APT p=8", "deep prompt p=2", "APT p=2"]
    assert record["batch_sizes"] == [4, 2, 8] and sorted(record["batches"]) == ["2", "4", "8"]
    assert record["skipped"] == []
    for batch in record["batches"].values():
        rows = batch["rows"]
        assert list(rows) == methods and batch["out_of_memory"] == []
        for name, row in rows.items():
            assert row["infer"]["cpu"][0] > 0 and row["infer"]["cpu"][1] > 0
            assert (name == "frozen") == ("step" not in row)
            assert name == "frozen" or row["step_flops"] > row["flops"]  # a backward on top of the forward
        assert rows["frozen"]["flops"] < rows["APT p=2"]["flops"] < rows["APT p=8"]["flops"]
        for p in (8, 2):
            assert rows[f"deep prompt p={p}"]["flops"] > rows[f"APT p={p}"]["flops"]
            assert 1 <= batch["summary"][f"apt_vs_analytic_{p}"] < 1.2  # plus the keys, p*r*d, not tiny here
            for key in (f"infer_apt_base_{p}", f"step_apt_lora_{p}", f"step_deep_apt_{p}"):
                assert all(ratio > 0 for ratio in batch["summary"][key]["cpu"])
    assert record["batches"]["4"]["repetitions"] == 1 and record["batches"]["2"]["repetitions"] == 2
    verdicts = sorted(
        line.split(": ")[0].split(" ", 1)[1] for line in stdout.splitlines() if line.startswith(("PASS ", "FAIL "))
    )
    assert verdicts == sorted(description for description, *_ in gpu_targets(8, 2) if "memory" not in description)

    assert [profile["method"] for profile in record["profiles"]] == ["APT p=8", "LoRA"]
    for profile in record["profiles"]:
        assert len(profile["top"]) == 15 and profile["total_ms"] > 0
        assert sum(item["share"] for item in profile["top"]) <= 1 + 1e-9
    compiled = record["compiled"]
    assert list(compiled["rows"]) == [
        "frozen",
        "frozen compiled",
        "LoRA",
        "LoRA compiled",
        "APT p=8",
        "APT p=8 compiled",
    ]
    assert compiled["compile_seconds"]["APT p=8 compiled"]["step"] > 0
    assert compiled["rows"]["APT p=8 compiled"]["step"]["vs_eager"] > 0
    assert compiled["rows"]["LoRA compiled"]["infer"]["vs_reference"] > 0

    text = (tmp_path / "RESULTS.md").read_text()
    for expected in ("Targets at batch 4", "### Batch 8", "torch.compile", "Command:", "aten::"):
        assert expected in text
    again = tmp_path / "again"
    again.mkdir()
    run_benchmark(
        "benchmarks.efficiency_layers",
        "--report-only",
        str(tmp_path / "efficiency_layers.json"),
        "--output-dir",
        str(again),
    )
    assert (again / "RESULTS.md").read_text() == text


def test_efficiency_layers_deadline_skips_what_would_end_past_it(tmp_path):
    from benchmarks.efficiency_layers import measure, parse_args

    args = parse_args(["--device", "cpu", "--tiny", "--deadline", "0", "--output-dir", str(tmp_path)])
    record = measure(args)
    assert list(record["batches"]) == ["4"] and record["skipped"] == ["batch 2", "batch 8"]
    assert record["compiled"]["rows"] == {} and record["compiled"]["skipped"] == ["frozen", "LoRA", "APT p=8"]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "### Batch 4" in text and "### Batch 2" not in text and "Skipped (would end past the deadline)" in text


def test_accuracy_plot(tmp_path):
    from benchmarks.plots import plot_accuracy_vs_flops

    path = tmp_path / "figure1.png"
    plot_accuracy_vs_flops(
        {"APT p=200": 0.9, "deep prompt p=200": 5.1, "LoRA": 0.0},
        {"APT p=200": 70.9, "deep prompt p=200": 69.3, "LoRA": 68.4, "head-only": 60.0},
        path,
        title="ViLT, VQAv2",
    )
    assert path.stat().st_size > 0


def test_calibration_tiny_writes_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    run_benchmark("benchmarks.calibration", "--tiny", "--results-md", str(results))
    text = results.read_text()
    assert text.count("<!-- BEGIN calibration -->") == 1
    for expected in ("tiny Llama", "tiny DINOv2, digits", "default, calibrated for a LayerNorm-sized X", "Command:"):
        assert expected in text


def test_design_sweep_tiny_records_each_variant_once(tmp_path):
    output = tmp_path / "design.jsonl"
    variants = ["3e-3,16,1,0", "1e-2,4,2,1", "3e-3,16,1,0,apt_s"]
    arguments = ["--tiny", "--steps", "2", "--variants", *variants, "--lrs", "1e-2", "--output"]
    run_benchmark("benchmarks.design_sweep", *arguments, str(output))
    run_benchmark("benchmarks.design_sweep", *arguments, str(output))  # resumes: nothing left to run
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["variant"] for r in records] == variants
    # the variant reaches the adapter; training s alone is another run, with one trained number per adapted layer
    assert len({r["perplexity"] for r in records}) == 3
    assert records[2]["trainable_parameters"] == tiny_llama(word_tokenizer(["a b"])).config.num_hidden_layers
    assert all(r["steps"] == 2 and r["perplexity"] > 0 and "Command:" in r["environment"] for r in records)


@pytest.mark.parametrize("centred", [False, True])
def test_design_sweep_prompts_from_inputs_start_at_the_target_ratio(centred):
    import torch.nn.functional as F

    from benchmarks import causal_lm_quality, design_sweep
    from benchmarks.prompt_terms import prompt_terms
    from examples.offline.text import token_blocks
    from examples.tiny_models import tiny_corpus
    from peft_apt import APTConfig, APTLayer
    from peft_apt.layer import INITIAL_TERM_RATIO

    tokenizer = word_tokenizer([tiny_corpus()])
    blocks = token_blocks(tokenizer, [tiny_corpus()], block_size=16, max_blocks=2)
    with design_sweep.prompts_from_inputs(blocks, centred=centred):
        model = causal_lm_quality.get_peft_model(
            tiny_llama(tokenizer), APTConfig(num_prompts=16, task_type="CAUSAL_LM")
        )
    with model.disable_adapter():
        records = prompt_terms(model, lambda m: m(input_ids=blocks))
    layers = [module for module in model.modules() if isinstance(module, APTLayer)]
    assert len(records) == len(layers) == 2
    for layer, record in zip(layers, records):
        # the term is of degree 3 in the prompts, so one rescale of the multiplier lands it on the target exactly
        ratio = (record["term"].norm(dim=-1) / record["X"].norm(dim=-1)).mean().item()
        assert ratio == pytest.approx(INITIAL_TERM_RATIO, rel=1e-4)
        tokens = record["X"].flatten(0, -2)
        tokens = tokens - tokens.mean(dim=0) if centred else tokens
        cosines = F.normalize(layer.apt_prompt["default"], dim=-1) @ F.normalize(tokens, dim=-1).T
        assert cosines.max(dim=1).values.min().item() == pytest.approx(1.0, abs=1e-5)  # each prompt is a token's X
