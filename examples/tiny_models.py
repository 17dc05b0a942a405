"""Tiny random models and a tokenizer built on the spot, for the examples' `--tiny` mode and the tests: nothing is
downloaded, and a run finishes on a CPU in seconds. Seeded, so a second run rebuilds the same base model to load an
adapter into. Imported as `examples.tiny_models` everywhere (`_common` puts the repository root on the examples'
path)."""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BitImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)


def tiny_corpus(n_sentences: int = 400, seed: int = 0) -> str:
    """Sentences with learnable structure, for the tiny Llama: a fixed grammar over a small vocabulary."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the bird", "my friend", "the teacher"]
    verbs = ["sees", "likes", "follows", "finds"]
    objects = ["the ball", "a tree", "the house", "a river", "the moon"]
    return " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} ." for _ in range(n_sentences))


def word_tokenizer(texts: list[str], model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of `texts`."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for word in sorted({word for text in texts for word in text.split()}):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer))


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A 2-layer Llama of width 64 over `tokenizer`'s vocabulary (the causal-LM examples' and the tiny LLaVA's)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def tiny_dinov2(seed: int = 0, **config) -> Dinov2Model:
    """A random DINOv2 of width 32, by default 3 blocks on 28x28 images (2x2 patches of 14 px): every code path, in
    seconds. `config` overrides `Dinov2Config` fields (`attn_implementation` included)."""
    torch.manual_seed(seed)
    defaults = dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=14, use_mask_token=False
    )
    return Dinov2Model(Dinov2Config(**defaults | config)).eval()


def tiny_unet(seed: int = 0):
    """A seeded tiny `UNet2DConditionModel`: 16x16 latents, one cross-attention block down and one up, text width 32."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_unet_inputs() -> dict:
    """Seeded inputs for `tiny_unet`: 7 text tokens against its 256 / 64 image tokens, so a layer that read X from the
    encoder states instead of the query stream could not match."""
    g = torch.Generator().manual_seed(3)
    return {
        "sample": torch.randn(2, 4, 16, 16, generator=g),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 7, 32, generator=g),
    }


def tiny_stable_diffusion(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> dict:
    """UNet, VAE, text encoder and scheduler of a Stable Diffusion pipeline: 32x32 images, 16x16 latents."""
    from diffusers import AutoencoderKL, DDPMScheduler

    unet = tiny_unet(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


# A chat template in the shape of LLaVA-1.5's: "user: <image> what is the red shape? assistant: circle<eos>".
TINY_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}:"
    "{% for part in message['content'] %} {{ '<image>' if part['type'] == 'image' else part['text'] }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}<eos>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TINY_LLAVA_IMAGE_SIZE = 56  # 4x4 patches of 14 px: 16 image tokens


def tiny_llava_processor(texts: list[str]) -> LlavaProcessor:
    """A LLaVA processor built locally: a word-level tokenizer over `texts` and the chat template's words, an `<image>`
    token, and DINOv2's image processing at the tiny vision tower's size."""
    tokenizer = word_tokenizer([*texts, "user: assistant:"], model_max_length=128)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_processor = BitImageProcessor(
        size={"height": TINY_LLAVA_IMAGE_SIZE, "width": TINY_LLAVA_IMAGE_SIZE},
        do_center_crop=False,
        do_convert_rgb=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",  # drops DINOv2's CLS token
        num_additional_image_tokens=1,
        chat_template=TINY_LLAVA_CHAT_TEMPLATE,
    )


def tiny_llava(processor: LlavaProcessor, seed: int = 0) -> LlavaForConditionalGeneration:
    """A random LLaVA of a 2-block DINOv2 (width 32) and a 2-layer Llama (width 64), for `tiny_llava_processor`."""
    torch.manual_seed(seed)
    tokenizer = processor.tokenizer
    vision_config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=TINY_LLAVA_IMAGE_SIZE,
        patch_size=14,
        use_mask_token=False,
    )
    text_config = tiny_llama_config(tokenizer)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=processor.image_token_id,
        image_seq_length=(TINY_LLAVA_IMAGE_SIZE // 14) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()
