"""
The cost task's trainer (`benchmarks/tasks/cost`): what a method adds to a frozen model, measured.

A run builds the experiment's `model` (random weights at the real sizes: cost does not depend on them) and the method
on a copy that shares the frozen weights. Per sample it counts forward FLOPs of the frozen model and of the method,
the method's training-step FLOPs (torch.utils.flop_counter: matmuls, attention, convolutions) and the activation bytes
autograd saves for backward (a deterministic proxy of training memory). Then it times the method's inference and
training step (forward, backward, AdamW) against the frozen model's forward, interleaved in one process, and reports
medians of per-repetition ratios, so that drifts in machine load cancel. On the meta device (`"device": "meta"`) only
FLOPs are counted: a 7B model costs neither memory nor time. `sweep` (`{name: values}`) repeats the measurement at each
value of a training parameter or of an adapter-config field.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import time
from typing import Callable, Optional

import torch
import transformers as T
from peft import PeftConfig, PeftModel, get_peft_model
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from peft_apt import APTLayer

from .baselines import DeepPrompts

TINY = dict(repetitions=1, warmup=0, compile_backend="aot_eager", layers=2, tokens=16)  # on the CPU, off meta
TINY_LAYER = dict(hidden_size=32, num_attention_heads=2, intermediate_size=37)


@dataclasses.dataclass
class Setup:
    """A frozen model, the function that runs it (or a PEFT model of it) on its inputs, and where methods attach."""

    description: str
    model: nn.Module
    forward: Callable[[nn.Module], torch.Tensor]
    hidden_size: int
    head: Optional[str] = None  # trained by every method; alone, it is head-only training
    prompt_layers: tuple[str, ...] = ()  # the layer lists deep prompts join
    image_tokens: int = 0  # per sample, where a language model reads images as tokens


def run_inputs(inputs: dict) -> Callable[[nn.Module], torch.Tensor]:
    def forward(model: nn.Module) -> torch.Tensor:
        output = model(**inputs)
        return output.logits if hasattr(output, "logits") else output

    return forward


def image_and_text(params: dict, side: int) -> dict:
    batch = params["batch_size"]
    return dict(
        input_ids=torch.randint(3, 99, (batch, params["text_tokens"])), pixel_values=torch.randn(batch, 3, side, side)
    )


def vilt(params: dict) -> Setup:
    """ViLT-B/32 for VQAv2 at 384x384, every patch kept."""
    tiny = dict(TINY_LAYER, num_hidden_layers=2, image_size=64, patch_size=16, vocab_size=99)
    config = T.ViltConfig(**tiny) if params["tiny"] else T.ViltConfig(num_labels=3129)
    config.max_image_length = -1
    side, patch = config.image_size, config.patch_size
    description = (
        f"ViLT-B/32: d={config.hidden_size}, {config.num_hidden_layers} layers, {params['text_tokens']} text + "
        f"{(side // patch) ** 2 + 1} image tokens ({side}x{side}), batch {params['batch_size']}"
    )
    model, forward = T.ViltForQuestionAnswering(config), run_inputs(image_and_text(params, side))
    return Setup(description, model, forward, config.hidden_size, "classifier", ("vilt.encoder.layer",))


def bridgetower(params: dict) -> Setup:
    """BridgeTower-base (METER's architecture): RoBERTa-base and CLIP ViT-B/16 at 288x288, 6+6 cross-modal layers."""
    if params["tiny"]:
        small = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
        vision = dict(hidden_size=64, num_hidden_layers=2, image_size=32, patch_size=8)
        text = dict(hidden_size=64, vocab_size=99, **small)
        config = T.BridgeTowerConfig(text_config=text, vision_config=vision, hidden_size=64, **small)
    else:
        config = T.BridgeTowerConfig()
    side, patch, layers = config.vision_config.image_size, config.vision_config.patch_size, config.num_hidden_layers
    description = (
        f"BridgeTower-base: d={config.hidden_size}, {layers}+{layers} cross-modal layers (APT on their {4 * layers} "
        f"attention modules), {params['text_tokens']} text + {(side // patch) ** 2 + 1} image tokens ({side}x{side}), "
        f"batch {params['batch_size']}"
    )
    model, forward = T.BridgeTowerForImageAndTextRetrieval(config), run_inputs(image_and_text(params, side))
    prompt_layers = ("bridgetower.cross_modal_text_layers", "bridgetower.cross_modal_image_layers")
    return Setup(description, model, forward, config.hidden_size, "itm_score", prompt_layers)


class LayerStack(nn.Module):
    """Transformer layers run one after the other on fixed hidden states (a buffer, shared by the copies), under
    `torch.autocast` in `autocast` when given, as `Trainer --bf16` runs fp32 weights."""

    def __init__(self, layers: list[nn.Module], hidden_states: torch.Tensor, autocast: Optional[str] = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.register_buffer("hidden_states", hidden_states, persistent=False)
        self.autocast = getattr(torch, autocast) if autocast else None

    def forward(self) -> torch.Tensor:
        hidden_states = self.hidden_states
        device_type = hidden_states.device.type
        with torch.autocast(device_type, self.autocast) if self.autocast else contextlib.nullcontext():
            for layer in self.layers:
                output = layer(hidden_states)
                hidden_states = output[0] if isinstance(output, tuple) else output
        return hidden_states


def vilt_layers(params: dict) -> Setup:
    """`layers` ViLT-B encoder layers alone on `tokens` random hidden states: what a GPU times without ViLT's CPU-bound
    patch sampling, and one layer for the sweeps. With `input_needs_grad`, backward reaches the input as it does in
    the middle of a network."""
    config = T.ViltConfig(**TINY_LAYER) if params["tiny"] else T.ViltConfig()
    layers = [T.models.vilt.modeling_vilt.ViltLayer(config) for _ in range(params["layers"])]
    hidden_states = torch.randn(params["batch_size"], params["tokens"], config.hidden_size)
    hidden_states.requires_grad_(params.get("input_needs_grad", False))
    stack = LayerStack(layers, hidden_states, params.get("autocast"))
    description = (
        f"{params['layers']} ViLT-B layer(s) alone: d={config.hidden_size}, {params['tokens']} tokens, batch "
        f"{params['batch_size']}, fp32 weights" + (f", {params['autocast']} autocast" if params.get("autocast") else "")
    )
    return Setup(description, stack, lambda model: model(), config.hidden_size, prompt_layers=("layers",))


LLAVA = {  # (CLIP vision tower, Llama language model) sizes; LLaVA-1.5-7B is CLIP ViT-L/14-336 and Llama-2-7B
    "llava-1.5-7b": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32064),
    ),
    # a quarter of the width, 4 layers, the vocabulary cut so that the output layer keeps about its 7B share of FLOPs
    "llava-1.5-scaled": (
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4),
        dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=16, vocab_size=4000),
    ),
    "tiny": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100),
    ),
}


def llava(params: dict) -> Setup:
    """A LLaVA-1.5 of `LLAVA[model]`'s sizes: each image is 576 tokens (24x24 patches of 14 px at 336 px) that the
    language model reads before `text_tokens` text tokens. The image features are computed apart and joined to the
    text embeddings as LLaVA does, so that the meta device needs no data-dependent check."""
    vision, text = LLAVA["tiny" if params["tiny"] else params["model"]]
    vision = T.CLIPVisionConfig(**{"image_size": 336, "patch_size": 14, **vision})
    config = T.LlavaConfig(vision_config=vision, text_config=T.LlamaConfig(**text), vision_feature_layer=-2)
    model, batch, side = T.LlavaForConditionalGeneration(config), params["batch_size"], vision.image_size
    d = text["hidden_size"]
    pixel_values = torch.randn(batch * params["images"], 3, side, side)
    input_ids = torch.randint(3, text["vocab_size"], (batch, params["text_tokens"]))

    def forward(peft_or_llava: nn.Module) -> torch.Tensor:
        llava = peft_or_llava.get_base_model() if isinstance(peft_or_llava, PeftModel) else peft_or_llava
        image = llava.model.get_image_features(
            pixel_values, vision_feature_layer=-2, vision_feature_select_strategy="default"
        )
        embeddings = torch.cat(
            [torch.stack(image.pooler_output).reshape(batch, -1, d), llava.get_input_embeddings()(input_ids)], 1
        )
        return peft_or_llava(inputs_embeds=embeddings).logits

    description = (
        f"LLaVA-1.5 language model d={d}, {text['num_hidden_layers']} layers, vocabulary {text['vocab_size']}; CLIP "
        f"vision tower d={vision.hidden_size}, {vision.num_hidden_layers} layers; {params['images']} image(s) of "
        f"{(side // 14) ** 2} tokens + {params['text_tokens']} text tokens, batch {batch}"
    )
    return Setup(description, model, forward, d, image_tokens=params["images"] * (side // 14) ** 2)


def dinov2(params: dict) -> Setup:
    """DINOv2 ViT-S/14 at `size` px with the image tasks' head: a linear layer on [CLS; mean patch token]."""
    sizes = dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536)
    config = T.Dinov2Config(**(dict(TINY_LAYER, num_hidden_layers=2) if params["tiny"] else sizes), num_labels=10)
    forward = run_inputs(dict(pixel_values=torch.randn(params["batch_size"], 3, params["size"], params["size"])))
    description = (
        f"DINOv2-S/14: d={config.hidden_size}, {config.num_hidden_layers} layers, {params['size']} px "
        f"({(params['size'] // 14) ** 2 + 1} tokens), batch {params['batch_size']}"
    )
    model = T.Dinov2ForImageClassification(config)
    return Setup(description, model, forward, config.hidden_size, "classifier", ("dinov2.encoder.layer",))


def smollm2(params: dict) -> Setup:
    """SmolLM2-135M's shapes: a Llama with d=576, 30 layers, 9 heads of which 3 key-value."""
    sizes = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9)
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = T.LlamaConfig(
        **(tiny if params["tiny"] else sizes),
        num_key_value_heads=2 if params["tiny"] else 3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    batch = params["batch_size"]
    forward = run_inputs(dict(input_ids=torch.randint(0, config.vocab_size, (batch, params["tokens"]))))
    description = f"SmolLM2-135M: d={config.hidden_size}, {config.num_hidden_layers} layers, "
    description += f"{params['tokens']} tokens, batch {batch}"
    return Setup(description, T.LlamaForCausalLM(config), forward, config.hidden_size)


MODELS = {
    "vilt-b32": vilt,
    "bridgetower-base": bridgetower,
    "vilt-b32-layers": vilt_layers,
    "llava-1.5-7b": llava,
    "llava-1.5-scaled": llava,
    "dinov2-small": dinov2,
    "smollm2-135m": smollm2,
}


def attach(setup: Setup, params: dict, peft_config: Optional[PeftConfig]) -> nn.Module:
    """The method on a copy of the frozen model that shares every frozen tensor (so copies cost no memory) and owns
    the head: a PEFT adapter, or the `baseline` of the training parameters (head-only, full, deep-prompt: VPT-deep)."""
    full = peft_config is None and params.get("baseline") == "full"  # trains every weight: owns them all
    head = setup.model if full else setup.model.get_submodule(setup.head) if setup.head else nn.Module()
    own = {id(t) for t in [*head.parameters(), *head.buffers()]}
    memo = {id(t): t for t in [*setup.model.parameters(), *setup.model.buffers()] if id(t) not in own}
    model = copy.deepcopy(setup.model, memo).requires_grad_(False)
    if peft_config is not None:
        return get_peft_model(model, peft_config)
    baseline = params.get("baseline")
    if full:
        model.requires_grad_(True)
    elif baseline == "deep-prompt":
        layers = [layer for path in setup.prompt_layers for layer in model.get_submodule(path)]
        model.deep_prompts = DeepPrompts(layers, params["num_prompts"], setup.hidden_size, init_bound=0.02)
    elif baseline != "head-only":
        raise ValueError(
            f"A cost experiment without adapter_config.json needs `baseline`: head-only, full or deep-prompt; "
            f"got {baseline!r}"
        )
    if setup.head:
        model.get_submodule(setup.head).requires_grad_(True)
    return model


def count_flops(run: Callable[[], object]) -> int:
    """FLOPs of `run`, every token's attention included: the counter knows no fused CPU attention kernel (it would
    leave out the prompts' keys and prefix tuning's virtual tokens), so it runs the math one."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def forward_flops(model: nn.Module, batch: dict) -> int:
    """FLOPs of one forward pass of `batch`, its `labels` left out."""
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    return count_flops(torch.no_grad()(lambda: model(**inputs)))


def apt_formula_flops(model: nn.Module, run: Callable[[], object]) -> int:
    """APT's cost by its formula, 4*n*p*d (X @ K^T and A @ P) + 4*p*r*d (K = P + P @ W1 @ W2) per adapted module and
    forward, with n the query tokens each APT layer sees during `run`."""
    calls = []

    def log(layer, args, kwargs):
        query = kwargs.get(layer.query_argument, args[0] if args else None)
        p, r, d = layer.num_prompts["default"], layer.r["default"], query.shape[-1]
        calls.append(4 * query.shape[:-1].numel() * p * d + 4 * p * r * d)

    layers = [module for module in model.modules() if isinstance(module, APTLayer)]
    handles = [layer.register_forward_pre_hook(log, with_kwargs=True) for layer in layers]
    run()
    for handle in handles:
        handle.remove()
    return sum(calls)


def saved_for_backward_bytes(model: nn.Module, forward: Callable[[], object]) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in a training `forward` of `model`, weights and
    buffers excluded."""
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in fixed:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()  # alive until counted: no storage is freed and reused meanwhile
    del output
    return sum(saved.values())


def make_runs(frozen: nn.Module, head_only: nn.Module, model: nn.Module, forward: Callable) -> dict[str, Callable]:
    """The timed runs: the frozen model's forward, head-only training's step (for a model without a head: a forward
    in training mode and the loss), the method's inference and its training step (forward, backward, AdamW)."""

    @torch.no_grad()
    def infer(module: nn.Module) -> None:
        forward(module.eval())

    def stepper(module: nn.Module) -> Callable[[], None]:
        trainable = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

        def step() -> None:
            loss = forward(module.train()).float().square().mean()
            if loss.requires_grad:
                loss.backward()
            if optimizer:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return step

    runs = dict(frozen_forward=lambda: infer(frozen), head_only_step=stepper(head_only))
    return dict(runs, inference=lambda: infer(model), train_step=stepper(model))


def timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds of `run`: wall time on CUDA (synchronised), else this process's CPU time, which leaves out the time
    the scheduler gave to other jobs on a shared machine (with one torch thread)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def interleaved_times(runs: dict, repetitions: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Each repetition times every run once, in an order rotated from one repetition to the next, so that drifts in
    machine load hit all runs alike and cancel in per-repetition ratios; `warmup` untimed rounds first."""
    names, times = list(runs), {name: [] for name in runs}
    for repetition in range(-warmup, repetitions):
        shift = max(repetition, 0) % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = timed(runs[name], device)
            if repetition >= 0:
                times[name].append(seconds)
    return times


def peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory of `run` above what was allocated before it."""
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    return torch.cuda.max_memory_allocated(device) - before


def measure(params: dict, peft_config: Optional[PeftConfig], seed: int) -> tuple[dict, nn.Module]:
    """Every cost of one setting, per sample; times only off the meta device."""
    torch.manual_seed(seed)
    device = torch.device(params["device"])
    with device:  # models and inputs made where they run: quick even at 7B sizes, and free on the meta device
        setup = MODELS[params["model"]](params)
    frozen = setup.model.requires_grad_(False).eval()
    model = attach(setup, params, peft_config)
    head = setup.head.split(".") if setup.head else ()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    forward, batch = setup.forward, params["batch_size"]
    frozen_flops = count_flops(torch.no_grad()(lambda: forward(frozen)))
    flops = count_flops(torch.no_grad()(lambda: forward(model.eval())))
    metrics = dict(
        setting=setup.description,
        **({"image_tokens": setup.image_tokens} if setup.image_tokens else {}),
        trainable_params=sum(p.numel() for n, p in trainable.items() if not (head and set(head) <= set(n.split(".")))),
        frozen_forward_flops=frozen_flops // batch,
        added_forward_flops=(flops - frozen_flops) // batch,
        apt_formula_flops=apt_formula_flops(model, torch.no_grad()(lambda: forward(model))) // batch,
        train_step_flops=count_flops(lambda: forward(model.train()).float().square().mean().backward()) // batch,
    )
    model.zero_grad(set_to_none=True)
    if device.type == "meta":
        return metrics, model
    metrics["saved_for_backward_bytes"] = saved_for_backward_bytes(model, lambda: forward(model.train())) // batch
    models = [frozen, attach(setup, {"baseline": "head-only"}, None), model]
    if params.get("compile"):
        backend = params["compile_backend"]
        models = [torch.compile(m.get_base_model() if isinstance(m, PeftModel) else m, backend=backend) for m in models]
    runs = make_runs(*models, forward)
    if params.get("compile"):
        metrics["compile_s"] = {name: timed(run, device) for name, run in runs.items()}  # the first calls compile
    times = interleaved_times(runs, params["repetitions"], params["warmup"], device)
    method = peft_config.peft_type.lower().replace("_", "-") if peft_config else params["baseline"]  # its folder name
    ratios_of = {"inference": ("inference", "frozen_forward"), "step": ("train_step", "head_only_step")}
    for key, (name, reference) in ratios_of.items():
        ratios = [a / b for a, b in zip(times[name], times[reference])]
        metrics[f"{key}_time_ratio"] = {method: statistics.median(ratios)}
    metrics.update(times_s=times, clock="wall" if device.type == "cuda" else "cpu")
    if device.type == "cuda":
        metrics["peak_bytes"] = {name: peak_bytes(run, device) for name, run in runs.items()}
    return metrics, model


def run(params: dict, peft_config: Optional[PeftConfig], seed: int) -> dict:
    """The runner's entry point: the costs of the experiment's method, at each value of `sweep` if there is one."""
    if params.get("tiny"):
        params = {**params, **TINY, "device": "meta" if params["device"] == "meta" else "cpu"}
    (key, values), *_ = (params.get("sweep") or {None: [None]}).items()
    points, model = [], None
    for value in values:
        config = copy.deepcopy(peft_config)
        if key is not None and hasattr(config, key):
            config = dataclasses.replace(config, **{key: value})
        point, model = measure(params if key is None else {**params, key: value}, config, seed)
        points.append(point if key is None else {key: value, **point})
    first = points[0]
    return dict(
        metrics=first if key is None else {"sweep": key, "points": points},
        trainable_params=first["trainable_params"],
        added_forward_flops=first["added_forward_flops"],
        model=None if params["device"] == "meta" else model,  # the runner measures the adapter file of real ones
    )
