"""Tiny random models of every supported family, built from configs (no download), with inputs and, written here
independently of the library, where APT must attach in each: the attention modules and their output projections.

transformers 5.x releases renamed the modules of some families (ViT's `encoder.layer.N.attention` with `output.dense`
became `layers.N.attention` with `o_proj`; DINOv2's projections became `o_proj` in 5.18). Such a family lists both
layouts; the model built by the installed release must match exactly one of them, whole, and the tests then expect
exactly that one's modules adapted and the term at that one's output projection."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
import transformers as T
from transformers.pytorch_utils import Conv1D

SMALL = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)


@dataclass
class Layout:
    attention_paths: list[str]  # the modules the defaults must adapt, in model order
    # relative path of the output projection ("" = the module's own output[0]), or one per attention path
    projection: str | list[str]

    def projection_of(self, path: str) -> str:
        if isinstance(self.projection, str):
            return self.projection
        return self.projection[self.attention_paths.index(path)]

    def describes(self, model: torch.nn.Module) -> bool:
        """Every attention path is there, and its output projection is a Linear or GPT-2's transposed `Conv1D` (or,
        for "", the attention is a `nn.MultiheadAttention`, which applies its `out_proj` functionally)."""
        modules = dict(model.named_modules())
        for path in self.attention_paths:
            projection = self.projection_of(path)
            if path not in modules:
                return False
            if not projection:
                if not isinstance(modules[path], torch.nn.MultiheadAttention):
                    return False
            elif not isinstance(modules.get(f"{path}.{projection}"), (torch.nn.Linear, Conv1D)):
                return False
        return True


@dataclass
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]
    layouts: list[Layout]  # one per module naming that a supported transformers release builds
    hidden_size: int | list[int]  # d of each adapted module (one value for all, or one per attention path)
    query_argument: str = "hidden_states"
    task_type: str | None = None  # the generating task ("CAUSAL_LM", "SEQ_2_SEQ_LM") of the model built

    @cached_property
    def layout(self) -> Layout:
        """The one layout that describes the model this installed release builds."""
        with torch.random.fork_rng():
            model = self.build()
        matches = [layout for layout in self.layouts if layout.describes(model)]
        assert len(matches) == 1, f"{self.name}: {len(matches)} of the expected layouts describe the model, not one"
        return matches[0]

    @property
    def attention_paths(self) -> list[str]:
        return self.layout.attention_paths

    def projection_of(self, path: str) -> str:
        return self.layout.projection_of(path)

    @property
    def hidden_sizes(self) -> list[int]:
        if isinstance(self.hidden_size, int):
            return [self.hidden_size] * len(self.attention_paths)
        return self.hidden_size


def _text(vocab=99, length=7, batch=2, mask=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    out = {"input_ids": ids}
    if mask:
        attention_mask = torch.ones(batch, length, dtype=torch.long)
        attention_mask[1, -2:] = 0
        out["attention_mask"] = attention_mask
    return out


def _pixels(size=32, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


# CLIP's and SigLIP's whole models: a text tower of width 32 and a vision tower of width 48, two blocks each
TWO_TOWERS = (
    [
        Layout(
            [f"{tower}_model.encoder.layers.{i}.self_attn" for tower in ("text", "vision") for i in range(2)],
            "out_proj",
        )
    ],
    [32, 32, 48, 48],
)


def _seeded(fn):
    def build():
        torch.manual_seed(0)
        return fn().eval()

    return build


def _layers(pattern, n=2):
    return [pattern.format(i) for i in range(n)]


# token ids inside the tiny vocabulary, for configs whose defaults lie outside it
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# the vision tower of the composite models (CLIP, SigLIP, Gemma 3)
VISION_TOWER = dict(hidden_size=48, image_size=32, patch_size=8, **SMALL)
# GPT-2-style configs name their sizes n_embd, n_layer and n_head
GPT_SIZES = dict(n_embd=32, n_layer=2, vocab_size=99, **TOKENS)
IMAGE_TOKEN = 98
GEMMA4_TEXT = dict(
    head_dim=16,
    global_head_dim=16,
    vocab_size_per_layer_input=99,
    hidden_size_per_layer_input=8,
    layer_types=["sliding_attention", "full_attention"],
)


def _decoder(name, config_cls, model_cls, projection="o_proj", **config):
    """A causal LM whose blocks are `model.layers.N.self_attn`."""
    return Family(
        name,
        _seeded(
            lambda: model_cls(config_cls(hidden_size=32, num_key_value_heads=1, vocab_size=99, **{**SMALL, **config}))
        ),
        lambda: _text(mask=False),
        [Layout(_layers("model.layers.{}.self_attn"), projection)],
        32,
        task_type="CAUSAL_LM",
    )


def _t5_config():
    return dict(d_model=32, d_kv=16, d_ff=37, num_layers=2, num_heads=2, vocab_size=99, decoder_start_token_id=0)


def _bart_config():
    return dict(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        vocab_size=99,
        decoder_start_token_id=2,
        **TOKENS,
    )


def _encoder_decoder_paths(prefix):
    """BART-style: each encoder layer's `self_attn`, each decoder layer's `self_attn` and `encoder_attn`."""
    decoder = [f"{prefix}decoder.layers.{i}.{kind}" for i in range(2) for kind in ("self_attn", "encoder_attn")]
    return [*_layers(prefix + "encoder.layers.{}.self_attn"), *decoder]


def _decoder_ids(batch=2, length=5):
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(3))


def _seq2seq_text():
    return {**_text(), "decoder_input_ids": _decoder_ids()}


def _speech(batch=2):
    """Whisper: 8 mel bins over 32 frames (twice `max_source_positions`), and decoder tokens."""
    features = torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(4))
    return {"input_features": features, "decoder_input_ids": _decoder_ids(batch)}


def _never_generating_image_tokens(build):
    """A generated image placeholder would count as one more image token when fed back (generation without the cache
    feeds the whole sequence again)."""

    def built(*args):
        model = build(*args)
        model.generation_config.suppress_tokens = [IMAGE_TOKEN]
        return model

    return built


def _text_with_image_tokens(num_image_tokens, batch=2):
    """Text whose first tokens are the image's placeholders, and the image."""
    inputs = _text(vocab=IMAGE_TOKEN, length=num_image_tokens + 5, batch=batch, mask=False)
    inputs["input_ids"][:, :num_image_tokens] = IMAGE_TOKEN
    return {**inputs, "pixel_values": _pixels(batch=batch)}


def _gemma4_families() -> dict:
    return {
        "gemma4_text": _decoder("gemma4_text", T.Gemma4TextConfig, T.Gemma4ForCausalLM, **GEMMA4_TEXT),
        # only the language model is adapted, so text alone runs every adapted module
        "gemma4": Family(
            "gemma4",
            _seeded(
                lambda: T.Gemma4ForConditionalGeneration(
                    T.Gemma4Config(
                        text_config=dict(hidden_size=32, num_key_value_heads=1, vocab_size=99, **SMALL, **GEMMA4_TEXT),
                        vision_config=dict(hidden_size=32, head_dim=16, **SMALL),
                        audio_config=None,
                    )
                )
            ),
            lambda: _text(mask=False),
            [Layout(_layers("model.language_model.layers.{}.self_attn"), "o_proj")],
            32,
            task_type="CAUSAL_LM",
        ),
    }


FAMILIES = {
    "vilt": Family(
        "vilt",
        _seeded(
            lambda: T.ViltModel(
                T.ViltConfig(hidden_size=32, image_size=32, patch_size=8, max_image_length=-1, vocab_size=99, **SMALL)
            )
        ),
        lambda: {**_text(), "pixel_values": _pixels()},
        [Layout(_layers("encoder.layer.{}.attention"), "output.dense")],
        32,
    ),
    "bert": Family(
        "bert",
        _seeded(lambda: T.BertModel(T.BertConfig(hidden_size=32, vocab_size=99, **SMALL))),
        _text,
        [Layout(_layers("encoder.layer.{}.attention"), "output.dense")],
        32,
    ),
    "roberta": Family(
        "roberta",
        _seeded(lambda: T.RobertaModel(T.RobertaConfig(hidden_size=32, vocab_size=99, **SMALL))),
        _text,
        [Layout(_layers("encoder.layer.{}.attention"), "output.dense")],
        32,
    ),
    "bridgetower": Family(
        "bridgetower",
        _seeded(
            lambda: T.BridgeTowerModel(
                T.BridgeTowerConfig(
                    text_config=dict(hidden_size=64, vocab_size=99, **SMALL),
                    vision_config=dict(hidden_size=64, num_hidden_layers=2, image_size=32, patch_size=8),
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    intermediate_size=37,
                )
            )
        ),
        lambda: {**_text(), "pixel_values": _pixels()},
        [
            Layout(
                [
                    f"cross_modal_{side}_layers.{i}.{kind}"
                    for side in ("image", "text")
                    for i in range(2)
                    for kind in ("attention", "crossattention")
                ],
                "output.dense",
            )
        ],
        64,
    ),
    "clip": Family(
        "clip",
        _seeded(
            lambda: T.CLIPModel(
                T.CLIPConfig(
                    text_config=dict(hidden_size=32, vocab_size=99, bos_token_id=0, eos_token_id=2, **SMALL),
                    vision_config=VISION_TOWER,
                    projection_dim=16,
                )
            )
        ),
        lambda: {**_text(), "pixel_values": _pixels()},
        *TWO_TOWERS,
    ),
    "clip_vision_model": Family(
        "clip_vision_model",
        _seeded(lambda: T.CLIPVisionModel(T.CLIPVisionConfig(hidden_size=48, image_size=32, patch_size=8, **SMALL))),
        lambda: {"pixel_values": _pixels()},
        [
            Layout(_layers("encoder.layers.{}.self_attn"), "out_proj"),  # newer transformers releases
            Layout(_layers("vision_model.encoder.layers.{}.self_attn"), "out_proj"),
        ],
        48,
    ),
    "clip_text_model": Family(
        "clip_text_model",
        _seeded(
            lambda: T.CLIPTextModel(
                T.CLIPTextConfig(hidden_size=32, vocab_size=99, bos_token_id=0, eos_token_id=2, **SMALL)
            )
        ),
        _text,
        [
            Layout(_layers("encoder.layers.{}.self_attn"), "out_proj"),  # newer transformers releases
            Layout(_layers("text_model.encoder.layers.{}.self_attn"), "out_proj"),
        ],
        32,
    ),
    **{
        name: Family(
            name,
            _seeded(
                lambda model=model, config=config: model(config(hidden_size=32, image_size=32, patch_size=8, **SMALL))
            ),
            lambda: {"pixel_values": _pixels()},
            [
                Layout(_layers("layers.{}.attention"), "o_proj"),  # newer transformers releases
                Layout(_layers("encoder.layer.{}.attention"), "output.dense"),
            ],
            32,
        )
        for name, model, config in [("vit", T.ViTModel, T.ViTConfig), ("deit", T.DeiTModel, T.DeiTConfig)]
    },
    "dinov2": Family(
        "dinov2",
        _seeded(lambda: T.Dinov2Model(T.Dinov2Config(hidden_size=32, image_size=32, patch_size=8, **SMALL))),
        lambda: {"pixel_values": _pixels()},
        [
            Layout(_layers("encoder.layer.{}.attention"), "o_proj"),  # from transformers 5.18 on
            Layout(_layers("encoder.layer.{}.attention"), "output.dense"),
        ],
        32,
    ),
    **{
        name: _decoder(name, config_cls, model_cls, **config)
        for name, config_cls, model_cls, config in [
            ("llama", T.LlamaConfig, T.LlamaForCausalLM, {}),
            ("mistral", T.MistralConfig, T.MistralForCausalLM, {}),
            ("qwen2", T.Qwen2Config, T.Qwen2ForCausalLM, {}),
            ("qwen3", T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 16}),
            (
                "qwen3_moe",
                T.Qwen3MoeConfig,
                T.Qwen3MoeForCausalLM,
                {"head_dim": 16, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16},
            ),
            ("mixtral", T.MixtralConfig, T.MixtralForCausalLM, {"num_local_experts": 2, "intermediate_size": 32}),
            ("gemma", T.GemmaConfig, T.GemmaForCausalLM, {"head_dim": 16}),
            ("gemma2", T.Gemma2Config, T.Gemma2ForCausalLM, {"head_dim": 16}),
            ("gemma3_text", T.Gemma3TextConfig, T.Gemma3ForCausalLM, {"head_dim": 16}),
            ("phi3", T.Phi3Config, T.Phi3ForCausalLM, TOKENS),
            ("olmo2", T.Olmo2Config, T.Olmo2ForCausalLM, TOKENS),
            ("granite", T.GraniteConfig, T.GraniteForCausalLM, {}),
            ("smollm3", T.SmolLM3Config, T.SmolLM3ForCausalLM, TOKENS),
            ("stablelm", T.StableLmConfig, T.StableLmForCausalLM, TOKENS),
            (
                "llama4_text",
                T.Llama4TextConfig,
                T.Llama4ForCausalLM,
                {"head_dim": 16, "num_local_experts": 2, "intermediate_size": 32, "intermediate_size_mlp": 37},
            ),
        ]
    },
    "phi": _decoder("phi", T.PhiConfig, T.PhiForCausalLM, projection="dense", **TOKENS),
    **(_gemma4_families() if hasattr(T, "Gemma4Config") else {}),  # Gemma 4 came with a later transformers 5.x
    **{
        name: Family(
            name,
            _seeded(lambda build=build: build()),
            lambda: _text(mask=False),
            [Layout(_layers(attention), projection)],
            32,
            task_type="CAUSAL_LM",
        )
        for name, build, attention, projection in [
            (
                "gpt2",
                lambda: T.GPT2LMHeadModel(T.GPT2Config(n_head=2, **GPT_SIZES)),
                "transformer.h.{}.attn",
                "c_proj",
            ),
            (
                "gpt_bigcode",
                lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(n_head=2, **GPT_SIZES)),
                "transformer.h.{}.attn",
                "c_proj",
            ),
            (
                "gptj",
                lambda: T.GPTJForCausalLM(T.GPTJConfig(n_head=2, rotary_dim=8, **GPT_SIZES)),
                "transformer.h.{}.attn",
                "out_proj",
            ),
            (
                "codegen",
                lambda: T.CodeGenForCausalLM(
                    # 4 heads: transformers 5.0 splits them over 4 groups
                    T.CodeGenConfig(n_head=4, rotary_dim=8, **GPT_SIZES)
                ),
                "transformer.h.{}.attn",
                "out_proj",
            ),
            (
                "gpt_neo",
                lambda: T.GPTNeoForCausalLM(
                    T.GPTNeoConfig(
                        hidden_size=32,
                        num_layers=2,
                        num_heads=2,
                        attention_types=[[["global", "local"], 1]],
                        window_size=4,
                        vocab_size=99,
                        **TOKENS,
                    )
                ),
                "transformer.h.{}.attn.attention",
                "out_proj",
            ),
            (
                "gpt_neox",
                lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=32, vocab_size=99, **SMALL, **TOKENS)),
                "gpt_neox.layers.{}.attention",
                "dense",
            ),
            (
                "bloom",
                lambda: T.BloomForCausalLM(T.BloomConfig(hidden_size=32, n_layer=2, n_head=2, vocab_size=99, **TOKENS)),
                "transformer.h.{}.self_attention",
                "dense",
            ),
            (
                "falcon",
                lambda: T.FalconForCausalLM(
                    T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=99, **TOKENS)
                ),
                "transformer.h.{}.self_attention",
                "dense",
            ),
            (
                "mpt",
                lambda: T.MptForCausalLM(T.MptConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=99, **TOKENS)),
                "transformer.blocks.{}.attn",
                "out_proj",
            ),
            (
                "opt",
                lambda: T.OPTForCausalLM(
                    T.OPTConfig(
                        hidden_size=32,
                        num_hidden_layers=2,
                        num_attention_heads=2,
                        ffn_dim=37,
                        word_embed_proj_dim=32,
                        vocab_size=99,
                        **TOKENS,
                    )
                ),
                "model.decoder.layers.{}.self_attn",
                "out_proj",
            ),
        ]
    },
    **{
        name: Family(
            name,
            _seeded(lambda config_cls=config_cls, model_cls=model_cls: model_cls(config_cls(**_t5_config()))),
            _seq2seq_text,
            [
                Layout(
                    [
                        *_layers("encoder.block.{}.layer.0.SelfAttention"),
                        *(
                            f"decoder.block.{i}.layer.{j}.{kind}"
                            for i in range(2)
                            for j, kind in enumerate(["SelfAttention", "EncDecAttention"])
                        ),
                    ],
                    "o",
                )
            ],
            32,
            task_type="SEQ_2_SEQ_LM",
        )
        for name, config_cls, model_cls in [
            ("t5", T.T5Config, T.T5ForConditionalGeneration),
            ("mt5", T.MT5Config, T.MT5ForConditionalGeneration),
        ]
    },
    **{
        name: Family(
            name,
            _seeded(
                lambda config_cls=config_cls, model_cls=model_cls, extra=extra: model_cls(
                    config_cls(**_bart_config(), **extra)
                )
            ),
            inputs,
            [Layout(_encoder_decoder_paths("model."), "out_proj")],
            32,
            task_type="SEQ_2_SEQ_LM",
        )
        for name, config_cls, model_cls, extra, inputs in [
            ("bart", T.BartConfig, T.BartForConditionalGeneration, {}, _seq2seq_text),
            ("mbart", T.MBartConfig, T.MBartForConditionalGeneration, {}, _seq2seq_text),
            (
                "whisper",
                T.WhisperConfig,
                T.WhisperForConditionalGeneration,
                {"num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 32},
                _speech,
            ),
        ]
    },
    **{
        name: Family(
            name,
            _seeded(lambda build=build: build()),
            _text,
            [Layout(_layers("encoder.layer.{}.attention"), "output.dense")],
            32,
        )
        for name, build in [
            ("xlm-roberta", lambda: T.XLMRobertaModel(T.XLMRobertaConfig(hidden_size=32, vocab_size=99, **SMALL))),
            (
                "electra",
                lambda: T.ElectraModel(T.ElectraConfig(hidden_size=32, embedding_size=16, vocab_size=99, **SMALL)),
            ),
            ("layoutlm", lambda: T.LayoutLMModel(T.LayoutLMConfig(hidden_size=32, vocab_size=99, **SMALL))),
            ("deberta", lambda: T.DebertaModel(T.DebertaConfig(hidden_size=32, vocab_size=99, **SMALL))),
            ("deberta-v2", lambda: T.DebertaV2Model(T.DebertaV2Config(hidden_size=32, vocab_size=99, **SMALL))),
        ]
    },
    "siglip": Family(
        "siglip",
        _seeded(
            lambda: T.SiglipModel(
                T.SiglipConfig(
                    # the text head projects to the vision width, so that the towers' embeddings compare
                    text_config=dict(hidden_size=32, projection_size=48, vocab_size=99, **SMALL, **TOKENS),
                    vision_config=VISION_TOWER,
                )
            )
        ),
        lambda: {**_text(), "pixel_values": _pixels()},
        *TWO_TOWERS,
    ),
    "gemma3": Family(
        "gemma3",
        _seeded(
            lambda: _never_generating_image_tokens(T.Gemma3ForConditionalGeneration)(
                T.Gemma3Config(
                    text_config=dict(hidden_size=32, head_dim=16, num_key_value_heads=1, vocab_size=99, **SMALL),
                    vision_config=VISION_TOWER,
                    mm_tokens_per_image=4,
                    image_token_index=IMAGE_TOKEN,
                )
            )
        ),
        lambda: _text_with_image_tokens(4),
        # the language model only, as in every vision-language model: the SigLIP tower stays frozen
        [Layout(_layers("model.language_model.layers.{}.self_attn"), "o_proj")],
        32,
        task_type="CAUSAL_LM",
    ),
}

# nn.MultiheadAttention, sequence-first, reached with an explicit regex: BridgeTower's vision tower.
MHA_FAMILY = Family(
    "bridgetower_vision_mha",
    FAMILIES["bridgetower"].build,
    FAMILIES["bridgetower"].inputs,
    [Layout(_layers("vision_model.visual.transformer.resblocks.{}.attn"), "")],
    64,
    query_argument="query",
)


# Vision-language (image-text-to-text) models: a language model of width 32 and a vision tower of width 48 (so that a
# vision module adapted by mistake would show in the shapes), two blocks each, images of 32 x 32 pixels. Each input
# starts with as many image placeholders as the model makes image tokens from one image, then 5 text tokens.
VLM_TEXT = dict(hidden_size=32, num_key_value_heads=1, vocab_size=99, **SMALL, **TOKENS)
VLM_VISION = dict(hidden_size=48, image_size=32, patch_size=8, **SMALL)
# Qwen-VL: 4 x 4 patches of 4 x 4 pixels over 2 frames, merged 2 x 2 into 4 image tokens; multimodal rotary sections
# of head_dim / 2 = 8
QWEN_GRID = torch.tensor([[1, 4, 4], [1, 4, 4]])
QWEN_ROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
QWEN_VISION = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
# BLIP-2 and InstructBLIP: a 4-query Q-Former over the vision tower, and OPT as the language model
BLIP_QFORMER = dict(hidden_size=32, encoder_hidden_size=48, vocab_size=99, **SMALL)
BLIP_OPT = dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=37, vocab_size=99)


def _image_prompts(num_image_tokens: int, **image_inputs) -> Callable[[], dict]:
    def inputs():
        text = _text_with_image_tokens(num_image_tokens)
        return {"input_ids": text["input_ids"], **image_inputs}

    return inputs


def _images(*shape) -> torch.Tensor:
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))


def _qwen_inputs() -> dict:
    input_ids = _text_with_image_tokens(4)["input_ids"]
    return {
        "input_ids": input_ids,
        "pixel_values": torch.randn(32, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(2)),
        "image_grid_thw": QWEN_GRID,
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN).long(),
    }


def _mllama_inputs() -> dict:
    """One image token; the text cross-attends to the image's one tile."""
    input_ids = _text_with_image_tokens(1)["input_ids"]
    return {
        "input_ids": input_ids,
        "pixel_values": _images(1, 1, 3, 32, 32),
        "aspect_ratio_ids": torch.ones(2, 1, dtype=torch.long),
        "aspect_ratio_mask": torch.ones(2, 1, 1, dtype=torch.long),
        "cross_attention_mask": torch.ones(2, input_ids.shape[1], 1, 1, dtype=torch.long),
    }


def _vlm(name, build, inputs, language_model="model.language_model.layers.{}.{}", kinds=("self_attn",) * 2, **layout):
    return Family(
        name,
        _seeded(_never_generating_image_tokens(build)),
        inputs,
        [Layout([language_model.format(i, kind) for i, kind in enumerate(kinds)], layout.get("projection", "o_proj"))],
        32,
        task_type="CAUSAL_LM",
    )


VLM_FAMILIES = {
    family.name: family
    for family in [
        _vlm(
            "llava",
            lambda: T.LlavaForConditionalGeneration(
                T.LlavaConfig(
                    text_config=dict(model_type="llama", **VLM_TEXT),
                    vision_config=dict(model_type="clip_vision_model", **VLM_VISION),
                    image_token_index=IMAGE_TOKEN,
                )
            ),
            _image_prompts(16, pixel_values=_images(3, 32, 32)),  # 16 patches (the CLS token is dropped)
        ),
        *(
            _vlm(
                name,
                lambda config=config, model=model, text=text, vision=vision: model(
                    config(
                        text_config=dict(model_type=text, **VLM_TEXT),
                        vision_config=dict(model_type=vision, **VLM_VISION),
                        image_token_index=IMAGE_TOKEN,
                        image_grid_pinpoints=[[32, 32]],
                    )
                ),
                # the whole image's 16 patches, one 32 x 32 crop's 16 and a newline after each of 4 rows
                _image_prompts(36, pixel_values=_images(2, 3, 32, 32), image_sizes=torch.tensor([[32, 32]] * 2)),
            )
            for name, config, model, text, vision in [
                ("llava_next", T.LlavaNextConfig, T.LlavaNextForConditionalGeneration, "llama", "clip_vision_model"),
                (
                    "llava_onevision",
                    T.LlavaOnevisionConfig,
                    T.LlavaOnevisionForConditionalGeneration,
                    "qwen2",
                    "siglip_vision_model",
                ),
            ]
        ),
        _vlm(
            "qwen2_vl",
            lambda: T.Qwen2VLForConditionalGeneration(
                T.Qwen2VLConfig(
                    text_config=dict(model_type="qwen2_vl_text", rope_parameters=QWEN_ROPE, **VLM_TEXT),
                    vision_config=dict(embed_dim=48, hidden_size=32, mlp_ratio=2, **QWEN_VISION),
                    image_token_id=IMAGE_TOKEN,
                )
            ),
            _qwen_inputs,
        ),
        _vlm(
            "qwen2_5_vl",
            lambda: T.Qwen2_5_VLForConditionalGeneration(
                T.Qwen2_5_VLConfig(
                    text_config=dict(model_type="qwen2_5_vl_text", rope_parameters=QWEN_ROPE, **VLM_TEXT),
                    vision_config=dict(
                        hidden_size=48,
                        out_hidden_size=32,
                        intermediate_size=37,
                        window_size=16,
                        fullatt_block_indexes=[1],
                        **QWEN_VISION,
                    ),
                    image_token_id=IMAGE_TOKEN,
                )
            ),
            _qwen_inputs,
        ),
        _vlm(
            "qwen3_vl",
            lambda: T.Qwen3VLForConditionalGeneration(
                T.Qwen3VLConfig(
                    text_config=dict(
                        model_type="qwen3_vl_text",
                        head_dim=16,
                        rope_parameters={**QWEN_ROPE, "mrope_interleaved": True},
                        **VLM_TEXT,
                    ),
                    vision_config=dict(
                        hidden_size=48,
                        out_hidden_size=32,
                        intermediate_size=37,
                        num_position_embeddings=16,
                        deepstack_visual_indexes=[1],
                        **QWEN_VISION,
                    ),
                    image_token_id=IMAGE_TOKEN,
                )
            ),
            _qwen_inputs,
        ),
        _vlm(
            "paligemma",
            lambda: T.PaliGemmaForConditionalGeneration(
                T.PaliGemmaConfig(
                    text_config=dict(model_type="gemma", head_dim=16, **VLM_TEXT),
                    vision_config=dict(model_type="siglip_vision_model", projection_dim=32, **VLM_VISION),
                    image_token_index=IMAGE_TOKEN,
                    projection_dim=32,
                )
            ),
            _image_prompts(16, pixel_values=_images(3, 32, 32)),
        ),
        *(
            _vlm(
                name,
                lambda config=config, model=model: model(
                    config(
                        text_config=dict(model_type="llama", **VLM_TEXT),
                        vision_config=VLM_VISION,
                        image_token_id=IMAGE_TOKEN,
                        scale_factor=2,
                    )
                ),
                _image_prompts(4, pixel_values=_images(1, 3, 32, 32)),  # 16 patches, shuffled 2 x 2 into 4
                language_model="model.text_model.layers.{}.{}",
            )
            for name, config, model in [
                ("idefics3", T.Idefics3Config, T.Idefics3ForConditionalGeneration),
                ("smolvlm", T.SmolVLMConfig, T.SmolVLMForConditionalGeneration),
            ]
        ),
        _vlm(
            "mllama",
            lambda: T.MllamaForConditionalGeneration(
                T.MllamaConfig(
                    text_config=dict(cross_attention_layers=[1], **VLM_TEXT),
                    vision_config=dict(
                        num_global_layers=1,
                        max_num_tiles=1,
                        supported_aspect_ratios=[[1, 1]],
                        intermediate_layers_indices=[0],
                        vision_output_dim=96,  # the last layer's and one intermediate layer's features
                        **VLM_VISION,
                    ),
                    image_token_index=IMAGE_TOKEN,
                )
            ),
            _mllama_inputs,
            kinds=("self_attn", "cross_attn"),  # its second block attends to the image
        ),
        *(
            _vlm(
                name,
                lambda config=config, model=model: model(
                    config(
                        text_config={**BLIP_OPT, **TOKENS},
                        vision_config=VLM_VISION,
                        qformer_config=BLIP_QFORMER,
                        num_query_tokens=4,
                        image_token_index=IMAGE_TOKEN,
                    )
                ),
                _image_prompts(4, pixel_values=_images(3, 32, 32), **extra),  # one token per query
                language_model="language_model.model.decoder.layers.{}.{}",
                projection="out_proj",
            )
            for name, config, model, extra in [
                ("blip-2", T.Blip2Config, T.Blip2ForConditionalGeneration, {}),
                (
                    "instructblip",
                    T.InstructBlipConfig,
                    T.InstructBlipForConditionalGeneration,
                    {"qformer_input_ids": _text(length=5, mask=False)["input_ids"]},
                ),
            ]
        ),
        _vlm(
            "mistral3",
            lambda: T.Mistral3ForConditionalGeneration(
                T.Mistral3Config(
                    text_config=dict(model_type="mistral", head_dim=16, **VLM_TEXT),
                    vision_config=dict(model_type="pixtral", head_dim=24, **VLM_VISION),
                    image_token_index=IMAGE_TOKEN,
                    spatial_merge_size=2,
                )
            ),
            # 4 x 4 patches merged 2 x 2
            _image_prompts(4, pixel_values=_images(3, 32, 32), image_sizes=torch.tensor([[32, 32]] * 2)),
        ),
        _vlm(
            "internvl",
            lambda: T.InternVLForConditionalGeneration(
                T.InternVLConfig(
                    text_config=dict(model_type="qwen2", **VLM_TEXT),
                    vision_config=dict(
                        model_type="internvl_vision", **{**VLM_VISION, "image_size": [32, 32], "patch_size": [8, 8]}
                    ),
                    image_token_id=IMAGE_TOKEN,
                    downsample_ratio=0.5,
                )
            ),
            _image_prompts(4, pixel_values=_images(3, 32, 32)),  # 4 x 4 patches shuffled into 2 x 2
        ),
    ]
}
