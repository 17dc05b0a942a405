"""`PARAMETRISATION_VERSION` must change whenever what an APT adapter learns changes (formula, init, multipliers):
benchmark records are keyed by it. This test pins what version `PARAMETRISATION_VERSION` computes, on a fixed tiny
problem; when it fails after a deliberate change, bump the version and record the new fingerprint beside it."""

import pytest
import torch
from peft import get_peft_model
from transformers import Dinov2Config, Dinov2Model

from peft_apt import APTConfig
from peft_apt.layer import PARAMETRISATION_VERSION

# version -> (multipliers of the first block; how far the adapter moves the output at init, and after 3 AdamW steps)
FINGERPRINTS = {
    1: (0.25, 0.125, 1.0529, 1.3690),
    2: (0.25, 0.125, 1.0643, 1.3800),  # calibrated on the norm producing X
    3: (0.0625, 0.125, 1.0643, 1.0057),  # prompts trained at 16x the reference std
}


def fingerprint() -> tuple[float, float, float, float]:
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=28, patch_size=14
    )
    model = get_peft_model(Dinov2Model(config), APTConfig(num_prompts=16, r=2))
    layer = model.base_model.model.encoder.layer[0].attention
    pixels = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        frozen = model.get_base_model()
        with model.disable_adapter():
            base = frozen(pixel_values=pixels).last_hidden_state
        initial = (model(pixel_values=pixels).last_hidden_state - base).norm().item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(3):
        model(pixel_values=pixels).last_hidden_state.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        trained = (model(pixel_values=pixels).last_hidden_state - base).norm().item()
    return layer.prompt_scale("default"), layer.W2_scale("default"), initial, trained


def test_parametrisation_version_names_what_the_tuner_computes():
    assert PARAMETRISATION_VERSION in FINGERPRINTS, "record the fingerprint of the new version"
    assert fingerprint() == pytest.approx(FINGERPRINTS[PARAMETRISATION_VERSION], rel=1e-4), (
        f"what APT learns has changed: bump PARAMETRISATION_VERSION and record {fingerprint()}"
    )
