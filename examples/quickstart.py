"""Quickstart: adapt a tiny ViLT with APT and train it for a few steps on generated picture questions.

Runs on a CPU in well under a minute with no download: a randomly initialised ViLT (hidden 64, 2 layers) answers
"what colour is the square?" and "is it on the left or the right?" about generated 32x32 pictures. Only the APT
tensors and the answer head train; the backbone stays frozen. Prints the trainable parameters and a falling loss.

    python examples/quickstart.py [--steps 80] [--num-prompts 16]
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model
from torch import nn
from transformers import ViltConfig, ViltForQuestionAnswering

from peft_apt import APTConfig  # importing peft_apt registers APT with PEFT

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1)}
ANSWERS = [*COLOURS, "left", "right"]
QUESTION_IDS = {"colour": [5, 6, 7, 8], "side": [5, 9, 10, 11]}  # token ids of two fixed questions


def make_batch(batch_size: int, generator: torch.Generator, size: int = 32) -> dict:
    """Pictures of one coloured square on grey noise, with a question about its colour or side."""
    pixels = 0.1 * torch.randn(batch_size, 3, size, size, generator=generator)
    input_ids, labels = [], []
    for i in range(batch_size):
        colour = int(torch.randint(len(COLOURS), (1,), generator=generator))
        right = bool(torch.randint(2, (1,), generator=generator))
        top = int(torch.randint(size - 14, (1,), generator=generator))
        left = int(torch.randint(size // 2 - 13, (1,), generator=generator)) + (size // 2 if right else 0)
        rgb = torch.tensor(list(COLOURS.values())[colour])[:, None, None]
        pixels[i, :, top : top + 14, left : left + 14] = rgb
        question = "colour" if i % 2 == 0 else "side"
        input_ids.append(QUESTION_IDS[question])
        labels.append(colour if question == "colour" else len(COLOURS) + int(right))
    return {"input_ids": torch.tensor(input_ids), "pixel_values": pixels, "labels": torch.tensor(labels)}


def build_model(num_prompts: int) -> nn.Module:
    config = ViltConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, max_image_length=-1, vocab_size=32, num_labels=len(ANSWERS),
        # with the default 0.02 a random model's features barely depend on its input; pretrained ones do
        initializer_range=0.2,
    )
    model = ViltForQuestionAnswering(config)
    # The VQA head is new, so it trains and is saved with the adapter.
    return get_peft_model(model, APTConfig(num_prompts=num_prompts, r=4, modules_to_save=["classifier"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output-dir", default=None, help="save the adapter here at the end")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model(args.num_prompts)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    data = torch.Generator().manual_seed(1)

    model.train()
    for step in range(1, args.steps + 1):
        batch = make_batch(args.batch_size, data)
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        loss = loss_fn(logits, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == 1:
            accuracy = (logits.argmax(-1) == batch["labels"]).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.4f}  batch accuracy {accuracy:.2f}", flush=True)

    model.eval()
    test = make_batch(256, torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=test["input_ids"], pixel_values=test["pixel_values"]).logits
    accuracy = (logits.argmax(-1) == test["labels"]).float().mean().item()
    print(f"held-out accuracy {accuracy:.3f} (chance: colour 0.25, side 0.50)")
    if args.output_dir:
        model.save_pretrained(args.output_dir)
        print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
