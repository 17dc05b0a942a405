"""APT on a ViLT-B-sized layer, on every device present, in fp32 and under bf16 autocast (fp32 weights, as
`Trainer --bf16` runs it): outputs and adapter gradients against the independent reference in float64.

On a CUDA machine this is the first thing `benchmarks/gpu_check.sh` runs: a fast CUDA path of the APT term must
compute the same thing as the formula, to bf16 accuracy, before its speed means anything.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from peft import get_peft_model
from reference import adapter_tensors, multiplier, reference_hooks

from peft_apt import APTConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ATTENTION = "layers.0.attention"
VILT = SimpleNamespace(query_argument="hidden_states", projection_of=lambda path: "output.dense")
# Relative errors (norm of the difference / norm of the reference) allowed: fp32 rounding, and bf16's 8-bit mantissa
# through 768-deep matmuls. Measured on CPU, the term in the autocast dtype: outputs 2e-7 (fp32) and 2.4e-3 (bf16),
# adapter gradients up to 6e-6 and 1.8e-2 to 5e-2 (their upstream gradient comes through the layer's bf16 backward).
# A term off by a factor exp(s) (s ~ 0.1), or without a's scaling, misses by far more.
NORM_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
GRADIENT_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-1}
# ViLT-B's d and the paper's p everywhere; ViLT-B's 185 tokens at batch 2 on CUDA, fewer on CPU (bf16 is slow there).
TOKENS = {"cpu": (1, 64), "cuda": (2, 185)}


class Stack(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layers = torch.nn.ModuleList([layer])

    def forward(self, hidden_states):
        return self.layers[0](hidden_states)[0]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_vilt_layer_output_and_gradients_match_the_reference(device, precision):
    torch.manual_seed(0)
    base = Stack(T.models.vilt.modeling_vilt.ViltLayer(T.ViltConfig())).to(device)
    reference = copy.deepcopy(base).double()
    # init_weights=False: W2 and s random too, so every part of the formula moves the output
    model = get_peft_model(base, APTConfig(num_prompts=200, target_modules=["attention"], init_weights=False))
    layer = model.base_model.model.get_submodule(ATTENTION)
    x = torch.randn(*TOKENS[device], 768, device=device)
    upstream = torch.randn(*TOKENS[device], 768, device=device, dtype=torch.float64)

    model.train()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        got = model(x)
    assert got.dtype == torch.float32  # the residual stream stays fp32 under autocast
    (got.double() * upstream).sum().backward()
    names = ("apt_prompt", "apt_W1", "apt_W2", "apt_s")
    got_grads = []
    for name in names:  # gradients of the formula's P, W1, W2, s (the reference's leaves), not of what is trained
        got_grads.append(getattr(layer, name)["default"].grad.double() / multiplier(layer, name))

    tensors = [t.double().requires_grad_() for t in adapter_tensors(model, [ATTENTION])[ATTENTION]]
    with reference_hooks(reference, VILT, {ATTENTION: tensors}):
        want = reference(x.double())
    want_grads = torch.autograd.grad((want * upstream).sum(), tensors)
    with torch.no_grad():
        frozen = reference(x.double())
    assert relative_error(frozen, want) > 0.1, "the prompt term must matter for the comparison to mean anything"

    assert relative_error(got, want) < NORM_TOLERANCE[precision]
    scale = want.abs().mean().item()
    tolerance = 5 * NORM_TOLERANCE[precision]
    torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance * scale)
    for name, got_grad, want_grad in zip(names, got_grads, want_grads):
        assert relative_error(got_grad, want_grad) < GRADIENT_TOLERANCE[precision], name
