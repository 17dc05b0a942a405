"""Deep prompt tuning (VPT-deep) over any list of transformer layers, through hooks: the baseline APT approximates.

Each layer gets its own `num_prompts` learnable tokens, appended to its input sequence; their outputs are dropped
after the layer, so every layer sees fresh prompts (Jia et al., 2022). The model's code is untouched, which lets the
same function serve ViLT's encoder layers, BridgeTower's cross-modal layers or any batch-first layer whose first
argument is the hidden states.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch
from torch import nn

MASK_ARGUMENT = "attention_mask"


def extend_attention_mask(mask: Optional[torch.Tensor], num_prompts: int, seq_len: int) -> Optional[torch.Tensor]:
    """Let every token attend to the appended prompts: pad the dimensions of length `seq_len` with "attend"."""
    if mask is None:
        return None
    attend = True if mask.dtype == torch.bool else 0
    for dim in (-1, -2):
        if mask.shape[dim] == seq_len:
            shape = list(mask.shape)
            shape[dim] = num_prompts
            mask = torch.cat([mask, mask.new_full(shape, attend)], dim=dim)
    return mask


class DeepPrompts(nn.Module):
    """Holds one prompt matrix per layer and the hooks that splice them in; `remove()` restores the layers."""

    def __init__(self, layers: Sequence[nn.Module], num_prompts: int, hidden_size: int):
        super().__init__()
        self.num_prompts = num_prompts
        like = next(layers[0].parameters())
        self.prompts = nn.ParameterList(
            [nn.Parameter(0.02 * torch.randn(num_prompts, hidden_size, device=like.device, dtype=like.dtype))
             for _ in layers]
        )
        self.handles = []
        for layer, prompts in zip(layers, self.prompts):
            signature = inspect.signature(layer.forward)
            self.handles.append(
                layer.register_forward_pre_hook(
                    lambda module, args, kwargs, prompts=prompts, signature=signature: self._append(
                        prompts, signature, args, kwargs
                    ),
                    with_kwargs=True,
                )
            )
            self.handles.append(layer.register_forward_hook(self._drop))

    def _append(self, prompts: torch.Tensor, signature: inspect.Signature, args: tuple, kwargs: dict) -> Any:
        bound = signature.bind(*args, **kwargs)
        hidden_name = next(iter(signature.parameters))
        hidden_states = bound.arguments[hidden_name]
        seq_len = hidden_states.shape[1]
        batch_prompts = prompts.to(hidden_states.dtype).expand(hidden_states.shape[0], -1, -1)
        bound.arguments[hidden_name] = torch.cat([hidden_states, batch_prompts], dim=1)
        if MASK_ARGUMENT in bound.arguments:
            bound.arguments[MASK_ARGUMENT] = extend_attention_mask(
                bound.arguments[MASK_ARGUMENT], self.num_prompts, seq_len
            )
        return bound.args, bound.kwargs

    def _drop(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0][:, : -self.num_prompts], *output[1:])
        return output[:, : -self.num_prompts]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

