"""PEFT behaviours on APT: several adapters, unload, merge errors, task heads, half precision, gradient
checkpointing, torch.compile and AutoPeftModel."""

import copy

import pytest
import torch
import transformers as T
from families import FAMILIES, SMALL
from peft import AutoPeftModelForSequenceClassification, PeftModel, TaskType, get_peft_model
from reference import adapter_tensors, randomise_adapter, reference_hooks, run

from peft_apt import APTConfig, APTLayer

BERT = FAMILIES["bert"]
LLAMA = FAMILIES["llama"]


def bert_with_adapter(**config):
    base = BERT.build()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, APTConfig(num_prompts=4, r=2, **config))
    randomise_adapter(model)
    return model.eval(), reference


@torch.no_grad()
def test_several_adapters_switch_compose_delete_and_load(tmp_path):
    model, reference = bert_with_adapter()
    inputs = BERT.inputs()
    model.add_adapter("second", APTConfig(num_prompts=3, r=1))
    randomise_adapter(model, seed=1, adapter_name="second")
    first_tensors = adapter_tensors(model, BERT.attention_paths, "default")
    second_tensors = adapter_tensors(model, BERT.attention_paths, "second")

    model.set_adapter("second")
    with reference_hooks(reference, BERT, second_tensors):
        expected_second = run(reference, inputs)
    torch.testing.assert_close(run(model, inputs)[0], expected_second[0])

    # two active adapters apply in order: the second acts on the first one's output
    model.base_model.set_adapter(["default", "second"])
    with reference_hooks(reference, BERT, first_tensors), reference_hooks(reference, BERT, second_tensors):
        expected_both = run(reference, inputs)
    torch.testing.assert_close(run(model, inputs)[0], expected_both[0])

    model.set_adapter("default")
    model.save_pretrained(tmp_path)  # saves "default"
    model.delete_adapter("second")
    assert all("second" not in name for name, _ in model.named_parameters())
    model.load_adapter(tmp_path, adapter_name="reloaded")
    model.set_adapter("reloaded")
    with reference_hooks(reference, BERT, first_tensors):
        expected_first = run(reference, inputs)
    torch.testing.assert_close(run(model, inputs)[0], expected_first[0])


def test_added_adapter_trains_only_when_active():
    model, _ = bert_with_adapter()
    model.add_adapter("second", APTConfig(num_prompts=3, r=1))
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"default"}


@torch.no_grad()
def test_unload_returns_the_untouched_base_model():
    model, reference = bert_with_adapter()
    inputs = BERT.inputs()
    base = model.unload()
    assert not any(isinstance(m, APTLayer) for m in base.modules())
    assert [type(m) for m in base.modules()] == [type(m) for m in reference.modules()]
    assert base.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in base.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())
    assert torch.equal(run(base, inputs)[0], run(reference, inputs)[0])


def test_merging_is_refused_with_a_pointer_to_unload():
    model, _ = bert_with_adapter()
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match=r"cannot be merged.*unload\(\)"):
            merge()


def test_sequence_classification_head_trains_and_saves_with_the_adapter(tmp_path):
    torch.manual_seed(0)
    base = T.BertForSequenceClassification(T.BertConfig(hidden_size=32, vocab_size=99, num_labels=3, **SMALL)).eval()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, APTConfig(task_type=TaskType.SEQ_CLS, num_prompts=4, r=2))
    randomise_adapter(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    apt = 2 * (4 * 32 + 2 * 2 * 32 + 1)
    head = 32 * 3 + 3
    assert sum(trainable.values()) == apt + head
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
        before = run(model, BERT.inputs())[0]
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(reference, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(run(loaded, BERT.inputs())[0], before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapter_and_finite_output(dtype):
    base = BERT.build()
    full = get_peft_model(copy.deepcopy(base), APTConfig(num_prompts=4, r=2))
    randomise_adapter(full)
    half = get_peft_model(base.to(dtype), APTConfig(num_prompts=4, r=2))
    half.load_state_dict(full.state_dict(), strict=False)
    adapter_dtypes = {p.dtype for n, p in half.named_parameters() if ".apt_" in n}
    assert adapter_dtypes == {torch.float32}
    inputs = BERT.inputs()
    with torch.no_grad():
        out = run(half.eval(), inputs)[0]
        want = run(full.eval(), inputs)[0]
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=0.05)
    # large activations: exp(s) at its largest and prompts scaled up must still give finite fp16/bf16 outputs
    with torch.no_grad():
        for name, p in half.named_parameters():
            if ".apt_prompt." in name:
                p.mul_(20)
        assert torch.isfinite(run(half, inputs)[0]).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        base = LLAMA.build()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(base, APTConfig(num_prompts=4, r=2))
        randomise_adapter(model)
        model.train()
        inputs = LLAMA.inputs()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])
    assert all(g.abs().sum() > 0 for g in grads[0].values())


def test_torch_compile_matches_eager():
    model, _ = bert_with_adapter()
    inputs = BERT.inputs()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    eager = model(**inputs).last_hidden_state
    out = compiled(**inputs).last_hidden_state
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_auto_peft_model_loads_base_and_adapter(tmp_path):
    torch.manual_seed(0)
    base = T.BertForSequenceClassification(T.BertConfig(hidden_size=32, vocab_size=99, num_labels=2, **SMALL))
    base.save_pretrained(tmp_path / "base")
    base = T.BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    model = get_peft_model(base, APTConfig(task_type=TaskType.SEQ_CLS, num_prompts=4, r=2))
    randomise_adapter(model)
    with torch.no_grad():
        want = run(model.eval(), BERT.inputs())[0]
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(run(loaded, BERT.inputs())[0], want)


def test_attention_that_bypasses_its_projection_module_is_an_error():
    """A projection applied functionally would silently lose the prompt term; the layer refuses instead."""
    model, _ = bert_with_adapter()
    output = model.base_model.model.encoder.layer[0].attention.get_base_layer().output
    output.forward = lambda hidden_states, input_tensor: output.LayerNorm(
        torch.nn.functional.linear(hidden_states, output.dense.weight, output.dense.bias) + input_tensor
    )
    with pytest.raises(RuntimeError, match=r"output projection 'output.dense' was not called as a module"):
        model(**BERT.inputs())
