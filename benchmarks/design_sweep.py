"""The design sweep behind the default parametrisation, on the causal-LM benchmark's short budget.

Each variant changes the default's three constants and nothing else: the initial term's target ratio
(`INITIAL_TERM_RATIO`), the trained prompts' std relative to the reference's (`TRAINED_PROMPT_STD_RATIO`) and a factor
on W2's multiplier (`key_map_scale`), optionally with the authors' optimiser and with only some of APT's tensors
trained (the others keep their init). A variant is written `ratio,std_ratio,W2_factor,reference_optimiser[,trained]`,
e.g. `3e-3,16,1,0` (the default of parametrisation version 3) or `3e-3,16,1,0,apt_s` (only the output scale trains;
tensor names joined by `+`). `--prompt-init inputs` starts the prompts from the adapted modules' own inputs instead of
random draws (`centred-inputs`: minus the tokens' mean input), a data-dependent start that the constants cannot give.
Records resume: a (variant, prompt init, lr, seed, steps) already in the file is skipped. The few-shot image variants
are methods of `benchmarks.quality` (`APT p=200 term R P/c std S`).

Run from the repository root, e.g.
`python -m benchmarks.design_sweep --variants 3e-3,16,1,0 1e-2,16,1,0 --lrs 3e-3 1e-2`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
from pathlib import Path
from unittest import mock

import torch
from peft import get_peft_model

from peft_apt import APTConfig, APTLayer, approximated_prompt_output
from peft_apt import layer as apt_layer

from . import causal_lm_quality
from .baselines import train_only
from .markdown import environment
from .prompt_terms import prompt_terms

OUTPUT = Path(__file__).resolve().parent / "results" / "design" / "causal-lm-30-steps.jsonl"
DEFAULT_PROMPT_SCALE, DEFAULT_KEY_MAP_SCALE = apt_layer.calibrated_prompt_scale, apt_layer.key_map_scale


def use_variant(ratio: float, std_ratio: float, W2_factor: float) -> None:
    """Make `APTConfig()`'s default init use these constants (for the adapters created after the call)."""
    apt_layer.calibrated_prompt_scale = lambda p, d, size=None: DEFAULT_PROMPT_SCALE(p, d, size, target=ratio)
    apt_layer.TRAINED_PROMPT_STD_RATIO = std_ratio
    apt_layer.key_map_scale = lambda d: DEFAULT_KEY_MAP_SCALE(d) * W2_factor


def training_only(tensor_names: list[str]):
    """Within the block, the benchmark's adapted models train only the APT tensors named (e.g. `apt_s`)."""

    def adapted(model, config):
        return train_only(get_peft_model(model, config), tensor_names)

    return mock.patch.object(causal_lm_quality, "get_peft_model", adapted)


PROMPT_INITS = ("random", "inputs", "centred-inputs")


def prompts_from_inputs(blocks: torch.Tensor, centred: bool):
    """
    Within the block, the benchmark's APT adapters start from prompts drawn among their inputs X in the frozen model on
    `blocks` (minus the tokens' mean X when `centred`), at the default's trained std, with each module's prompt
    multiplier set so that the initial term is `INITIAL_TERM_RATIO` of X there. Drawn from the data, the keys start
    aligned with the tokens they score, which random prompts only reach by training.
    """

    @torch.no_grad()
    def adapted(model, config):
        peft_model = get_peft_model(model, config)
        with peft_model.disable_adapter():  # the frozen model's X, the same whatever the other layers' prompts
            records = prompt_terms(peft_model.eval(), lambda m: m(input_ids=blocks))
        layers = [module for module in peft_model.modules() if isinstance(module, APTLayer)]
        generator = torch.Generator().manual_seed(0)
        for layer, record in zip(layers, records):
            name, X = layer.active_adapters[0], record["X"]
            tokens = X.flatten(0, -2)
            prompts = tokens[torch.randperm(len(tokens), generator=generator)[: layer.apt_prompt[name].shape[0]]]
            prompts = prompts - tokens.mean(dim=0) if centred else prompts
            layer.apt_prompt[name].copy_(prompts * (0.02 * apt_layer.TRAINED_PROMPT_STD_RATIO / prompts.std()))
            P, W1, W2 = layer.prompts(name), layer.apt_W1[name], layer.W2(name)
            term = approximated_prompt_output(torch.zeros_like(X), X, P, W1, W2, X.new_zeros(1))
            ratio = (term.norm(dim=-1) / X.norm(dim=-1)).mean().item()
            layer.multipliers[name]["prompt"] *= (apt_layer.INITIAL_TERM_RATIO / ratio) ** (1 / 3)
        return peft_model

    return mock.patch.object(causal_lm_quality, "get_peft_model", adapted)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", required=True, help="ratio,std_ratio,W2_factor,reference_optimiser")
    parser.add_argument("--lrs", nargs="+", type=float, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--prompt-init", choices=PROMPT_INITS, default="random", help="where the prompts start")
    parser.add_argument("--tiny", action="store_true", help="the causal-LM benchmark's tiny Llama: a smoke test")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    benchmark = causal_lm_quality.parse_args(["--steps", str(args.steps), *(["--tiny"] if args.tiny else [])])
    records = [json.loads(line) for line in args.output.read_text().splitlines()] if args.output.exists() else []
    done = {(r["variant"], r.get("prompt_init", "random"), r["lr"], r["seed"], r["steps"]) for r in records}
    base, _, train_blocks, held_out_blocks = causal_lm_quality.load_base(benchmark)
    machine = environment(torch.device("cpu"))
    for variant, lr in itertools.product(args.variants, args.lrs):
        if (variant, args.prompt_init, lr, args.seed, args.steps) in done:
            continue
        ratio, std_ratio, W2_factor, reference, *trained = variant.split(",")
        if trained and args.prompt_init != "random":
            raise ValueError(
                f"Variant {variant!r}: a trained subset and --prompt-init {args.prompt_init} do not combine"
            )
        use_variant(float(ratio), float(std_ratio), float(W2_factor))
        config = APTConfig(task_type="CAUSAL_LM")
        optimiser = "reference" if reference == "1" else None
        if trained:
            adapting = training_only(trained[0].split("+"))
        elif args.prompt_init != "random":
            adapting = prompts_from_inputs(train_blocks[: benchmark.batch_size], args.prompt_init == "centred-inputs")
        else:
            adapting = contextlib.nullcontext()
        with adapting:
            record = causal_lm_quality.train_and_evaluate(
                config, base, train_blocks, held_out_blocks, lr, args.seed, benchmark, optimiser
            )
        record.update(
            variant=variant, prompt_init=args.prompt_init, lr=lr, seed=args.seed, steps=args.steps, environment=machine
        )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{variant} ({args.prompt_init} prompts) lr {lr:g}: perplexity {record['perplexity']:.3f}", flush=True)


if __name__ == "__main__":
    main()
