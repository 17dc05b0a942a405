"""
Library paths that assume an adapter layer wraps a single weight-owning module, as LoRA's do, taken differently by
models with an APT adapter (whose layers wrap a whole attention module). Models with other adapters run the
libraries' own code unchanged.

- Loading onto a base with disk-offloaded layers (`PeftModel.from_pretrained` on a model loaded with a `device_map`
  that offloads to disk): see `update_offload`.
- diffusers' `save_lora_adapter`: its folder is read back by `load_lora_adapter` as a LoRA, so APT refuses it.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import tempfile
import weakref
from itertools import chain

from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import APTConfig
from .hub import for_apt_models
from .layer import APTLayer

# the prefix of the base model's modules in a PeftModel
BASE_MODEL_PREFIX = "base_model.model."
OFFLOADED_ADAPTER_FILE = "apt_adapter.safetensors"

LORA_FORMAT_ERROR = (
    "APT adapter '{adapter_name}' cannot be saved with diffusers' `save_lora_adapter`: `load_lora_adapter` reads its "
    "folder as a LoRA adapter and cannot load it. Save it in PEFT's format instead: create the adapter with "
    "`model = peft.get_peft_model(unet, APTConfig(...))`, save it with `model.save_pretrained(directory)` and load it "
    "with `PeftModel.from_pretrained(unet, directory)`."
)


def _base_name(name: str) -> str:
    """A tensor's or module's name in the base model, from its name in the adapted model (no `base_layer` levels)."""
    return name.removeprefix(BASE_MODEL_PREFIX).replace(".base_layer.", ".").removesuffix(".base_layer")


def update_offload(peft_method, self: PeftModel, offload_index: dict, adapters_weights: dict) -> None:
    """
    PEFT's `_update_offload` for APT models: point accelerate's index of disk-offloaded weights at their names in the
    adapted model and add the APT tensors of the layers that live on disk, which accelerate then loads at each forward.

    PEFT's version looks each weight's owner up as an adapter layer; an APT layer wraps the attention, whose weights
    sit one `base_layer` deeper. Here the base weights are also read from the checkpoint where they are instead of
    being copied into new files (PEFT writes its copy beside the Hub cache's folder, or under the current directory
    for a checkpoint in a local folder): only the APT tensors are written, to a temporary folder removed with the
    model.
    """
    if not offload_index:
        return
    adapted_names = {
        _base_name(name): name
        for name, _ in chain(self.named_parameters(remove_duplicate=False), self.named_buffers(remove_duplicate=False))
    }
    # Checkpoints may store keys without the name of the model's root module (GPT-2's keys lack "transformer.").
    root = next(iter(offload_index)).split(".")[0] + "."
    stored_keys = {}
    for name in list(offload_index):
        entry = offload_index.pop(name)
        path = entry["safetensors_file"]
        if path not in stored_keys:
            with safe_open(path, framework="pt") as checkpoint:
                stored_keys[path] = set(checkpoint.keys())
        stored = name if name in stored_keys[path] else name.removeprefix(root)
        if stored not in stored_keys[path] or name not in adapted_names:
            raise ValueError(f"Cannot find the disk-offloaded weight '{name}' in '{path}' and in the model.")
        offload_index[adapted_names[name]] = {**entry, "weight_name": stored}

    (adapter_name,) = self.peft_config  # PEFT dispatches an offloaded model with one adapter only
    offloaded_layers = [
        path
        for path, module in self.named_modules()
        if isinstance(module, APTLayer) and any(name.startswith(f"{path}.base_layer.") for name in offload_index)
    ]
    tensors = {
        f"{path}.{tensor}.{adapter_name}": adapters_weights[f"{path}.{tensor}"].contiguous()
        for path in offloaded_layers
        for tensor in APTLayer.adapter_layer_names
    }
    if not tensors:
        return
    folder = tempfile.mkdtemp(prefix="peft-apt-offload-")
    weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, OFFLOADED_ADAPTER_FILE)
    save_file(tensors, path)
    offload_index.update({key: {"safetensors_file": path, "weight_name": key} for key in tensors})


def _refuse_apt_lora_format(diffusers_method):
    """diffusers' `save_lora_adapter`, raising a ValueError for an APT adapter instead of writing a folder that
    `load_lora_adapter` cannot read."""

    @functools.wraps(diffusers_method)
    def save_lora_adapter(self, *args, **kwargs):
        call = inspect.signature(diffusers_method).bind(self, *args, **kwargs)
        call.apply_defaults()
        configs = getattr(self, "peft_config", {})
        adapter_name = call.arguments.get("adapter_name")
        names = [adapter_name] if adapter_name is not None else list(configs)
        for name in names:
            if isinstance(configs.get(name), APTConfig):
                raise ValueError(LORA_FORMAT_ERROR.format(adapter_name=name))
        return diffusers_method(self, *args, **kwargs)

    save_lora_adapter.__diffusers_method__ = diffusers_method
    return save_lora_adapter


def guard_lora_format(model: nn.Module) -> None:
    """Make diffusers' `save_lora_adapter` refuse APT adapters, once `model`, a diffusers model, gets one."""
    if not callable(getattr(model, "save_lora_adapter", None)):
        return
    from diffusers.loaders.peft import PeftAdapterMixin

    method = PeftAdapterMixin.save_lora_adapter
    if not hasattr(method, "__diffusers_method__"):
        PeftAdapterMixin.save_lora_adapter = _refuse_apt_lora_format(method)


def install() -> None:
    for_apt_models("_update_offload", update_offload)
