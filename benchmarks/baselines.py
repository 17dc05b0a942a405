"""What the benchmarks need beside PEFT: VPT-deep (the paper's deep-prompt baseline) for encoders, the authors'
optimiser, and APT with only some of its tensors trained.

VPT-deep (Jia et al., 2022) gives every encoder layer its own p learnable prompt tokens: they are inserted into the
layer's input sequence (after the CLS token) and dropped from its output, so each layer sees fresh prompts. We add them
with hooks on the layer modules rather than copying transformers code, so it works for any batch-first layer whose
first argument is the hidden states (an `attention_mask` argument, positional or keyword, is widened to match) and
that returns the hidden states (alone or first in a tuple): ViT-family blocks, ViLT's encoder layers, BridgeTower's
cross-modal layers.
"""

import inspect
import math
from typing import Sequence

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from peft_apt import APTLayer


def count_trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def vpt_init_bound(patch_fan_in: int, hidden_size: int) -> float:
    """VPT's prompt init: the xavier-uniform bound of the patch embedding (fan-in channels * patch area)."""
    return math.sqrt(6.0 / (patch_fan_in + hidden_size))


def _insert_rows_or_cols(mask: torch.Tensor, dim: int, at: int, count: int) -> torch.Tensor:
    """Insert `count` "attend" entries (True, or 0 for additive masks) into a (.., query, key) mask along `dim`."""
    if mask.shape[dim] == 1:  # broadcast dimension
        return mask
    shape = list(mask.shape)
    shape[dim] = count
    allowed = mask.new_ones(shape) if mask.dtype == torch.bool else mask.new_zeros(shape)
    return torch.cat([mask.narrow(dim, 0, at), allowed, mask.narrow(dim, at, mask.shape[dim] - at)], dim=dim)


class DeepPrompts(nn.Module):
    """Per-layer prompt tokens attached to an encoder's layers with hooks (VPT-deep).

    Each of the `layers` gets `num_prompts` tokens of width `hidden_size`, right after the CLS token as in VPT,
    starting uniform in [-init_bound, init_bound] (see `vpt_init_bound`). With `output_hidden_states=True`,
    transformers records `hidden_states[0]` from layer 0's input as the layer sees it, so that one entry carries the
    layer-0 prompts; the other entries and `last_hidden_state` do not.
    """

    def __init__(self, layers: Sequence[nn.Module], num_prompts: int, hidden_size: int, init_bound: float):
        super().__init__()
        self.num_prompts = num_prompts
        # On the layers' device and in their dtype: a model moved before its prompts were added must not join
        # CPU prompts to CUDA hidden states (nor pay a copy per call).
        where = next((dict(device=p.device, dtype=p.dtype) for layer in layers for p in layer.parameters()), {})
        self.prompts = nn.Parameter(torch.empty(len(layers), num_prompts, hidden_size, **where))
        nn.init.uniform_(self.prompts, -init_bound, init_bound)
        self._handles = []
        for index, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_pre_hook(index, layer), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._drop_prompts))

    def _make_pre_hook(self, index: int, layer: nn.Module):
        signature = inspect.signature(layer.forward)
        hidden_name = next(iter(signature.parameters))

        def insert_prompts(module, args, kwargs):
            bound = signature.bind(*args, **kwargs)
            hidden_states = bound.arguments[hidden_name]
            prompts = self.prompts[index].to(hidden_states.dtype).unsqueeze(0).expand(hidden_states.shape[0], -1, -1)
            bound.arguments[hidden_name] = torch.cat([hidden_states[:, :1], prompts, hidden_states[:, 1:]], dim=1)
            mask = bound.arguments.get("attention_mask")
            if mask is not None:
                mask = _insert_rows_or_cols(mask, -1, 1, self.num_prompts)
                bound.arguments["attention_mask"] = _insert_rows_or_cols(mask, -2, 1, self.num_prompts)
            return bound.args, bound.kwargs

        return insert_prompts

    def _drop_prompts(self, module, args, output):
        hidden_states = output[0] if isinstance(output, tuple) else output
        hidden_states = torch.cat([hidden_states[:, :1], hidden_states[:, 1 + self.num_prompts :]], dim=1)
        return (hidden_states,) + output[1:] if isinstance(output, tuple) else hidden_states

    def remove(self):
        """Detach the hooks; the encoder behaves as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def add_deep_prompts(model: nn.Module, num_prompts: int) -> DeepPrompts:
    """Freeze a ViT-family `model` and give its `encoder.layer` blocks VPT-deep prompts, registered as
    `model.deep_prompts` (trainable, saved with it), uniform within VPT's xavier bound of the patch embedding."""
    config = model.config
    model.requires_grad_(False)
    bound = vpt_init_bound(config.num_channels * config.patch_size**2, config.hidden_size)
    prompts = DeepPrompts(model.encoder.layer, num_prompts, config.hidden_size, bound)
    model.add_module("deep_prompts", prompts)
    return prompts


def train_only(model: nn.Module, tensor_names: Sequence[str]) -> nn.Module:
    """`model` with only the APT tensors named (e.g. `apt_s`) left trainable; the others keep their init."""
    unknown = set(tensor_names) - set(APTLayer.adapter_layer_names)
    if unknown:
        raise ValueError(f"Unknown APT tensors {sorted(unknown)}: choose from {APTLayer.adapter_layer_names}")
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and not any(f".{tensor}." in name for tensor in tensor_names):
            parameter.requires_grad_(False)
    return model


def optimiser_for(parameters: dict[str, nn.Parameter], params: dict, steps: int, warmup_steps: int):
    """(optimizer, schedule) of a benchmark run: AdamW with the training parameters' `lr`, `weight_decay` and
    `adam_betas`, linear warm-up then cosine decay; parameters named `head.*` learn `head_lr_ratio` times faster (1
    unless given). With `optimiser: reference`, the authors' (APT_SPEC.md): AdamW with betas (0.9, 0.98), weight decay
    0.01 on every tensor whose name has no "bias" or "norm" (APT's P, W1, W2 and s included), linear warm-up then
    linear decay to 0."""
    if params.get("optimiser") == "reference":
        decayed = [p for name, p in parameters.items() if "bias" not in name and "norm" not in name]
        kept = [p for name, p in parameters.items() if "bias" in name or "norm" in name]
        groups = [{"params": decayed, "weight_decay": 0.01}, {"params": kept, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=params["lr"], betas=(0.9, 0.98), eps=1e-8)
        return optimizer, get_linear_schedule_with_warmup(optimizer, warmup_steps, steps)
    betas, weight_decay = tuple(params.get("adam_betas", (0.9, 0.999))), params.get("weight_decay", 0.0)
    head_lr = params["lr"] * params.get("head_lr_ratio", 1.0)
    groups = [
        {"params": [p for n, p in parameters.items() if n.startswith("head.") == is_head], "lr": lr}
        for is_head, lr in ((False, params["lr"]), (True, head_lr))
    ]
    groups = [group for group in groups if group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=params["lr"], betas=betas, weight_decay=weight_decay)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
