"""Where APT attaches in each model family: the one table of per-model defaults."""

# Default `target_modules` per `config.model_type`. Each entry names the attention module of a block, the module
# whose input is the query-side hidden states X and whose output projection produces O. A list matches on the end
# of a module path (and then only the outermost match is adapted, so ViLT's `attention` never also adapts the nested
# `attention.attention`); a string is a regex on the whole path.
TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING: dict[str, list[str] | str] = {
    "vilt": ["attention"],
    # METER's architecture; its reference adapts the co-attention layers only, not the unimodal encoders.
    "bridgetower": r"(.*\.)?cross_modal_(text|image)_layers\.\d+\.(attention|crossattention)",
    "clip": ["self_attn"],
    "clip_text_model": ["self_attn"],
    "clip_vision_model": ["self_attn"],
    "vit": ["attention"],
    "dinov2": ["attention"],
    "bert": ["attention"],
    "roberta": ["attention"],
    "llama": ["self_attn"],
    "mistral": ["self_attn"],
    "qwen2": ["self_attn"],
    # diffusers models have no `model_type`; APT knows them by class name (see `APTModel.get_model_config`).
    # `attn1` is the self-attention and `attn2` the cross-attention of each transformer block; X is the query stream.
    "UNet2DConditionModel": ["attn1", "attn2"],
}

# Paths, relative to an attention module, of the projection whose output is O, tried in this order. APT adds its
# term to that output, so it lands before the block's dropout, residual and (post-LN) LayerNorm.
# `torch.nn.MultiheadAttention` applies its `out_proj` functionally; there O is the module's own output[0].
OUTPUT_PROJECTION_NAMES: tuple[str, ...] = ("output.dense", "o_proj", "out_proj", "to_out.0")
