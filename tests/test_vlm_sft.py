"""examples/vlm_sft.py on its tiny random LLaVA and easy-VQA: the answer-only loss mask, Trainer and TRL's SFTTrainer
with an APT config, exact-match accuracy, and the saved adapter's round trip. Offline; TRL parts skip without TRL."""

import contextlib
import io
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import vlm_sft  # noqa: E402
from peft import PeftModel  # noqa: E402

from examples.offline.easy_vqa import easy_vqa_records, subsample  # noqa: E402

TRAINERS = ["transformers", "trl"]
IMAGE_TOKENS = 16  # the tiny LLaVA's 56 px images in 14 px patches, DINOv2's CLS token dropped
TINY_RUN = [
    "--tiny",
    "--max_steps",
    "6",
    "--max_train_samples",
    "48",
    "--max_eval_samples",
    "12",
    "--logging_steps",
    "2",
    "--disable_tqdm",
    "true",
]


def skip_without(trainer: str) -> None:
    if trainer == "trl":
        pytest.importorskip("trl", reason="TRL is not installed (pip install peft-apt[trl])")


@pytest.fixture(scope="module")
def tiny():
    args, training_args = vlm_sft.parse_args(["--tiny", "--output_dir", "unused"])
    model, processor = vlm_sft.load_model_and_processor(args, training_args)
    return model, processor


@pytest.fixture(scope="module")
def records():
    """Questions of every type, of different lengths (so that the batch pads)."""
    chosen = subsample(easy_vqa_records("train"), 40, seed=1)
    by_type = {}
    for record in chosen:
        by_type.setdefault(record["question_type"], []).append(record)
    batch = [record for kind in ("yes/no", "shape", "color") for record in by_type[kind][:2]]
    assert len({len(record["question"].split()) for record in batch}) > 1
    return batch


def expected_row(vocab: dict, record: dict) -> tuple[list[int], list[int]]:
    """(tokens, labels) of one record, written out from the tiny tokenizer's word vocabulary: 'user: <image>x16
    question assistant: answer <eos>', labels on the last two only."""
    words = ["user:", *["<image>"] * IMAGE_TOKENS, *record["question"].split(), "assistant:", record["answer"], "<eos>"]
    tokens = [vocab[word] for word in words]
    return tokens, [-100] * (len(tokens) - 2) + tokens[-2:]


def test_collator_labels_exactly_the_answer_and_end_of_turn(tiny, records):
    _, processor = tiny
    batch = vlm_sft.AnswerOnlyCollator(processor)(records)
    vocab, pad = processor.tokenizer.get_vocab(), processor.tokenizer.pad_token_id
    rows = [expected_row(vocab, record) for record in records]
    width = max(len(tokens) for tokens, _ in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (len(records), width)
    for i, (tokens, labels) in enumerate(rows):
        padding = width - len(tokens)
        assert batch["input_ids"][i].tolist() == tokens + [pad] * padding
        assert batch["attention_mask"][i].tolist() == [1] * len(tokens) + [0] * padding
        assert batch["labels"][i].tolist() == labels + [-100] * padding
    assert (batch["labels"] != -100).sum().item() == 2 * len(records)  # the answer word and <eos>, nothing else
    assert batch["pixel_values"].shape == (len(records), 3, 56, 56)


def test_collator_matches_trl(tiny, records):
    """TRL's vision-language collator, on the same records as TRL's prompt-completion data, builds the same batch."""
    pytest.importorskip("trl", reason="TRL is not installed (pip install peft-apt[trl])")
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    _, processor = tiny
    ours = vlm_sft.AnswerOnlyCollator(processor)(records)
    trl_collator = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)
    theirs = trl_collator(list(vlm_sft.sft_dataset(records)))
    assert set(theirs) == set(ours)
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key


def test_read_records_reads_images_beside_the_file_and_names_what_is_missing(tmp_path):
    lines = [
        {"image": "images/0.png", "question": "what color is the shape?", "answer": "red"},
        {"image": "/data/1.png", "question": "is there a circle?", "answer": "no", "question_type": "yes/no"},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    records = vlm_sft.read_records(str(tmp_path / "train.jsonl"))
    assert records == [{**lines[0], "image": str(tmp_path / "images/0.png")}, lines[1]]
    (tmp_path / "bad.jsonl").write_text(json.dumps(lines[0]) + "\n" + json.dumps({"image": "x.png"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: missing field\(s\) \['question', 'answer'\]"):
        vlm_sft.read_records(str(tmp_path / "bad.jsonl"))


def test_exact_match_accuracy_on_a_hand_made_case():
    records = [
        {"answer": "yes", "question_type": "yes/no"},
        {"answer": "no", "question_type": "yes/no"},
        {"answer": "circle", "question_type": "shape"},
        {"answer": "teal", "question_type": "color"},
        {"answer": "red", "question_type": "color"},
    ]
    predictions = [" Yes.", "no no", "circle", "teal ", "blue"]  # case, spaces and a full stop do not count
    accuracy = vlm_sft.exact_match_accuracy(records, predictions)
    assert accuracy == {"all": 3 / 5, "yes/no": 1 / 2, "shape": 1.0, "color": 1 / 2}
    assert vlm_sft.exact_match_accuracy([{"answer": "a b"}], ["A  b"]) == {"all": 1.0}  # no type: overall only
    with pytest.raises(ValueError, match="2 predictions for 1 records"):
        vlm_sft.exact_match_accuracy(records[:1], predictions[:2])


@pytest.fixture(scope="module")
def train_tiny(tmp_path_factory):
    """The example's own steps with one trainer: base weights kept, trained, saved, reloaded into a fresh base. Each
    trainer runs once per module."""
    runs = {}

    def train(trainer_name: str) -> SimpleNamespace:
        skip_without(trainer_name)
        if trainer_name not in runs:
            output_dir = tmp_path_factory.mktemp(trainer_name)
            argv = [*TINY_RUN, "--trainer", trainer_name, "--output_dir", str(output_dir)]
            args, training_args = vlm_sft.parse_args(argv)
            train_records, _ = vlm_sft.load_records(args, training_args.seed)
            model, processor = vlm_sft.load_model_and_processor(args, training_args)
            base_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
            trainer = vlm_sft.build_trainer(args, training_args, model, processor, train_records)
            trainable = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
            with contextlib.redirect_stdout(io.StringIO()):
                trainer.train()
            trainer.save_model(output_dir)
            base, _ = vlm_sft.load_model_and_processor(args, training_args)
            runs[trainer_name] = SimpleNamespace(
                model=trainer.model,
                losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
                processor=processor,
                base_before=base_before,
                trainable_before=trainable,
                reloaded=PeftModel.from_pretrained(base, output_dir),
                output_dir=output_dir,
            )
        return runs[trainer_name]

    return train


@pytest.mark.parametrize("trainer", TRAINERS)
def test_training_changes_only_the_apt_tensors(train_tiny, trainer):
    run = train_tiny(trainer)
    model, base_before, adapter_before = run.model, run.base_before, run.trainable_before
    base_after = {
        name.replace(".base_layer", ""): tensor for name, tensor in model.get_base_model().state_dict().items()
    }
    apt_names = {name for name in base_after if ".apt_" in name}
    assert set(base_after) - apt_names == set(base_before)
    assert all(torch.equal(base_after[name], tensor) for name, tensor in base_before.items())
    # trainable: APT's four tensors in each of the language model's 2 attentions, all moved by training
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(adapter_before) == 8
    assert all(".language_model.layers." in name and ".self_attn.apt_" in name for name in trainable)
    assert all(not torch.equal(trainable[name], tensor) for name, tensor in adapter_before.items())
    saved = load_file(run.output_dir / "adapter_model.safetensors")
    assert len(saved) == 8 and all(".self_attn.apt_" in key for key in saved)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_saved_adapter_reloads_to_identical_logits_and_answers(train_tiny, trainer, records):
    run = train_tiny(trainer)
    processor, reloaded = run.processor, run.reloaded
    batch = vlm_sft.AnswerOnlyCollator(processor)(records)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    trained_model = run.model.eval()
    with torch.no_grad():
        trained_logits = trained_model(**inputs).logits
        assert torch.equal(reloaded.eval()(**inputs).logits, trained_logits)
    with reloaded.disable_adapter(), torch.no_grad():
        base_logits = reloaded(**inputs).logits
    assert not torch.allclose(base_logits, trained_logits)  # the adapter matters
    answers = [vlm_sft.generate_answers(model, processor, records, 4, 4) for model in (trained_model, reloaded)]
    assert answers[0] == answers[1]


def test_trainer_and_sft_trainer_train_the_same_adapter(train_tiny):
    """Same batches, same mask, same seeded adapter: TRL's fused loss and Trainer's give the same training run."""
    trainer_run, trl_run = train_tiny("transformers"), train_tiny("trl")
    assert trl_run.losses == pytest.approx(trainer_run.losses, rel=1e-5) and len(trl_run.losses) == 3
    adapters = [load_file(run.output_dir / "adapter_model.safetensors") for run in (trainer_run, trl_run)]
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_tiny_run_reports_accuracy_before_after_and_reloaded(trainer, tmp_path):
    skip_without(trainer)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        results = vlm_sft.main([*TINY_RUN, "--trainer", trainer, "--output_dir", str(tmp_path)])
    printed = output.getvalue()
    assert list(results) == ["before training", "after training", "reloaded"]
    assert results["reloaded"] == results["after training"]
    for name, accuracy in results.items():
        line = re.search(
            rf"^  {name} +([01]\.\d{{3}})  \(yes/no ([\d.]+), shape ([\d.]+), color ([\d.]+)\)$", printed, re.M
        )
        assert [float(value) for value in line.groups()] == [
            round(accuracy[kind], 3) for kind in ("all", "yes/no", "shape", "color")
        ]
    # the reported accuracy, recounted from the reloaded adapter's answers
    args, training_args = vlm_sft.parse_args([*TINY_RUN, "--output_dir", str(tmp_path)])
    _, eval_records = vlm_sft.load_records(args, training_args.seed)
    base, processor = vlm_sft.load_model_and_processor(args, training_args)
    answers = vlm_sft.generate_answers(PeftModel.from_pretrained(base, tmp_path), processor, eval_records, 16, 8)
    hits = sum(answer.strip() == record["answer"] for answer, record in zip(answers, eval_records))
    assert results["reloaded"]["all"] == hits / len(eval_records)
    assert len(eval_records) == 12
