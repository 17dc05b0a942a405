"""peft-apt: Approximated Prompt Tuning (APT, arXiv 2306.15706) as a PEFT tuner type.

Importing this package registers `PeftType.APT` with PEFT, in memory only, so that `get_peft_model`,
`PeftModel.from_pretrained`, `AutoPeftModel*` and `load_adapter` handle APT adapters.
It also makes the model cards of APT adapters complete, through `push_to_hub` too (see `peft_apt.hub`).
Where PEFT or diffusers assume LoRA-like layers (disk offload, diffusers' LoRA format), APT models take their own
path (see `peft_apt.integrations`).
"""

from importlib.metadata import version

from packaging.version import Version

MIN_PEFT_VERSION = "0.18.0"

if Version(version("peft")) < Version(MIN_PEFT_VERSION):
    raise ImportError(
        f"peft-apt needs peft>={MIN_PEFT_VERSION} (its tuner API changed before), found peft {version('peft')}. "
        "Upgrade with `pip install -U peft`."
    )

from aenum import extend_enum  # noqa: E402
from peft.mapping import (  # noqa: E402
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType, register_peft_method  # noqa: E402

from .config import APTConfig  # noqa: E402
from .constants import TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING  # noqa: E402
from .hub import install as _install_model_cards  # noqa: E402
from .integrations import install as _install_integrations  # noqa: E402
from .layer import APTLayer, approximated_prompt_output  # noqa: E402
from .model import APTModel  # noqa: E402

__version__ = "0.2.0.dev0"


def _register() -> None:
    """Add APT to PEFT's enum and registries; a repeated import (or reload) replaces its own earlier entries."""
    if "APT" not in PeftType.__members__:
        extend_enum(PeftType, "APT", "APT")
    for mapping in (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
    ):
        mapping.pop(PeftType.APT, None)
    register_peft_method(name="apt", config_cls=APTConfig, model_cls=APTModel, prefix=APTModel.prefix)
    _install_model_cards()
    _install_integrations()


_register()

__all__ = [
    "APTConfig",
    "APTLayer",
    "APTModel",
    "TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING",
    "approximated_prompt_output",
]
