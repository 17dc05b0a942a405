"""APTModel: injects APT layers into the attention modules of a model."""

from __future__ import annotations

import inspect
import os
import re
import warnings
from contextlib import contextmanager
from typing import Optional, Union

from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from .config import APTConfig
from .constants import (
    LANGUAGE_MODEL_INPUT_NORMS,
    OUTPUT_PROJECTION_NAMES,
    TRANSFORMERS_MODELS_TO_APT_INPUT_NORMS,
    TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES,
)
from .integrations import guard_lora_format
from .layer import MERGE_ERROR, APTLayer, find_output_projection, output_size, set_adapter_names


class APTModel(BaseTuner):
    """
    Creates an Approximated Prompt Tuning (APT) model from a pretrained model (https://arxiv.org/abs/2306.15706).

    Each targeted attention module is wrapped in an [`APTLayer`] that approximates the effect of deep prompts on its
    output; the base model's weights stay untouched and frozen.

    Example:

        ```py
        >>> import peft_apt  # registers "APT" with PEFT
        >>> from peft import get_peft_model
        >>> from peft_apt import APTConfig
        >>> from transformers import ViltForQuestionAnswering

        >>> model = ViltForQuestionAnswering.from_pretrained("dandelin/vilt-b32-finetuned-vqa")
        >>> model = get_peft_model(model, APTConfig(num_prompts=200, r=4))
        ```
    """

    prefix: str = "apt_"
    tuner_layer_cls = APTLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING

    @staticmethod
    def get_model_config(model: nn.Module) -> dict:
        """PEFT's model config, where a diffusers model (its config has no `model_type`) is known by its class name."""
        model_config = BaseTuner.get_model_config(model)
        if "model_type" not in model_config:
            model_config = {**model_config, "model_type": type(model).__name__}
        return model_config

    def _prepare_adapter_config(self, peft_config: APTConfig, model_config: dict) -> APTConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(self.model, model_config.get("model_type"))
        if peft_config.multipliers is None:
            peft_config.multipliers = {}
        return peft_config

    def _pre_injection_hook(self, model: nn.Module, config: APTConfig, adapter_name: str) -> None:
        guard_lora_format(model)  # diffusers' LoRA format cannot hold APT adapters

    @staticmethod
    def _check_target_module_exists(peft_config: APTConfig, key: str):
        """Match like PEFT, but adapt only the outermost of nested matches so each block gets one APT layer."""
        matched = check_target_module_exists(peft_config, key)
        if not matched:
            return matched
        parts = key.split(".")
        for depth in range(1, len(parts)):
            if check_target_module_exists(peft_config, ".".join(parts[:depth])):
                return False
        return matched

    def _create_and_replace(
        self,
        apt_config: APTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        layer_kwargs = {
            "num_prompts": apt_config.num_prompts,
            "r": apt_config.r,
            "apt_dropout": apt_config.apt_dropout,
            "init_weights": apt_config.init_weights,
            "multipliers": apt_config.module_multipliers(current_key),
            "input_norm": self.input_norm(current_key) if apt_config.init_weights is True else None,
        }
        if isinstance(target, APTLayer):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        output_projection = find_output_projection(target)
        if output_projection is None:
            raise ValueError(
                f"APT cannot adapt module '{current_key}' ({type(target).__name__}): APT adapts whole attention "
                f"modules with an output projection at one of {list(OUTPUT_PROJECTION_NAMES)} (or "
                "torch.nn.MultiheadAttention), not single projections. Check `target_modules`."
            )
        new_module = APTLayer(target, adapter_name, output_projection, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            # an added adapter does not train until it is set active
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def input_norm(self, attention_path: str) -> Optional[nn.Module]:
        """The norm layer whose output is the input X of the attention at `attention_path` (None: not known)."""
        model_type, candidates = input_norm_candidates(self.model, attention_path)
        norm = find_input_norm(self.model, attention_path, candidates)
        if norm is None and candidates:
            warnings.warn(
                f"APT found none of the norms {list(candidates)} feeding '{attention_path}' ({model_type}); its "
                "prompts are calibrated for a LayerNorm-sized input instead."
            )
        return norm

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(child, APTLayer) and new_module is child.get_base_layer():
            # unloading puts the untouched attention module back; PEFT's version assumes a Linear-like module
            child.remove_projection_hook()
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def forward(self, *args, **kwargs):
        """
        The base model's forward. PEFT's task classes pass `input_ids=None` and `inputs_embeds=None` to every model;
        one whose forward has no such parameter (Whisper takes `input_features`) would hand them on to its decoder
        beside its own, so they are left out there.
        """
        passed_none = [name for name in ("input_ids", "inputs_embeds") if name in kwargs and kwargs[name] is None]
        if passed_none:  # the signature is read only then, not on every forward
            parameters = inspect.signature(self.model.forward).parameters
            for name in passed_none:
                if name not in parameters:
                    del kwargs[name]
        return self.model(*args, **kwargs)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """
        Mixed-adapter batches: `model(..., adapter_names=["a", "b", "__base__"])` runs each sample with its own
        adapter ("__base__": none), in inference only, as PEFT's LoRA does. The names reach the APT layers through
        per-thread state rather than hooks registered for the call, so threads sharing the model never see each
        other's names.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"`adapter_names` must be a list of str, one per sample, got {adapter_names!r}.")
        known = {name for layer in self.model.modules() if isinstance(layer, APTLayer) for name in layer.apt_prompt}
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            # generate() repeats each input num_beams times
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        previous = set_adapter_names(list(adapter_names))
        try:
            yield
        finally:
            set_adapter_names(previous)

    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_ERROR)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Refuse APT weights that do not fit this model instead of silently skipping or keeping random ones."""
        check_apt_state_dict(self, {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)})
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def find_language_model(model: nn.Module, holding: Optional[str] = None) -> Optional[tuple[str, nn.Module]]:
    """
    (path, module) of a vision-language model's language model: the outermost module named `language_model`, as
    transformers names it, else, in a model type of transformers' `AutoModelForImageTextToText`, the module its
    `get_decoder()` returns (Idefics3's `text_model`, BLIP's `text_decoder`, Git's whole model). None where there is
    neither, or where the module has no config. With `holding`, a module path: the language model holding it, or None.
    """
    if holding is None:
        modules = list(model.named_modules())
    else:  # the modules on the way to `holding`, outermost first
        parts = holding.split(".")
        paths = [".".join(parts[:depth]) for depth in range(1, len(parts))]
        modules = [("", model), *((path, _base_submodule(model, path)) for path in paths)]
    found = next(((path, module) for path, module in modules if path.rpartition(".")[2] == "language_model"), None)
    if (
        found is None
        and _model_type(model) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        and callable(getattr(model, "get_decoder", None))
    ):
        decoder = model.get_decoder()
        found = next(((path, module) for path, module in modules if module is decoder), None)
    if found is None or not hasattr(found[1], "config"):
        return None
    return found


def _model_type(model: nn.Module) -> Optional[str]:
    """`config.model_type`, or for a diffusers model (its config has none) the class name, as `get_model_config`."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def language_model_attentions(model: nn.Module) -> tuple[Optional[str], list[str]]:
    """
    The rule that finds APT's default targets in a vision-language model: (path of its language model, the paths of
    the language model's attention modules). An attention is a module whose class is named as one ("...Attention")
    with an output projection (`OUTPUT_PROJECTION_NAMES`) of the language model's hidden size; only the outermost of
    nested ones counts. Sub-models of another config type inside the language model (Git's and Idefics' image
    encoders) are skipped, and so is everything outside it: the vision tower and the projector are never matched.
    """
    found = find_language_model(model)
    if found is None:
        return None, []
    path, language_model = found
    config = language_model.config
    hidden_size = getattr(config.get_text_config(), "hidden_size", None)
    attentions: list[str] = []
    skipped: list[str] = []
    for name, module in language_model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in (*attentions, *skipped)):
            continue
        if isinstance(module, APTLayer):  # adapted already, by another adapter
            module = module.get_base_layer()
        own_type = getattr(getattr(module, "config", None), "model_type", config.model_type)
        if own_type != config.model_type:
            skipped.append(name)
        elif "Attention" in type(module).__name__ and _output_size(module) == hidden_size:
            attentions.append(name)
    return path, [f"{path}.{name}" if path else name for name in attentions]


def _output_size(attention: nn.Module) -> Optional[int]:
    """The output size of `attention`'s output projection (None: it has none), from its declared sizes."""
    projection_path = find_output_projection(attention)
    return None if projection_path is None else output_size(attention.get_submodule(projection_path))


def default_target_modules(model: nn.Module, model_type: Optional[str]) -> Union[str, set[str]]:
    """
    APT's default `target_modules` for `model`: its type's entry in the table, else its language model's attention
    modules (`language_model_attentions`) as a regex that matches exactly those, with block indices written `\\d+`
    where that matches no other module. A ValueError saying what to pass where there are neither.
    """
    if model_type in TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING:
        targets = TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING[model_type]
        # a regex stays a string (peft 0.18 would split it into a set of characters)
        return targets if isinstance(targets, str) else set(targets)
    reason = TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES.get(model_type)
    language_model, attentions = (None, []) if reason else language_model_attentions(model)
    if not attentions:
        if reason:
            because = f" ({reason})"
        elif language_model is None:
            because = (
                " (a vision-language model whose language model APT cannot find: no module named `language_model`, "
                "no `get_decoder()`)"
                if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
                else ""
            )
        else:
            because = (
                f" (its language model '{language_model}' has no attention module with an output projection of its "
                "hidden size)"
            )
        raise ValueError(
            f"APT has no default `target_modules` for model type {model_type!r}{because}. Pass the attention "
            "modules to adapt, by name or regex, e.g. `APTConfig(target_modules=['self_attn'])` or, in a "
            "vision-language model, `APTConfig(target_modules=r'.*language_model.*\\.self_attn')`: modules with an "
            f"output projection at one of {list(OUTPUT_PROJECTION_NAMES)}, or torch.nn.MultiheadAttention. Model "
            f"types with defaults: {sorted(TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING)} and vision-language "
            "models."
        )
    return exact_regex(attentions, [path for path, _ in model.named_modules()])


def exact_regex(paths: list[str], all_paths: list[str]) -> str:
    """A regex that fully matches `paths` and no other of `all_paths`: per module list, `list\\.\\d+\\.(names)`,
    or the indices themselves where `\\d+` would also match a module not in `paths` (a hybrid model's other mixers)."""
    groups: dict[str, dict[str, list[str]]] = {}
    patterns = []
    for path in paths:
        match = re.fullmatch(r"(.*?)\.(\d+)\.(.*)", path)
        if match is None:  # not in a module list
            patterns.append(re.escape(path))
            continue
        blocks, index, name = match.groups()
        groups.setdefault(blocks, {}).setdefault(name, []).append(index)
    for blocks, names in groups.items():
        names_pattern = "|".join(re.escape(name) for name in names)
        general = rf"{re.escape(blocks)}\.\d+\.{names_pattern if len(names) == 1 else f'({names_pattern})'}"
        wanted = {path for path in paths if path.startswith(f"{blocks}.")}
        if {path for path in all_paths if re.fullmatch(general, path)} == wanted:
            patterns.append(general)
        else:
            patterns += [
                rf"{re.escape(blocks)}\.({'|'.join(indexes)})\.{re.escape(name)}" for name, indexes in names.items()
            ]
    return "|".join(patterns)


def input_norm_candidates(model: nn.Module, attention_path: str) -> tuple[Optional[str], tuple[str, ...]]:
    """
    (model type, candidates of `TRANSFORMERS_MODELS_TO_APT_INPUT_NORMS`) for the attention at `attention_path`: the
    entry of the model's type; for a type without one, that of the innermost sub-model holding the attention with an
    entry (the config type of a vision-language model's language model or vision tower), else, inside the language
    model that `find_language_model` finds, `LANGUAGE_MODEL_INPUT_NORMS`. No candidates: X is calibrated as
    LayerNorm-sized.
    """
    model_type = _model_type(model)
    norms = TRANSFORMERS_MODELS_TO_APT_INPUT_NORMS.get(model_type)
    parts = attention_path.split(".")
    for depth in range(len(parts), 0, -1):
        if norms is not None:
            break
        module = _base_submodule(model, ".".join(parts[:depth]))
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        norms = TRANSFORMERS_MODELS_TO_APT_INPUT_NORMS.get(model_type)
    if norms is None:
        found = find_language_model(model, holding=attention_path)
        if found is None:
            return None, ()
        model_type, norms = found[1].config.model_type, LANGUAGE_MODEL_INPUT_NORMS
    return model_type, norms.get(attention_path.rpartition(".")[2], norms.get("*", ()))


def find_input_norm(model: nn.Module, attention_path: str, candidates: tuple[str, ...]) -> Optional[nn.Module]:
    """The first of `candidates` (see `TRANSFORMERS_MODELS_TO_APT_INPUT_NORMS`) found for `attention_path`."""
    parts = attention_path.split(".")
    indexes = [position for position, part in enumerate(parts) if part.isdigit()]
    block = ".".join(parts[: indexes[-1] + 1]) if indexes else attention_path.rpartition(".")[0]
    index = int(parts[indexes[-1]]) if indexes else 0
    previous = f"{block.rpartition('.')[0]}.{index - 1}" if index else None
    for candidate in candidates:
        if not previous and ("{previous}" in candidate or candidate.startswith("previous/")):
            continue
        if candidate.startswith("~"):
            suffix = candidate[1:].format(previous=index - 1)
            found = {path: module for path, module in _modules_by_base_path(model) if path.endswith(suffix)}
            if found:
                return found[max(found, key=lambda path: len(os.path.commonprefix([path, attention_path])))]
            continue
        scope, _, name = candidate.rpartition("/")
        norm = _base_submodule(model, f"{previous if scope == 'previous' else block}.{name}")
        if norm is not None:
            return norm
    return None


def _base_submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The module at `path` in the base model (through adapted attentions' base layers), or None."""
    module = model
    for name in path.split("."):
        if isinstance(module, APTLayer) and not hasattr(module, name):
            module = module.get_base_layer()
        module = getattr(module, name, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _modules_by_base_path(model: nn.Module):
    """(path in the base model, module) for every module: an adapted attention's children keep their paths."""
    for path, module in model.named_modules():
        yield path.replace(".base_layer.", ".").removesuffix(".base_layer"), module


_OTHER_ADAPTER_KEY = re.compile(rf"\.({'|'.join(APTLayer.adapter_layer_names)})(\.[^.]+){{2}}$")


def _tensor_key(name: str) -> str:
    """`module.apt_W1` from `module.apt_W1.<adapter name>`: PEFT leaves keys it cannot map without the name."""
    module_tensor = name.rpartition(".")[0]
    return module_tensor if module_tensor.rpartition(".")[2] in APTLayer.adapter_layer_names else name


def check_apt_state_dict(model: nn.Module, state_dict: dict) -> None:
    """
    Raise a ValueError naming the modules and shapes where APT weights in `state_dict` do not fit `model`.

    A loaded adapter must cover exactly the APT layers of the adapter names it carries: weights for modules the
    model lacks (other module names), other shapes (another hidden size, p or r) and missing modules are errors.
    """
    own = {name: tensor.shape for name, tensor in model.state_dict().items() if f".{APTModel.prefix}" in name}
    # peft < 0.20 saves every loaded adapter's tensors into each adapter file; those of the others arrive with two
    # names appended ("apt_W1.<new name>.<other name>") and are not part of the adapter being loaded
    incoming = {
        name: tensor.shape
        for name, tensor in state_dict.items()
        if f".{APTModel.prefix}" in name and not _OTHER_ADAPTER_KEY.search(name)
    }
    if not incoming:
        return
    adapter_names = {name.rpartition(".")[2] for name in incoming if _tensor_key(name) != name}
    problems = [f"{_tensor_key(name)}: the model has no such APT weight" for name in incoming if name not in own]
    problems += [
        f"{_tensor_key(name)}: shape {tuple(shape)} in the adapter, {tuple(own[name])} in the model"
        for name, shape in incoming.items()
        if name in own and shape != own[name]
    ]
    problems += [
        f"{_tensor_key(name)}: missing from the adapter"
        for name in own
        if name.rpartition(".")[2] in adapter_names and name not in incoming
    ]
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise ValueError(f"The APT adapter does not fit this model ({len(problems)} problems):\n  {shown}")
