"""The offline LLaVA's building code (examples/offline/llava.py) on tiny random towers: nothing is downloaded."""

import numpy as np
import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from examples.offline import llava
from examples.tiny_models import tiny_dinov2, tiny_llama, word_tokenizer
from peft_apt import APTConfig

WORDS = "user assistant what color is the shape ? red blue a frog describe image briefly."
IMAGE_TOKENS = (llava.IMAGE_SIZE // 14) ** 2 + 1  # DINOv2's patches and its CLS token


def tiny_text_parts():
    """(tokenizer with ChatML's tokens, tiny Llama)."""
    tokenizer = word_tokenizer([WORDS, "user assistant"], model_max_length=128)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer, tiny_llama(tokenizer)


@pytest.fixture
def towers():
    tokenizer, language_model = tiny_text_parts()
    return tiny_dinov2(), language_model, tokenizer


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def test_build_keeps_both_towers_and_places_the_image_tokens(towers):
    vision_tower, language_model, tokenizer = towers
    text = torch.tensor([[tokenizer.convert_tokens_to_ids(word) for word in ("what", "color", "is", "the", "shape")]])
    with torch.no_grad():
        expected_logits = language_model(text).logits
        expected_features = vision_tower(torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0)))
    model, processor = llava.build_llava(vision_tower, language_model, tokenizer)

    with torch.no_grad():
        logits = model(input_ids=text).logits
    assert logits.shape[-1] == len(expected_logits[0, 0]) + 1  # one new row: the image token
    torch.testing.assert_close(logits[..., :-1], expected_logits, rtol=0, atol=0)
    with torch.no_grad():
        features = model.model.vision_tower(torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(features.last_hidden_state, expected_features.last_hidden_state, rtol=0, atol=0)

    batch = processor(
        images=random_images(1),
        text=llava.chat_prompts(processor, ["what color is the shape ?"]),
        return_tensors="pt",
    )
    assert batch["pixel_values"].shape == (1, 3, llava.IMAGE_SIZE, llava.IMAGE_SIZE)
    assert int((batch["input_ids"][0] == processor.image_token_id).sum()) == IMAGE_TOKENS
    projector = model.model.multi_modal_projector
    assert [type(m).__name__ for m in projector.children()] == ["Linear", "GELUActivation", "Linear"]
    assert (projector.linear_1.in_features, projector.linear_2.out_features) == (32, 64)


def test_answer_loss_is_the_models_own_loss_on_the_answer(towers):
    model, processor = llava.build_llava(*towers)
    answers = ["red", "a blue frog"]
    batch = llava.answer_batch(processor, random_images(2), ["what color is the shape ?", "describe"], answers)

    end = processor.tokenizer.eos_token_id
    for row, answer in enumerate(answers):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled == [processor.tokenizer.convert_tokens_to_ids(w) for w in answer.split()] + [end]
        assert batch["input_ids"][row, -1] == end  # left padding: every answer ends its row
    with torch.no_grad():
        reference = model(**batch).loss  # transformers' loss over all positions, full vocabulary logits
        torch.testing.assert_close(llava.answer_loss(model, batch), reference)


def test_alignment_trains_the_projector_alone_and_the_folder_reloads(towers, tmp_path):
    model, processor = llava.build_llava(*towers)
    for index, image in enumerate(random_images(6)):
        image.save(tmp_path / f"{index}.png")
    pairs = [(tmp_path / f"{index}.png", "a red frog." if index % 2 else "a blue frog.") for index in range(6)]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    recipe = llava.ALIGNMENT_RECIPE | {"steps": 4, "batch_size": 2, "held_out": 2}
    figures = llava.align_projector(model, processor, pairs, recipe, log=lambda message: None)

    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed == {f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert (figures["steps"], figures["train_pairs"], figures["held_out_pairs"]) == (4, 4, 2)
    assert figures["held_out_loss_after"] != figures["held_out_loss_before"]

    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path / "saved")
    batch = llava.answer_batch(reloaded_processor, random_images(2, seed=1), ["what", "describe"], ["red", "blue"])
    expected = llava.answer_batch(processor, random_images(2, seed=1), ["what", "describe"], ["red", "blue"])
    assert batch.keys() == expected.keys() and all(torch.equal(batch[key], expected[key]) for key in batch)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    answers = llava.generate_answers(reloaded, reloaded_processor, random_images(2), ["what", "describe"], 3)
    assert answers == llava.generate_answers(model, processor, random_images(2), ["what", "describe"], 3)


def test_stamps_are_composited_on_white_squares_and_read_with_their_captions(tmp_path):
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    (tmp_path / "animals").mkdir()
    image.save(tmp_path / "animals" / "fox.png")
    (tmp_path / "animals" / "fox.txt").write_text("A red fox.\nfr.utf8=Un renard rouge.\n", encoding="utf-8")
    image.save(tmp_path / "animals" / "uncaptioned.png")

    rgb = np.asarray(llava.load_rgb(tmp_path / "animals" / "fox.png"))
    assert rgb.shape == (4, 4, 3)
    assert rgb[0].tolist() == [[255, 255, 255]] * 4  # the padding row above
    assert rgb[1].tolist() == [[255, 255, 255]] + [[255, 0, 0]] * 3  # the transparent pixel turned white
    assert llava.caption_pairs(tmp_path) == [(tmp_path / "animals" / "fox.png", "A red fox.")]
    with pytest.raises(FileNotFoundError, match="tuxpaint-stamps-default"):
        llava.caption_pairs(tmp_path / "missing")


def greedy_without_cache(model, processor, images, prompts, max_new_tokens):
    """Reference: the whole sequence through the model again for every token, stopped at the end token."""
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=llava.chat_prompts(processor, prompts), padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
    end = processor.tokenizer.eos_token_id
    rows = [row[: row.index(end)] if end in row else row for row in ids[:, batch["input_ids"].shape[1] :].tolist()]
    return [text.strip() for text in processor.batch_decode(rows, skip_special_tokens=True)]


@pytest.mark.parametrize(
    "config",
    [
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),  # `generate` would drop the image here
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        APTConfig(target_modules=r".*language_model.*\.self_attn", init_weights=False),
    ],
    ids=lambda config: config.peft_type.value,
)
def test_generated_answers_are_the_greedy_tokens_of_the_adapted_model(config):
    model, processor = llava.build_llava(tiny_dinov2(), *reversed(tiny_text_parts()))
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "prompt_encoder" in name:
                parameter.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    model.eval()
    images, prompts = random_images(3), ["what color is the shape ?", "what", "describe"]
    expected = greedy_without_cache(model, processor, images, prompts, 4)
    assert llava.generate_answers(model, processor, images, prompts, 4) == expected
