"""Every supported family: default targets, exact parameter counts, the formula against an independent reference,
the base output when disabled, and exact save/load round trips with the specified file format."""

import copy
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from families import FAMILIES, MHA_FAMILY, SMALL, TOKENS
from peft import PeftModel, get_peft_model
from reference import adapter_tensors, initial_term_ratios, randomise_adapter, reference_hooks, run
from safetensors import safe_open
from transformers.pytorch_utils import Conv1D

from peft_apt import APTConfig, APTLayer
from peft_apt.layer import INITIAL_TERM_RATIO

pytestmark = pytest.mark.usefixtures("one_thread")
P, R = 5, 3
ALL = [*FAMILIES.values(), MHA_FAMILY]


def make(family, **config):
    base = family.build()
    # frozen like the adapted model's base: a frozen nn.MultiheadAttention (SigLIP's pooling head) takes a faster path
    reference = copy.deepcopy(base).requires_grad_(False)
    if family is MHA_FAMILY:
        config.setdefault("target_modules", r".*resblocks\.\d+\.attn")
    model = get_peft_model(base, APTConfig(num_prompts=P, r=R, **config))
    randomise_adapter(model)
    return model.eval(), reference


def adapted_paths(model):
    return [n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, APTLayer)]


@pytest.mark.parametrize("family", ALL, ids=lambda f: f.name)
def test_default_targets_adapt_each_block_once(family):
    model, _ = make(family)
    assert sorted(adapted_paths(model)) == sorted(family.attention_paths)
    assert sorted(model.base_model.targeted_module_names) == sorted(family.attention_paths)


@pytest.mark.parametrize("family", ALL, ids=lambda f: f.name)
def test_trainable_parameters_are_exactly_P_W1_W2_s(family):
    model, _ = make(family)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    expected = sum(P * d + 2 * R * d + 1 for d in family.hidden_sizes)
    assert sum(trainable.values()) == expected
    assert all(n.rsplit(".", 2)[-2] in ("apt_prompt", "apt_W1", "apt_W2", "apt_s") for n in trainable)
    assert len(trainable) == 4 * len(family.attention_paths)


# Adapted modules whose X comes from no norm layer, which the default calibrates for a LayerNorm-sized X: OLMo 2
# normalises after its attention (X is the residual stream); ELECTRA projects its embeddings' norm to d.
UNNORMALISED_INPUTS = {
    "olmo2": ("model.layers.0.self_attn", "model.layers.1.self_attn"),
    "electra": ("encoder.layer.0.attention",),
}


@torch.no_grad()
def give_norms_random_gains(model, seed=0):
    """Every norm layer's affine weights made non-unit and different across layers: a per-layer gain 3x to 10x away
    from 1, per-channel noise and a bias, so that a calibration assuming a LayerNorm-sized X misses by 3x or more
    (Gemma's norms scale by 1 + w, which this leaves near 1)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if "norm" not in type(module).__name__.lower():
            continue
        sign = 1 if torch.rand(1, generator=g).item() < 0.5 else -1
        gain = math.exp(sign * torch.empty(1).uniform_(1.1, 2.3, generator=g).item())
        for param in module.parameters(recurse=False):
            if param.dim() == 1:
                param.add_(0.2 * torch.randn(param.shape, generator=g)).mul_(gain)


@pytest.mark.parametrize("family", ALL, ids=lambda f: f.name)
def test_default_init_term_is_its_target_fraction_of_the_input(family):
    """The default calibrates on the norm feeding each attention: measured on the model's own inputs, the initial
    ||a (A @ P)|| / ||X|| is within 2x of INITIAL_TERM_RATIO at every adapted module."""
    base = family.build()
    give_norms_random_gains(base)
    config = {"target_modules": r".*resblocks\.\d+\.attn"} if family is MHA_FAMILY else {}
    model = get_peft_model(base, APTConfig(num_prompts=200, r=R, **config)).eval()
    ratios = initial_term_ratios(model, family, lambda: run(model, family.inputs()))
    exempt = UNNORMALISED_INPUTS.get(family.name, ())
    assert sorted(ratios) == sorted(family.attention_paths) and set(exempt) <= set(ratios)
    misses = {path: ratio / INITIAL_TERM_RATIO for path, ratio in ratios.items() if path not in exempt}
    assert all(0.5 < miss < 2 for miss in misses.values()), misses


def outputs_matching_reference(model, reference, family, inputs) -> tuple[list, list]:
    """(adapted outputs, base outputs), after checking the adapted ones against the reference formula hooked into an
    unadapted copy with the same adapter tensors."""
    with torch.no_grad():
        adapted = run(model, inputs)
        base = run(reference, inputs)
        with reference_hooks(reference, family, adapter_tensors(model, family.attention_paths)):
            expected = run(reference, inputs)
    assert len(adapted) == len(expected) > 0
    for got, want in zip(adapted, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    return adapted, base


@pytest.mark.parametrize("family", ALL, ids=lambda f: f.name)
def test_output_matches_independent_reference(family):
    model, reference = make(family)
    adapted, base = outputs_matching_reference(model, reference, family, family.inputs())
    # the test can fail: the adapter really moves the output
    assert max((a - b).abs().max().item() for a, b in zip(adapted, base)) > 1e-2


@pytest.mark.parametrize("family", ALL, ids=lambda f: f.name)
def test_disabled_adapter_gives_the_base_output_exactly(family):
    model, reference = make(family)
    inputs = family.inputs()
    with torch.no_grad():  # both without autograd: T5 rounds differently with it
        with model.disable_adapter():
            disabled = run(model, inputs)
        base = run(reference, inputs)
    for got, want in zip(disabled, base):
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", ALL, ids=lambda f: f.name)
def test_save_load_round_trip_is_exact(family, tmp_path):
    model, reference = make(family)
    inputs = family.inputs()
    with torch.no_grad():
        before = run(model, inputs)
    model.save_pretrained(tmp_path)

    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "APT" and config["num_prompts"] == P and config["r"] == R
    path = tmp_path / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    expected_keys = {
        f"base_model.model.{m}.{name}"
        for m in family.attention_paths
        for name in ("apt_prompt", "apt_W1", "apt_W2", "apt_s")
    }
    assert keys == expected_keys
    for m, d in zip(family.attention_paths, family.hidden_sizes):
        shapes = [
            tuple(tensors[f"base_model.model.{m}.{n}"].shape) for n in ("apt_prompt", "apt_W1", "apt_W2", "apt_s")
        ]
        assert shapes == [(P, d), (d, R), (R, d), (1,)]
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size - header == 4 * sum(P * d + 2 * R * d + 1 for d in family.hidden_sizes)

    loaded = PeftModel.from_pretrained(reference, tmp_path).eval()
    state = loaded.state_dict()  # holds the effective P, as the file does, whatever the trainable parametrisation
    for name, tensor in tensors.items():
        assert torch.equal(state[f"{name}.default"], tensor)
    with torch.no_grad():
        after = run(loaded, inputs)
    for got, want in zip(after, before):
        assert torch.equal(got, want)


class NarrowConv1DAttention(torch.nn.Module):
    """GPT-2's layout with an inner width (16) unlike the hidden size (32): `c_proj` is a `Conv1D` whose weight is
    stored (16, 32), transposed, so only its declared `nf` gives d."""

    def __init__(self):
        super().__init__()
        self.c_attn = Conv1D(16, 32)
        self.c_proj = Conv1D(32, 16)

    def forward(self, hidden_states):
        return self.c_proj(torch.tanh(self.c_attn(hidden_states)))


class NarrowBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = NarrowConv1DAttention()

    def forward(self, hidden_states):
        return self.attn(hidden_states)


def test_conv1d_output_projection_takes_d_from_its_declared_size():
    torch.manual_seed(0)
    base = NarrowBlock()
    reference = copy.deepcopy(base).requires_grad_(False)
    model = get_peft_model(base, APTConfig(num_prompts=P, r=R, target_modules=["attn"])).eval()
    randomise_adapter(model)
    assert model.base_model.model.attn.hidden_size == 32
    X = torch.randn(2, 7, 32)
    layout = SimpleNamespace(query_argument="hidden_states", projection_of=lambda path: "c_proj")
    with torch.no_grad(), reference_hooks(reference, layout, adapter_tensors(model, ["attn"])):
        torch.testing.assert_close(model(X), reference(X), rtol=1e-4, atol=1e-5)


def test_llama4_adapts_its_language_model_and_the_vision_tower_when_named():
    """Placement only: `Llama4ForConditionalGeneration.forward` itself fails in transformers 5.24 (it reads
    `image_outputs` from its language model's output), so the formula is checked on `llama4_text`."""
    text = dict(hidden_size=32, num_key_value_heads=1, head_dim=16, vocab_size=99, num_local_experts=2)
    vision = dict(hidden_size=48, image_size=32, patch_size=8, intermediate_size=192, vision_output_dim=32)
    config = T.Llama4Config(
        text_config={**text, **SMALL, **TOKENS, "intermediate_size": 32, "intermediate_size_mlp": 37},
        vision_config={**vision, "num_hidden_layers": 2, "num_attention_heads": 2},
        pad_token_id=0,
    )
    language_model = [f"language_model.model.layers.{i}.self_attn" for i in range(2)]
    default = get_peft_model(T.Llama4ForConditionalGeneration(config), APTConfig(num_prompts=P, r=R))
    assert sorted(adapted_paths(default)) == language_model
    # both towers by name, as the default was before vision-language models followed the language-model rule
    model = get_peft_model(
        T.Llama4ForConditionalGeneration(config), APTConfig(num_prompts=P, r=R, target_modules=["self_attn"])
    )
    towers = [*(f"vision_model.model.layers.{i}.self_attn" for i in range(2)), *language_model]
    assert sorted(adapted_paths(model)) == sorted(towers)
    for path in towers:  # each calibrated on its block's own pre-attention norm
        block = model.base_model.model.get_submodule(path.rpartition(".")[0])
        assert model.base_model.input_norm(path) is block.input_layernorm
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if name.endswith("apt_prompt.default")}
    assert shapes == {
        f"base_model.model.{path}.apt_prompt.default": (P, d) for path, d in zip(towers, [48, 48, 32, 32])
    }
