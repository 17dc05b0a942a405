"""APT's defaults on every image-text-to-text model type of the installed transformers (`AutoModelForImageTextToText`):
each is built from its default config on the meta device (no weights, no memory), its default targets are resolved as
`get_peft_model` resolves them, and every resolved module must be an attention of the language model: an output
projection as wide as the text embeddings, a norm feeding it that the prompt calibration finds, and nothing of the
vision tower, the projector or another tower's encoder in its path."""

import functools
import importlib.util
import re

import pytest
import torch
import transformers
from transformers import AutoConfig
from transformers.initialization import no_init_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from peft_apt import APTConfig
from peft_apt.constants import TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES
from peft_apt.layer import find_output_projection
from peft_apt.model import APTModel, default_target_modules, find_input_norm, input_norm_candidates

pytestmark = pytest.mark.usefixtures("one_thread")

# Default configs that leave a field their model needs unset (aya_vision's: 1152 wide with 14 heads, which does not
# divide); checkpoints set them. These types are built with these fields set and nothing else changed.
UNSET_FIELDS = {
    "aya_vision": {"vision_config.num_attention_heads": 16},
    "chameleon": {"vocabulary_map": {}},
    "emu3": {"vocabulary_map": {}},
    "cohere_compass": {"text_config.rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "deepseek_ocr2": {"text_config.mlp_layer_types": ["dense"] * 32},
    "diffusion_gemma": {
        "text_config.num_experts": 8,
        "text_config.top_k_experts": 2,
        "text_config.moe_intermediate_size": 704,
    },
    "granite4_vision": {"deepstack_layer_map": [(-1, 0)], "downsample_rate": "4/8"},
    "hunyuan_vl": {"text_config.head_dim": 128},
    "qwen4_exp": {
        "text_config.indexer_n_heads": 8,
        "text_config.indexer_kv_heads": 1,
        "text_config.indexer_head_dim": 64,
        "text_config.indexer_budget": 2048,
        "text_config.indexer_compress_ratio": 4,
    },
}
# Types whose default config builds its vision tower with another library, measured where that library is installed.
OPTIONAL_DEPENDENCIES = {"fast_vlm": "timm", "gemma3n": "timm", "perception_lm": "timm"}
# Language models with attentions whose input X comes from no norm the calibration finds, so that it assumes a
# LayerNorm-sized X there (as for OLMo 2).
UNNORMALISED_INPUTS = {
    "exaone4_5": "post-norm blocks (EXAONE 4 normalises after its attention): X is the residual stream",
    **dict.fromkeys(
        ("inkling2", "inkling2_loop"),
        "its sliding-window blocks normalise the query, key and value inputs each on its own: X is the residual stream",
    ),
    "qwen4_exp": "hyper-connections: X is a learned mix of several residual streams, not one norm's output",
}
# Words naming the parts of a vision-language model that are not its language model: none may be in a resolved path.
NOT_LANGUAGE_MODEL = re.compile(
    r"vision|visual|image|video|audio|projector|connector|qformer|resampler|merger|patch|protein|vq", re.IGNORECASE
)

BUILT = sorted(
    model_type
    for model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    if importlib.util.find_spec(OPTIONAL_DEPENDENCIES.get(model_type, "torch")) is not None
)
WITHOUT_DEFAULTS = [model_type for model_type in BUILT if model_type in TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES]
MEASURED = [model_type for model_type in BUILT if model_type not in WITHOUT_DEFAULTS]


def build_on_meta(model_type: str) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type)
    for path, value in UNSET_FIELDS.get(model_type, {}).items():
        *parents, name = path.split(".")
        setattr(functools.reduce(getattr, parents, config), name, value)
    with torch.device("meta"), no_init_weights():
        return getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])(config)


def default_targets(model: torch.nn.Module, model_type: str) -> list[str]:
    """The modules `get_peft_model(model, APTConfig())` adapts."""
    config = APTConfig(target_modules=default_target_modules(model, model_type))
    return [name for name, _ in model.named_modules() if APTModel._check_target_module_exists(config, name)]


def text_width(model: torch.nn.Module) -> int:
    """The language model's hidden size, as its token embeddings have it."""
    try:
        return model.get_input_embeddings().embedding_dim
    except NotImplementedError:  # PP-FormulaNet
        return model.config.get_text_config().hidden_size


@pytest.mark.parametrize("model_type", MEASURED)
def test_defaults_are_the_language_models_attentions(model_type):
    model = build_on_meta(model_type)
    targets = default_targets(model, model_type)
    assert targets
    width = text_width(model)
    for path in targets:
        assert not NOT_LANGUAGE_MODEL.search(path), path
        attention = model.get_submodule(path)
        projection = attention.get_submodule(find_output_projection(attention))
        assert projection.out_features == width, (path, projection)
    without_norm = [
        path for path in targets if find_input_norm(model, path, input_norm_candidates(model, path)[1]) is None
    ]
    assert bool(without_norm) == (model_type in UNNORMALISED_INPUTS), without_norm


@pytest.mark.parametrize("model_type", WITHOUT_DEFAULTS)
def test_types_without_defaults_say_why(model_type):
    reason = TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES[model_type]
    with pytest.raises(ValueError, match=rf"model type '{model_type}' \({re.escape(reason)}\)\. Pass"):
        default_target_modules(build_on_meta(model_type), model_type)


def test_at_least_nine_in_ten_image_text_to_text_types_have_defaults():
    """The types not measured (an optional library missing) and those without defaults count against the rule."""
    without = set(TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES) & set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    assert len(set(MEASURED) - without) >= 0.9 * len(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
