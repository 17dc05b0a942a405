"""A real LLaVA-style vision-language model that works offline: DINOv2 ViT-S/14 sees, SmolLM2-135M-Instruct answers.

Both towers are pretrained (`examples.offline.dinov2`, `examples.offline.smollm2`); what joins them is LLaVA-1.5's
projector (two linear layers with a GELU) from DINOv2's last hidden states, its CLS token included, into SmolLM2's
embedding space. The projector starts random, so it is aligned first as in LLaVA's first stage: the projector alone
trains, both towers frozen, on image-caption pairs: the 785 captioned PNG stamps of Debian's
`tuxpaint-stamps-default` (`apt-get install tuxpaint-stamps-default`), which share no image with easy-VQA.

The result is an ordinary `LlavaForConditionalGeneration` with a `LlavaProcessor` (DINOv2's image processing at
`IMAGE_SIZE` px, SmolLM2's tokenizer with an `<image>` token, a ChatML chat template), saved with `save_pretrained`
under `.cache/`, so every fine-tuning method starts from the same aligned model:

    model = AutoModelForImageTextToText.from_pretrained(aligned_llava_path())
    processor = AutoProcessor.from_pretrained(aligned_llava_path())

The first call builds and aligns (about 10 minutes on one CPU core); `python -m examples.offline.llava` does it from
the command line and prints what the alignment reached (also stored in the folder's `alignment.json`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    BitImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .dinov2 import DEFAULT_CACHE_DIR, IMAGE_MEAN, IMAGE_STD

IMAGE_SIZE = 56  # 4x4 patches of 14 px: easy-VQA's images are 64 px, and the language model reads 17 image tokens
IMAGE_TOKEN = "<image>"
# ChatML, SmolLM2's own format, with image parts; no default system prompt (it would cost 20 tokens a sample).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
STAMPS_HINT = "apt-get install tuxpaint-stamps-default"
CAPTION_PROMPT = "Describe the image briefly."
# LLaVA's first stage: projector only, both towers frozen (LLaVA-1.5: lr 1e-3 at batch 256). 60 steps of 8 pairs
# (two thirds of an epoch) keep it to about 10 minutes on one CPU core.
ALIGNMENT_RECIPE = {
    "steps": 60,
    "batch_size": 8,
    "lr": 2e-3,
    "warmup_ratio": 0.05,
    "weight_decay": 0.0,
    "held_out": 32,
    "seed": 0,
    "image_size": IMAGE_SIZE,
}


def image_processor(image_size: int = IMAGE_SIZE) -> BitImageProcessor:
    """DINOv2's preprocessing (ImageNet statistics, bicubic resize) to a square of `image_size` px, without cropping."""
    return BitImageProcessor(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        do_convert_rgb=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )


def build_llava(
    vision_tower: PreTrainedModel,
    language_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    image_size: int = IMAGE_SIZE,
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A `LlavaForConditionalGeneration` holding `vision_tower` (a DINOv2) and `language_model` (a causal LM) with a
    random LLaVA-1.5 projector, and its processor. `tokenizer` gains an `<image>` token and the language model's
    embeddings a row for it."""
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    patch_size = vision_tower.config.patch_size
    processor = LlavaProcessor(
        image_processor=image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",  # DINOv2's CLS token summarises the image: keep it
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    text_config = language_model.config
    config = LlavaConfig(
        vision_config=vision_tower.config,
        text_config=text_config,
        image_token_index=processor.image_token_id,
        image_seq_length=(image_size // patch_size) ** 2 + 1,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision_tower.state_dict())
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # its row is never read: images replace it
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model.eval(), processor


def build_tiny_llava(texts: list[str], seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """`build_llava` on tiny random towers (a 3-block DINOv2 of width 32, a 2-layer Llama of width 64) and a word-level
    tokenizer over `texts` with ChatML's tokens: the same model class, processor and chat template, in seconds."""
    from examples.tiny_models import tiny_dinov2, tiny_llama, word_tokenizer

    tokenizer = word_tokenizer([*texts, "user assistant"], model_max_length=128)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    return build_llava(tiny_dinov2(seed), tiny_llama(tokenizer, seed), tokenizer, seed=seed)


def load_rgb(path: str | Path) -> Image.Image:
    """An image as RGB on a white square: transparent stamps are composited on white, then padded to a square."""
    image = Image.open(path).convert("RGBA")
    side = max(image.size)
    square = Image.new("RGBA", (side, side), "white")
    square.alpha_composite(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square.convert("RGB")


def caption_pairs(stamps_dir: Path = STAMPS_DIR) -> list[tuple[Path, str]]:
    """(PNG path, English caption) of every Tux Paint stamp with a description, in path order."""
    if not stamps_dir.is_dir():
        raise FileNotFoundError(f"No Tux Paint stamps in {stamps_dir}; install them with: {STAMPS_HINT}")
    pairs = []
    for png in sorted(stamps_dir.rglob("*.png")):
        description = png.with_suffix(".txt")
        if description.exists():
            caption = description.read_text(encoding="utf-8").splitlines()[0].strip()
            if caption:
                pairs.append((png, caption))
    return pairs


def chat_prompts(processor: LlavaProcessor, prompts: list[str]) -> list[str]:
    """Each prompt as a user turn holding one image, followed by the assistant's turn opening."""
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            add_generation_prompt=True,
        )
        for prompt in prompts
    ]


def answer_batch(processor: LlavaProcessor, images: list, prompts: list[str], answers: list[str]) -> dict:
    """One left-padded batch of (image, prompt) -> answer conversations, labelled on the answer and the end token.

    Left padding puts every answer at the end of its row, so `answer_loss` needs the logits of the last positions
    only. RoPE makes the padding offset invisible to attention between real tokens.
    """
    tokenizer = processor.tokenizer
    endings = [answer + tokenizer.eos_token for answer in answers]
    texts = [prompt + ending for prompt, ending in zip(chat_prompts(processor, prompts), endings)]
    tokenizer.padding_side = "left"
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    for row, ending in enumerate(endings):
        ids = tokenizer(ending, add_special_tokens=False)["input_ids"]
        if batch["input_ids"][row, -len(ids) :].tolist() != ids:
            raise ValueError(f"Answer {answers[row]!r} does not tokenize the same inside its conversation")
        labels[row, -len(ids) :] = batch["input_ids"][row, -len(ids) :]
    batch["labels"] = labels
    return dict(batch)


def answer_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens at the end of a left-padded `answer_batch`, computing the language
    model head only there (its 49k-word projection would otherwise cost a fifth of the forward pass)."""
    labels = batch["labels"]
    keep = int((labels != -100).sum(-1).max()) + 1
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, -(keep - 1) :].flatten(), ignore_index=-100)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, processor: LlavaProcessor, images: list, prompts: list[str], max_new_tokens: int = 4
) -> list[str]:
    """Greedy answers to (image, prompt) pairs, decoded without special tokens and stripped.

    Decodes with the model's own forward pass and cache rather than `generate`: with PEFT's prefix tuning, `generate`
    on a LLaVA starts past the prefix's cached positions and so never passes the image to the model. The first step
    runs `model` (adapters, prompts and prefixes applied), the next ones its base model on the cache that step left.
    """
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=chat_prompts(processor, prompts), padding=True, return_tensors="pt")
    output = model(**batch, use_cache=True, logits_to_keep=1)
    decoder = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache, mask = output.past_key_values, batch["attention_mask"]
    # Prompt learning puts its virtual tokens or prefix in the cache before the inputs: they are always attended.
    mask = torch.cat([mask.new_ones(len(mask), cache.get_seq_length() - mask.shape[1]), mask], dim=1)
    tokens = output.logits[:, -1].argmax(-1, keepdim=True)
    generated, finished = [tokens], tokens[:, 0] == processor.tokenizer.eos_token_id
    for _ in range(max_new_tokens - 1):
        if finished.all():
            break
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        output = decoder(input_ids=tokens, attention_mask=mask, cache=cache, use_cache=True)
        cache, tokens = output.past_key_values, output.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(tokens)
        finished |= tokens[:, 0] == processor.tokenizer.eos_token_id
    answers = processor.batch_decode(torch.cat(generated, dim=1), skip_special_tokens=True)
    return [answer.split("\n")[0].strip() for answer in answers]


def _linear_warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _mean_loss(model, processor, pairs, batch_size: int) -> float:
    losses = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = answer_batch(
                processor, [load_rgb(p) for p, _ in chunk], [CAPTION_PROMPT] * len(chunk), [c for _, c in chunk]
            )
            losses.append(float(answer_loss(model, batch)) * len(chunk))
    return sum(losses) / len(pairs)


def align_projector(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, pairs: list, recipe: dict, log=print
) -> dict:
    """LLaVA's first stage: train the projector alone on (image path, caption) pairs, both towers frozen.

    Holds `recipe["held_out"]` pairs out and returns the caption loss on them before and after, with the mean training
    loss of each tenth of the steps.
    """
    rng = random.Random(recipe["seed"])
    order = list(range(len(pairs)))
    rng.shuffle(order)
    held_out = [pairs[i] for i in order[: recipe["held_out"]]]
    train = [pairs[i] for i in order[recipe["held_out"] :]]
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("model.multi_modal_projector.")
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch_size, steps = recipe["batch_size"], recipe["steps"]
    optimizer = torch.optim.AdamW(trainable, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    scheduler = _linear_warmup_cosine(optimizer, max(1, round(recipe["warmup_ratio"] * steps)), steps)
    # The training pairs in a new random order each epoch, as many as the steps take.
    stream = [pair for _ in range(math.ceil(steps * batch_size / len(train))) for pair in rng.sample(train, len(train))]

    model.eval()  # no dropout anywhere; only the projector's parameters receive gradients
    figures = {"held_out_loss_before": _mean_loss(model, processor, held_out, batch_size)}
    losses = []
    start_time = time.perf_counter()
    for step in range(steps):
        chunk = stream[step * batch_size : (step + 1) * batch_size]
        batch = answer_batch(
            processor, [load_rgb(p) for p, _ in chunk], [CAPTION_PROMPT] * len(chunk), [c for _, c in chunk]
        )
        loss = answer_loss(model, batch)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"alignment step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - start_time:.0f} s)")
    for parameter in model.parameters():
        parameter.requires_grad = False
    tenth = max(1, steps // 10)
    figures.update(
        held_out_loss_after=_mean_loss(model, processor, held_out, batch_size),
        training_loss_per_tenth=[
            round(sum(losses[i : i + tenth]) / len(losses[i : i + tenth]), 4) for i in range(0, steps, tenth)
        ],
        steps=steps,
        train_pairs=len(train),
        held_out_pairs=len(held_out),
        seconds=round(time.perf_counter() - start_time, 1),
    )
    return figures


def _recipe_key(recipe: dict) -> str:
    from .dinov2 import file_sha256, find_onnx_file
    from .smollm2 import find_gguf_file

    sources = [file_sha256(find_onnx_file())[:16], find_gguf_file().name, json.dumps(recipe, sort_keys=True)]
    return hashlib.sha256("|".join(sources).encode()).hexdigest()[:12]


def aligned_llava_path(cache_dir: str | Path = DEFAULT_CACHE_DIR, log=print) -> Path:
    """The folder of the aligned DINOv2-S + SmolLM2-135M LLaVA (model and processor), built and aligned on first call.

    Load it with `AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained`. The folder name
    carries a hash of both towers' source files and of `ALIGNMENT_RECIPE`, so changing either builds a new one.
    """
    from .dinov2 import load_dinov2_small
    from .smollm2 import load_smollm2

    path = Path(cache_dir) / f"llava_dinov2s_smollm2_{IMAGE_SIZE}px_{_recipe_key(ALIGNMENT_RECIPE)}"
    if (path / "alignment.json").exists():
        return path
    log(f"Building the LLaVA of DINOv2-S and SmolLM2-135M and aligning its projector into {path} (once)")
    pairs = caption_pairs()
    language_model, tokenizer = load_smollm2()
    model, processor = build_llava(load_dinov2_small(cache_dir), language_model, tokenizer, IMAGE_SIZE)
    del language_model
    figures = align_projector(model, processor, pairs, ALIGNMENT_RECIPE, log=log)
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    (staging / "alignment.json").write_text(json.dumps({"recipe": ALIGNMENT_RECIPE, **figures}, indent=2) + "\n")
    staging.rename(path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = aligned_llava_path(args.cache_dir)
    print(path)
    print((path / "alignment.json").read_text())


if __name__ == "__main__":
    main()
