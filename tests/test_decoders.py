"""Decoders and encoder-decoders: generation with the KV cache equals generation without it. APT's term depends only
on each token's own X, so a cached step must add exactly what the full forward adds for that token; in cross-attention
X is the decoder stream, so the cached encoder states change nothing either."""

import pytest
import torch
from families import FAMILIES
from peft import get_peft_model
from reference import randomise_adapter

from peft_apt import APTConfig

pytestmark = pytest.mark.usefixtures("one_thread")
GENERATING = [family for family in FAMILIES.values() if family.task_type]
NEW_TOKENS = 8


def left_padded_prompts():
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, 99, (2, 6), generator=g)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :2] = 0
    attention_mask[1, :2] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def prompts(family) -> dict:
    """Left-padded text for a decoder (with the image, for a model whose inputs place one); an encoder-decoder's
    encoder inputs."""
    inputs = family.inputs()
    if family.task_type == "SEQ_2_SEQ_LM":
        return {name: value for name, value in inputs.items() if not name.startswith("decoder_")}
    return inputs if "pixel_values" in inputs else left_padded_prompts()


def generate(model, family, use_cache, **kwargs):
    """Greedy, always NEW_TOKENS new tokens: the sequences and each step's scores."""
    output = model.generate(
        **prompts(family),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return output.sequences, torch.stack(output.scores, dim=1)


def assert_cached_generation_is_exact(model, family) -> None:
    """Greedy generation with the KV cache gives what it gives without, and the adapter changes its scores."""
    with torch.no_grad():
        cached, cached_scores = generate(model, family, use_cache=True)
        uncached, uncached_scores = generate(model, family, use_cache=False)
        with model.disable_adapter():
            base, base_scores = generate(model, family, use_cache=True)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-4, atol=1e-4)
    # the test can fail: the adapter changes the scores of what is generated (those not masked to -inf)
    finite = cached_scores.isfinite()
    assert (cached_scores - base_scores)[finite].abs().max() > 1e-2


@pytest.mark.parametrize("family", GENERATING, ids=lambda f: f.name)
def test_generate_with_kv_cache_equals_without(family):
    model = get_peft_model(family.build(), APTConfig(num_prompts=5, r=3, task_type=family.task_type))
    randomise_adapter(model)
    model.eval()
    assert_cached_generation_is_exact(model, family)
