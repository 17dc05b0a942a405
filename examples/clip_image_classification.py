"""
Image classification with CLIP's vision tower and an APT adapter, trained with Trainer: the tower is frozen while APT
and a new linear head train.

    python examples/clip_image_classification.py --tiny --max_steps 300 --output_dir clip-apt     # CPU, no download
    python examples/clip_image_classification.py --data_dir my_images --num_train_epochs 10 --bf16 ...

`--data_dir` holds `train/<label>/*.jpg` and, optionally, `validation/<label>/*.jpg`. `--tiny` builds a tiny random
CLIP vision tower and trains it on scikit-learn's bundled 8x8 handwritten digits, scaled up to 32x32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from _common import APTArguments, APTTrainer, add_apt, load_image, parse_args, train_and_save
from PIL import Image
from transformers import (
    AutoImageProcessor,
    CLIPConfig,
    CLIPForImageClassification,
    CLIPImageProcessor,
    set_seed,
)

TINY_IMAGE_SIZE = 32


@dataclass
class ClassificationArguments(APTArguments):
    model: str = field(default="openai/clip-vit-base-patch32", metadata={"help": "CLIP hub id or local path."})
    data_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder with train/<label>/<image> and optionally validation/<label>/<image>."}
    )


def accuracy(eval_pred) -> dict[str, float]:
    return {"accuracy": float((eval_pred.predictions.argmax(-1) == eval_pred.label_ids).mean())}


class ClassificationCollator:
    """Turns records `{image, label}` into a CLIP batch."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.image_processor([load_image(record["image"]) for record in records], return_tensors="pt")
        batch["labels"] = torch.tensor([record["label"] for record in records])
        return batch


def read_image_folder(folder: str, labels: list[str]) -> list[dict]:
    """Records of `folder/<label>/<image>`; images are opened one batch at a time."""
    return [
        {"image": os.path.join(folder, label, name), "label": index}
        for index, label in enumerate(labels)
        for name in sorted(os.listdir(os.path.join(folder, label)))
    ]


def digits_records() -> tuple[list[dict], list[dict], list[str]]:
    """scikit-learn's bundled digits as 32x32 RGB images: 1,497 to train, 300 to evaluate."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    records = [
        {
            "image": Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize(size).convert("RGB"),
            "label": int(label),
        }
        for pixels, label in zip(digits.images, digits.target)
    ]
    return records[:-300], records[-300:], [str(label) for label in digits.target_names]


def tiny_clip(labels: list[str]) -> CLIPForImageClassification:
    config = CLIPConfig(
        vision_config=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
        ),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    return CLIPForImageClassification(config)


def tiny_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )


def main(args: Optional[list[str]] = None) -> dict[str, float]:
    script_args, training_args = parse_args(ClassificationArguments, args, output_dir="clip-apt")
    set_seed(training_args.seed)
    if script_args.tiny:
        train, evaluation, labels = digits_records()
        image_processor = tiny_image_processor()
        model = tiny_clip(labels)
    else:
        if script_args.data_dir is None:
            raise ValueError("Pass --data_dir, or --tiny for scikit-learn's digits.")
        labels = sorted(os.listdir(os.path.join(script_args.data_dir, "train")))
        train = read_image_folder(os.path.join(script_args.data_dir, "train"), labels)
        validation = os.path.join(script_args.data_dir, "validation")
        evaluation = read_image_folder(validation, labels) if os.path.isdir(validation) else []
        image_processor = AutoImageProcessor.from_pretrained(script_args.model)
        model = CLIPForImageClassification.from_pretrained(
            script_args.model,
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    evaluation = evaluation[: script_args.max_eval_samples]

    model = add_apt(model, script_args)
    trainer = APTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation or None,
        data_collator=ClassificationCollator(image_processor),
        compute_metrics=accuracy,
        head_lr_ratio=script_args.head_lr_ratio,
    )
    metrics = train_and_save(trainer, image_processor)
    if metrics and trainer.is_world_process_zero():
        print(f"Final accuracy: {metrics['eval_accuracy']:.3f} (chance: {1 / len(labels):.3f})")
    return metrics


if __name__ == "__main__":
    main()
