"""Configuration of Approximated Prompt Tuning (APT) adapters."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from huggingface_hub import hf_hub_download
from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, PeftType

INIT_CHOICES = ("reference",)
MULTIPLIER_NAMES = ("prompt", "W2")
# the `multipliers` entry for every module without one of its own
ANY_MODULE = "*"


@dataclass
class APTConfig(PeftConfig):
    """
    Configuration of an [`APTModel`]: Approximated Prompt Tuning (Wu et al., arXiv 2306.15706).

    APT replaces the `num_prompts` learnable tokens that deep prompt tuning joins to every layer's sequence by a
    cheap approximation of their effect on each attention output, so prompts never enter the global attention.
    Each adapted attention module learns prompts `P` (`num_prompts` x d), a low-rank map `W1` (d x `r`) and `W2`
    (`r` x d), and a scalar log-scale `s`.

    Args:
        num_prompts (`int`, defaults to `200`):
            Number of approximated prompts per adapted attention module (p). The paper's tables use 200 for ViLT
            and METER; the authors' released ViLT script uses 50. Each prompt adds d parameters per module.
        r (`int`, defaults to `4`):
            Rank of the low-rank residual that maps prompts to their keys, `K = P + P @ W1 @ W2`. `0` disables
            the residual (keys equal prompts).
        target_modules (`Optional[Union[list[str], str]]`):
            The attention modules to adapt: a list of module names (a name matches a module whose path ends with
            it) or a regex that must match the whole path. APT adapts whole attention modules, such as ViLT's
            `attention`, CLIP's `self_attn`, or any `torch.nn.MultiheadAttention`; never a single projection. When
            `None`, the defaults for the model type are used (see `TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING`;
            a vision-language model without an entry gets its language model's attention modules).
            Where a name matches nested modules, only the outermost one is adapted.
        exclude_modules (`Optional[Union[list[str], str]]`):
            Module names or a regex of modules not to adapt.
        layers_to_transform (`Optional[Union[list[int], int]]`):
            Layer indexes to adapt; only used with a list of `target_modules`. All layers when `None`.
        layers_pattern (`Optional[Union[list[str], str]]`):
            Name of the `nn.ModuleList` holding the layers (for example `'layer'` or `'layers'`), used together
            with `layers_to_transform`.
        apt_dropout (`float`, defaults to `0.0`):
            Dropout probability on the prompt attention scores during training, as the reference code's `attn_drop`.
        init_weights (`Union[bool, Literal["reference"]]`, defaults to `True`):
            How to initialise and parametrise the adapter. `True` (default): the reference init with the prompts
            scaled so that the initial prompt term is a small fraction of a normalised input, and `P` and `W2`
            trained through fixed multipliers (`multipliers`) that bound each optimiser step's effect; the formula
            is the reference one (see docs/initialisation.md). `"reference"`: the authors' code exactly
            (`P ~ N(0, 0.02^2)`, `W1 ~ N(0, 1)`, `W2 = 0`, `s = 0`, every tensor trained as it is), to compare with
            the paper. `False`: every tensor random, including `W2` and `s`; for tests only.
        modules_to_save (`Optional[list[str]]`):
            Modules besides the APT layers to train and save, for example a new classification head.
        trainable_token_indices (`Optional[Union[list[int], dict[str, list[int]]]]`):
            Token indices whose embeddings train beside the adapter (PEFT's trainable tokens, as in `LoraConfig`),
            such as tokens added to the tokenizer: a list for the input embedding layer, or a dict from embedding
            module name to indices, e.g. `{"embed_tokens": [32000, 32001]}`. Only those rows are trained and saved.
            TRL's `SFTTrainer` fills it in when its chat template adds tokens.
        multipliers (`Optional[dict[str, dict[str, float]]]`):
            Filled in by APT; leave it unset. The fixed multipliers of each adapted module, keyed by its path:
            `{"prompt": c, "W2": k}` with P = c * apt_prompt and W2 = k * apt_W2 in the formula. They are recorded
            when the adapter is created and saved in adapter_config.json beside the tensors, which are saved as
            trained. The entry `"*"` applies to modules without one of their own: adapters saved by peft-apt 0.1,
            whose files hold the formula's P and W2, load with `{"*": {"prompt": 1.0, "W2": 1.0}}`.
    """

    num_prompts: int = field(default=200, metadata={"help": "Number of approximated prompts per adapted module."})
    r: int = field(
        default=4, metadata={"help": "Rank of the low-rank residual mapping prompts to keys; 0 disables it."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Attention modules to adapt: a list of names (matched on the end of the module path) or a regex "
                "matched on the whole path, for example ['attention'] or '.*layers\\.\\d+\\.self_attn'. "
                "None uses the model type's defaults."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules to leave untouched."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indexes to adapt (only with a list of target_modules)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the ModuleList holding the layers, used with layers_to_transform."}
    )
    apt_dropout: float = field(default=0.0, metadata={"help": "Dropout on the prompt attention scores."})
    init_weights: Union[bool, Literal["reference"]] = field(
        default=True,
        metadata={
            "help": (
                "True: the reference init with a small initial prompt term and fixed multipliers on P and W2 that "
                "keep training stable (default); 'reference': the authors' initialisation; False: random, for tests."
            )
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the APT layers to train and save, such as a new head."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={
            "help": (
                "Token indices whose embeddings train beside the adapter: a list for the input embeddings, or a dict "
                "from embedding module name to indices, e.g. {'embed_tokens': [32000, 32001]}."
            )
        },
    )
    multipliers: Optional[dict[str, dict[str, float]]] = field(
        default=None,
        metadata={"help": "Filled in by APT: each module's fixed multipliers of P and W2, saved with the adapter."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.APT
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if isinstance(self.num_prompts, bool) or not isinstance(self.num_prompts, int) or self.num_prompts <= 0:
            raise ValueError(f"`num_prompts` must be a positive integer, got {self.num_prompts!r}.")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"`r` must be a non-negative integer, got {self.r!r}.")
        if not 0.0 <= self.apt_dropout < 1.0:
            raise ValueError(f"`apt_dropout` must be in [0, 1), got {self.apt_dropout!r}.")
        if not isinstance(self.init_weights, bool) and self.init_weights not in INIT_CHOICES:
            raise ValueError(f"`init_weights` must be True, False or one of {INIT_CHOICES}, got {self.init_weights!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` is only used together with `layers_to_transform`; set both.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used with a regex `target_modules`; use a list of names.")
        for module, entry in (self.multipliers or {}).items():
            if not isinstance(entry, dict) or not set(entry) <= set(MULTIPLIER_NAMES):
                raise ValueError(f"`multipliers[{module!r}]` must map {MULTIPLIER_NAMES} to numbers, got {entry!r}.")
            for name, value in entry.items():
                if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                    raise ValueError(f"`multipliers[{module!r}][{name!r}]` must be a positive number, got {value!r}.")

    def module_multipliers(self, module: str) -> dict[str, float]:
        """This config's record of the multipliers of `module` (a path), created from the `"*"` entry if it has none."""
        return self.multipliers.setdefault(module, dict(self.multipliers.get(ANY_MODULE, {})))

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs):
        """Read adapter_config.json; one written by peft-apt 0.1 (no `multipliers`) holds the formula's tensors."""
        attributes = super().from_json_file(path_json_file, **kwargs)
        if "multipliers" not in attributes:
            attributes["multipliers"] = {ANY_MODULE: {"prompt": 1.0, "W2": 1.0}}
        return attributes

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load the config, after checking that the adapter weights are safetensors: APT never loads pickles."""
        hub_kwargs, _, _ = cls._split_kwargs(kwargs)
        _require_safetensors_weights(pretrained_model_name_or_path, subfolder, hub_kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)


def _require_safetensors_weights(model_id: str, subfolder: Optional[str], hub_kwargs: dict) -> None:
    """PEFT falls back to a pickled `adapter_model.bin` when no safetensors file exists; refuse that for APT."""
    directory = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(directory):
        if os.path.isfile(os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)):
            return
        reason = f"it holds {sorted(os.listdir(directory))}"
    else:
        try:
            hf_hub_download(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
            return
        except Exception as exc:  # not found, offline without a cached copy, no access, ...
            reason = f"{type(exc).__name__}: {exc}"
    raise ValueError(
        f"No {SAFETENSORS_WEIGHTS_NAME} found for the APT adapter at '{directory}' ({reason}). APT adapters load "
        "from safetensors only, never from pickled files such as adapter_model.bin."
    )
