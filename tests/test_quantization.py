"""Quantized bases (QLoRA-style): APT on bitsandbytes 4-bit (nf4, fp4) and 8-bit Llama layers, which bitsandbytes runs
on the CPU. The packed 4-bit weight must not be mistaken for the hidden size; the term matches the independent
reference on the quantized model; training with `prepare_model_for_kbit_training` and gradient checkpointing, save and
load, and generation work, with the APT tensors in fp32. CI installs `peft-apt[quantization]`."""

import pytest

pytest.importorskip("bitsandbytes")

import torch  # noqa: E402
import transformers as T  # noqa: E402
from families import SMALL  # noqa: E402
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from reference import adapter_tensors, randomise_adapter, reference_hooks  # noqa: E402
from test_families import FAMILIES  # noqa: E402

from peft_apt import APTConfig  # noqa: E402

LLAMA = FAMILIES["llama"]
HIDDEN, P, R = 64, 5, 2
QUANTIZATIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    torch.manual_seed(0)
    # bitsandbytes' packed CPU kernel (taken on AVX-512 machines) needs every quantized output size divisible by 32
    small = {**SMALL, "intermediate_size": 64}
    config = T.LlamaConfig(hidden_size=HIDDEN, num_key_value_heads=1, vocab_size=99, **small)
    path = tmp_path_factory.mktemp("llama")
    T.LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_quantized(path, kind):
    config = T.BitsAndBytesConfig(**QUANTIZATIONS[kind])
    return T.LlamaForCausalLM.from_pretrained(path, quantization_config=config).eval()


def tokens():
    return torch.randint(3, 99, (2, 8), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("kind", QUANTIZATIONS)
def test_quantized_base_matches_reference_and_round_trips(saved_llama, kind, tmp_path):
    model = get_peft_model(load_quantized(saved_llama, kind), APTConfig(num_prompts=P, r=R))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == len(LLAMA.attention_paths) * (P * HIDDEN + 2 * R * HIDDEN + 1)
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    randomise_adapter(model)

    reference = load_quantized(saved_llama, kind)
    ids = tokens()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        base = reference(input_ids=ids).logits
        with reference_hooks(reference, LLAMA, adapter_tensors(model, LLAMA.attention_paths)):
            expected = reference(input_ids=ids).logits
    torch.testing.assert_close(adapted, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(adapted, base, atol=1e-3)

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load_quantized(saved_llama, kind), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, adapted)


@pytest.mark.parametrize("kind", QUANTIZATIONS)
def test_kbit_training_with_gradient_checkpointing_and_generation(saved_llama, kind):
    base = prepare_model_for_kbit_training(load_quantized(saved_llama, kind), use_gradient_checkpointing=True)
    model = get_peft_model(base, APTConfig(num_prompts=P, r=R, init_weights=False, task_type="CAUSAL_LM"))
    model.train()
    ids = tokens()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in before)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    assert losses[-1] < losses[0]

    model.eval()
    with torch.no_grad():
        cached = model.generate(input_ids=ids[:, :4], max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(input_ids=ids[:, :4], max_new_tokens=4, do_sample=False, use_cache=False)
    assert cached.shape == (2, 8) and torch.equal(cached, uncached)
