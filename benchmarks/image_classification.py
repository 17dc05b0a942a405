"""Image classification on a pretrained DINOv2 ViT-S/14 (digits, textile): the trainer of the `image-*` tasks.

Every method adapts the same last `adapted_layers` blocks and trains a linear head on [CLS; mean patch token] for the
same steps, on the same stratified split of the seed. The blocks before the adapted ones are frozen for every method,
so their outputs are computed once per split and cached. Besides accuracy, a run records how far it moved the test
features from the frozen model's (cosine) and how separable the classes are before and after: a collapse keeps the
features close to the frozen ones but erases what separates the classes.
"""

from __future__ import annotations

import copy
import functools
import math
import time

import torch
import torch.nn.functional as F
from peft import PeftConfig, get_peft_model
from torch import nn
from transformers import Dinov2Model

from examples.offline.images import load_dataset
from examples.tiny_models import tiny_dinov2
from peft_apt import APTLayer

from .baselines import add_deep_prompts, count_trainable_parameters, optimiser_for, train_only
from .calibration import term_state
from .cost import count_flops

METRIC = "accuracy"
HIGHER_IS_BETTER = True
METRIC_SCALE, METRIC_DIGITS = 100, 1
TINY = dict(size=28, n_train=20, n_test=20, adapted_layers=2, epochs=1)


@functools.cache
def load_backbone(tiny: bool, weights: str | None = None) -> Dinov2Model:
    if tiny:
        return tiny_dinov2()
    if weights:
        return Dinov2Model.from_pretrained(weights, dtype=torch.float32).eval()
    from examples.offline.dinov2 import load_dinov2_small

    return load_dinov2_small()


def split_backbone(model: Dinov2Model, adapted_layers: int) -> tuple[callable, Dinov2Model]:
    """(frozen prefix: pixels -> hidden states entering the adapted blocks, tail: a Dinov2Model of those blocks)."""
    layers = list(model.encoder.layer)
    tail = copy.deepcopy(model)
    tail.encoder.layer = nn.ModuleList(layers[-adapted_layers:])
    tail.config.num_hidden_layers = adapted_layers
    del tail.embeddings  # never called: the tail starts from cached hidden states

    @torch.no_grad()
    def prefix(pixels: torch.Tensor) -> torch.Tensor:
        outputs = []
        for batch in pixels.split(100):
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


def batched_features(tail: Dinov2Model, hidden: torch.Tensor) -> torch.Tensor:
    return torch.cat([pooled_features(tail, batch) for batch in hidden.split(100)])


def class_separation(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-class over within-class variance of the features (traces): how well a linear head can tell them."""
    means = torch.stack([features[labels == c].mean(dim=0) for c in labels.unique()])
    within = torch.stack([features[labels == c].var(dim=0).sum() for c in labels.unique()]).mean()
    return float(means.var(dim=0).sum() / within)


@functools.cache
def prepare(key: tuple) -> tuple[dict, Dinov2Model]:
    """The split of a seed pushed once through the frozen blocks, and the tail to adapt; cached per setup."""
    params = dict(key)
    model = load_backbone(params["tiny"], params.get("weights")).to(params.get("device", "cpu"))
    options = {"root": params["textile_root"]} if params.get("textile_root") else {}
    splits = load_dataset(
        params["dataset"], size=params["size"], n_train=params["n_train"], n_test=params["n_test"],
        seed=params["seed"], **options,
    )  # fmt: skip
    prefix, tail = split_backbone(model, params["adapted_layers"])
    device = next(model.parameters()).device
    data = {
        "train_hidden": prefix(splits.train_images.to(device)),
        "train_labels": splits.train_labels.to(device),
        "test_hidden": prefix(splits.test_images.to(device)),
        "test_labels": splits.test_labels.to(device),
        "num_classes": len(splits.class_names),
    }
    with torch.no_grad():
        data["frozen_test_features"] = batched_features(tail.eval(), data["test_hidden"])
    return data, tail


def attach(tail: Dinov2Model, params: dict, peft_config: PeftConfig | None) -> nn.Module:
    """Make exactly the method's parameters trainable: a PEFT adapter, or a `baseline` of the training parameters."""
    tail.requires_grad_(False)
    if peft_config is not None:
        tail = get_peft_model(tail, peft_config)
        return train_only(tail, params["train_only"]) if params.get("train_only") else tail
    baseline = params.get("baseline")
    if baseline == "full":
        tail.encoder.requires_grad_(True)
        tail.layernorm.requires_grad_(True)
    elif baseline == "deep-prompt":
        add_deep_prompts(tail, params["num_prompts"])
    elif baseline != "head-only":
        raise ValueError(f"An experiment without adapter_config.json needs `baseline`: head-only, full or deep-prompt, "
                         f"got {baseline!r}")  # fmt: skip
    return tail


def fit_linear_probe(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, l2: float) -> None:
    """Fit the head to the frozen model's training features by L-BFGS over the whole set (cross-entropy plus `l2`
    times the squared weights): linear probing, so that the steps that follow start from a trained head."""
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def added_forward_flops(base: Dinov2Model, adapted: nn.Module, hidden: torch.Tensor) -> int:
    """Forward FLOPs per image the method adds to the frozen tail (unmerged LoRA counted as run, deep prompts' attention
    included)."""

    def flops(module):
        return count_flops(torch.no_grad()(lambda: pooled_features(module, hidden[:1])))

    return flops(adapted) - flops(base)


def run(params: dict, peft_config: PeftConfig | None, seed: int) -> dict:
    """Train the method and a fresh linear head (AdamW, linear warm-up, cosine decay, or the authors' optimiser with
    `optimiser: reference`; with `linear_probe_l2`, the head is first fitted to the frozen features); test accuracy
    and what explains it."""
    params = {**params, **(TINY if params.get("tiny") else {})}
    key = ("tiny", "weights", "device", "textile_root", "dataset", "size", "n_train", "n_test", "adapted_layers")
    data, base = prepare(tuple((k, params.get(k)) for k in key) + (("seed", seed),))
    torch.manual_seed(seed)
    tail = attach(copy.deepcopy(base), params, peft_config)
    head = nn.Linear(2 * base.config.hidden_size, data["num_classes"])
    if "linear_probe_l2" in params:
        with torch.no_grad():
            frozen_train_features = batched_features(base, data["train_hidden"])
        fit_linear_probe(head, frozen_train_features, data["train_labels"], params["linear_probe_l2"])
    probe = data["test_hidden"][:64]
    is_apt = any(isinstance(module, APTLayer) for module in tail.modules())
    measure_term = (lambda: term_state(tail.eval(), lambda m: pooled_features(m, probe))) if is_apt else dict
    info = {f"{k}_before": v for k, v in measure_term().items()}
    device = data["train_labels"].device
    tail.to(device), head.to(device)
    trainable = count_trainable_parameters(tail)
    fixed = None if trainable else batched_features(tail.eval(), data["train_hidden"]).detach()
    parameters = {n: p for n, p in (*tail.named_parameters(), *head.named_parameters(prefix="head")) if p.requires_grad}
    steps = params["epochs"] * math.ceil(len(data["train_labels"]) / params["batch_size"])
    optimizer, schedule = optimiser_for(parameters, params, steps, math.ceil(params.get("warmup_ratio", 0.0) * steps))
    generator, losses = torch.Generator().manual_seed(seed), []
    start = time.perf_counter()
    tail.train()
    for _ in range(params["epochs"]):
        order = torch.randperm(len(data["train_labels"]), generator=generator).to(device)
        for batch in order.split(params["batch_size"]):
            features = fixed[batch] if fixed is not None else pooled_features(tail, data["train_hidden"][batch])
            loss = F.cross_entropy(head(features), data["train_labels"][batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    seconds = time.perf_counter() - start
    tail.eval()
    with torch.no_grad():
        features = batched_features(tail, data["test_hidden"])
        accuracy = float((head(features).argmax(dim=-1) == data["test_labels"]).float().mean())
    frozen = data["frozen_test_features"]
    info.update({f"{k}_after": v for k, v in measure_term().items()})
    metrics = {
        "accuracy": accuracy,
        "final_train_loss": losses[-1],
        "cosine_to_frozen": float(F.cosine_similarity(features, frozen, dim=-1).mean()),
        "separation": class_separation(features, data["test_labels"]),
        "frozen_separation": class_separation(frozen, data["test_labels"]),
        **info,
    }
    return {
        "metrics": metrics,
        "train_losses": losses,
        "trainable_params": trainable,
        "train_time_s": round(seconds, 2),
        "added_forward_flops": added_forward_flops(base, tail, probe),
        "model": tail,
    }
