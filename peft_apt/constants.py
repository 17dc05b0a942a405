"""Where APT attaches in each model family: the one table of per-model defaults."""

# Default `target_modules` per `config.model_type`. Each entry names the attention module of a block, the module
# whose input is the query-side hidden states X and whose output projection produces O. A list matches on the end
# of a module path (and then only the outermost match is adapted, so ViLT's `attention` never also adapts the nested
# `attention.attention`); a string is a regex on the whole path. Composite models (CLIP, SigLIP) get every tower whose
# attention matches; encoder-decoders get the encoder's self-attention and the decoder's self- and cross-attention,
# where X is the decoder stream. Vision-language models without an entry get their language model's attention modules
# by a rule (`language_model_attentions` in model.py); an entry here is for a model where that rule is wrong.
TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING: dict[str, list[str] | str] = {
    "vilt": ["attention"],
    # METER's architecture; its reference adapts the co-attention layers only, not the unimodal encoders.
    "bridgetower": r"(.*\.)?cross_modal_(text|image)_layers\.\d+\.(attention|crossattention)",
    "clip": ["self_attn"],
    "clip_text_model": ["self_attn"],
    "clip_vision_model": ["self_attn"],
    "siglip": ["self_attn"],
    "siglip_text_model": ["self_attn"],
    "siglip_vision_model": ["self_attn"],
    "vit": ["attention"],
    "deit": ["attention"],
    "dinov2": ["attention"],
    "bert": ["attention"],
    "roberta": ["attention"],
    "xlm-roberta": ["attention"],
    "electra": ["attention"],
    "layoutlm": ["attention"],
    "deberta": ["attention"],
    "deberta-v2": ["attention"],
    "llama": ["self_attn"],
    "llama4_text": ["self_attn"],
    "mistral": ["self_attn"],
    "mixtral": ["self_attn"],
    "qwen2": ["self_attn"],
    "qwen3": ["self_attn"],
    "qwen3_moe": ["self_attn"],
    "gemma": ["self_attn"],
    "gemma2": ["self_attn"],
    "gemma3_text": ["self_attn"],
    "gemma4_text": ["self_attn"],
    "phi": ["self_attn"],
    "phi3": ["self_attn"],
    "olmo2": ["self_attn"],
    "granite": ["self_attn"],
    "smollm3": ["self_attn"],
    "stablelm": ["self_attn"],
    "opt": ["self_attn"],
    "gpt2": ["attn"],
    "gpt_bigcode": ["attn"],
    "gptj": ["attn"],
    "codegen": ["attn"],
    "mpt": ["attn"],
    # `attn` wraps the attention that holds the projections
    "gpt_neo": ["attention"],
    "gpt_neox": ["attention"],
    "bloom": ["self_attention"],
    "falcon": ["self_attention"],
    "t5": ["SelfAttention", "EncDecAttention"],
    "mt5": ["SelfAttention", "EncDecAttention"],
    "bart": ["self_attn", "encoder_attn"],
    "mbart": ["self_attn", "encoder_attn"],
    "whisper": ["self_attn", "encoder_attn"],
    # vision-language encoder-decoders whose text and image tokens meet in the encoder, which the rule (the language
    # model that `get_decoder()` returns) would miss: UDOP's one T5 stack takes the image patches with the text, and
    # T5Gemma 2's encoder merges the image tokens into its text model (its vision tower's attentions are `self_attn`
    # too, hence the regex)
    "udop": ["SelfAttention", "EncDecAttention"],
    "t5gemma2": r"model\.(encoder\.text_model|decoder)\.layers\.\d+\.self_attn",
    # diffusers models have no `model_type`; APT knows them by class name (see `APTModel.get_model_config`).
    # `attn1` is the self-attention and `attn2` the cross-attention of each transformer block; X is the query stream.
    "UNet2DConditionModel": ["attn1", "attn2"],
}

# The norm whose output is an attention's input X, per model type and attention name (the last part of the module's
# path; "*" for any): the default init calibrates the prompts on the size of that norm's output, so the initial term
# is the same fraction of X in every family (`APTModel.input_norm`, `layer.normalised_input_size`). Candidates are
# tried in order:
#   "name"           `name` in the attention's block (the entry of the module list that holds the attention)
#   "previous/name"  `name` in the block before it (post-LN stacks: X is the previous block's output norm)
#   "~suffix"        the module whose path ends with `suffix` and shares the longest prefix with the attention's path
#                    (the embeddings' norm feeding a post-LN stack's first block); `{previous}` is the block's index - 1
# The entry of the model's own type is used; for a type without one, the entry of the innermost sub-model holding the
# attention (a vision-language model's language model or vision tower, by its config's model type), and in a
# language model found by the rule of `language_model_attentions`, LANGUAGE_MODEL_INPUT_NORMS. Attentions with none
# of these, and those whose X is not normalised (OLMo 2 normalises after its attention, so X is the residual stream),
# are calibrated for a LayerNorm-sized X (||X|| = sqrt(d)).
_PRE_LN = ("input_layernorm",)
_POST_LN_ENCODER = ("previous/output.LayerNorm", "~embeddings.LayerNorm")
TRANSFORMERS_MODELS_TO_APT_INPUT_NORMS: dict[str, dict[str, tuple[str, ...]]] = {
    **dict.fromkeys(("vilt", "vit", "deit"), {"*": ("layernorm_before",)}),
    "dinov2": {"*": ("norm1",)},
    **dict.fromkeys(
        ("clip", "clip_text_model", "clip_vision_model", "siglip", "siglip_text_model", "siglip_vision_model"),
        {"*": ("layer_norm1",)},
    ),
    **dict.fromkeys(
        ("bert", "roberta", "xlm-roberta", "electra", "layoutlm", "deberta", "deberta-v2"), {"*": _POST_LN_ENCODER}
    ),
    "bridgetower": {
        # each co-attention layer after the first reads the link tower joining the unimodal and cross-modal streams
        "attention": ("~link_tower.{previous}.LayerNorm", "~_layernorm"),
        "crossattention": ("attention.output.LayerNorm",),
        "attn": ("ln_1",),  # the CLIP-style vision tower, when targeted
    },
    **dict.fromkeys(
        (
            "llama",
            "llama4_text",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "gemma4_text",
            "phi",
            "phi3",
            "granite",
            "smollm3",
            "stablelm",
            "gpt_neox",
            "bloom",
        ),
        {"*": _PRE_LN},
    ),
    "llama4_vision_model": {"*": _PRE_LN},
    "falcon": {"*": (*_PRE_LN, "ln_attn")},
    "olmo2": {},
    "opt": {"*": ("self_attn_layer_norm",)},
    **dict.fromkeys(("gpt2", "gpt_bigcode", "gptj", "codegen", "gpt_neo"), {"*": ("ln_1",)}),
    "mpt": {"*": ("norm_1",)},
    **dict.fromkeys(("t5", "mt5", "udop"), {"*": ("layer_norm",)}),
    **dict.fromkeys(("t5gemma2_encoder", "t5gemma2_decoder"), {"*": ("pre_self_attn_layernorm",)}),
    "bart": {
        "self_attn": ("previous/final_layer_norm", "~layernorm_embedding"),
        "encoder_attn": ("self_attn_layer_norm",),
    },
    **dict.fromkeys(
        ("mbart", "whisper"),
        {"self_attn": ("self_attn_layer_norm",), "encoder_attn": ("encoder_attn_layer_norm",)},
    ),
    "UNet2DConditionModel": {"attn1": ("norm1",), "attn2": ("norm2",)},
}
# The language model of a vision-language model, whatever its type: most are pre-norm decoders whose attention reads
# `input_layernorm` (the other names are those of the families that name it otherwise); BERT-style post-LN text
# decoders (BLIP's, Git's) read the previous block's output norm, and their cross-attention the self-attention's.
LANGUAGE_MODEL_INPUT_NORMS: dict[str, tuple[str, ...]] = {
    "*": (*_PRE_LN, "attention_layernorm", "self_attn_layer_norm", "operator_norm", "norm", *_POST_LN_ENCODER),
    "encoder_attn": ("encoder_attn_layer_norm",),
    "crossattention": ("attention.output.LayerNorm",),
}

# Model types with LoRA defaults in PEFT that APT gives none, and why: the error for `target_modules=None` says so.
TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES: dict[str, str] = {
    "rwkv": "RWKV has no attention: its time mixing is a recurrence over token-shifted inputs, with no query-side X",
    "nemotron_h": "its attention and Mamba blocks are all named `mixer`, so no module name picks out the attention",
    "pix2struct": "its attentions' output projection is called `output`, a name APT does not look for (RWKV's time "
    "mixing, which is no attention, has one too)",
    **{
        model_type: "not a transformers model (remote code): pass the attention modules of its code"
        for model_type in ("chatglm", "btlm", "RefinedWeb", "RefinedWebModel", "rwkv7")
    },
}

# Paths, relative to an attention module, of the projection whose output is O, tried in this order (so a family
# resolved by an earlier name never changes when a later one is added). APT adds its term to that output, so it
# lands before the block's dropout, residual and (post-LN) LayerNorm. `torch.nn.MultiheadAttention` applies its
# `out_proj` functionally; there O is the module's own output[0]. `o_proj.linear` is a gated projection's weight (the
# gate acts on its input).
OUTPUT_PROJECTION_NAMES: tuple[str, ...] = (
    "output.dense",
    "o_proj",
    "out_proj",
    "to_out.0",
    "o",
    "dense",
    "c_proj",
    "o_proj.linear",
)
