"""What APT's prompt term is on real inputs: the measurements the calibration and quality benchmarks report."""

from __future__ import annotations

import statistics
from typing import Callable

import torch
import torch.nn.functional as F
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


def output_of(record: dict) -> torch.Tensor:
    """O of a `prompt_terms` record: nn.MultiheadAttention returns it first in a tuple."""
    return record["O"][0] if isinstance(record["O"], tuple) else record["O"]


def term_sizes(records: list[dict]) -> list[float]:
    """Per layer, ||a (A @ P)|| / ||O|| over the batch: how far the adapter takes the attention from the frozen one."""
    return [float(record["term"].norm() / output_of(record).norm()) for record in records]


def term_state(model: nn.Module, forward: Callable[[nn.Module], object]) -> dict:
    """
    The term's size, the median over layers of `term_sizes`, and its direction: the mean over layers and tokens of
    |cos(term, the tokens' mean X)|. Near 1, the term adds to every token the direction all tokens share, which the
    next norm turns into a loss of what tells them apart.
    """
    records = prompt_terms(model, forward)
    alignments = []
    for record in records:
        common = F.normalize(record["X"].flatten(0, -2).mean(dim=0), dim=0)
        alignments.append(F.cosine_similarity(record["term"].flatten(0, -2), common[None], dim=-1).abs().mean())
    return {
        "term_alignment": float(torch.stack(alignments).mean()),
        "term_size": statistics.median(term_sizes(records)),
    }
