"""The cost task runs through the suite's runner on tiny shapes: result schema, and FLOP counts against formulas."""

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import cost, report, run

TASK = Path(__file__).parents[1] / "benchmarks" / "tasks" / "cost"
LLAVA = ["apt/llava-1.5-7b-p200", "lora/llava-1.5-7b-r8-qv", "prefix-tuning/llava-1.5-7b-p200"]
EXPERIMENTS = [
    *LLAVA,
    "apt/vilt-b32-layer-prompts",
    "lora/vilt-b32-layers-gpu-r4-qv",
    "head-only/vilt-b32",
    "apt/bridgetower-base-p50",
    "full/dinov2-small",
    "prompt-tuning/smollm2-135m-p20",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    """The experiments above, run tiny through `python -m benchmarks.run` in a copy of the task."""
    copy = tmp_path_factory.mktemp("tasks") / "cost"
    copy.mkdir()
    shutil.copy(TASK / "default_training_params.json", copy)
    for experiment in EXPERIMENTS:
        shutil.copytree(TASK / "experiments" / experiment, copy / "experiments" / experiment)
    run.main([str(copy / "experiments" / experiment) for experiment in EXPERIMENTS] + ["--tiny"])
    files = [json.loads(path.read_text()) for path in (copy / "temporary_results").glob("*.json")]
    return {result["run_info"]["experiment"]: result for result in files}


def test_every_experiment_writes_the_suite_schema(results):
    assert sorted(results) == sorted(EXPERIMENTS)
    for experiment, result in results.items():
        assert result["run_info"]["status"] == "success" and result["run_info"]["task"] == "cost"
        assert {"command", "machine", "package_versions"} <= set(result["meta_info"])
        info = result["train_info"]
        metrics = info["metrics"]
        points = metrics["points"] if "points" in metrics else [metrics]
        assert info["added_forward_flops"] == points[0]["added_forward_flops"]
        assert info["trainable_params"] == points[0]["trainable_params"]
        method = experiment.split("/")[0]
        for point in points:
            assert point["frozen_forward_flops"] > 0 and point["train_step_flops"] > point["frozen_forward_flops"]
            assert (point["added_forward_flops"] > 0) == (method not in ("head-only", "full"))
            if result["run_info"]["train_params"]["device"] == "meta":
                assert "step_time_ratio" not in point  # FLOPs only
            else:
                assert set(point["step_time_ratio"]) == {method} and set(point["inference_time_ratio"]) == {method}
                assert point["step_time_ratio"][method] > 0 and point["clock"] == "cpu"
    sweep = results["apt/vilt-b32-layer-prompts"]["train_info"]["metrics"]
    assert sweep["sweep"] == "num_prompts" and [p["num_prompts"] for p in sweep["points"]] == [
        10,
        25,
        50,
        100,
        200,
        400,
    ]
    assert [p["apt_formula_flops"] for p in sweep["points"]] == [p["added_forward_flops"] for p in sweep["points"]]
    assert [
        point["batch_size"] for point in results["lora/vilt-b32-layers-gpu-r4-qv"]["train_info"]["metrics"]["points"]
    ] == [64, 8, 256]
    assert results["full/dinov2-small"]["train_info"]["trainable_params"] > 0


def test_llava_added_flops_match_each_methods_formula(results):
    """On the tiny LLaVA (meta device: the language model d=64, 2 layers, 4 image + T text tokens), the FLOPs each
    method adds per forward, from its definition: APT 4*n*p*d (X @ K^T, A @ P) + 4*p*r*d (K = P + P @ W1 @ W2) per
    attention; LoRA 4*n*d*r per adapted projection (q and v: d to d); prefix tuning 4*n*p*d per layer (scores and
    weighted sum over p more keys)."""
    vision, text = cost.LLAVA["tiny"]
    d, layers = text["hidden_size"], text["num_hidden_layers"]
    image_tokens = (vision["image_size"] // 14) ** 2
    formulas = {
        "apt/llava-1.5-7b-p200": lambda n: layers * (4 * n * 200 * d + 4 * 200 * 4 * d),
        "lora/llava-1.5-7b-r8-qv": lambda n: layers * 2 * 4 * n * d * 8,
        "prefix-tuning/llava-1.5-7b-p200": lambda n: layers * 4 * n * 200 * d,
    }
    for experiment, formula in formulas.items():
        metrics = results[experiment]["train_info"]["metrics"]
        assert metrics["sweep"] == "text_tokens" and len(metrics["points"]) == 3
        for point in metrics["points"]:
            assert point["added_forward_flops"] == formula(image_tokens + point["text_tokens"]), experiment
    apt = results["apt/llava-1.5-7b-p200"]["train_info"]
    assert apt["trainable_params"] == layers * (200 * d + d * 4 + 4 * d + 1)  # P, W1, W2, s per attention


def test_pages_render_from_the_results(results, tmp_path):
    listed = list(results.values())
    summary = report.cost_summary(listed)
    assert len(summary.splitlines()) <= 25 and "| 4 + 64 |" in summary
    page = report.cost_page(tmp_path, listed)
    assert (tmp_path / report.COST_PLOT).stat().st_size > 0 and f"]({report.COST_PLOT})" in page
    for experiment in EXPERIMENTS:
        assert experiment in page


def test_a_baseline_it_does_not_know_is_named():
    setup = cost.MODELS["smollm2-135m"](dict(tiny=True, batch_size=1, tokens=4))
    with pytest.raises(ValueError, match="`baseline`.*'lora'"):
        cost.attach(setup, {"baseline": "lora"}, None)


def test_methods_on_copies_do_not_unfreeze_or_freeze_each_other():
    """Variants share the frozen weights; full fine-tuning owns its copy, so a variant made after it (the head-only
    reference) cannot freeze it again, nor can it unfreeze the frozen model."""
    setup = cost.MODELS["dinov2-small"](dict(tiny=True, batch_size=1, size=28))
    setup.model.requires_grad_(False)  # as the runs freeze it
    full = cost.attach(setup, {"baseline": "full"}, None)
    head_only = cost.attach(setup, {"baseline": "head-only"}, None)
    assert all(p.requires_grad for p in full.parameters())
    assert [n for n, p in head_only.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]
    assert not any(p.requires_grad for p in setup.model.parameters())
    shared = {id(p) for p in setup.model.parameters()}
    assert shared.isdisjoint(id(p) for p in full.parameters())
    assert {id(p) for n, p in head_only.named_parameters() if not n.startswith("classifier")} <= shared
