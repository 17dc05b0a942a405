"""
The training side of tests/test_distributed.py: the examples' tiny ViLT and CLIP, loaded from base models saved once
(a model built under DeepSpeed's zero.Init draws other random weights), trained for a few steps and saved.

Launched in two CPU processes, or called in one for the reference. `--engine trainer` trains with the examples'
Trainer under whatever `accelerate launch` set up (DDP, DeepSpeed ZeRO-2 or ZeRO-3); `--engine fsdp2` trains with
torch's own `fully_shard` (accelerate runs FSDP2 only on accelerators) and a plain AdamW loop. For each model it writes
`<out>/<model>/`: the adapter, `logits.safetensors` (the trained model on fixed inputs) and `run.json` (what ran).
`--families DIR` first loads each model saved in DIR under the active ZeRO-3 config and records what APT adapted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import transformers
from peft import get_peft_model
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import clip_image_classification as clip_example  # noqa: E402
import vilt_vqa  # noqa: E402
from _common import (  # noqa: E402
    APTArguments,
    APTTrainer,
    add_apt,
    end_processes,
    parse_args,
    release_wrapped_model,
    report_processes,
    report_start,
)

from peft_apt import APTConfig, APTLayer  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 8
LEARNING_RATE = 2e-3
APT_ARGUMENTS = APTArguments(num_prompts=16)


@dataclass
class TinyTask:
    model_class: type
    block_class: str  # the transformer block, FSDP2's unit
    build: Callable[[], torch.nn.Module]
    records: Callable[[], tuple[list[dict], list[dict]]]  # training records, evaluation inputs
    collator: Callable[[torch.nn.Module], Callable]


def _vilt_collator(model):
    return vilt_vqa.VQACollator(vilt_vqa.tiny_processor(), model.config.label2id, model.config.max_position_embeddings)


def _vilt_records():
    return vilt_vqa.tiny_vqa_records(STEPS * GLOBAL_BATCH, seed=0), vilt_vqa.tiny_vqa_records(4, seed=1)


def _clip_records():
    train, evaluation, _ = clip_example.digits_records()
    return train[: STEPS * GLOBAL_BATCH], evaluation[:4]


TASKS = {
    "vilt": TinyTask(
        transformers.ViltForQuestionAnswering,
        "ViltLayer",
        lambda: vilt_vqa.tiny_vilt(
            len(vilt_vqa.tiny_processor().tokenizer), sorted({a for kind in vilt_vqa.ANSWERS.values() for a in kind})
        ),
        _vilt_records,
        _vilt_collator,
    ),
    "clip": TinyTask(
        transformers.CLIPForImageClassification,
        "CLIPEncoderLayer",
        lambda: clip_example.tiny_clip([str(digit) for digit in range(10)]),
        _clip_records,
        lambda model: clip_example.ClassificationCollator(clip_example.tiny_image_processor()),
    ),
}


def save_base_models(folder: Path) -> None:
    for name, task in TASKS.items():
        torch.manual_seed(0)
        task.build().save_pretrained(folder / name)


def load_with_apt(task: TinyTask, base: Path):
    model = task.model_class.from_pretrained(base)
    partitioned = all(parameter.numel() == 0 and hasattr(parameter, "ds_shape") for parameter in model.parameters())
    torch.manual_seed(0)  # the same adapter init whatever loading drew
    return add_apt(model, APT_ARGUMENTS), partitioned


def evaluation_batch(task: TinyTask, model) -> dict:
    return task.collator(model)(task.records()[1])


def finish(model, task: TinyTask, out: Path, run: dict) -> None:
    """Write the trained model's logits on the evaluation inputs (a forward every process takes part in)."""
    model.eval()
    with torch.no_grad():
        logits = model(**evaluation_batch(task, model)).logits
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_file({"logits": logits.contiguous()}, out / "logits.safetensors")
        (out / "run.json").write_text(json.dumps(run))


def train_with_trainer(name: str, base: Path, out: Path, processes: int) -> APTTrainer:
    task = TASKS[name]
    _, training_args = parse_args(
        APTArguments,
        [
            *("--output_dir", str(out), "--max_steps", str(STEPS), "--learning_rate", str(LEARNING_RATE)),
            *("--per_device_train_batch_size", str(GLOBAL_BATCH // processes), "--save_strategy", "no"),
            *("--report_to", "none", "--disable_tqdm", "true"),
        ],
    )
    model, partitioned = load_with_apt(task, base)
    trainer = APTTrainer(
        model=model, args=training_args, train_dataset=task.records()[0], data_collator=task.collator(model)
    )
    report_start(trainer)
    trainer.train()
    report_processes(trainer)
    trainer.save_model(str(out))
    run = {"processes": trainer.args.world_size, "distributed_type": trainer.accelerator.distributed_type.value}
    finish(model, task, out, {**run, "partitioned": partitioned})
    return trainer


def train_with_fully_shard(name: str, base: Path, out: Path) -> None:
    """AdamW steps on each process's share of the global batch; FSDP2 averages the gradients over processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    task = TASKS[name]
    model, _ = load_with_apt(task, base)
    rank, processes = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if processes > 1:
        for module in model.modules():
            if type(module).__name__ == task.block_class:
                fully_shard(module)
        fully_shard(model)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    records, collator = task.records()[0], task.collator(model)
    share = GLOBAL_BATCH // processes
    model.train()
    for step in range(STEPS):
        first = step * GLOBAL_BATCH + rank * share
        model(**collator(records[first : first + share])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    apt_sharded = all(isinstance(p, DTensor) for n, p in model.named_parameters() if ".apt_" in n)
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out, state_dict=state_dict)
    finish(model, task, out, {"processes": processes, "apt_sharded": apt_sharded})


def adapted_families(folder: Path) -> dict:
    """Load each saved family model (partitioned, under ZeRO-3) and add APT: what was partitioned and adapted, or
    why loading failed."""
    found = {}
    for directory in sorted(folder.iterdir()):
        config = json.loads((directory / "config.json").read_text())
        try:
            model = getattr(transformers, config["architectures"][0]).from_pretrained(directory)
        except (RuntimeError, TypeError) as error:  # limits of DeepSpeed or transformers (the test names them)
            found[directory.name] = {"error": str(error)}
            continue
        partitioned = all(parameter.numel() == 0 and hasattr(parameter, "ds_shape") for parameter in model.parameters())
        model = get_peft_model(model, APTConfig(num_prompts=4, r=2))
        adapted = {
            path: list(module.apt_prompt["default"].shape)
            for path, module in model.get_base_model().named_modules()
            if isinstance(module, APTLayer)
        }
        found[directory.name] = {"partitioned": partitioned, "adapted": adapted}
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("trainer", "fsdp2"), required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--families", type=Path)
    args = parser.parse_args()
    if args.engine == "fsdp2":
        dist.init_process_group("gloo")
        for name in TASKS:
            train_with_fully_shard(name, args.base / name, args.out / name)
        # as `end_processes`: a barrier after the last collective, so no gloo thread is still freeing its tensors
        # when the group goes (under load that aborted a process: "terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
        return
    trainers = []
    for name in TASKS:
        trainers.append(train_with_trainer(name, args.base / name, args.out / name, int(os.environ["WORLD_SIZE"])))
        if args.families and len(trainers) == 1:  # under the first Trainer's (ZeRO-3) config
            families = adapted_families(args.families)
            if trainers[0].is_world_process_zero():
                (args.out / "families.json").write_text(json.dumps(families))
    for trainer in trainers[:-1]:
        release_wrapped_model(trainer)
    end_processes(trainers[-1])


if __name__ == "__main__":
    main()
