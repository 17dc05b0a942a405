"""An independent reference of APT, written from APT_SPEC.md and applied with hooks to an untouched base model."""

from __future__ import annotations

import contextlib

import torch


def reference_apt(O, X, P, W1, W2, s):
    """O' = exp(s) (O + a A P) with K = P + P W1 W2, A = relu(X K^T), a = max_j A (held constant)."""
    K = P + torch.einsum("pd,dr,re->pe", P, W1, W2)
    A = torch.einsum("...nd,pd->...np", X, K).clamp(min=0)
    a = A.max(dim=-1, keepdim=True).values.detach()
    return torch.exp(s) * (O + a * torch.einsum("...np,pd->...nd", A, P))


@contextlib.contextmanager
def reference_hooks(base_model, family, adapter_tensors, projection=None):
    """Add the reference term on `base_model`: X from each attention's input, O from its output projection (or from
    `projection`, a path relative to the attention module, "" for the module's own output)."""
    handles = []
    for path, (P, W1, W2, s) in adapter_tensors.items():
        attention = base_model.get_submodule(path)
        projection_path = family.projection_of(path) if projection is None else projection
        captured = {}

        def capture(module, args, kwargs, captured=captured):
            captured["X"] = kwargs[family.query_argument] if family.query_argument in kwargs else args[0]

        def add_term(module, args, output, captured=captured, tensors=(P, W1, W2, s)):
            O = output[0] if isinstance(output, tuple) else output
            new = reference_apt(O, captured["X"], *tensors)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        projection_module = attention.get_submodule(projection_path) if projection_path else attention
        handles.append(attention.register_forward_pre_hook(capture, with_kwargs=True))
        handles.append(projection_module.register_forward_hook(add_term))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def initial_term_ratios(peft_model, family, forward) -> dict[str, float]:
    """{attention path: mean over tokens of ||a (A @ P)|| / ||X||}, with X captured at each APT layer during
    `forward()` and the term computed by the reference formula from the layer's effective tensors (O = 0, s = 0)."""
    ratios = {}
    handles = []
    for path, (P, W1, W2, _) in adapter_tensors(peft_model, family.attention_paths).items():

        def measure(module, args, kwargs, path=path, tensors=(P, W1, W2)):
            X = (kwargs[family.query_argument] if family.query_argument in kwargs else args[0]).float()
            term = reference_apt(torch.zeros_like(X), X, *tensors, torch.zeros(()))
            size = X.norm(dim=-1)
            kept = size > 0  # padding tokens with zero embeddings
            ratios[path] = (term.norm(dim=-1)[kept] / size[kept]).mean().item()

        layer = peft_model.base_model.model.get_submodule(path)
        handles.append(layer.register_forward_pre_hook(measure, with_kwargs=True))
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return ratios


def run(model, inputs) -> list[torch.Tensor]:
    """The floating tensors of the model's output, in order. Seeded: ViLT draws a random patch order each call."""
    torch.manual_seed(0)
    output = model(**inputs)
    values = output.values() if hasattr(output, "values") else output
    return [v for v in values if torch.is_tensor(v) and v.is_floating_point()]


def multiplier(layer, tensor_name: str, adapter_name: str = "default") -> float:
    """The fixed factor between a trained APT tensor and the formula's: c for apt_prompt, k for apt_W2, else 1."""
    scales = {"apt_prompt": layer.prompt_scale, "apt_W2": layer.W2_scale}
    return scales[tensor_name](adapter_name) if tensor_name in scales else 1.0


@torch.no_grad()
def randomise_adapter(model, seed: int = 0, adapter_name: str = "default"):
    """Give every APT tensor a random effective value (the formula's P, W1, W2, s) large enough that each term of the
    formula moves the output, whatever multipliers the layer trains P and W2 through (a prompt multiplier not yet
    calibrated is set to 1)."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if not hasattr(layer, "multipliers") or adapter_name not in layer.apt_prompt:
            continue
        if layer.multipliers[adapter_name]["prompt"] is None:
            layer.multipliers[adapter_name]["prompt"] = 1.0
        for name in layer.adapter_layer_names:
            param = getattr(layer, name)[adapter_name]
            if name == "apt_s":
                value = torch.empty(param.shape).uniform_(-0.3, 0.3, generator=g)
            elif name == "apt_prompt":
                value = torch.randn(param.shape, generator=g) * 0.2
            else:  # W1 (d x r) and W2 (r x d), so that P W1 W2 is on the scale of P
                value = torch.randn(param.shape, generator=g) / param.shape[0] ** 0.5
            param.copy_((value / multiplier(layer, name, adapter_name)).to(param.dtype))


def adapter_tensors(peft_model, paths, adapter_name: str = "default"):
    """{attention path: (P, W1, W2, s)} copied out of an adapted model: the effective tensors of the formula."""
    out = {}
    for path in paths:
        layer = peft_model.base_model.model.get_submodule(path)
        tensors = (
            layer.prompts(adapter_name),
            layer.apt_W1[adapter_name],
            layer.W2(adapter_name),
            layer.apt_s[adapter_name],
        )
        out[path] = tuple(tensor.detach().clone() for tensor in tensors)
    return out
