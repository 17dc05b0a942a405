"""Decoders (Llama, Mistral, Qwen2): generation with the KV cache equals generation without it. APT's term depends only
on each token's own X, so a cached step must add exactly what the full forward adds for that token."""

import pytest
import torch
from families import FAMILIES
from peft import get_peft_model
from reference import randomise_adapter

from peft_apt import APTConfig

DECODERS = [FAMILIES[name] for name in ("llama", "mistral", "qwen2")]
NEW_TOKENS = 8


def left_padded_prompts():
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, 99, (2, 6), generator=g)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :2] = 0
    attention_mask[1, :2] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def generate(model, use_cache):
    output = model.generate(
        **left_padded_prompts(),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return output.sequences, torch.stack(output.scores, dim=1)


@pytest.mark.parametrize("family", DECODERS, ids=lambda f: f.name)
def test_generate_with_kv_cache_equals_without(family):
    model = get_peft_model(family.build(), APTConfig(num_prompts=5, r=3, task_type="CAUSAL_LM"))
    randomise_adapter(model)
    model.eval()
    with torch.no_grad():
        cached, cached_scores = generate(model, use_cache=True)
        uncached, uncached_scores = generate(model, use_cache=False)
        with model.disable_adapter():
            base, _ = generate(model, use_cache=True)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-4, atol=1e-4)
    # the test can fail: the adapter changes what is generated
    assert not torch.equal(cached, base)
