"""What APT's prompt term is on real inputs: the measurements the calibration and quality benchmarks report."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from peft_apt import APTLayer, approximated_prompt_output


@torch.no_grad()
def prompt_terms(model: nn.Module, forward: Callable[[nn.Module], object]) -> list[dict]:
    """
    Per APT layer of `model`, in model order, during `forward(model)`: "X", the attention's query-side input, "O", its
    output projection's output before the term (the raw output: a tuple for nn.MultiheadAttention), and "term",
    a (A @ P) of the active adapter on that X.
    """
    captured, handles = [], []
    for layer in (module for module in model.modules() if isinstance(module, APTLayer)):
        record = {"layer": layer}
        captured.append(record)

        def keep_input(module, args, kwargs, record=record):
            record["X"] = kwargs[module.query_argument] if module.query_argument in kwargs else args[0]

        def keep_output(_, args, output, record=record):
            record["O"] = output

        handles.append(layer.register_forward_pre_hook(keep_input, with_kwargs=True))
        # prepended: runs before the layer's own hook adds the term
        handles.append(layer._projection().register_forward_hook(keep_output, prepend=True))
    try:
        forward(model)
    finally:
        for handle in handles:
            handle.remove()
    for record in captured:
        layer, X = record.pop("layer"), record["X"]
        name = layer.active_adapters[0]
        P, W1, W2 = layer.prompts(name), layer.apt_W1[name], layer.W2(name)
        record["term"] = approximated_prompt_output(torch.zeros_like(X), X, P, W1, W2, X.new_zeros(1))
    return captured
