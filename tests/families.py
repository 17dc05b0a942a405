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

SMALL = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)


@dataclass
class Layout:
    attention_paths: list[str]  # the modules the defaults must adapt, in model order
    projection: str  # relative path of the output projection ("" = the module's own output[0])

    def describes(self, model: torch.nn.Module) -> bool:
        """Every attention path is there, and its output projection is a Linear (or, for "", it is a
        `nn.MultiheadAttention`, which applies its `out_proj` functionally)."""
        modules = dict(model.named_modules())
        if not all(path in modules for path in self.attention_paths):
            return False
        if not self.projection:
            return all(isinstance(modules[path], torch.nn.MultiheadAttention) for path in self.attention_paths)
        projections = [modules.get(f"{path}.{self.projection}") for path in self.attention_paths]
        return all(isinstance(projection, torch.nn.Linear) for projection in projections)


@dataclass
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]
    layouts: list[Layout]  # one per module naming that a supported transformers release builds
    hidden_size: int | list[int]  # d of each adapted module (one value for all, or one per attention path)
    query_argument: str = "hidden_states"

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

    @property
    def projection(self) -> str:
        return self.layout.projection

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


def _seeded(fn):
    def build():
        torch.manual_seed(0)
        return fn().eval()

    return build


def _layers(pattern, n=2):
    return [pattern.format(i) for i in range(n)]


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
                    vision_config=dict(hidden_size=48, image_size=32, patch_size=8, **SMALL),
                    projection_dim=16,
                )
            )
        ),
        lambda: {**_text(), "pixel_values": _pixels()},
        [
            Layout(
                [f"{tower}_model.encoder.layers.{i}.self_attn" for tower in ("text", "vision") for i in range(2)],
                "out_proj",
            )
        ],
        [32, 32, 48, 48],
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
    "vit": Family(
        "vit",
        _seeded(lambda: T.ViTModel(T.ViTConfig(hidden_size=32, image_size=32, patch_size=8, **SMALL))),
        lambda: {"pixel_values": _pixels()},
        [
            Layout(_layers("layers.{}.attention"), "o_proj"),  # newer transformers releases
            Layout(_layers("encoder.layer.{}.attention"), "output.dense"),
        ],
        32,
    ),
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
        name: Family(
            name,
            _seeded(
                lambda config_cls=config_cls, model_cls=model_cls: model_cls(
                    config_cls(hidden_size=32, num_key_value_heads=1, vocab_size=99, **SMALL)
                )
            ),
            lambda: _text(mask=False),
            [Layout(_layers("model.layers.{}.self_attn"), "o_proj")],
            32,
        )
        for name, config_cls, model_cls in [
            ("llama", T.LlamaConfig, T.LlamaForCausalLM),
            ("mistral", T.MistralConfig, T.MistralForCausalLM),
            ("qwen2", T.Qwen2Config, T.Qwen2ForCausalLM),
        ]
    },
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
