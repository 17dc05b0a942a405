"""The paths through transformers, TRL, diffusers and accelerate that PEFT users take with an adapter, walked with LoRA
and with APT side by side on tiny models: a change in any of these libraries that breaks APT but not LoRA fails here.
Each test checks the path's result against the same adapter in a plain `PeftModel` (round trips exact)."""

import copy
import os
from importlib.metadata import version

import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.helpers import disable_input_dtype_casting
from transformers import AutoModelForCausalLM, pipeline

import peft_apt  # noqa: F401  (registers APT)
from examples.tiny_models import tiny_corpus, tiny_llama, tiny_unet, tiny_unet_inputs, word_tokenizer
from peft_apt import APTConfig, APTLayer

ADAPTERS = ("lora", "apt")
LLAMA_LORA_TARGETS = ["q_proj", "v_proj"]
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def adapter_config(kind, lora_targets=LLAMA_LORA_TARGETS, **kwargs):
    """A LoRA or APT config whose adapter changes the output from the start (no identity init)."""
    if kind == "lora":
        return LoraConfig(r=4, target_modules=lora_targets, init_lora_weights=False, **kwargs)
    return APTConfig(num_prompts=4, r=2, init_weights=False, **kwargs)


def adapter_tensors(model):
    return {name: p for name, p in model.named_parameters() if ".lora_" in name or ".apt_" in name}


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer([tiny_corpus(50)])


@pytest.fixture(scope="module")
def llama_dir(tokenizer, tmp_path_factory):
    """A tiny Llama saved as a checkpoint folder, so that adapters record it as their base."""
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(tokenizer).save_pretrained(path)
    return path


def input_ids(tokenizer):
    return tokenizer("the cat sees the ball", return_tensors="pt").input_ids


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def saved_adapter(kind, llama_dir, tmp_path, tokenizer):
    """(adapter folder, its logits, the base's logits) for an adapter on the checkpoint at `llama_dir`."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir).eval(), adapter_config(kind))
    ids = input_ids(tokenizer)
    adapted = logits(model, ids)
    with model.disable_adapter():
        base = logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3  # the adapter acts, so the comparisons below can fail
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", adapted, base


# transformers


@pytest.mark.parametrize("kind", ADAPTERS)
def test_transformers_load_adapter(kind, llama_dir, tmp_path, tokenizer):
    adapter_dir, adapted, _ = saved_adapter(kind, llama_dir, tmp_path, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    model.load_adapter(adapter_dir)
    assert torch.equal(logits(model, input_ids(tokenizer)), adapted)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_auto_model_loads_base_and_adapter_from_the_adapter_folder(kind, llama_dir, tmp_path, tokenizer):
    adapter_dir, adapted, _ = saved_adapter(kind, llama_dir, tmp_path, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(adapter_dir).eval()
    assert torch.equal(logits(model, input_ids(tokenizer)), adapted)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_pipeline_from_the_adapter_folder_generates_as_the_adapted_model(kind, llama_dir, tmp_path, tokenizer):
    adapter_dir, adapted, _ = saved_adapter(kind, llama_dir, tmp_path, tokenizer)
    generator = pipeline("text-generation", model=str(adapter_dir), tokenizer=tokenizer, device="cpu")
    assert torch.equal(logits(generator.model, input_ids(tokenizer)), adapted)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), adapter_dir).eval()
    ids = input_ids(tokenizer)
    expected = reference.generate(input_ids=ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1] :]
    (generated,) = generator("the cat sees the ball", max_new_tokens=4, do_sample=False, return_tensors=True)
    assert generated["generated_token_ids"][ids.shape[1] :] == expected.tolist()


def transformers_adapter_api_refusal():
    """The reason transformers' own adapter API refuses the installed peft, or None where it accepts it."""
    from transformers.integrations import peft as transformers_peft

    required = getattr(transformers_peft, "MIN_PEFT_VERSION", "0")
    if Version(version("peft")) < Version(required):
        return (
            f"transformers {version('transformers')} refuses its adapter API (add_adapter, set_adapter, "
            f"disable_adapters, get_adapter_state_dict) with peft {version('peft')}: it needs peft>={required}"
        )
    return None


@pytest.mark.parametrize("kind", ADAPTERS)
def test_transformers_adapter_api(kind, llama_dir, tokenizer):
    refusal = transformers_adapter_api_refusal()
    if refusal:
        print(refusal)
        pytest.skip(refusal)
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir).eval(), adapter_config(kind))
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    model.add_adapter(adapter_config(kind), adapter_name="first")
    set_peft_model_state_dict(model, get_peft_model_state_dict(reference), adapter_name="first")
    model.set_adapter("first")
    ids = input_ids(tokenizer)
    assert torch.equal(logits(model, ids), logits(reference, ids))
    model.disable_adapters()
    with reference.disable_adapter():
        assert torch.equal(logits(model, ids), logits(reference, ids))
    model.enable_adapters()
    saved = model.get_adapter_state_dict("first")
    expected = get_peft_model_state_dict(reference)
    assert saved.keys() == {key.removeprefix("base_model.model.") for key in expected}
    assert all(torch.equal(saved[key.removeprefix("base_model.model.")], value) for key, value in expected.items())


# TRL


def chat_template_source(tokenizer, path):
    """A tokenizer folder with a chat template and two special tokens the training tokenizer lacks."""
    source = copy.deepcopy(tokenizer)
    source.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    source.eos_token = "<|im_end|>"
    source.chat_template = (
        "{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
        "{% endfor %}"
    )
    source.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ADAPTERS)
def test_trl_sft_trainer_chat_template_trains_new_tokens_and_reloads(kind, tokenizer, tmp_path):
    """TRL adds the template's tokens, makes them trainable (`trainable_token_indices`) and trains them."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    conversation = [{"role": "user", "content": "the cat sees"}, {"role": "assistant", "content": "the ball ."}]
    trainer = SFTTrainer(
        model=tiny_llama(tokenizer),
        args=SFTConfig(
            output_dir=str(tmp_path / "run"),
            chat_template_path=str(chat_template_source(tokenizer, tmp_path / "template")),
            max_steps=2,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
        ),
        train_dataset=Dataset.from_list([{"messages": conversation}] * 8),
        processing_class=copy.deepcopy(tokenizer),
        peft_config=adapter_config(kind),
    )
    model = trainer.model
    new_tokens = trainer.processing_class.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert set(new_tokens) <= set(model.peft_config["default"].trainable_token_indices["embed_tokens"])
    embeddings = model.get_input_embeddings()
    before = embeddings(torch.tensor(new_tokens)).detach().clone()
    trainer.train()
    model.eval()
    after = embeddings(torch.tensor(new_tokens)).detach()
    assert (after - before).abs().amax(dim=-1).min() > 1e-4  # each new token's embedding trained
    trainer.save_model(str(tmp_path / "final"))

    base = tiny_llama(tokenizer)
    base.resize_token_embeddings(model.get_base_model().config.vocab_size, mean_resizing=False)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "final").eval()
    trained, loaded = get_peft_model_state_dict(model), get_peft_model_state_dict(reloaded)
    assert trained.keys() == loaded.keys()
    assert any(".apt_" in key or ".lora_" in key for key in trained)
    assert all(torch.equal(trained[key], loaded[key]) for key in trained)
    assert torch.equal(reloaded.get_input_embeddings()(torch.tensor(new_tokens)), after)


# diffusers


def unet_output(unet):
    with torch.no_grad():
        return unet(**tiny_unet_inputs()).sample


@pytest.mark.parametrize("kind", ADAPTERS)
def test_diffusers_adapter_api_switches_and_disables(kind):
    pytest.importorskip("diffusers")
    unet = tiny_unet().eval()
    base = unet_output(unet)
    outputs = {}
    for seed, name in enumerate(("first", "second")):
        torch.manual_seed(seed)
        unet.add_adapter(adapter_config(kind, UNET_LORA_TARGETS), adapter_name=name)
        unet.set_adapters([name])
        outputs[name] = unet_output(unet)
    assert (outputs["first"] - outputs["second"]).abs().max() > 1e-3
    assert (outputs["first"] - base).abs().max() > 1e-3
    unet.set_adapters(["first"])
    assert torch.equal(unet_output(unet), outputs["first"])
    unet.disable_adapters()
    assert torch.equal(unet_output(unet), base)
    unet.enable_adapters()
    assert torch.equal(unet_output(unet), outputs["first"])


def test_diffusers_save_lora_adapter_round_trips_lora(tmp_path):
    pytest.importorskip("diffusers")
    unet = tiny_unet().eval()
    unet.add_adapter(adapter_config("lora", UNET_LORA_TARGETS))
    adapted = unet_output(unet)
    unet.save_lora_adapter(tmp_path)
    fresh = tiny_unet().eval()
    fresh.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True, adapter_name="default")
    assert torch.equal(unet_output(fresh), adapted)


def test_diffusers_save_lora_adapter_refuses_apt_and_names_the_way(tmp_path):
    """`load_lora_adapter` reads every folder as a LoRA: APT refuses to write one rather than leave a trap."""
    pytest.importorskip("diffusers")
    unet = tiny_unet().eval()
    unet.add_adapter(adapter_config("apt"), adapter_name="mine")
    with pytest.raises(ValueError, match=r"APT adapter 'mine' cannot be saved .*save_pretrained"):
        unet.save_lora_adapter(tmp_path, adapter_name="mine")
    assert not os.listdir(tmp_path)


# layerwise casting (diffusers' hooks: weights stored in bf16, computed in fp32)


def build_llama(tokenizer):
    return tiny_llama(tokenizer).eval()


def cast_layerwise(model):
    """diffusers' layerwise casting, skipping PEFT's adapter weights as `ModelMixin.enable_layerwise_casting` does."""
    if hasattr(model, "enable_layerwise_casting"):
        model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        return
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN, apply_layerwise_casting
    from peft.tuners.lora import LoraLayer

    skip = (*DEFAULT_SKIP_MODULES_PATTERN, *LoraLayer.adapter_layer_names)
    apply_layerwise_casting(model, torch.bfloat16, torch.float32, skip_modules_pattern=skip)


@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.parametrize("family", ["unet", "llama"])
def test_layerwise_casting_after_adapting_matches_bf16_rounded_weights(kind, family, tokenizer):
    """Adapter weights stay as they are (fp32), base weights are rounded to bf16 and everything computes in fp32: the
    same as the uncast model with its base weights rounded, to fp32 precision (a term computed or stored in bf16
    would be ~1e-3 off)."""
    pytest.importorskip("diffusers")
    if family == "unet":
        model, run = tiny_unet().eval(), unet_output
        model.add_adapter(adapter_config(kind, UNET_LORA_TARGETS))
    else:
        model = get_peft_model(build_llama(tokenizer), adapter_config(kind))
        ids = input_ids(tokenizer)
        run = lambda m: logits(m, ids)  # noqa: E731
    uncast = copy.deepcopy(model)
    cast_layerwise(model)
    assert all(p.dtype == torch.float32 for p in adapter_tensors(model).values())
    stored_in_bf16 = {name for name, p in model.named_parameters() if p.dtype == torch.bfloat16}
    assert len(stored_in_bf16) > 10
    rounded = copy.deepcopy(uncast)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name in stored_in_bf16:
                p.copy_(p.bfloat16().float())
    got = run(model)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, run(rounded), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, run(uncast), rtol=3e-2, atol=3e-2)  # within bf16 tolerance of the uncast model
    assert (run(uncast) - run(rounded)).abs().max() > 1e-4  # the weights' rounding is visible at this tolerance


@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.parametrize("family", ["unet", "llama"])
def test_layerwise_casting_before_adapting(kind, family, tokenizer):
    """Adapting a cast model: adapter tensors follow the stored weights as LoRA's do (bf16 through diffusers'
    `add_adapter`; PEFT's `get_peft_model` keeps trainable adapters in fp32), and the output stays within bf16
    tolerance of the uncast model with the same adapter."""
    pytest.importorskip("diffusers")
    if family == "unet":
        uncast, model, run = tiny_unet().eval(), tiny_unet().eval(), unet_output
        uncast.add_adapter(adapter_config(kind, UNET_LORA_TARGETS))
        cast_layerwise(model)
        model.add_adapter(adapter_config(kind, UNET_LORA_TARGETS))
        adapter_dtype = torch.bfloat16
    else:
        uncast = get_peft_model(build_llama(tokenizer), adapter_config(kind))
        model = build_llama(tokenizer)
        cast_layerwise(model)
        model = get_peft_model(model, adapter_config(kind))
        ids = input_ids(tokenizer)
        run = lambda m: logits(m, ids)  # noqa: E731
        adapter_dtype = torch.float32
    set_peft_model_state_dict(model, get_peft_model_state_dict(uncast))
    assert {p.dtype for p in adapter_tensors(model).values()} == {adapter_dtype}
    got = run(model)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, run(uncast), rtol=3e-2, atol=3e-2)


def test_apt_term_runs_in_the_compute_dtype_when_adapter_tensors_are_fp32():
    """fp8 storage, bf16 compute, fp32 adapter tensors (PEFT's default on a bf16 base): APT computes its term in bf16,
    as the uncast bf16 model does with the same weights (LoRA's layers fail here on mismatched dtypes)."""
    pytest.importorskip("diffusers")
    model = get_peft_model(tiny_unet().to(torch.bfloat16).eval(), adapter_config("apt"))
    assert all(p.dtype == torch.float32 for p in adapter_tensors(model).values())
    reference = copy.deepcopy(model)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    stored_in_fp8 = {name for name, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert len(stored_in_fp8) > 10
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in stored_in_fp8:
                p.copy_(p.to(torch.float8_e4m3fn).to(torch.bfloat16))
            elif p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)
    inputs = {
        key: value.to(torch.bfloat16) if value.is_floating_point() else value
        for key, value in tiny_unet_inputs().items()
    }
    with torch.no_grad():
        got, expected = model(**inputs).sample, reference(**inputs).sample
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_disable_input_dtype_casting(kind, tokenizer):
    model = get_peft_model(build_llama(tokenizer), adapter_config(kind))
    ids = input_ids(tokenizer)
    expected = logits(model, ids)
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers
    with disable_input_dtype_casting(model):
        assert not any(layer.cast_input_dtype_enabled for layer in layers)
        assert torch.equal(logits(model, ids), expected)
    assert all(layer.cast_input_dtype_enabled for layer in layers)


# big bases: disk offload


@pytest.mark.parametrize("kind", ADAPTERS)
def test_adapter_on_a_base_with_a_disk_offloaded_layer(kind, llama_dir, tmp_path, tokenizer, monkeypatch):
    """PEFT dispatches the adapted model with the `device_map` given to `from_pretrained`; the adapter's tensors in
    the offloaded layer stay on disk (meta) between forwards and the output is the one without offload."""
    adapter_dir, adapted, _ = saved_adapter(kind, llama_dir, tmp_path, tokenizer)
    monkeypatch.chdir(tmp_path)  # PEFT writes LoRA's copy of the offloaded checkpoint under a relative path
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    base = AutoModelForCausalLM.from_pretrained(llama_dir, device_map=device_map, offload_folder=tmp_path / "base")
    model = PeftModel.from_pretrained(
        base,
        adapter_dir,
        device_map={f"base_model.model.{module}": device for module, device in device_map.items()},
        offload_folder=tmp_path / "adapted",
    )
    offloaded = {name: p for name, p in adapter_tensors(model).items() if ".layers.1." in name}
    assert offloaded and all(p.is_meta for p in offloaded.values())
    assert not any(p.is_meta for name, p in adapter_tensors(model).items() if ".layers.0." in name)
    assert torch.equal(logits(model, input_ids(tokenizer)), adapted)
    if kind == "apt":
        assert sum(isinstance(m, APTLayer) for m in model.modules()) == 2
