"""Smoke test of benchmarks/causal_lm_quality.py on a random tiny Llama: every method trains, records and the report
appear, finished runs are reused, and a new APT recipe runs next to them."""

import json
import math

import pytest

from benchmarks.causal_lm_quality import METHODS, main


def records(folder):
    return [
        json.loads(line) for path in sorted(folder.glob("causal-lm-*.jsonl")) for line in path.read_text().splitlines()
    ]


def test_causal_lm_sweep_runs_reuses_records_and_adds_recipes(tmp_path):
    results = tmp_path / "RESULTS.md"
    common = ["--tiny", "--seeds", "0", "--lrs", "1e-2", "--output-dir", str(tmp_path), "--results-md", str(results)]
    main(common)
    first = records(tmp_path)
    assert sorted(r["method"] for r in first) == sorted(METHODS)
    frozen = first[0]["frozen_perplexity"]
    assert all(
        math.isfinite(r["perplexity"]) and r["perplexity"] > 1 and r["frozen_perplexity"] == frozen for r in first
    )
    # lr 1e-2 on a random tiny Llama: every method moves the held-out perplexity
    assert all(r["perplexity"] != frozen for r in first)
    assert {r["trainable_parameters"] > 0 for r in first} == {True}
    apt = [r for r in first if r["method"].startswith("APT")]
    assert apt and all(r["term_size_before"] > 0 and 0 <= r["term_alignment_after"] <= 1 for r in apt)
    assert all("term_size_before" not in r for r in first if not r["method"].startswith("APT"))
    sequence_kept = [r for r in first if r["method"].startswith(("APT", "LoRA"))]
    assert all(r["attention_change_train"] > 0 and r["attention_change_held_out"] > 0 for r in sequence_kept)
    assert all("attention_change_train" not in r for r in first if r not in sequence_kept)

    main([*common, "--apt", "APT p=8", '{"num_prompts": 8}'])
    second = records(tmp_path)
    assert second[: len(first)] == first  # nothing rerun
    added = second[len(first) :]
    assert [r["method"] for r in added] == ["APT p=8"] and "num_prompts=8" in results.read_text()

    text = results.read_text()
    assert text.count("<!-- BEGIN causal-lm -->") == 1
    for method in [*METHODS, "APT p=8"]:
        assert f"| {method} |" in text
    assert f"**{frozen:.2f}**" in text and "Command:" in text
    # the training-loss table: one row per method, each the record's last training loss (one seed, one lr)
    losses = text.split("Training loss over the last 5 batches")[1].split("Change of the held-out")[0]
    for r in second:
        assert f"| {r['method']} | {r['last_train_loss']:.2f} |" in losses
    assert (tmp_path / "causal-lm.png").stat().st_size > 0


def test_config_keys_do_not_depend_on_the_hash_seed():
    """LoraConfig holds target_modules as a set: a key built from its repr would differ between processes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from benchmarks.causal_lm_quality import METHODS, config_key; "
        "print([config_key(m()) for m in METHODS.values()])"
    )
    root = Path(__file__).resolve().parents[1]
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1 and len(eval(outputs.pop())) == len(METHODS)


def test_apt_records_follow_the_declared_parametrisation_version_and_the_config(monkeypatch):
    """A new parametrisation version or a changed field reruns the APT row; the multipliers APT records at injection,
    and a field added later and left unset, keep the records."""
    from dataclasses import dataclass
    from typing import Optional

    from benchmarks.causal_lm_quality import config_key
    from peft_apt import APTConfig
    from peft_apt import layer as apt_layer

    @dataclass
    class APTConfigWithALaterField(APTConfig):
        filled_in_at_injection: Optional[float] = None

    key = config_key(APTConfig(task_type="CAUSAL_LM"))
    assert config_key(APTConfig(task_type="CAUSAL_LM")) == key
    assert config_key(APTConfigWithALaterField(task_type="CAUSAL_LM")) == key
    assert config_key(APTConfigWithALaterField(task_type="CAUSAL_LM", filled_in_at_injection=0.5)) != key
    recorded = APTConfig(task_type="CAUSAL_LM", multipliers={"model.layers.0.self_attn": {"prompt": 0.5, "W2": 0.25}})
    assert config_key(recorded) == key  # what APT records at injection
    assert config_key(APTConfig(task_type="CAUSAL_LM", num_prompts=50)) != key
    monkeypatch.setattr(apt_layer, "PARAMETRISATION_VERSION", apt_layer.PARAMETRISATION_VERSION + 1)
    assert config_key(APTConfig(task_type="CAUSAL_LM")) != key


def test_reference_optimiser_is_the_authors_and_keys_its_runs_apart():
    from peft import get_peft_model

    from benchmarks.causal_lm_quality import optimiser_of, run_key
    from examples.tiny_models import tiny_llama, word_tokenizer

    model = get_peft_model(tiny_llama(word_tokenizer(["a b c"])), METHODS["APT, reference optimiser"]())
    model.base_model.model.model.norm.weight.requires_grad_(True)  # a trainable norm, kept out of weight decay
    optimizer, schedule = optimiser_of(model, lr=1e-3, steps=10, optimiser="reference")
    decayed, kept = optimizer.param_groups
    assert (decayed["weight_decay"], kept["weight_decay"]) == (0.01, 0.0) and decayed["betas"] == (0.9, 0.98)
    assert len(kept["params"]) == 1 and kept["params"][0] is model.base_model.model.model.norm.weight
    assert len(decayed["params"]) == 4 * len(model.base_model.model.model.layers)  # P, W1, W2, s per layer
    rates = []
    for _ in range(10):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates[0] == 0.0 and rates[1] == 1e-3 and schedule.get_last_lr()[0] == 0.0  # 1 warm-up step, linear to 0
    assert rates[1] - rates[2] == pytest.approx(rates[2] - rates[3])
    keys = {run_key(name, METHODS["APT"]()) for name in ("APT", "APT, reference optimiser", "APT, beta2 0.98")}
    assert len(keys) == 3
    (only_beta2,) = optimiser_of(model, lr=1e-3, steps=10, optimiser="beta2 0.98")[0].param_groups
    assert only_beta2["betas"] == (0.9, 0.98) and only_beta2["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="Unknown optimiser 'adam'"):
        optimiser_of(model, lr=1e-3, steps=10, optimiser="adam")


def test_attention_change_is_the_median_relative_change_of_the_attention_outputs():
    import torch
    from peft import LoraConfig, get_peft_model

    from benchmarks.causal_lm_quality import attention_change
    from examples.tiny_models import tiny_corpus, tiny_llama, word_tokenizer
    from peft_apt import APTConfig

    tokenizer = word_tokenizer([tiny_corpus()])
    blocks = torch.randint(3, len(tokenizer), (4, 8), generator=torch.Generator().manual_seed(0))
    lora = get_peft_model(tiny_llama(tokenizer), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert attention_change(lora, blocks, batch_size=2) == 0.0  # B = 0 at init: no change
    # APT on the last of two layers, no prompt term and exp(s) = 2: that layer's output doubles (relative change 1),
    # the first layer's is untouched (0); the median of the two is 0.5
    apt = get_peft_model(
        tiny_llama(tokenizer),
        APTConfig(num_prompts=4, target_modules=["self_attn"], layers_to_transform=[1], layers_pattern="layers"),
    )
    for name, parameter in apt.named_parameters():
        if "apt_prompt" in name:
            parameter.data.zero_()
        if "apt_s" in name:
            parameter.data.fill_(math.log(2))
    for name, parameter in apt.named_parameters():
        if "apt_W1" in name:
            parameter.requires_grad_(False)  # a run that trains a subset of the tensors
    trained = {name for name, parameter in apt.named_parameters() if parameter.requires_grad}
    assert attention_change(apt, blocks, batch_size=2) == pytest.approx(0.5, abs=1e-6)
    # measuring without the adapter and back leaves what trains as it was
    assert {name for name, parameter in apt.named_parameters() if parameter.requires_grad} == trained
