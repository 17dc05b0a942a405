"""Serving: one model answering from several threads, mixed-adapter batches (`adapter_names`) in forward and
`generate` for every family, and the low-level PEFT API (`inject_adapter_in_model`, state dict helpers)."""

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from families import FAMILIES, MHA_FAMILY
from peft import get_peft_model, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from reference import randomise_adapter, run
from test_decoders import generate

from peft_apt import APTConfig, APTLayer

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = [*FAMILIES.values(), MHA_FAMILY]
# CLIP's logits compare every image with every text, so a row mixes two samples' adapters; the embeddings do not.
CROSS_SAMPLE_OUTPUTS = ("logits_per_image", "logits_per_text")


def with_two_adapters(family, base=None):
    """Adapters "first" and "second", each randomised differently, on the family's tiny model, in eval mode."""
    target = {"target_modules": r".*resblocks\.\d+\.attn"} if family is MHA_FAMILY else {}
    model = get_peft_model(base or family.build(), APTConfig(num_prompts=5, r=3, **target), adapter_name="first")
    model.add_adapter("second", APTConfig(num_prompts=3, r=2, **target))
    randomise_adapter(model, seed=1, adapter_name="first")
    randomise_adapter(model, seed=2, adapter_name="second")
    return model.eval()


def per_sample_outputs(model, inputs, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # ViLT draws a random patch order each call
    output = model(**inputs, **kwargs)
    items = output.items() if hasattr(output, "items") else enumerate(output)
    return {
        name: value
        for name, value in items
        if torch.is_tensor(value) and value.is_floating_point() and name not in CROSS_SAMPLE_OUTPUTS
    }


def single_adapter_outputs(model, inputs, name):
    """What the whole batch gives with only adapter `name` ("__base__": adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return per_sample_outputs(model, inputs)
    model.set_adapter(name)
    try:
        return per_sample_outputs(model, inputs)
    finally:
        model.set_adapter("first")


def assert_each_sample_uses_its_adapter(model, inputs, adapter_names):
    with torch.no_grad():
        mixed = per_sample_outputs(model, inputs, adapter_names=adapter_names)
        expected = {name: single_adapter_outputs(model, inputs, name) for name in set(adapter_names)}
    assert mixed
    # float32 through a few layers: the sub-batches' GEMMs round differently from the whole batch's, by up to 2e-5
    # on some CPUs' kernels; the two choices differ by orders of magnitude more (checked below)
    tolerance = 1e-4
    for key, value in mixed.items():
        for i, name in enumerate(adapter_names):
            torch.testing.assert_close(value[i], expected[name][key][i], rtol=tolerance, atol=tolerance)
    first, second = (expected[name] for name in dict.fromkeys(adapter_names))
    assert max((first[key] - second[key]).abs().max().item() for key in mixed) > 100 * tolerance


@pytest.mark.parametrize("family", ALL, ids=lambda f: f.name)
def test_mixed_adapter_batch_gives_each_sample_its_own_adapter(family):
    model = with_two_adapters(family)
    inputs = family.inputs()
    assert_each_sample_uses_its_adapter(model, inputs, ["first", "second"])
    assert_each_sample_uses_its_adapter(model, inputs, ["second", "__base__"])


def test_mixed_adapter_batch_on_a_unet():
    from test_diffusers import UNET

    model = with_two_adapters(UNET)
    assert_each_sample_uses_its_adapter(model, UNET.inputs(), ["second", "first"])
    assert_each_sample_uses_its_adapter(model, UNET.inputs(), ["__base__", "second"])


# Every family's forward takes mixed batches (above); generate() is checked on one family of each kind of cache and
# attention: rotary decoders, GPT-2's Conv1D, Bloom's and Falcon's fused QKV with their own cache layouts, the three
# encoder-decoders, and Gemma 3 with an image.
MIXED_GENERATE = ["llama", "mistral", "qwen2", "gpt2", "bloom", "falcon", "t5", "bart", "whisper", "gemma3"]


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("family", [FAMILIES[name] for name in MIXED_GENERATE], ids=lambda f: f.name)
def test_mixed_adapter_generate_matches_single_adapter_generate(family, use_cache):
    model = with_two_adapters(family)
    with torch.no_grad():
        mixed, mixed_scores = generate(model, family, use_cache, adapter_names=["second", "__base__"])
        with model.disable_adapter():
            base, base_scores = generate(model, family, use_cache)
        model.set_adapter("second")
        with_b, with_b_scores = generate(model, family, use_cache)
    assert torch.equal(mixed[0], with_b[0]) and torch.equal(mixed[1], base[1])
    torch.testing.assert_close(mixed_scores[0], with_b_scores[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed_scores[1], base_scores[1], rtol=1e-5, atol=1e-5)
    # the test can fail: the two choices really score differently (where not masked to -inf)
    finite = base_scores[0].isfinite()
    assert (with_b_scores[0] - base_scores[0])[finite].abs().max() > 1e-2


def test_mixed_adapter_beam_search_repeats_names_per_beam():
    llama = FAMILIES["llama"]
    model = with_two_adapters(llama)
    with torch.no_grad():
        mixed, _ = generate(model, llama, True, adapter_names=["first", "second"], num_beams=2)
        with_a, _ = generate(model, llama, True, num_beams=2)
        model.set_adapter("second")
        with_b, _ = generate(model, llama, True, num_beams=2)
    assert torch.equal(mixed[0], with_a[0]) and torch.equal(mixed[1], with_b[1])


def test_mixed_adapter_errors_match_peft():
    family = FAMILIES["bert"]
    model = with_two_adapters(family)
    inputs = family.inputs()
    with pytest.raises(ValueError, match="non-existing adapter.*: third"):
        model(**inputs, adapter_names=["first", "third"])
    with pytest.raises(ValueError, match=r"Length of `adapter_names`.*3 names.*shape \(2, 7, 32\)"):
        model(**inputs, adapter_names=["first", "second", "first"])
    with pytest.raises(TypeError, match="list of str"):
        model(**inputs, adapter_names="first")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(**inputs, adapter_names=["first", "second"])


def test_concurrent_threads_get_the_outputs_of_sequential_calls():
    """A server runs one model from several threads; torch releases the GIL inside ops, so calls interleave."""
    family = FAMILIES["vit"]
    model = get_peft_model(family.build(), APTConfig(num_prompts=5, r=3))
    randomise_adapter(model)
    model.eval()
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(120)]

    def forward(pixel_values):
        with torch.no_grad():
            return model(pixel_values=pixel_values).last_hidden_state

    sequential = [forward(x) for x in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(forward, batches))
    wrong = sum(not torch.allclose(c, s, rtol=1e-5, atol=1e-6) for c, s in zip(concurrent, sequential))
    assert wrong == 0, f"{wrong} of {len(batches)} concurrent forwards differ from the same forward run alone"


def test_concurrent_threads_with_different_adapter_names():
    family = FAMILIES["bert"]
    model = with_two_adapters(family)
    inputs = family.inputs()
    choices = [["first", "second"], ["second", "first"], ["__base__", "second"], ["first", "__base__"]] * 15

    def forward(adapter_names):
        with torch.no_grad():
            return model(**inputs, adapter_names=adapter_names).last_hidden_state

    sequential = [forward(names) for names in choices]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(forward, choices))
    assert all(torch.allclose(c, s, rtol=1e-5, atol=1e-6) for c, s in zip(concurrent, sequential))


def test_unload_detaches_the_projection_hook():
    family = FAMILIES["bert"]
    model = get_peft_model(family.build(), APTConfig(num_prompts=5, r=3))
    path = family.attention_paths[0]
    projection = model.base_model.model.get_submodule(f"{path}.base_layer.{family.projection_of(path)}")
    assert len(projection._forward_hooks) == 1
    model.unload()
    assert len(projection._forward_hooks) == 0


def test_inject_adapter_in_model_and_state_dict_helpers_round_trip():
    family = FAMILIES["bert"]
    base = family.build()
    other = copy.deepcopy(base)
    untouched = copy.deepcopy(base)
    model = inject_adapter_in_model(APTConfig(num_prompts=5, r=3), base)
    assert sum(isinstance(m, APTLayer) for m in model.modules()) == len(family.attention_paths)
    randomise_adapter(model)
    state = get_peft_model_state_dict(model)
    d = family.hidden_sizes[0]
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        f"{path}.{name}": shape
        for path in family.attention_paths
        for name, shape in (("apt_prompt", (5, d)), ("apt_W1", (d, 3)), ("apt_W2", (3, d)), ("apt_s", (1,)))
    }
    loaded = inject_adapter_in_model(APTConfig(num_prompts=5, r=3), other)
    result = set_peft_model_state_dict(loaded, state)
    assert not [key for key in result.unexpected_keys if ".apt_" in key]
    assert not [key for key in result.missing_keys if ".apt_" in key]
    inputs = family.inputs()
    with torch.no_grad():
        want, got, base_out = run(model.eval(), inputs), run(loaded.eval(), inputs), run(untouched, inputs)
    assert all(torch.equal(w, g) for w, g in zip(want, got))
    assert not torch.allclose(want[0], base_out[0])
