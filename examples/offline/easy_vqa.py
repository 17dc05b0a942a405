"""easy-VQA: visual question answering on generated images of one coloured shape, shipped inside the `easy-vqa` package.

The package holds 64x64 PNG images (4000 train, 1000 test) and their questions (38575 train, 9673 test) with a
one-word answer from 13. Its train and test splits use different images. It has no question-type field, but its
answers split the questions into three kinds without overlap, which `question_type` names:

- `yes/no`: "does the image contain a circle?", "is there not a black shape in the image?"
- `shape`: "what is the blue shape?" (circle, rectangle or triangle)
- `color`: "what color is the shape?" (one of 8 colours)

`write_easy_vqa_jsonl` writes the format of `examples/vlm_sft.py`: one JSON object a line, `{"image": path,
"question": ..., "answer": ..., "question_type": ...}`. `python -m examples.offline.easy_vqa train train.jsonl --limit
1000` writes one from the command line.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPLITS = ("train", "test")
YES_NO_ANSWERS = ("yes", "no")
SHAPE_ANSWERS = ("circle", "rectangle", "triangle")
QUESTION_TYPES = ("yes/no", "shape", "color")


def question_type(answer: str) -> str:
    """The kind of question an easy-VQA answer belongs to: `yes/no`, `shape` or `color`."""
    if answer in YES_NO_ANSWERS:
        return "yes/no"
    return "shape" if answer in SHAPE_ANSWERS else "color"


def easy_vqa_records(split: str) -> list[dict]:
    """Every question of a split, in the package's order: dicts with `image` (absolute path of the PNG), `question`,
    `answer` and `question_type`."""
    import easy_vqa

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        image_paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        image_paths = easy_vqa.get_test_image_paths()
    return [
        {"image": image_paths[image_id], "question": question, "answer": answer, "question_type": question_type(answer)}
        for question, answer, image_id in zip(questions, answers, image_ids)
    ]


def subsample(records: list[dict], limit: int | None = None, seed: int = 0) -> list[dict]:
    """`limit` of the records drawn at random (all of them without a limit), kept in their order."""
    if limit is None or limit >= len(records):
        return records
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return [records[index] for index in sorted(random.Random(seed).sample(range(len(records)), limit))]


def sample_records(split: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """`limit` questions of a split drawn at random (all of them without a limit), kept in the package's order."""
    return subsample(easy_vqa_records(split), limit, seed)


def write_easy_vqa_jsonl(split: str, path: str | Path, limit: int | None = None, seed: int = 0) -> Path:
    """Write `sample_records(split, limit, seed)` as JSON lines to `path` (its folder is created); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for record in sample_records(split, limit, seed):
            file.write(json.dumps(record) + "\n")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write easy-VQA questions as JSON lines.")
    parser.add_argument("split", choices=SPLITS)
    parser.add_argument("path")
    parser.add_argument("--limit", type=int, default=None, help="Draw this many questions at random (default: all).")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    print(write_easy_vqa_jsonl(arguments.split, arguments.path, arguments.limit, arguments.seed))
