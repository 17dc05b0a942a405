"""The APT layer: an attention module whose output gains the approximated prompt term."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import threading
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .constants import OUTPUT_PROJECTION_NAMES

# The version of what decides what an APT adapter learns beside its config: the formula, the initialisation and the
# default's multipliers. Bump it with any change to them (tests/test_parametrisation.py fails until it is bumped);
# benchmark records are keyed by it.
PARAMETRISATION_VERSION = 3

# The default's initial prompt term relative to the module's input, ||a (A @ P)|| / ||X|| (||X|| read from the norm that
# produces X): small enough that the adapted model starts close to the frozen one (docs/initialisation.md says how it
# was chosen).
INITIAL_TERM_RATIO = 3e-3

# The default draws apt_prompt at this many times the reference std (0.02) and keeps P = prompt_scale * apt_prompt
# where the reference init puts it: each Adam step then changes P this many times less relative to its size.
TRAINED_PROMPT_STD_RATIO = 16

MERGE_ERROR = (
    "APT adapters cannot be merged into the base weights: the approximated prompt term depends on each input, it is "
    "not a weight update. Use `unload()` to get the untouched base model back, or keep the adapter for inference."
)


def approximated_prompt_output(
    output: torch.Tensor,
    query_states: torch.Tensor,
    prompts: torch.Tensor,
    W1: torch.Tensor,
    W2: torch.Tensor,
    log_scale: torch.Tensor,
    dropout: float = 0.0,
    training: bool = False,
    prompt_scale: float = 1.0,
    W2_scale: float = 1.0,
) -> torch.Tensor:
    """
    The APT formula of the authors' reference code, for one attention module.

    `output` is O, the attention output right after its output projection, and `query_states` is X, the hidden
    states entering the attention on the query side; both end in the hidden size d. Only the keys are computed once
    per call; everything else is two matmuls over the tokens. The prompt weight `a` is a constant for
    backpropagation, as in the reference code. With P = prompt_scale * prompts and W2 = W2_scale * W2:

        K  = P + (P @ W1) @ W2
        A  = dropout(relu(X @ K^T))
        a  = max_j A[..., j]          (detached)
        O' = exp(s) * (O + a * (A @ P))

    The two matmuls over the tokens are nearly all of the cost, so the rest is arranged to add as few passes over
    memory as possible: `a` scales the n x p scores rather than the n x d product (p < d in practice), and the sum
    with O is fused into the second matmul. The multipliers (positive: they pass through relu and max, so the term
    is prompt_scale^3 times the one of the unscaled tensors) ride on the matmuls instead of making scaled copies of
    the tensors on every call. Under autocast the matmuls run in the autocast dtype (with its GEMMs' fp32
    accumulation) and the result keeps that dtype.
    """
    d, num_prompts = prompts.shape[-1], prompts.shape[0]
    keys = torch.addmm(prompts, prompts @ W1, W2, alpha=W2_scale)  # K / prompt_scale
    scores = (query_states @ keys.T).relu_()
    scores = F.dropout(scores, p=dropout, training=training)
    weight = scores.detach().amax(dim=-1, keepdim=True)
    summed = torch.addmm(
        output.reshape(-1, d), (scores * weight).reshape(-1, num_prompts), prompts, alpha=prompt_scale**3
    )
    return log_scale.exp().to(summed.dtype) * summed.view(output.shape)


@functools.lru_cache
def calibrated_prompt_scale(
    num_prompts: int, hidden_size: int, input_size: Optional[float] = None, target: float = INITIAL_TERM_RATIO
) -> float:
    """
    The factor c such that prompts c * P, P drawn as in the reference init, make the initial prompt term `target`
    times inputs X of norm `input_size` (default sqrt(d), a LayerNorm-sized X).

    With the reference init (P ~ N(0, 0.02^2)) the term a * (A @ P) grows with the cube of the prompts' scale, with p
    and with ||X||^2; on pretrained ViTs it starts as large as O itself and wrecks the features, while on decoders
    whose norms shrink X it barely acts. P is isotropic and K = P at init, so the term's size depends on p, d and
    ||X|| alone: fixed Gaussian draws of that norm measure it without data and the cube root gives the scale.
    """
    # on the CPU whatever device a model is being built on (`with torch.device("meta")` included)
    cpu = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    probes = torch.randn(256, hidden_size, generator=generator, device=cpu)
    probes *= (input_size or math.sqrt(hidden_size)) / probes.norm(dim=-1, keepdim=True)
    prompts = 0.02 * torch.randn(num_prompts, hidden_size, generator=generator, device=cpu)
    no_rank = torch.zeros(hidden_size, 0, device=cpu)
    term = approximated_prompt_output(
        torch.zeros_like(probes), probes, prompts, no_rank, no_rank.T, torch.zeros(1, device=cpu)
    )
    ratio = (term.norm(dim=-1) / probes.norm(dim=-1)).mean().item()
    return (target / ratio) ** (1 / 3)


@torch.no_grad()
def normalised_input_size(norm: Optional[nn.Module], hidden_size: int) -> Optional[float]:
    """
    The typical ||X|| of an attention whose input X is `norm`'s output: the mean norm of its outputs on fixed Gaussian
    draws. A norm layer's output size is set by its own weights (LayerNorm: about sqrt(|gamma|^2 + |beta|^2); RMSNorm
    and Gemma's 1 + w alike), whatever its input, so the weights alone measure it, the same on every run. None where
    there is no norm or its weights are not loaded yet (meta).
    """
    weights = list(norm.parameters()) if norm is not None else []
    if (
        norm is None
        or any(weight.is_meta for weight in weights)
        or any(full_shape(w)[-1] != hidden_size for w in weights)
    ):
        return None  # no norm, its weights not loaded yet, or a norm before a projection to d (ELECTRA's embeddings)
    probes = torch.randn(256, hidden_size, generator=torch.Generator().manual_seed(0), device="cpu")
    like = weights[0] if weights else probes
    with _gathered(weights):
        return norm(probes.to(like.device, like.dtype)).float().norm(dim=-1).mean().item()


def _gathered(parameters: list[nn.Parameter]):
    """The full parameters for the duration, where DeepSpeed ZeRO-3 has partitioned them (every rank calls this)."""
    if any(hasattr(parameter, "ds_id") for parameter in parameters):
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
    return contextlib.nullcontext()


def key_map_scale(hidden_size: int) -> float:
    """
    The default multiplier k of W2 = k * apt_W2: 1/sqrt(d), rounded to a power of two.

    W1 ~ N(0, 1) (the reference init) makes P @ W1 sqrt(d) times larger than P, so a plain Adam step on W2 turns the
    keys K = P + P W1 W2 about sqrt(d) times faster than a step on P moves them; the term, quadratic in X K^T, then
    runs away at learning rates LoRA takes. k undoes that amplification without changing W1's init (with Adam, a
    multiplier on a parameter is a learning rate on it). A power of two keeps the effective W2 exact in any format.
    """
    return 2.0 ** round(math.log2(hidden_size**-0.5))


def full_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's shape, also where DeepSpeed ZeRO-3 has partitioned it: its local tensor is then an empty placeholder
    and `ds_shape` holds the real shape (as PEFT's LoRA reads it)."""
    return getattr(weight, "ds_shape", weight.shape)


def find_output_projection(attention: nn.Module) -> Optional[str]:
    """Path, relative to `attention`, of the module whose output is O ("" for the module itself), or None."""
    if isinstance(attention, nn.MultiheadAttention):
        return ""
    for path in OUTPUT_PROJECTION_NAMES:
        try:
            projection = attention.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(getattr(projection, "weight", None), torch.Tensor) and len(full_shape(projection.weight)) == 2:
            return path
    return None


def output_size(projection: nn.Module) -> int:
    """The output size of an output projection (or nn.MultiheadAttention), from its declared sizes where it has
    them (see `APTLayer.hidden_size`)."""
    if isinstance(projection, nn.MultiheadAttention):
        return projection.embed_dim
    return (
        getattr(projection, "out_features", None) or getattr(projection, "nf", None) or full_shape(projection.weight)[0]
    )


@contextlib.contextmanager
def _onloaded(modules: list[nn.Module]):
    """
    The modules' tensors loaded for the duration where accelerate offloads them (a base dispatched with a
    `device_map` that offloads to CPU or disk). accelerate's hooks load a module's tensors when the module is called;
    APT's parameter dicts are read, never called, so their hooks run here.
    """
    hooks = [(module, module._hf_hook) for module in modules if getattr(module, "_hf_hook", None) is not None]
    for module, hook in hooks:
        hook.pre_forward(module)
    try:
        yield
    finally:
        for module, hook in hooks:
            hook.post_forward(module, None)


@dataclass(eq=False)  # compared by identity: removing one call must never compare tensors
class _RunningCall:
    """One APT layer's forward in progress: its X, and whether its output projection has run yet."""

    layer: "APTLayer"
    query_states: torch.Tensor
    term_added: bool = False


class _ThreadState(threading.local):
    """
    Per-thread state of APT forwards. Threads that share one model (a server answering requests in parallel) each
    see only their own calls, so no call ever reads another call's X or adapter names.
    """

    def __init__(self) -> None:
        self.running: list[_RunningCall] = []
        self.adapter_names: Optional[list[str]] = None


_THREAD_STATE = _ThreadState()


def current_adapter_names() -> Optional[list[str]]:
    """The per-sample adapter names of the mixed-adapter batch running in this thread, or None."""
    return _THREAD_STATE.adapter_names


def set_adapter_names(adapter_names: Optional[list[str]]) -> Optional[list[str]]:
    """Set this thread's per-sample adapter names (see `APTModel._enable_peft_forward_hooks`); returns the old ones."""
    previous, _THREAD_STATE.adapter_names = _THREAD_STATE.adapter_names, adapter_names
    return previous


class APTLayer(nn.Module, BaseTunerLayer):
    """
    Wraps an attention module and adds APT's approximated prompt term to its output projection's result.

    The term needs X, the attention's query-side input, and must land right after the output projection (before
    dropout, residual and, in post-LN blocks, the LayerNorm that live inside some attention modules). So the layer
    reads X from its own call and a forward hook, registered once on the projection, adds the term. X travels from
    the layer to the hook through per-thread state, so concurrent calls from several threads never mix. Outside an
    APT forward (adapters disabled, or the projection called on its own) the hook does nothing. The base module's
    weights and code are never modified; `unload()` removes the hook.

    With the default init two tensors are trained through fixed multipliers, so that Adam's steps have the size that
    keeps training stable whatever the prompts' scale: P = c * apt_prompt (apt_prompt at `TRAINED_PROMPT_STD_RATIO`
    times the reference std, so a small initial term does not turn a usual learning rate into a huge relative one) and
    W2 = k * apt_W2 (see `key_map_scale`); `prompts()` and `W2()` give the formula's tensors. Parameters are saved as
    they are trained; the multipliers are kept in `multipliers[adapter_name]`, the adapter config's record for this
    module (`APTConfig.multipliers`), and so saved in adapter_config.json.
    """

    adapter_layer_names = ("apt_prompt", "apt_W1", "apt_W2", "apt_s")
    other_param_names = ("num_prompts", "r", "apt_dropout", "multipliers")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        output_projection: str,
        num_prompts: int,
        r: int,
        apt_dropout: float = 0.0,
        init_weights: Union[bool, str] = True,
        multipliers: Optional[dict[str, float]] = None,
        input_norm: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.output_projection = output_projection
        self.apt_prompt = nn.ParameterDict({})
        self.apt_W1 = nn.ParameterDict({})
        self.apt_W2 = nn.ParameterDict({})
        self.apt_s = nn.ParameterDict({})
        self.num_prompts: dict[str, int] = {}
        self.r: dict[str, int] = {}
        self.apt_dropout: dict[str, float] = {}
        self.multipliers: dict[str, dict[str, float]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # read by `peft.helpers.disable_input_dtype_casting`, which diffusers' layerwise casting applies
        self.cast_input_dtype_enabled = True
        self._active_adapter = adapter_name
        # The first parameter of the attention's forward carries X (`hidden_states`, or `query` for
        # nn.MultiheadAttention); models pass it positionally or by keyword.
        self.query_argument = next(iter(inspect.signature(base_layer.forward).parameters))
        self._projection_hook = self._projection().register_forward_hook(self._add_prompt_term)
        self.update_layer(adapter_name, num_prompts, r, apt_dropout, init_weights, multipliers, input_norm)

    def _projection(self) -> nn.Module:
        """The module whose output is O: the output projection, or nn.MultiheadAttention itself."""
        return self.get_base_layer().get_submodule(self.output_projection)

    @property
    def hidden_size(self) -> int:
        """
        d, taken from the module itself: composite configs (CLIP, BridgeTower) have no single hidden size. Read from
        the layer's declared sizes, not its weight, whose shape is packed in quantized layers (bitsandbytes 4-bit),
        partitioned under DeepSpeed ZeRO-3 and transposed in transformers' `Conv1D` (GPT-2, which declares `nf`).
        """
        return output_size(self._projection())

    def _projection_weight(self) -> torch.Tensor:
        projection = self._projection()
        return projection.out_proj.weight if isinstance(projection, nn.MultiheadAttention) else projection.weight

    def update_layer(
        self,
        adapter_name: str,
        num_prompts: int,
        r: int,
        apt_dropout: float,
        init_weights: Union[bool, str],
        multipliers: Optional[dict[str, float]] = None,
        input_norm: Optional[nn.Module] = None,
    ) -> None:
        """
        Add (or re-create) the adapter `adapter_name`. `multipliers` is the adapter config's record of this module's
        multipliers: the values it holds are used (a loaded adapter's), the missing ones are set and written to it.
        `input_norm` is the norm layer producing X, whose output size the default init calibrates on (None: a
        LayerNorm-sized X).
        """
        d = self.hidden_size
        self.num_prompts[adapter_name] = num_prompts
        self.r[adapter_name] = r
        self.apt_dropout[adapter_name] = apt_dropout
        self.apt_prompt[adapter_name] = nn.Parameter(torch.empty(num_prompts, d))
        self.apt_W1[adapter_name] = nn.Parameter(torch.empty(d, r))
        self.apt_W2[adapter_name] = nn.Parameter(torch.empty(r, d))
        self.apt_s[adapter_name] = nn.Parameter(torch.empty(1))
        self.multipliers[adapter_name] = {} if multipliers is None else multipliers
        self.reset_apt_parameters(adapter_name, init_weights, input_norm)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_apt_parameters(
        self, adapter_name: str, init_weights: Union[bool, str], input_norm: Optional[nn.Module] = None
    ) -> None:
        prompts, W1, W2, log_scale = (getattr(self, name)[adapter_name] for name in self.adapter_layer_names)
        # The multipliers depend on p, d and the base model's weights only: a model built again from the same config
        # gets the same ones, also where only the tensors are loaded (a resumed Trainer run). Powers of two keep P and
        # W2 exact in any float format and the multiplier the same across machines' rounding; apt_prompt absorbs the
        # rest of the calibrated scale, within a factor sqrt(2) of its target std.
        default = init_weights is True
        scale = (
            calibrated_prompt_scale(*prompts.shape, normalised_input_size(input_norm, prompts.shape[1]))
            if default
            else 1.0
        )
        record = self.multipliers[adapter_name]
        record.setdefault("prompt", 2.0 ** round(math.log2(scale)) / (TRAINED_PROMPT_STD_RATIO if default else 1))
        record.setdefault("W2", key_map_scale(prompts.shape[1]) if default else 1.0)
        if prompts.is_meta:
            return
        # The reference code's initialisation: K = P and exp(s) = 1 at the start.
        nn.init.normal_(prompts, mean=0.0, std=0.02)
        nn.init.normal_(W1, mean=0.0, std=1.0)
        if init_weights is False:
            # Every term non-trivial, P W1 W2 on the scale of P; for tests only.
            nn.init.normal_(W2, mean=0.0, std=1.0 / math.sqrt(W1.shape[0] * max(W1.shape[1], 1)))
            nn.init.normal_(log_scale, mean=0.0, std=0.1)
            return
        nn.init.zeros_(W2)
        nn.init.zeros_(log_scale)
        prompts.mul_(scale / self.prompt_scale(adapter_name))

    def prompt_scale(self, adapter_name: str) -> float:
        """c in P = c * apt_prompt."""
        return self.multipliers[adapter_name]["prompt"]

    def W2_scale(self, adapter_name: str) -> float:
        """k in W2 = k * apt_W2."""
        return self.multipliers[adapter_name]["W2"]

    def prompts(self, adapter_name: str) -> torch.Tensor:
        """The effective prompts P of the formula: `prompt_scale` times `apt_prompt`."""
        return self.prompt_scale(adapter_name) * self.apt_prompt[adapter_name]

    def W2(self, adapter_name: str) -> torch.Tensor:
        """The effective W2 of the formula: `W2_scale` times `apt_W2`."""
        return self.W2_scale(adapter_name) * self.apt_W2[adapter_name]

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Follow the output projection's device and floating dtype (PEFT's autocast then keeps adapters in fp32)."""
        weight = self._projection_weight()
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        for name in self.adapter_layer_names:
            parameters = getattr(self, name)
            if adapter_name in parameters and not parameters[adapter_name].is_meta:
                parameters[adapter_name] = parameters[adapter_name].to(device or weight.device, dtype=dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        raise ValueError(MERGE_ERROR)

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """
        diffusers' `set_adapters(names, weights)` weights LoRA deltas. APT's term is not a weighted delta (exp(s) scales
        the whole output), so only the neutral weight 1.0, what `set_adapters(names)` passes, is accepted.
        """
        if scale != 1.0:
            raise ValueError(
                f"APT adapter '{adapter_name}' cannot be weighted ({scale!r} given): APT has no adapter weight. Call "
                "`set_adapters(names)` without `weights`, or with weights of 1.0."
            )

    def remove_projection_hook(self) -> None:
        """Detach from the base module (on unload), which then computes exactly what it did before APT."""
        self._projection_hook.remove()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters or not any(name in self.apt_prompt for name in self.active_adapters):
            return self.base_layer(*args, **kwargs)
        if self.query_argument in kwargs:
            query_states = kwargs[self.query_argument]
        elif args:
            query_states = args[0]
        else:
            raise TypeError(
                f"APT could not find the query-side hidden states: {type(self.base_layer).__name__} was called "
                f"without a positional argument or `{self.query_argument}=`."
            )
        if query_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"APT on {type(self.base_layer).__name__}: the query-side input has last dimension "
                f"{query_states.shape[-1]} but the output projection has {self.hidden_size} features."
            )
        call = _RunningCall(self, query_states)
        running = _THREAD_STATE.running
        running.append(call)
        try:
            output = self.base_layer(*args, **kwargs)
        finally:
            running.remove(call)
        if not call.term_added:
            raise RuntimeError(
                f"APT on {type(self.base_layer).__name__}: its output projection '{self.output_projection}' was not "
                "called as a module during the forward (applied functionally, e.g. by a custom attention "
                "processor), so the prompt term could not be added."
            )
        return output

    def _add_prompt_term(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        """Forward hook on the output projection: O -> exp(s) * (O + a * (A @ P)) during this layer's own call."""
        running = _THREAD_STATE.running
        if not running or running[-1].layer is not self:
            return None
        call = running[-1]
        call.term_added = True
        attention_output = output[0] if isinstance(output, tuple) else output
        adapter_names = current_adapter_names()
        with _onloaded([getattr(self, name) for name in self.adapter_layer_names]):
            if adapter_names is None:
                result = self._apply_adapters(self.active_adapters, attention_output, call.query_states)
            else:
                result = self._mixed_batch_prompt_term(adapter_names, attention_output, call.query_states)
        return (result, *output[1:]) if isinstance(output, tuple) else result

    def _apply_adapters(self, adapter_names: list[str], output: torch.Tensor, query_states: torch.Tensor):
        """O' for these adapters in order, each applied to the previous one's output."""
        result = output
        for adapter_name in adapter_names:
            if adapter_name not in self.apt_prompt:
                continue
            prompts, W1, W2, log_scale = (getattr(self, name)[adapter_name] for name in self.adapter_layer_names)
            device_type = result.device.type  # autocast does not exist on every device (meta)
            # Under autocast the matmuls run in the autocast dtype: casting to fp32 first would be wasted.
            if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
                if self.cast_input_dtype_enabled:
                    # The term in the adapter's dtype (fp32 masters on a half-precision base), as LoRA does.
                    result = self._cast_input_dtype(result, prompts.dtype)
                    query_states = self._cast_input_dtype(query_states, prompts.dtype)
                else:
                    # Hooks set the compute dtype (diffusers' layerwise casting): the term runs in it.
                    prompts, W1, W2, log_scale = (tensor.to(result.dtype) for tensor in (prompts, W1, W2, log_scale))
            result = approximated_prompt_output(
                result,
                query_states,
                prompts,
                W1,
                W2,
                log_scale,
                dropout=self.apt_dropout[adapter_name],
                training=self.training,
                prompt_scale=self.prompt_scale(adapter_name),
                W2_scale=self.W2_scale(adapter_name),
            )
        return result.to(output.dtype)

    def _batch_dim(self, query_states: torch.Tensor) -> int:
        """Sequence-first nn.MultiheadAttention (the default) carries the batch in dim 1; everything else in dim 0."""
        base_layer = self.get_base_layer()
        sequence_first = isinstance(base_layer, nn.MultiheadAttention) and not base_layer.batch_first
        return 1 if sequence_first and query_states.ndim == 3 else 0

    def _mixed_batch_prompt_term(self, adapter_names: list[str], output: torch.Tensor, query_states: torch.Tensor):
        """Each sample gets its own adapter (or none for "__base__"); adapters this layer lacks leave it as it is."""
        batch_dim = self._batch_dim(query_states)
        if query_states.ndim < 3 or query_states.shape[batch_dim] != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} names for an input of shape {tuple(query_states.shape)} (batch dimension "
                f"{batch_dim}) at {type(self.get_base_layer()).__name__}."
            )
        result = output
        for adapter_name in dict.fromkeys(adapter_names):
            if adapter_name not in self.apt_prompt:
                continue
            rows = torch.tensor(
                [i for i, name in enumerate(adapter_names) if name == adapter_name], device=output.device
            )
            sub_result = self._apply_adapters(
                [adapter_name], output.index_select(batch_dim, rows), query_states.index_select(batch_dim, rows)
            )
            result = result.index_copy(batch_dim, rows, sub_result)
        return result

    def __repr__(self) -> str:
        return "apt." + super().__repr__()
