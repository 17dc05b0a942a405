"""
Visual question answering with ViLT and an APT adapter, trained with Trainer as in the APT paper: VQA soft-score
targets, VQA accuracy, the backbone frozen while APT and the new answer head train (head at 10x the learning rate).

    python examples/vilt_vqa.py --tiny --max_steps 300 --output_dir vilt-vqa-apt        # CPU, no download
    python examples/vilt_vqa.py --train_file train.jsonl --eval_file val.jsonl --num_train_epochs 10 --bf16 ...

Data files are JSON lines `{"image": "path/to/image.jpg", "question": "...", "answers": ["ten", "annotator", ...]}`,
for example VQA v2 with its ten answers per question. `--tiny` builds a tiny random ViLT and generated pictures of
coloured shapes with questions about their colour, shape, number and position.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from _common import APTArguments, APTTrainer, add_apt, load_image, parse_args, train_and_save
from PIL import Image, ImageDraw
from transformers import (
    BertTokenizer,
    ViltConfig,
    ViltForQuestionAnswering,
    ViltImageProcessor,
    ViltProcessor,
    set_seed,
)


@dataclass
class VQAArguments(APTArguments):
    model: str = field(default="dandelin/vilt-b32-mlm", metadata={"help": "ViLT hub id or local path."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Training questions, JSON lines."})
    eval_file: Optional[str] = field(default=None, metadata={"help": "Evaluation questions, JSON lines."})
    min_answer_count: int = field(
        default=9, metadata={"help": "Answers given at least this often in training form the answer vocabulary."}
    )
    head_lr_ratio: float = field(default=10.0, metadata={"help": "Head learning rate / --learning_rate (paper: 10)."})


def answer_score(count: int) -> float:
    """ViLT's VQA target for an answer that `count` of the ten annotators gave."""
    return min(1.0, 0.3 * count)


def vqa_targets(answers: list[str], label2id: dict[str, int]) -> torch.Tensor:
    """Soft multi-label target: each known answer scored by how many annotators gave it."""
    target = torch.zeros(len(label2id))
    for answer, count in Counter(answers).items():
        if answer in label2id:
            target[label2id[answer]] = answer_score(count)
    return target


def vqa_accuracy(eval_pred) -> dict[str, float]:
    """VQA accuracy: the target score of the predicted answer, averaged over questions."""
    logits, targets = eval_pred.predictions, eval_pred.label_ids
    return {"vqa_accuracy": float(targets[np.arange(len(targets)), logits.argmax(-1)].mean())}


class VQACollator:
    """Turns records `{image, question, answers}` into a ViLT batch with soft-score `labels`."""

    def __init__(self, processor: ViltProcessor, label2id: dict[str, int], max_length: int):
        self.processor = processor
        self.label2id = label2id
        self.max_length = max_length

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.processor(
            images=[load_image(record["image"]) for record in records],
            text=[record["question"] for record in records],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch["labels"] = torch.stack([vqa_targets(record["answers"], self.label2id) for record in records])
        return batch


# The generated data set: one to three identical shapes per picture.
COLOURS = {"red": (220, 50, 50), "green": (50, 170, 70), "blue": (50, 90, 220), "yellow": (225, 205, 40)}
SHAPES = ("square", "circle", "triangle")
COUNTS = ("one", "two", "three")
QUESTIONS = {
    "colour": ("what colour is the shape?", "what color are the shapes?", "which colour do you see?"),
    "shape": ("what shape is it?", "which shape do you see?", "what kind of shape is in the picture?"),
    "count": ("how many shapes are there?", "how many objects do you see?", "what is the number of shapes?"),
    "position": ("is the shape on the left or the right?", "where is the shape?", "which side is the object on?"),
}
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS, "position": ("left", "right")}
TINY_IMAGE_SIZE = 32


def draw_scene(rng: random.Random, colour: str, shape: str, count: int, side: Optional[str]) -> Image.Image:
    size, s = TINY_IMAGE_SIZE, 10
    image = Image.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    slots = [(x, y) for x in (1, 11, 21) for y in (1, 11, 21)]
    if side is not None:  # a single shape, clearly on one side
        slots = [(x, y) for x, y in slots if (x < 10) == (side == "left") and x != 11]
    for x, y in rng.sample(slots, count):
        box = (x, y, x + s - 1, y + s - 1)
        if shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        elif shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x + s // 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=COLOURS[colour])
    return image


def tiny_vqa_records(n: int, seed: int) -> list[dict]:
    """`n` generated questions; ten simulated annotators each give the true answer with probability 0.9."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        kind = rng.choice(tuple(QUESTIONS))
        count = 1 if kind == "position" else rng.randint(1, 3)
        truth = {
            "colour": rng.choice(tuple(COLOURS)),
            "shape": rng.choice(SHAPES),
            "count": COUNTS[count - 1],
            "position": rng.choice(("left", "right")) if kind == "position" else None,
        }
        image = draw_scene(rng, truth["colour"], truth["shape"], count, truth["position"])
        answers = [truth[kind] if rng.random() < 0.9 else rng.choice(ANSWERS[kind]) for _ in range(10)]
        records.append({"image": image, "question": rng.choice(QUESTIONS[kind]), "answers": answers})
    return records


def tiny_processor() -> ViltProcessor:
    """A ViLT processor built locally: a word-level BERT vocabulary of the generated questions."""
    questions = [question for kind in QUESTIONS.values() for question in kind]
    words = sorted({word for question in questions for word in question.replace("?", " ?").split()})
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    image_processor = ViltImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE}, size_divisor=TINY_IMAGE_SIZE)
    return ViltProcessor(image_processor=image_processor, tokenizer=BertTokenizer(vocab=vocab))


def tiny_vilt(vocab_size: int, answers: list[str]) -> ViltForQuestionAnswering:
    """A tiny random ViLT. Weights ten times larger than BERT's usual init make the frozen random attention mix tokens
    enough for the [CLS] state to carry the question and the picture; at 0.02 it is nearly the same for every input."""
    config = ViltConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        max_image_length=-1,
        initializer_range=0.2,
        id2label=dict(enumerate(answers)),
        label2id={answer: i for i, answer in enumerate(answers)},
    )
    return ViltForQuestionAnswering(config)


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def answer_vocabulary(records: list[dict], min_count: int) -> list[str]:
    counts = Counter(answer for record in records for answer in record["answers"])
    return sorted(answer for answer, count in counts.items() if count >= min_count)


def baselines(train: list[dict], evaluation: list[dict], label2id: dict[str, int]) -> dict[str, float]:
    """What needs no image: the most frequent answer, and the most frequent answer of each question."""

    def accuracy(pick):
        return float(np.mean([vqa_targets(r["answers"], label2id)[label2id[pick(r)]].item() for r in evaluation]))

    overall = Counter(a for r in train for a in r["answers"] if a in label2id).most_common(1)[0][0]
    by_question = {}
    for r in train:
        by_question.setdefault(r["question"], Counter()).update(a for a in r["answers"] if a in label2id)
    return {
        "most frequent answer": accuracy(lambda r: overall),
        "most frequent answer per question": accuracy(
            lambda r: by_question[r["question"]].most_common(1)[0][0] if r["question"] in by_question else overall
        ),
    }


def main(args: Optional[list[str]] = None) -> dict[str, float]:
    script_args, training_args = parse_args(VQAArguments, args, output_dir="vilt-vqa-apt")
    set_seed(training_args.seed)
    if script_args.tiny:
        train, evaluation = tiny_vqa_records(2000, seed=0), tiny_vqa_records(400, seed=1)
        processor = tiny_processor()
        answers = sorted({a for kind in ANSWERS.values() for a in kind})
        model = tiny_vilt(len(processor.tokenizer), answers)
    else:
        if script_args.train_file is None:
            raise ValueError("Pass --train_file (and --eval_file), or --tiny for generated data.")
        train = read_records(script_args.train_file)
        evaluation = read_records(script_args.eval_file) if script_args.eval_file else []
        processor = ViltProcessor.from_pretrained(script_args.model)
        answers = answer_vocabulary(train, script_args.min_answer_count)
        model = ViltForQuestionAnswering.from_pretrained(
            script_args.model,
            id2label=dict(enumerate(answers)),
            label2id={answer: i for i, answer in enumerate(answers)},
            ignore_mismatched_sizes=True,
        )
    evaluation = evaluation[: script_args.max_eval_samples]
    label2id = model.config.label2id

    model = add_apt(model, script_args)
    trainer = APTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation or None,
        data_collator=VQACollator(processor, label2id, model.config.max_position_embeddings),
        compute_metrics=vqa_accuracy,
        head_lr_ratio=script_args.head_lr_ratio,
    )
    metrics = train_and_save(trainer, processor)
    if metrics and trainer.is_world_process_zero():
        print(f"Final VQA accuracy: {metrics['eval_vqa_accuracy']:.3f}")
        for name, value in baselines(train, evaluation, label2id).items():
            print(f"  without the image, {name}: {value:.3f}")
    return metrics


if __name__ == "__main__":
    main()
