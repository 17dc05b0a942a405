"""Visual question answering on a real vision-language model: the trainer of the `vqa-*` tasks.

The model is the aligned LLaVA of `examples.offline.llava` (DINOv2-S, SmolLM2-135M, a LLaVA-1.5 projector aligned on
captions), loaded from the same folder by every run. Each method fine-tunes it on easy-VQA training questions and is
scored by exact match of its greedy answer on a fixed sample of easy-VQA's test split (other images) with as many
questions of each type (yes/no, shape, colour), overall and per type. The projector trains in every method, at
`projector_lr` (at `lr` for the head-only baseline, where it is all that trains). Every method gets the same recipe:
AdamW, linear warm-up over `warmup_ratio` of the steps then cosine decay, the same questions in the same order.

Besides accuracy, a run records its cost: trainable parameters, added forward FLOPs per sample (image tokens included,
from PyTorch's FLOP counter), the memory a training step holds above the loaded model (saved activations, gradients,
AdamW's moments), and training-step and inference times relative to the frozen model (its projector
alone trained), the two measured alternately in the same process.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import statistics
import time

import torch
from peft import PeftConfig, PrefixTuningConfig, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from examples.offline.easy_vqa import QUESTION_TYPES, easy_vqa_records, sample_records, subsample
from examples.offline.llava import answer_batch, answer_loss, build_tiny_llava, generate_answers
from peft_apt import APTConfig

from .baselines import count_trainable_parameters, optimiser_for
from .cost import forward_flops, saved_for_backward_bytes

METRIC = "accuracy"
HIGHER_IS_BETTER = True
METRIC_SCALE, METRIC_DIGITS = 100, 1
TINY = dict(n_train=8, n_test_per_type=2, steps=2, batch_size=2, eval_batch_size=3, time_repeats=1)
PROJECTOR = "multi_modal_projector"
APT_TARGETS = r".*language_model.*\.self_attn"  # as the experiments' adapter_config.json


@functools.cache
def load_model(tiny: bool):
    """(aligned model, processor); tiny: a random tiny LLaVA whose vocabulary covers easy-VQA's questions."""
    if tiny:
        texts = [f"{r['question']} {r['answer']}" for split in ("train", "test") for r in sample_records(split, 50)]
        return build_tiny_llava(texts)
    from examples.offline.llava import aligned_llava_path

    path = aligned_llava_path()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(path)


@functools.cache
def load_image(path: str) -> Image.Image:
    return Image.open(path).convert("RGB")


def attach(model, params: dict, peft_config: PeftConfig | None):
    """The method's parameters trainable, and the projector's: a PEFT adapter or a `baseline` (head-only, full), or
    nothing for `zero-shot` (the aligned model as it is)."""
    model.requires_grad_(False)
    baseline = params.get("baseline")
    if baseline == "zero-shot":
        return model
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    elif baseline == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    elif baseline != "head-only":
        raise ValueError(
            f"An experiment without adapter_config.json needs `baseline` (head-only, full, zero-shot), got {baseline!r}"
        )
    projector = [module for name, module in model.named_modules() if name.endswith(PROJECTOR)]
    if len(projector) != 1:
        raise ValueError(f"Expected one {PROJECTOR} in the model, found {len(projector)}")
    projector[0].requires_grad_(True)
    return model


def optimiser(model, params: dict, steps: int):
    """`optimiser_for` with the projector as the head, at `projector_lr` (at `lr` for head-only)."""
    projector_lr = params["lr"] if params.get("baseline") == "head-only" else params["projector_lr"]
    parameters = {
        f"head.{name}" if f"{PROJECTOR}." in name else name: parameter
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    params = {**params, "head_lr_ratio": projector_lr / params["lr"]}
    return optimiser_for(parameters, params, steps, math.ceil(params["warmup_ratio"] * steps))


@functools.cache
def balanced_test_questions(per_type: int, seed: int) -> list[dict]:
    """`per_type` test questions of each type: the split is three quarters yes/no, which would hide what the model
    sees of shapes and colours."""
    records = easy_vqa_records("test")
    by_type = ([r for r in records if r["question_type"] == kind] for kind in QUESTION_TYPES)
    return [r for same_type in by_type for r in subsample(same_type, per_type, seed)]


def to_batch(processor, records: list[dict]) -> dict:
    images = [load_image(record["image"]) for record in records]
    return answer_batch(processor, images, [r["question"] for r in records], [r["answer"] for r in records])


def evaluate(model, processor, records: list[dict], batch_size: int) -> dict:
    """Exact match of the greedy answers, overall and per question type (`accuracy_yes/no`, ...)."""
    model.eval()
    correct = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [load_image(record["image"]) for record in chunk]
        answers = generate_answers(model, processor, images, [r["question"] for r in chunk])
        correct += [answer.strip().lower().rstrip(".") == record["answer"] for answer, record in zip(answers, chunk)]
    metrics = {"accuracy": sum(correct) / len(correct)}
    for kind in QUESTION_TYPES:
        hits = [hit for hit, record in zip(correct, records) if record["question_type"] == kind]
        metrics[f"accuracy_{kind}"] = sum(hits) / len(hits) if hits else None
    return metrics


def relative_times(frozen, adapted, params: dict, batch: dict, repeats: int) -> dict:
    """Median training-step and inference times of `adapted` over the frozen model's (only its projector trains),
    the two measured alternately in this process so that both see the same machine load."""
    times = {key: [] for key in ("frozen_step", "step", "frozen_inference", "inference")}

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def step(model, optimizer):
        model.train()
        answer_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer(model):
        model.eval()
        with torch.no_grad():
            model(**{name: value for name, value in batch.items() if name != "labels"})

    optimizers = {id(m): optimiser(m, params, 10)[0] for m in (frozen, adapted)}
    for _ in range(repeats + 1):  # the first round warms up
        for prefix, model in (("frozen_", frozen), ("", adapted)):
            times[f"{prefix}step"].append(timed(lambda: step(model, optimizers[id(model)])))
            times[f"{prefix}inference"].append(timed(lambda: infer(model)))
    median = {key: statistics.median(values[1:]) for key, values in times.items()}
    return {
        "step_time_ratio": median["step"] / median["frozen_step"],
        "inference_time_ratio": median["inference"] / median["frozen_inference"],
    }


def training_memory_bytes(model, batch: dict) -> int:
    """Memory a training step holds above the loaded model: the tensors autograd saves for the backward pass of
    `batch` (each storage once), the gradients and AdamW's two moments."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return saved_for_backward_bytes(model, lambda: answer_loss(model.train(), batch)) + 3 * trainable


def answer_reading(model, frozen, batch: dict) -> dict:
    """How the position that predicts the answer reads the image, against the aligned model: its attention mass on
    the image tokens and the total-variation distance of its attention rows from the aligned model's, averaged over
    the language model's layers and heads and the questions (prefix tuning's virtual keys left out)."""
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    questions, length = torch.arange(len(inputs["input_ids"])), inputs["input_ids"].shape[1]
    answer_query = (batch["labels"] != -100).int().argmax(-1) - 1 - length  # from the end: prompt tuning prepends
    image = (inputs["input_ids"] == frozen.config.image_token_id)[None, :, None]  # (layer, question, head, key)

    def attention_rows(module) -> torch.Tensor:
        previous = module.config._attn_implementation
        module.set_attn_implementation("eager")  # the only one that returns the attention weights
        with torch.no_grad():
            attentions = module(**inputs, output_attentions=True).attentions
        module.set_attn_implementation(previous)
        return torch.stack([a[questions, :, answer_query, -length:] for a in attentions])

    adapted, aligned = attention_rows(model.eval()), attention_rows(frozen)
    return {
        "answer_image_attention": float((adapted * image).sum(-1).mean()),
        "aligned_answer_image_attention": float((aligned * image).sum(-1).mean()),
        "answer_attention_change": float(0.5 * (adapted - aligned).abs().sum(-1).mean()),
    }


def run(params: dict, peft_config: PeftConfig | None, seed: int) -> dict:
    params = {**params, **(TINY if params.get("tiny") else {})}
    base, processor = load_model(bool(params.get("tiny")))
    train = sample_records("train", params["n_train"], seed=params["data_seed"])
    test = balanced_test_questions(params["n_test_per_type"], params["data_seed"])
    torch.manual_seed(seed)
    model = attach(copy.deepcopy(base), params, peft_config)
    steps = 0 if params.get("baseline") == "zero-shot" else params["steps"]
    batch_size = params["batch_size"]
    optimizer, schedule = optimiser(model, params, steps) if steps else (None, None)
    generator, epochs = torch.Generator().manual_seed(seed), max(1, math.ceil(steps * batch_size / len(train)))
    order = torch.cat([torch.randperm(len(train), generator=generator) for _ in range(epochs)])
    probe = to_batch(processor, test[:batch_size])
    one_sample = to_batch(processor, test[:1])  # unpadded
    added_flops = forward_flops(model, one_sample) - forward_flops(base, one_sample)

    memory = training_memory_bytes(model, probe) if steps else None
    losses = []
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        batch = to_batch(processor, [train[int(i)] for i in order[step * batch_size : (step + 1) * batch_size]])
        loss = answer_loss(model, batch)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - start

    metrics = evaluate(model, processor, test, params["eval_batch_size"])
    metrics.update(answer_reading(model, base, to_batch(processor, test[:: len(test) // params["eval_batch_size"]])))
    metrics["final_train_loss"] = statistics.mean(losses[-max(1, steps // 10) :]) if losses else None
    metrics["projector_params"] = sum(p.numel() for n, p in model.named_parameters() if f"{PROJECTOR}." in n)
    metrics["training_memory_bytes"] = memory
    if params.get("time_repeats") and steps and seed == 0:
        frozen = attach(copy.deepcopy(base), {**params, "baseline": "head-only"}, None)
        metrics.update(relative_times(frozen, model, params, probe, params["time_repeats"]))
    return {
        "metrics": metrics,
        "train_losses": losses or None,
        "trainable_params": count_trainable_parameters(model),
        "train_time_s": round(seconds, 2),
        "added_forward_flops": added_flops,
        "model": model,
    }


def added_flops_by_prompts(model, processor, prompt_counts=(10, 50, 200)) -> list[dict]:
    """Forward FLOPs one test sample gains, per number of prompts p, from APT (on the language model's attention), from
    PEFT's prefix tuning (p keys and values per layer) and from deep prompts as ViLT's deep prompt tuning runs them
    (p more tokens through every layer of the language model: projections, MLP and attention)."""
    sample = to_batch(processor, balanced_test_questions(1, 0)[:1])
    frozen = forward_flops(model, sample)
    language_model = model.model.language_model
    tokens, width = sample["input_ids"].shape[1], model.config.text_config.hidden_size

    def layers_flops(length: int) -> int:
        return forward_flops(language_model, {"inputs_embeds": torch.zeros(1, length, width)})

    rows = []
    for prompts in prompt_counts:
        apt = get_peft_model(copy.deepcopy(model), APTConfig(num_prompts=prompts, target_modules=APT_TARGETS))
        prefix = get_peft_model(
            copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompts)
        )
        rows.append({
            "prompts": prompts,
            "tokens": tokens,
            "frozen": frozen,
            "apt": forward_flops(apt, sample) - frozen,
            "prefix_tuning": forward_flops(prefix, sample) - frozen,
            "deep_prompt_through_layers": layers_flops(tokens + prompts) - layers_flops(tokens),
        })  # fmt: skip
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Added forward FLOPs per sample on the aligned LLaVA, by prompts.")
    parser.add_argument("--prompts", nargs="+", type=int, default=[10, 50, 200])
    args = parser.parse_args(argv)
    model, processor = load_model(tiny=False)
    for row in added_flops_by_prompts(model, processor, args.prompts):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
