"""APT on a diffusers UNet: default targets, the formula against the independent reference (self- and
cross-attention, X always the query stream), placement before dropout, residual and rescale inside the attention
processor, the processor machinery, save/load and diffusers' own adapter API. CI installs `peft-apt[diffusers]`."""

import copy

import pytest

pytest.importorskip("diffusers")

import test_families as shared  # noqa: E402  (a module, so that pytest does not collect its tests twice)
import torch  # noqa: E402
from diffusers.models.attention_processor import (  # noqa: E402
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
)
from families import Family, Layout  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from reference import adapter_tensors, randomise_adapter, reference_hooks, run  # noqa: E402

from examples.tiny_models import tiny_unet  # noqa: E402
from examples.tiny_models import tiny_unet_inputs as unet_inputs  # noqa: E402
from peft_apt import APTConfig, APTLayer  # noqa: E402


def build_unet():
    return tiny_unet(seed=0).eval()


BLOCKS = [
    ("down_blocks.0.attentions.0", 32),
    ("mid_block.attentions.0", 64),
    ("up_blocks.1.attentions.0", 32),
    ("up_blocks.1.attentions.1", 32),
]
UNET = Family(
    "unet2d_condition",
    build_unet,
    unet_inputs,
    [
        Layout(
            [f"{block}.transformer_blocks.0.{attn}" for block, _ in BLOCKS for attn in ("attn1", "attn2")], "to_out.0"
        )
    ],
    [d for _, d in BLOCKS for _ in ("attn1", "attn2")],
)


def test_unet_default_targets_are_attn1_and_attn2_once_each():
    shared.test_default_targets_adapt_each_block_once(UNET)


def test_unet_default_init_term_is_its_target_fraction_of_the_input():
    shared.test_default_init_term_is_its_target_fraction_of_the_input(UNET)


def test_unet_trainable_parameters_are_exactly_P_W1_W2_s():
    shared.test_trainable_parameters_are_exactly_P_W1_W2_s(UNET)


def test_unet_output_matches_independent_reference():
    shared.test_output_matches_independent_reference(UNET)


def test_unet_disabled_adapter_gives_the_base_output_exactly():
    shared.test_disabled_adapter_gives_the_base_output_exactly(UNET)


def test_unet_save_load_round_trip_is_exact(tmp_path):
    shared.test_save_load_round_trip_is_exact(UNET, tmp_path)


def make_unet(base=None, **config):
    base = base if base is not None else build_unet()
    model = get_peft_model(base, APTConfig(num_prompts=5, r=3, **config))
    randomise_adapter(model)
    return model.eval()


def attention_modules(unet):
    return [unet.get_submodule(path) for path in UNET.attention_paths]


def test_term_lands_before_dropout_residual_connection_and_rescale():
    """The processor applies to_out[1] (dropout), the residual and 1/rescale_output_factor after to_out[0]."""
    base = build_unet()
    for attention in attention_modules(base):
        attention.to_out[1].p = 0.5
        attention.residual_connection = True
        attention.rescale_output_factor = 2.0
    reference = copy.deepcopy(base)
    model = make_unet(base).train()
    reference.train()
    inputs = unet_inputs()
    tensors = adapter_tensors(model, UNET.attention_paths)
    with torch.no_grad():
        adapted = run(model, inputs)[0]
        with reference_hooks(reference, UNET, tensors):
            expected = run(reference, inputs)[0]
        # the same term added at the attention's output, after dropout, residual and rescale
        with reference_hooks(reference, UNET, tensors, projection=""):
            misplaced = run(reference, inputs)[0]
    torch.testing.assert_close(adapted, expected, rtol=1e-4, atol=1e-5)
    assert (adapted - misplaced).abs().max() > 1e-2


def test_processor_names_gain_base_layer_and_round_trip():
    """diffusers finds each processor under the wrapped module: keys gain `.base_layer`; the count is unchanged."""
    model = make_unet()
    processors = model.attn_processors
    assert sorted(processors) == sorted(f"{path}.base_layer.processor" for path in UNET.attention_paths)
    model.set_attn_processor(dict(processors))  # a dict keyed like `attn_processors` fits (diffusers pops from it)
    original_names = {name.replace(".base_layer", ""): p for name, p in processors.items()}
    with pytest.raises(KeyError, match=r"attn1\.base_layer\.processor"):
        model.set_attn_processor(original_names)


@pytest.mark.parametrize("processor", [AttnProcessor, AttnProcessor2_0], ids=lambda cls: cls.__name__)
def test_every_processor_applies_the_term(processor):
    model = make_unet()
    inputs = unet_inputs()
    with torch.no_grad():
        default = run(model, inputs)[0]
        model.set_attn_processor(processor())
        assert all(isinstance(p, processor) for p in model.attn_processors.values())
        got = run(model, inputs)[0]
        with model.disable_adapter():
            base = run(model, inputs)[0]
    torch.testing.assert_close(got, default, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-2


def test_fused_qkv_projections_keep_the_term():
    model = make_unet()
    unet = model.get_base_model()
    inputs = unet_inputs()
    with torch.no_grad():
        unfused = run(model, inputs)[0]
        unet.fuse_qkv_projections()
        assert all(isinstance(p, FusedAttnProcessor2_0) for p in unet.attn_processors.values())
        fused = run(model, inputs)[0]
        unet.unfuse_qkv_projections()
        assert (run(model, inputs)[0] - unfused).abs().max() < 1e-5
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-5)


def test_adapter_loads_in_place_into_a_unet(tmp_path):
    """What a pipeline needs: `PeftModel.from_pretrained(pipe.unet, ...)` adapts the UNet object it was given."""
    model = make_unet()
    inputs = unet_inputs()
    with torch.no_grad():
        want = run(model, inputs)[0]
    model.save_pretrained(tmp_path)
    unet = build_unet()
    PeftModel.from_pretrained(unet, tmp_path)
    assert sum(isinstance(m, APTLayer) for m in unet.modules()) == len(UNET.attention_paths)
    with torch.no_grad():
        assert torch.equal(run(unet, inputs)[0], want)


def test_diffusers_add_adapter_uses_apt():
    unet = build_unet()
    unet.add_adapter(APTConfig(num_prompts=5, r=3))
    assert sorted(n for n, m in unet.named_modules() if isinstance(m, APTLayer)) == sorted(UNET.attention_paths)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".apt_" in n for n in trainable)


def test_diffusers_set_adapters_switches_apt_adapters_and_refuses_weights():
    unet = build_unet()
    unet.add_adapter(APTConfig(num_prompts=5, r=3), adapter_name="first")
    unet.add_adapter(APTConfig(num_prompts=5, r=3), adapter_name="second")
    randomise_adapter(unet, seed=1, adapter_name="first")
    randomise_adapter(unet, seed=2, adapter_name="second")
    outputs = {}
    for name in ("first", "second"):
        unet.set_adapters([name])
        assert unet.active_adapters() == [name]
        with torch.no_grad():
            outputs[name] = run(unet, unet_inputs())[0]
    assert not torch.allclose(outputs["first"], outputs["second"])
    unet.set_adapters(["first"], weights=[1.0])
    with torch.no_grad():
        assert torch.equal(run(unet, unet_inputs())[0], outputs["first"])
    with pytest.raises(ValueError, match="'first' cannot be weighted \\(0.5 given\\)"):
        unet.set_adapters(["first"], weights=[0.5])


def test_gradients_reach_every_adapter_tensor():
    model = make_unet().train()
    run(model, unet_inputs())[0].square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 * len(UNET.attention_paths)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
