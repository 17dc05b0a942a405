"""What the APT fine-tuning examples share: arguments, a Trainer that trains a new head faster, and what they print."""

from __future__ import annotations

import gc
import hashlib
import os
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import gather_object
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled

from peft_apt import APTConfig  # importing peft_apt registers APT with PEFT

# The examples run as scripts (`python examples/quickstart.py`, `accelerate launch examples/...`), with only their own
# folder on the path: the repository root goes right after it, so that they import the shared models and data as
# `examples.offline` and `examples.tiny_models`, as the benchmarks and tests do. Scripts import this module first
# (ruff sorts it among the third-party imports, ahead of the first-party `examples`).
REPOSITORY_ROOT = str(Path(__file__).resolve().parent.parent)
if REPOSITORY_ROOT not in sys.path:
    sys.path.insert(1, REPOSITORY_ROOT)


def accelerator_available() -> bool:
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


# Trainer defaults that fit APT: its recipe (README, "Choosing hyper-parameters"), lr 3e-3 (no few-shot run collapsed
# there) with a linear warm-up over the first 10% of the steps, frequent loss logs, and the batch keys our collators
# build (Trainer would otherwise drop them). `ddp_find_unused_parameters=False`: every trainable parameter takes part
# in each forward, and DDP then raises instead of silently paying for a graph traversal if one ever does not.
# `use_cpu` without an accelerator: processes started by torchrun (examples/accelerate/cpu_2proc.yaml) are not told to
# use the CPU, and would otherwise each train alone instead of joining a gloo group.
TRAINING_DEFAULTS = dict(
    learning_rate=3e-3,
    warmup_steps=0.1,
    logging_steps=10,
    remove_unused_columns=False,
    label_names=["labels"],
    ddp_find_unused_parameters=False,
    use_cpu=not accelerator_available(),
)


# For examples whose default is one short run on a CPU that reports at its end: a cosine decay, no checkpoints and no
# logging integrations.
SHORT_RUN_DEFAULTS = dict(lr_scheduler_type="cosine", save_strategy="no", report_to="none")


@dataclass
class APTArguments:
    """Arguments of every example besides Trainer's own."""

    tiny: bool = field(
        default=False, metadata={"help": "Train a tiny random model on generated data: runs on CPU, no download."}
    )
    # APTConfig's own defaults, so that the examples follow them when they change
    num_prompts: int = field(
        default=APTConfig.num_prompts, metadata={"help": "Approximated prompts per attention module (paper: 200)."}
    )
    r: int = field(default=APTConfig.r, metadata={"help": "Rank of APT's prompt-to-key map (paper: 4)."})
    apt_dropout: float = field(default=APTConfig.apt_dropout, metadata={"help": "Dropout on APT's prompt scores."})
    head_lr_ratio: float = field(
        default=1.0, metadata={"help": "Learning rate of the new head relative to --learning_rate."}
    )
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate on at most this many samples."})


def parse_args(script_arguments: type, args: Optional[list[str]] = None, **defaults):
    """Parse the script's own dataclass and Trainer's `TrainingArguments` from one command line."""
    parser = HfArgumentParser((script_arguments, TrainingArguments))
    parser.set_defaults(**{**TRAINING_DEFAULTS, **defaults})
    return parser.parse_args_into_dataclasses(args=args)


def load_image(image) -> Image.Image:
    """An RGB image from a PIL image or a file path (real data sets are read lazily, one batch at a time)."""
    return (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")


class APTTrainer(Trainer):
    """
    Trainer for an APT adapter plus a new head (PEFT `modules_to_save`).

    The head can learn `head_lr_ratio` times faster, as the APT reference does on VQA. The example heads average
    their loss over the local batch and ignore `num_items_in_batch`; Trainer would otherwise infer from their
    `**kwargs` that they sum over the global batch and multiply the loss, and so the gradients and the logged loss,
    by the number of processes.
    """

    def __init__(self, *args, head_lr_ratio: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_lr_ratio = head_lr_ratio
        self.model_accepts_loss_kwargs = False

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups = []
        for is_head, lr in ((False, self.args.learning_rate), (True, self.args.learning_rate * self.head_lr_ratio)):
            for decays in (True, False):
                params = [
                    p
                    for n, p in model.named_parameters()
                    if p.requires_grad and ("modules_to_save" in n) == is_head and (n in decay) == decays
                ]
                if params:
                    groups.append({"params": params, "lr": lr, "weight_decay": self.args.weight_decay * decays})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


def report_start(trainer: Trainer) -> None:
    """Refuse processes that were launched together but did not join one group, and print the trainable parameters."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and trainer.args.world_size == 1:
        # e.g. `--use_cpu false` without an accelerator: each process would train the whole run on its own, all of
        # them saving into the same output_dir
        raise RuntimeError(
            f"{launched} processes were launched but each trains alone, outside any process group "
            f"({trainer.accelerator.distributed_type.value}). Without an accelerator, keep `--use_cpu` true (the "
            "examples' default there) so that the processes join a gloo group."
        )
    if trainer.is_world_process_zero():
        trainer.model.print_trainable_parameters()


def report_processes(trainer: Trainer) -> None:
    """Say how many processes trained and check that those that each hold the whole adapter (DDP, ZeRO-1/2) end with
    the same one, so any rank could save it."""
    pids = gather_object([os.getpid()])
    line = f"{len(set(pids))} process(es) ran ({trainer.accelerator.distributed_type.value}, pids {sorted(set(pids))})"
    if trainer.is_fsdp_enabled or is_deepspeed_zero3_enabled():
        line += "; adapter sharded across processes"  # by design: each holds a part, the others are placeholders
    else:
        state = get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model))
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(name.encode() + state[name].detach().float().cpu().numpy().tobytes())
        digests = gather_object([digest.hexdigest()])
        if len(set(digests)) != 1:
            raise RuntimeError(f"The processes ended with different adapters: {digests}")
        line += "; adapter identical on all processes"
    if trainer.is_world_process_zero():
        print(line)


def release_wrapped_model(trainer: Trainer) -> None:
    """
    Release what wraps the model for training, so that no reducer outlives the process group (see `end_processes`).

    DDP's wrapper must go first: its reducer's destructor joins gloo's threads while holding the GIL and can deadlock
    if it runs after the group. DeepSpeed's engine has no reducer, and the hooks it leaves on the model keep it
    referenced: it is destroyed instead, which removes the ZeRO optimizer's hooks and buffers.
    """
    if trainer.is_deepspeed_enabled and trainer.model_wrapped is not trainer.model:
        trainer.model_wrapped.destroy()
    is_ddp = isinstance(trainer.model_wrapped, DistributedDataParallel)
    wrapped = weakref.ref(trainer.model_wrapped) if is_ddp else None
    trainer.accelerator.free_memory()  # the accelerator's references to the wrapper, optimizer and data loaders
    trainer.model_wrapped = trainer.model
    if wrapped is not None and wrapped() is not None:
        gc.collect()
        if wrapped() is not None:
            raise RuntimeError(
                "DistributedDataParallel is still referenced: its reducer would outlive destroy_process_group"
            )


def end_processes(trainer: Trainer) -> None:
    """
    Destroy the process group while Python is fully alive, after the last collective, through its last reference.

    A gloo worker thread frees each collective's tensors just after the collective returns, and needs the GIL for it.
    A group left to interpreter exit dies during finalisation, where such a thread aborts the process ("terminate
    called without an active exception"), or with DDP's reducer, whose destructor joins the threads while holding the
    GIL and can deadlock; `accelerator.end_training()` alone leaves the group to the reducer. With the wrapper
    released first, destroying the group joins its threads with the GIL released.
    """
    if not torch.distributed.is_initialized():
        return
    trainer.accelerator.wait_for_everyone()
    release_wrapped_model(trainer)
    trainer.accelerator.end_training()
    if trainer.is_world_process_zero():
        print("process group destroyed")


def add_apt(model: torch.nn.Module, script_args: APTArguments) -> PeftModel:
    """APT on the model type's default attention modules; the new head (`classifier`) trains and saves with it."""
    config = APTConfig(
        num_prompts=script_args.num_prompts,
        r=script_args.r,
        apt_dropout=script_args.apt_dropout,
        modules_to_save=["classifier"],
    )
    return get_peft_model(model, config)


def train_and_save(trainer: APTTrainer, processor) -> dict:
    """Train (resuming if asked), save the adapter and the processor at the top of output_dir, evaluate, and end the
    processes' group."""
    args = trainer.args
    report_start(trainer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    report_processes(trainer)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.output_dir)
    metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    end_processes(trainer)
    return metrics
