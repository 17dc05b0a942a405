"""The benchmark trainers' options: the authors' optimiser, Adam's betas and APT's init constants."""

import pytest
import torch
from peft import get_peft_model

from benchmarks.baselines import optimiser_for
from benchmarks.causal_lm import apt_constants
from examples.tiny_models import tiny_llama, word_tokenizer
from peft_apt import APTConfig, APTLayer


def tiny_apt():
    return get_peft_model(tiny_llama(word_tokenizer(["a b c"])), APTConfig(task_type="CAUSAL_LM"))


def test_reference_optimiser_is_the_authors():
    model = tiny_apt()
    model.base_model.model.model.norm.weight.requires_grad_(True)  # a trainable norm, kept out of weight decay
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer, schedule = optimiser_for(parameters, {"lr": 1e-3, "optimiser": "reference"}, steps=10, warmup_steps=1)
    decayed, kept = optimizer.param_groups
    assert (decayed["weight_decay"], kept["weight_decay"]) == (0.01, 0.0) and decayed["betas"] == (0.9, 0.98)
    assert len(kept["params"]) == 1 and kept["params"][0] is model.base_model.model.model.norm.weight
    assert len(decayed["params"]) == 4 * len(model.base_model.model.model.layers)  # P, W1, W2, s per layer
    rates = []
    for _ in range(10):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates[0] == 0.0 and rates[1] == 1e-3 and schedule.get_last_lr()[0] == 0.0  # 1 warm-up step, linear to 0
    assert rates[1] - rates[2] == pytest.approx(rates[2] - rates[3])
    (own,) = optimiser_for(parameters, {"lr": 1e-3, "adam_betas": [0.9, 0.98]}, 10, 1)[0].param_groups
    assert own["betas"] == (0.9, 0.98) and own["weight_decay"] == 0.0


def test_head_lr_ratio_scales_only_the_head():
    adapter, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    parameters = {"encoder.apt_prompt": adapter, "head.weight": head}
    optimizer, schedule = optimiser_for(parameters, {"lr": 1e-3, "head_lr_ratio": 10}, steps=10, warmup_steps=0)
    assert [(group["params"], group["lr"]) for group in optimizer.param_groups] == [([adapter], 1e-3), ([head], 1e-2)]
    assert [group["lr"] for group in optimiser_for(parameters, {"lr": 1e-3}, 10, 0)[0].param_groups] == [1e-3, 1e-3]


def test_apt_constants_scale_the_initial_prompts_and_keys():
    def first_layer(**constants):
        with apt_constants(**constants):
            model = tiny_apt()
        return next(module for module in model.modules() if isinstance(module, APTLayer))

    default = first_layer(initial_term_ratio=3e-3, trained_prompt_std_ratio=16, key_map_factor=1)
    # the term is cubic in the prompts: 8 times the ratio is twice the prompts; W2's multiplier follows its factor
    larger = first_layer(initial_term_ratio=2.4e-2, trained_prompt_std_ratio=16, key_map_factor=4)
    assert larger.multipliers["default"]["prompt"] == pytest.approx(2 * default.multipliers["default"]["prompt"])
    assert larger.multipliers["default"]["W2"] == pytest.approx(4 * default.multipliers["default"]["W2"])
