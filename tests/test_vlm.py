"""Vision-language models, as tests/test_families.py checks every family: on tiny random models of each, the defaults
adapt one attention per language-model block and nothing in the vision tower or projector, the output equals the
independent reference of the formula, `disable_adapter()` gives the base output, save/load round trips are exact,
`generate` with images gives the same tokens with and without the KV cache, a mixed-adapter batch with images gives
each sample its own adapter's output, and the default init's term is its target fraction of X. One adapted model per
family is shared by the checks that do not change it."""

import copy
import json

import pytest
import torch
import transformers as T
from families import BLIP_QFORMER, FAMILIES, IMAGE_TOKEN, TOKENS, VLM_FAMILIES, VLM_VISION
from peft import PeftModel, get_peft_model
from reference import initial_term_ratios, randomise_adapter, run
from safetensors import safe_open
from test_decoders import assert_cached_generation_is_exact
from test_families import P, R, adapted_paths, give_norms_random_gains, outputs_matching_reference
from test_serving import assert_each_sample_uses_its_adapter, with_two_adapters

from peft_apt import APTConfig
from peft_apt.layer import INITIAL_TERM_RATIO

pytestmark = pytest.mark.usefixtures("one_thread")
VLMS = list(VLM_FAMILIES.values())


@pytest.fixture(scope="module", params=VLMS, ids=lambda family: family.name)
def adapted(request):
    """(family, model with a randomised default adapter, untouched copy of its base, the family's inputs)."""
    family = request.param
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = family.build()
    reference = copy.deepcopy(base).requires_grad_(False)
    model = get_peft_model(base, APTConfig(num_prompts=P, r=R, task_type=family.task_type))
    randomise_adapter(model)
    yield family, model.eval(), reference, family.inputs()
    torch.set_num_threads(threads)


def test_defaults_adapt_each_language_model_block_once_and_nothing_else(adapted):
    family, model, reference, _ = adapted
    assert adapted_paths(model) == family.attention_paths  # blocks 0 and 1 of the language model
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    assert shapes == {
        f"base_model.model.{path}.{name}.default": shape
        for path in family.attention_paths
        for name, shape in (("apt_prompt", (P, 32)), ("apt_W1", (32, R)), ("apt_W2", (R, 32)), ("apt_s", (1,)))
    }


def test_output_matches_independent_reference(adapted):
    family, model, reference, inputs = adapted
    got, base = outputs_matching_reference(model, reference, family, inputs)
    assert (got[0] - base[0]).abs().max() > 1e-2  # the adapter really moves the output


def test_disabled_adapter_gives_the_base_output_exactly(adapted):
    _, model, reference, inputs = adapted
    with torch.no_grad():
        with model.disable_adapter():
            disabled = run(model, inputs)
        base = run(reference, inputs)
    assert all(torch.equal(a, b) for a, b in zip(disabled, base))


def test_save_load_round_trip_is_exact(adapted, tmp_path):
    family, model, reference, inputs = adapted
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == {
        f"base_model.model.{path}.{name}"
        for path in family.attention_paths
        for name in ("apt_prompt", "apt_W1", "apt_W2", "apt_s")
    }
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert adapted_paths(loaded) == family.attention_paths
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(run(loaded, inputs), run(model, inputs)))
    assert isinstance(config["target_modules"], str)  # the rule's regex, saved explicitly


def test_generate_with_images_and_kv_cache_equals_without(adapted):
    family, model, _, _ = adapted
    assert_cached_generation_is_exact(model, family)


@pytest.mark.parametrize("family", VLMS, ids=lambda family: family.name)
def test_mixed_adapter_batch_with_images_gives_each_sample_its_own_adapter(family):
    model = with_two_adapters(family)
    assert_each_sample_uses_its_adapter(model, family.inputs(), ["first", "second"])
    assert_each_sample_uses_its_adapter(model, family.inputs(), ["second", "__base__"])


@pytest.mark.parametrize("family", VLMS, ids=lambda family: family.name)
def test_default_init_term_is_its_target_fraction_of_the_input(family):
    """As for every family: calibrated on the norm feeding each language-model attention, whatever its gains."""
    base = family.build()
    give_norms_random_gains(base)
    model = get_peft_model(base, APTConfig(num_prompts=200, r=R)).eval()
    ratios = initial_term_ratios(model, family, lambda: run(model, family.inputs()))
    assert sorted(ratios) == sorted(family.attention_paths)
    misses = {path: ratio / INITIAL_TERM_RATIO for path, ratio in ratios.items()}
    assert all(0.5 < miss < 2 for miss in misses.values()), misses


def test_blip2_with_a_t5_language_model_adapts_the_t5_attentions():
    """BLIP-2's language model is OPT or T5 by checkpoint: with T5, the encoder's self-attention and the decoder's self-
    and cross-attention, each calibrated on the norm of its own sub-layer. Placement only: the formula is checked on
    T5 itself."""
    t5 = dict(model_type="t5", d_model=32, d_kv=16, d_ff=37, num_layers=2, num_heads=2, vocab_size=99, **TOKENS)
    config = T.Blip2Config(
        text_config={**t5, "decoder_start_token_id": 0},
        vision_config=VLM_VISION,
        qformer_config=BLIP_QFORMER,
        num_query_tokens=4,
        image_token_index=IMAGE_TOKEN,
    )
    model = get_peft_model(T.Blip2ForConditionalGeneration(config), APTConfig(num_prompts=P, r=R))
    sub_layers = [
        *(f"encoder.block.{i}.layer.0.SelfAttention" for i in range(2)),
        *(
            f"decoder.block.{i}.layer.{j}.{kind}"
            for i in range(2)
            for j, kind in enumerate(["SelfAttention", "EncDecAttention"])
        ),
    ]
    assert adapted_paths(model) == [f"language_model.{path}" for path in sub_layers]
    for path in adapted_paths(model):
        norm = model.base_model.model.get_submodule(f"{path.rpartition('.')[0]}.layer_norm")
        assert model.base_model.input_norm(path) is norm


def test_an_adapter_saved_with_both_towers_loads_as_before(tmp_path):
    """Gemma 3's default adapted the vision tower too; such adapters name their targets and load unchanged."""
    family = FAMILIES["gemma3"]
    base = family.build()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, APTConfig(num_prompts=P, r=R, target_modules=["self_attn"]))
    randomise_adapter(model)
    towers = [*(f"model.vision_tower.encoder.layers.{i}.self_attn" for i in range(2)), *family.attention_paths]
    assert sorted(adapted_paths(model)) == sorted(towers)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(reference, tmp_path).eval()
    assert sorted(adapted_paths(loaded)) == sorted(towers)
    inputs = family.inputs()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(run(loaded, inputs), run(model.eval(), inputs)))


def test_a_vision_language_model_without_a_language_model_names_its_type():
    """A model type of `AutoModelForImageTextToText` whose language model the rule cannot find: the error says so."""
    llava = VLM_FAMILIES["llava"].build()
    llava.model.text_stack = llava.model.language_model  # renamed: no `language_model`, and no `get_decoder()`
    del llava.model.language_model
    llava.get_decoder = None
    with pytest.raises(ValueError, match=r"model type 'llava' \(a vision-language model whose language model"):
        get_peft_model(llava, APTConfig(num_prompts=P))


def test_a_language_model_without_attentions_apt_can_adapt_names_it():
    llava = VLM_FAMILIES["llava"].build()
    for layer in llava.model.language_model.layers:  # an output projection under a name APT does not look for
        layer.self_attn.output = layer.self_attn.o_proj
        del layer.self_attn.o_proj
    with pytest.raises(
        ValueError, match=r"model type 'llava' \(its language model 'model\.language_model' has no attention"
    ):
        get_peft_model(llava, APTConfig(num_prompts=P))
