"""
Fine-tune a vision-language model with APT to answer questions about images, with Trainer or TRL's SFTTrainer.

Any image-text-to-text model (LLaVA, Qwen2-VL, SmolVLM, PaliGemma, ...) loads by name with `AutoModelForImageTextToText`
and `AutoProcessor`. Each question is rendered with the processor's chat template, the image in the user turn and the
answer in the assistant turn; the loss covers the answer's tokens and the end of its turn, never the prompt or the
image tokens. The run reports the exact-match accuracy of greedy answers before and after training, saves the adapter,
loads it into a freshly loaded base model with `PeftModel.from_pretrained` and reports the accuracy again.

    python examples/vlm_sft.py --tiny --output_dir /tmp/apt-vlm-tiny                  # seconds on a CPU, offline
    python examples/vlm_sft.py --tiny --trainer trl --output_dir /tmp/apt-vlm-tiny    # the same through SFTTrainer
    python examples/vlm_sft.py --offline --output_dir outputs/apt-llava-easy-vqa      # DINOv2-S + SmolLM2 LLaVA, CPU
    python examples/vlm_sft.py --model_name_or_path llava-hf/llava-1.5-7b-hf --train_file train.jsonl \\
        --eval_file test.jsonl --num_train_epochs 1 --bf16 --output_dir apt-llava

Data files are JSON lines `{"image": "path/to/image.png", "question": "...", "answer": "..."}` (relative image paths
are read from the file's folder); without them the run uses easy-VQA, shipped with the `easy-vqa` package
(`python -m examples.offline.easy_vqa train train.jsonl` writes it in this format). `--trainer trl` needs `pip install
peft-apt[trl]`. `--tiny` builds a tiny random LLaVA and its processor here; `--offline` uses the LLaVA of
`examples.offline.llava` (pretrained DINOv2-S and SmolLM2-135M with an aligned projector). Every `TrainingArguments`
flag works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from _common import SHORT_RUN_DEFAULTS, end_processes, load_image, report_processes, report_start
from _common import parse_args as parse_common_args
from peft import PeftModel, get_peft_model
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments, set_seed

from examples.offline.easy_vqa import easy_vqa_records, subsample
from examples.tiny_models import tiny_llava, tiny_llava_processor
from peft_apt import APTConfig  # importing peft_apt registers APT with PEFT


@dataclass
class VLMArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "An image-text-to-text model on the Hub or on disk."}
    )
    tiny: bool = field(default=False, metadata={"help": "A tiny random LLaVA on easy-VQA: offline, seconds on a CPU."})
    offline: bool = field(
        default=False, metadata={"help": "The LLaVA of DINOv2-S and SmolLM2-135M from examples.offline.llava."}
    )
    trainer: Literal["transformers", "trl"] = field(
        default="transformers", metadata={"help": "Train with transformers' Trainer or TRL's SFTTrainer."}
    )
    train_file: Optional[str] = field(
        default=None, metadata={"help": "Training questions, JSON lines (default: easy-VQA's training split)."}
    )
    eval_file: Optional[str] = field(
        default=None, metadata={"help": "Evaluation questions, JSON lines (default: easy-VQA's test split)."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on at most this many questions."})
    max_eval_samples: Optional[int] = field(default=200, metadata={"help": "Evaluate on at most this many questions."})
    target_modules: Optional[str] = field(
        default=None, metadata={"help": "A regex of the modules to adapt (default: APT's defaults for the model type)."}
    )
    num_prompts: int = field(default=APTConfig.num_prompts, metadata={"help": "APT prompts per attention module."})
    r: int = field(default=APTConfig.r, metadata={"help": "Rank of APT's prompt-to-key map."})
    max_new_tokens: int = field(default=8, metadata={"help": "Tokens generated for each answer."})


# The presets, each a short run on a CPU: data sizes and Trainer settings, overridden by anything on the command line.
# `--offline` is sized to finish in under 10 minutes on 2 CPU cores.
PRESETS = {
    "tiny": dict(max_train_samples=512, max_eval_samples=64, max_steps=40, per_device_train_batch_size=8),
    "offline": dict(max_train_samples=2000, max_eval_samples=100, max_steps=60, per_device_train_batch_size=8),
}
# APT adapts the language model, a decoder: decoders take the top of APT's range (README, "Choosing hyper-parameters").
VLM_DEFAULTS = dict(
    SHORT_RUN_DEFAULTS,
    learning_rate=1e-2,
    output_dir="outputs/apt-vlm",
    logging_steps=10,
    per_device_eval_batch_size=16,
)


def parse_args(argv=None) -> tuple[VLMArguments, TrainingArguments]:
    """Parse the command line, with the defaults of `--tiny` or `--offline` under it when one is given."""
    args, training_args = parse_common_args(VLMArguments, argv, **VLM_DEFAULTS)
    if args.tiny and args.offline:
        raise ValueError("Pass either --tiny or --offline, not both.")
    preset = "tiny" if args.tiny else "offline" if args.offline else None
    if preset is not None:
        args, training_args = parse_common_args(VLMArguments, argv, **VLM_DEFAULTS, **PRESETS[preset])
    if args.offline:
        from examples.offline.llava import aligned_llava_path

        args.model_name_or_path = str(aligned_llava_path())
    if not args.tiny and not args.model_name_or_path:
        raise ValueError("Pass --model_name_or_path, --offline or --tiny.")
    return args, training_args


def read_records(path: str) -> list[dict]:
    """Questions from JSON lines; relative image paths are read from the file's folder."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not a JSON object ({error})") from None
            missing = [key for key in ("image", "question", "answer") if key not in record]
            if missing:
                raise ValueError(f"{path}, line {number}: missing field(s) {missing}")
            record["image"] = str(Path(path).parent / record["image"])
            records.append(record)
    return records


def load_records(args: VLMArguments, seed: int) -> tuple[list[dict], list[dict]]:
    """(training, evaluation) questions from the given files or easy-VQA's splits, each a seeded sample if limited."""

    def load(path, split, limit):
        return subsample(easy_vqa_records(split) if path is None else read_records(path), limit, seed)

    return load(args.train_file, "train", args.max_train_samples), load(args.eval_file, "test", args.max_eval_samples)


def load_model_and_processor(args: VLMArguments, training_args: TrainingArguments):
    """(model, processor): the tiny random LLaVA, rebuilt identically from the seed, or the pretrained model."""
    if args.tiny:
        records = easy_vqa_records("train") + easy_vqa_records("test")
        processor = tiny_llava_processor([f"{record['question']} {record['answer']}" for record in records])
        return tiny_llava(processor, training_args.seed), processor
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    return AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=dtype), processor


def user_turn(question: str) -> list[dict]:
    """The conversation before the answer: one user turn, the image then the question (as TRL builds it)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def prompt_text(processor, question: str) -> str:
    return processor.apply_chat_template(user_turn(question), add_generation_prompt=True, tokenize=False)


def completion_text(processor, question: str, answer: str) -> str:
    """What the chat template writes after the prompt for this answer: the answer and the end of its turn."""
    prompt = prompt_text(processor, question)
    answer_turn = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    conversation = processor.apply_chat_template([*user_turn(question), answer_turn], tokenize=False)
    if not conversation.startswith(prompt):
        raise ValueError(
            f"The chat template of {type(processor).__name__} renders a conversation that does not start with its "
            f"generation prompt, so the answer's tokens cannot be told apart:\n{prompt!r}\n{conversation!r}"
        )
    return conversation[len(prompt) :]


class AnswerOnlyCollator:
    """
    Batches `{image, question, answer}` records for Trainer, labelled for a loss on the answers only.

    As TRL's vision-language collator does for prompt-completion data: the prompts (with their images) and the
    completions are tokenized separately, so generation later starts from exactly the prompt tokens trained on; each
    row is its prompt then its completion, right-padded. Labels are the completion's tokens and -100 elsewhere.
    """

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        processor = self.processor
        prompts = processor(
            images=[[load_image(record["image"])] for record in records],
            text=[prompt_text(processor, record["question"]) for record in records],
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,  # the chat template writes any special tokens itself
        )
        completions = processor(
            text=[completion_text(processor, record["question"], record["answer"]) for record in records],
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
        )
        batch = dict(prompts)  # pixel_values and whatever else the processor makes of the images
        # Fields with one value per token (token_type_ids, mm_token_type_ids) are joined like the tokens; completion
        # tokens are text, type 0 where the processor gives none.
        per_token = [
            key for key, value in prompts.items() if getattr(value, "shape", None) == prompts["input_ids"].shape
        ]
        completions["labels"] = completions["input_ids"]
        prompts["labels"] = torch.full_like(prompts["input_ids"], -100)
        padding = {"input_ids": processor.tokenizer.pad_token_id, "labels": -100}
        for key in [*per_token, "labels"]:
            completion_values = completions.get(key, torch.zeros_like(completions["input_ids"]))
            rows = [
                torch.cat((prompt[prompt_mask.bool()], completion[completion_mask.bool()]))
                for prompt, prompt_mask, completion, completion_mask in zip(
                    prompts[key], prompts["attention_mask"], completion_values, completions["attention_mask"]
                )
            ]
            batch[key] = pad_sequence(rows, batch_first=True, padding_value=padding.get(key, 0))
        return batch


def sft_dataset(records: list[dict]):
    """The records as a `datasets.Dataset` in TRL's conversational prompt-completion form, images decoded lazily."""
    from datasets import Dataset, Image

    rows = [
        {
            "image": record["image"],
            "prompt": [{"role": "user", "content": record["question"]}],
            "completion": [{"role": "assistant", "content": record["answer"]}],
        }
        for record in records
    ]
    return Dataset.from_list(rows).cast_column("image", Image())


@torch.no_grad()
def generate_answers(model, processor, records: list[dict], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers to the records' questions, decoded without special tokens."""
    model.eval()
    answers = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        inputs = processor(
            images=[[load_image(record["image"])] for record in chunk],
            text=[prompt_text(processor, record["question"]) for record in chunk],
            padding=True,
            padding_side="left",
            return_tensors="pt",
            add_special_tokens=False,
        ).to(model.device, dtype=model.dtype)
        generated = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        answers += processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def normalise(answer: str) -> str:
    """Lower case, single spaces, no trailing full stop: how exact match compares answers."""
    return " ".join(answer.lower().split()).removesuffix(".").strip()


def exact_match_accuracy(records: list[dict], predictions: list[str]) -> dict[str, float]:
    """The share of predictions equal to the answer after `normalise`: overall (`all`) and per `question_type`."""
    if len(records) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    hits: dict[str, list[bool]] = {"all": []}
    for record, prediction in zip(records, predictions):
        hit = normalise(prediction) == normalise(record["answer"])
        hits["all"].append(hit)
        if "question_type" in record:
            hits.setdefault(record["question_type"], []).append(hit)
    return {name: sum(values) / len(values) for name, values in hits.items()}


def apt_config(args: VLMArguments) -> APTConfig:
    target_modules = {} if args.target_modules is None else {"target_modules": args.target_modules}
    return APTConfig(num_prompts=args.num_prompts, r=args.r, task_type="CAUSAL_LM", **target_modules)


def build_trainer(args: VLMArguments, training_args: TrainingArguments, model, processor, train_records) -> Trainer:
    """Trainer with the answer-only collator, or TRL's SFTTrainer given the APT config, whose vision-language collator
    masks the prompt itself (`completion_only_loss`, on by default for prompt-completion data)."""
    if args.trainer == "transformers":
        set_seed(training_args.seed)  # as SFTTrainer does before adding the adapter: both start from the same one
        return Trainer(
            model=get_peft_model(model, apt_config(args)),
            args=training_args,
            train_dataset=train_records,
            data_collator=AnswerOnlyCollator(processor),
        )
    try:
        from trl import SFTTrainer
    except ImportError:
        raise ImportError("--trainer trl needs TRL: pip install peft-apt[trl]") from None
    return SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=sft_dataset(train_records),
        processing_class=processor,
        peft_config=apt_config(args),
    )


def main(argv=None) -> dict[str, dict[str, float]]:
    args, training_args = parse_args(argv)
    set_seed(training_args.seed)
    train_records, eval_records = load_records(args, training_args.seed)
    model, processor = load_model_and_processor(args, training_args)

    def evaluate(model) -> dict[str, float]:
        predictions = generate_answers(
            model, processor, eval_records, training_args.per_device_eval_batch_size, args.max_new_tokens
        )
        return exact_match_accuracy(eval_records, predictions)

    results = {"before training": evaluate(model)}
    trainer = build_trainer(args, training_args, model, processor, train_records)
    main_process = trainer.is_world_process_zero()
    report_start(trainer)
    if main_process:
        print(f"{len(train_records)} training questions, {len(eval_records)} evaluation questions")
    trainer.train()
    report_processes(trainer)
    results["after training"] = evaluate(trainer.model)
    trainer.save_model(training_args.output_dir)
    if main_process:
        processor.save_pretrained(training_args.output_dir)
    end_processes(trainer)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    del trainer, model

    base, _ = load_model_and_processor(args, training_args)
    results["reloaded"] = evaluate(PeftModel.from_pretrained(base, training_args.output_dir))
    if main_process:
        print(f"training loss: first logged {losses[0]:.4f}, last logged {losses[-1]:.4f}")
        print("exact-match accuracy on", "easy-VQA's test split" if args.eval_file is None else args.eval_file)
        for name, accuracy in results.items():
            by_type = ", ".join(f"{kind} {value:.3f}" for kind, value in accuracy.items() if kind != "all")
            print(f"  {name:16} {accuracy['all']:.3f}" + (f"  ({by_type})" if by_type else ""))
    return results


if __name__ == "__main__":
    main()
