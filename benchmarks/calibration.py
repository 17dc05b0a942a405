"""How close the default init's first prompt term comes to its target on real models, per adapted module.

`APTConfig()` sizes the prompts so that the initial term ||a (A @ P)|| is `INITIAL_TERM_RATIO` times ||X||, with
||X|| read from the norm layer that produces X (`APTModel.input_norm`). This measures the ratio the term actually has
on real inputs, over its target, on SmolLM2-135M (held-out standard-library code) and DINOv2-S (digits and textile
images), against the calibration that assumed a LayerNorm-sized X (||X|| = sqrt(d)) and the reference init.

Run from the repository root: `python -m benchmarks.calibration` (about a minute), `--tiny` for random tiny models.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from contextlib import nullcontext
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
from peft import get_peft_model

from examples.offline.images import load_dataset
from examples.offline.text import stdlib_sources, token_blocks
from examples.tiny_models import tiny_corpus, tiny_dinov2, tiny_llama, word_tokenizer
from peft_apt import APTConfig, APTModel
from peft_apt.layer import INITIAL_TERM_RATIO

from .prompt_terms import prompt_terms
from .records import command_line, machine, package_versions

DESIGN_STUDIES = Path(__file__).resolve().parent / "DESIGN_STUDIES.md"
BEGIN, END = "<!-- BEGIN calibration -->", "<!-- END calibration -->"  # the block `benchmarks.report` keeps
INITS = {
    "default (calibrated on the input norm)": lambda: APTConfig(),
    "default, calibrated for a LayerNorm-sized X": lambda: APTConfig(),
    "reference init": lambda: APTConfig(init_weights="reference"),
}
ASSUMES_LAYERNORM_SIZE = "default, calibrated for a LayerNorm-sized X"


def initial_terms(model: torch.nn.Module, forward: Callable[[torch.nn.Module], None]) -> list[dict]:
    """Per APT layer, in model order: the mean over tokens of ||X|| and of ||a (A @ P)|| / ||X|| during `forward`."""
    measured = []
    for record in prompt_terms(model, forward):
        input_sizes = record["X"].flatten(0, -2).float().norm(dim=-1)
        term_sizes = record["term"].flatten(0, -2).float().norm(dim=-1)
        measured.append({"input_size": input_sizes.mean().item(), "ratio": (term_sizes / input_sizes).mean().item()})
    return measured


def measure_model(base: torch.nn.Module, forward: Callable[[torch.nn.Module], None]) -> dict[str, list[dict]]:
    """{init name: per-layer measurements} for each of `INITS` on a copy of `base`."""
    results = {}
    for name, config in INITS.items():
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        assume_layernorm_size = name == ASSUMES_LAYERNORM_SIZE
        with mock.patch.object(APTModel, "input_norm", return_value=None) if assume_layernorm_size else nullcontext():
            get_peft_model(model, config())
        results[name] = initial_terms(model, forward)
    return results


def decoder_case(tiny: bool) -> tuple[str, torch.nn.Module, Callable]:
    if tiny:
        tokenizer = word_tokenizer([tiny_corpus(seed=0)])
        model, texts, label = tiny_llama(tokenizer, seed=0), [tiny_corpus(seed=1)], "tiny Llama, generated text"
    else:
        from examples.offline.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
        texts, label = list(stdlib_sources()[1].values()), "SmolLM2-135M-Instruct, held-out standard-library code"
    blocks = token_blocks(tokenizer, texts, 64, 8)
    return label, model.eval(), lambda model: model(input_ids=blocks)


def vision_cases(tiny: bool) -> list[tuple[str, torch.nn.Module, Callable]]:
    if tiny:
        model, size = tiny_dinov2(), 32
    else:
        from examples.offline.dinov2 import load_dinov2_small

        model, size = load_dinov2_small(), 112
    cases = []
    for dataset in ("digits", "textile"):
        pixels = load_dataset(dataset, size=size, n_train=32, n_test=10, seed=0).train_images
        label = f"{'tiny DINOv2' if tiny else 'DINOv2-S'}, {dataset} at {size} px"
        cases.append((label, model.eval(), lambda model, pixels=pixels: model(pixel_values=pixels)))
    return cases


def table_lines(label: str, results: dict[str, list[dict]]) -> list[str]:
    calibrated = results[next(iter(INITS))]
    lines = [
        f"{label}:",
        "",
        "| init | " + " | ".join(str(i) for i in range(len(calibrated))) + " | median |",
        "|---|" + "---:|" * (len(calibrated) + 1),
        "| mean norm of X | "
        + " | ".join(f"{r['input_size']:.3g}" for r in calibrated)
        + f" | {statistics.median(r['input_size'] for r in calibrated):.3g} |",
    ]
    for name, layers in results.items():
        misses = [r["ratio"] / INITIAL_TERM_RATIO for r in layers]
        lines.append(f"| {name} | " + " | ".join(f"{m:.3g}" for m in misses) + f" | {statistics.median(misses):.3g} |")
    return [*lines, ""]


def report(tiny: bool) -> str:
    lines = [
        "## Initial prompt term against its target (`python -m benchmarks.calibration`)",
        "",
        f"- Machine: {machine()}",
        "- Versions: " + ", ".join(f"{name} {version}" for name, version in package_versions().items()),
        f"- Command: `{command_line()}`",
        "",
        f"Per adapted block (0 = first): the mean ||X|| entering the attention, then the initial term's mean "
        f"||a (A @ P)|| / ||X|| over the tokens divided by the default's target ({INITIAL_TERM_RATIO:g}): 1 is on "
        "target. `APTConfig()` (p=200, r=4) on every block.",
        "",
    ]
    for label, model, forward in [decoder_case(tiny), *vision_cases(tiny)]:
        lines += table_lines(label, measure_model(model, forward))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="random tiny models: a smoke test")
    parser.add_argument("--output", type=Path, default=DESIGN_STUDIES, help="the page whose calibration block to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text = args.output.read_text() if args.output.exists() else ""
    block = f"{BEGIN}\n{report(args.tiny)}\n{END}"
    kept = text.split(BEGIN)[0] + text.split(END)[-1] if BEGIN in text else text
    args.output.write_text(kept.rstrip() + "\n\n" + block + "\n")
    print(f"wrote the calibration block of {args.output}")


if __name__ == "__main__":
    main()
