"""Fine-tune a decoder (Llama, Mistral, Qwen2, ...) with APT and the Hugging Face Trainer, then generate.

Real model, on any plain-text file (one document per line or free text; it is cut into blocks):

    python examples/causal_lm.py --model_name_or_path Qwen/Qwen2-0.5B --train_file corpus.txt \
        --output_dir apt-qwen2 --num_prompts 50 --learning_rate 5e-4 --num_train_epochs 1 --bf16

Offline check (tiny random Llama, generated corpus, tokenizer built here; runs on a CPU in seconds):

    python examples/causal_lm.py --tiny --output_dir /tmp/apt-tiny-lm --max_steps 60 --learning_rate 1e-2
"""

from __future__ import annotations

import argparse
import random

import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_llama, word_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from peft_apt import APTConfig  # importing peft_apt registers APT with PEFT


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", help="A causal LM on the Hub or on disk.")
    parser.add_argument("--train_file", help="A plain-text training corpus.")
    parser.add_argument("--tiny", action="store_true", help="Tiny random Llama on a generated corpus, offline.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_prompts", type=int, default=50)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--num_train_epochs", type=float, default=1.0)
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=None, help="Text to continue after training.")
    args = parser.parse_args(argv)
    if not args.tiny and not (args.model_name_or_path and args.train_file):
        parser.error("pass --model_name_or_path and --train_file, or --tiny")
    return args


class TokenBlocks(torch.utils.data.Dataset):
    """The corpus as one token stream cut into equal blocks; labels are the inputs (the model shifts them)."""

    def __init__(self, token_ids: list[int], block_size: int):
        n_blocks = len(token_ids) // block_size
        if n_blocks == 0:
            raise ValueError(f"The corpus has {len(token_ids)} tokens, fewer than one block of {block_size}.")
        self.blocks = torch.tensor(token_ids[: n_blocks * block_size]).view(n_blocks, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def tiny_corpus(n_sentences: int = 400, seed: int = 0) -> str:
    """Sentences with learnable structure: a fixed grammar over a small vocabulary."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the bird", "my friend", "the teacher"]
    verbs = ["sees", "likes", "follows", "finds"]
    objects = ["the ball", "a tree", "the house", "a river", "the moon"]
    return " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} ." for _ in range(n_sentences))


def load(args):
    """(model, tokenizer, training text)."""
    if args.tiny:
        corpus = tiny_corpus(seed=args.seed)
        tokenizer = word_tokenizer([corpus])
        return tiny_llama(tokenizer, seed=args.seed), tokenizer, corpus
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype)
    with open(args.train_file, encoding="utf-8") as f:
        return model, tokenizer, f.read()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tiny:
        args.block_size = min(args.block_size, 32)
    model, tokenizer, text = load(args)
    dataset = TokenBlocks(tokenizer(text)["input_ids"], args.block_size)

    # Default targets: every decoder layer's `self_attn`.
    model = get_peft_model(model, APTConfig(num_prompts=args.num_prompts, r=args.r, task_type="CAUSAL_LM"))
    model.print_trainable_parameters()

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        learning_rate=args.learning_rate,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        bf16=args.bf16,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=args.tiny,
        disable_tqdm=args.tiny,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"training loss: first logged {losses[0]:.4f}, last logged {losses[-1]:.4f}")
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)

    # Load the saved adapter into a fresh base model and continue a prompt.
    base, _, _ = load(args)
    loaded = PeftModel.from_pretrained(base, args.output_dir).eval()
    prompt = args.prompt or (text.split(" .")[0] if args.tiny else text[:64])
    inputs = tokenizer(prompt, return_tensors="pt").to(loaded.device)
    with torch.no_grad():
        generated = loaded.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print("generated:", tokenizer.decode(generated[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
