"""What APT's prompt term is on real inputs: the measurements the quality benchmarks record (`term_state`), and how
close the default init's first term comes to its target, per adapted module (`python -m benchmarks.calibration`).

`APTConfig()` sizes the prompts so that the initial term ||a (A @ P)|| is `INITIAL_TERM_RATIO` times ||X||, with
||X|| read from the norm layer that produces X (`APTModel.input_norm`). The calibration measures the ratio the term
actually has on real inputs, over its target, on SmolLM2-135M (held-out standard-library code) and DINOv2-S (digits
and textile images), against the calibration that assumed a LayerNorm-sized X (||X|| = sqrt(d)) and the reference
init.

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
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from examples.offline.images import load_dataset
from examples.offline.text import stdlib_sources, token_blocks
from examples.tiny_models import tiny_corpus, tiny_dinov2, tiny_llama, word_tokenizer
from peft_apt import APTConfig, APTLayer, APTModel, approximated_prompt_output
from peft_apt.layer import INITIAL_TERM_RATIO

from .records import command_line, machine, package_versions
from .report import markdown_table

DESIGN_STUDIES = Path(__file__).resolve().parent / "DESIGN_STUDIES.md"
BEGIN, END = "<!-- BEGIN calibration -->", "<!-- END calibration -->"  # the block `benchmarks.report` keeps
INITS = {  # name: (config, whether ||X|| is taken as a LayerNorm's sqrt(d) rather than read from the input norm)
    "default (calibrated on the input norm)": (APTConfig, False),
    "default, calibrated for a LayerNorm-sized X": (APTConfig, True),
    "reference init": (lambda: APTConfig(init_weights="reference"), False),
}


@torch.no_grad()
def prompt_terms(model: nn.Module, forward: Callable[[nn.Module], object]) -> list[dict]:
    """
    Per APT layer of `model`, in model order, during `forward(model)`: "X", the attention's query-side input, "O", its
    output projection's output before the term (the raw output: a tuple for nn.MultiheadAttention), and "term",
    a (A @ P) of the active adapter on that X.
    """
    captured, handles = [], []
    for layer in (module for module in model.modules() if isinstance(module, APTLayer)):
        record = {"layer": layer}
        captured.append(record)

        def keep_input(module, args, kwargs, record=record):
            record["X"] = kwargs[module.query_argument] if module.query_argument in kwargs else args[0]

        def keep_output(_, args, output, record=record):
            record["O"] = output

        handles.append(layer.register_forward_pre_hook(keep_input, with_kwargs=True))
        # prepended: runs before the layer's own hook adds the term
        handles.append(layer._projection().register_forward_hook(keep_output, prepend=True))
    try:
        forward(model)
    finally:
        for handle in handles:
            handle.remove()
    for record in captured:
        layer, X = record.pop("layer"), record["X"]
        name = layer.active_adapters[0]
        P, W1, W2 = layer.prompts(name), layer.apt_W1[name], layer.W2(name)
        record["term"] = approximated_prompt_output(torch.zeros_like(X), X, P, W1, W2, X.new_zeros(1))
    return captured


def term_state(model: nn.Module, forward: Callable[[nn.Module], object]) -> dict:
    """
    The term's size, the median over layers of ||a (A @ P)|| / ||O|| over the batch (how far the adapter takes the
    attention from the frozen one), and its direction: the mean over layers and tokens of |cos(term, the tokens' mean
    X)|. Near 1, the term adds to every token the direction all tokens share, which the next norm turns into a loss of
    what tells them apart.
    """
    sizes, alignments = [], []
    for record in prompt_terms(model, forward):
        output = record["O"][0] if isinstance(record["O"], tuple) else record["O"]  # nn.MultiheadAttention: a tuple
        sizes.append(float(record["term"].norm() / output.norm()))
        common = F.normalize(record["X"].flatten(0, -2).mean(dim=0), dim=0)
        alignments.append(F.cosine_similarity(record["term"].flatten(0, -2), common[None], dim=-1).abs().mean())
    return {"term_alignment": float(torch.stack(alignments).mean()), "term_size": statistics.median(sizes)}


def measure_model(base: nn.Module, forward: Callable[[nn.Module], None]) -> dict[str, list[dict]]:
    """{init name: per APT layer, the mean over tokens of ||X|| and of ||a (A @ P)|| / ||X||} on copies of `base`."""
    results = {}
    for name, (config, assume_layernorm_size) in INITS.items():
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        with mock.patch.object(APTModel, "input_norm", return_value=None) if assume_layernorm_size else nullcontext():
            get_peft_model(model, config())
        results[name] = []
        for record in prompt_terms(model, forward):
            input_sizes = record["X"].flatten(0, -2).float().norm(dim=-1)
            term_sizes = record["term"].flatten(0, -2).float().norm(dim=-1)
            ratio = (term_sizes / input_sizes).mean().item()
            results[name].append({"input_size": input_sizes.mean().item(), "ratio": ratio})
    return results


def decoder_case(tiny: bool) -> tuple[str, nn.Module, Callable]:
    if tiny:
        tokenizer = word_tokenizer([tiny_corpus(seed=0)])
        model, texts, label = tiny_llama(tokenizer, seed=0), [tiny_corpus(seed=1)], "tiny Llama, generated text"
    else:
        from examples.offline.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
        texts, label = list(stdlib_sources()[1].values()), "SmolLM2-135M-Instruct, held-out standard-library code"
    blocks = token_blocks(tokenizer, texts, 64, 8)
    return label, model.eval(), lambda model: model(input_ids=blocks)


def vision_cases(tiny: bool) -> list[tuple[str, nn.Module, Callable]]:
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
    sizes = [r["input_size"] for r in calibrated]
    rows = [["mean norm of X", *(f"{size:.3g}" for size in sizes), f"{statistics.median(sizes):.3g}"]]
    for name, layers in results.items():
        misses = [r["ratio"] / INITIAL_TERM_RATIO for r in layers]
        rows.append([name, *(f"{m:.3g}" for m in misses), f"{statistics.median(misses):.3g}"])
    return [f"{label}:", "", *markdown_table(["init", *map(str, range(len(sizes))), "median"], rows), ""]


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
