"""Encoder-decoders as PEFT users run them: `task_type="SEQ_2_SEQ_LM"` gives a `PeftModelForSeq2SeqLM` that trains
(the loss falls with only APT's tensors trained), generates, saves, and reloads exactly, with
`AutoPeftModelForSeq2SeqLM` from the adapter folder alone. Whisper too, although `PeftModelForSeq2SeqLM.forward`
passes `input_ids=None`, which Whisper would hand on to its decoder (`APTModel.forward` leaves it out); it reloads
with `PeftModel.from_pretrained`, since transformers' `AutoModelForSeq2SeqLM` has no Whisper."""

import pytest
import torch
from families import FAMILIES
from peft import AutoPeftModelForSeq2SeqLM, PeftModel, PeftModelForSeq2SeqLM, get_peft_model
from test_decoders import generate

from peft_apt import APTConfig

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 8


def train(model, family):
    """A few AdamW steps on one batch, the labels its decoder tokens; the loss in eval mode (no dropout) before and
    after."""
    inputs = family.inputs()
    labels = inputs.pop("decoder_input_ids")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(**inputs, labels=labels).loss.item()

    before = eval_loss()
    model.train()
    for _ in range(STEPS):
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return before, eval_loss()


@pytest.mark.parametrize(
    "family, task_type",
    [(FAMILIES["t5"], "SEQ_2_SEQ_LM"), (FAMILIES["bart"], "SEQ_2_SEQ_LM"), (FAMILIES["whisper"], "SEQ_2_SEQ_LM")],
    ids=["t5", "bart", "whisper"],
)
def test_seq2seq_trains_generates_and_reloads(family, task_type, tmp_path):
    family.build().save_pretrained(tmp_path / "base")
    model_class = type(family.build())
    model = get_peft_model(model_class.from_pretrained(tmp_path / "base"), APTConfig(task_type=task_type))
    assert isinstance(model, PeftModelForSeq2SeqLM) == (task_type == "SEQ_2_SEQ_LM")
    before, after = train(model, family)
    assert after < before

    model.eval()
    with torch.no_grad():
        sequences, scores = generate(model, family, use_cache=True)
        with model.disable_adapter():
            _, base_scores = generate(model, family, use_cache=True)
    finite = scores.isfinite()
    assert (scores - base_scores)[finite].abs().max() > 1e-3  # the trained adapter takes part in generate()
    model.save_pretrained(tmp_path / "adapter")

    if family.name != "whisper":
        loaded = AutoPeftModelForSeq2SeqLM.from_pretrained(tmp_path / "adapter")
    else:
        loaded = PeftModel.from_pretrained(model_class.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert isinstance(loaded, PeftModelForSeq2SeqLM)
    loaded.eval()
    with torch.no_grad():
        reloaded, reloaded_scores = generate(loaded, family, use_cache=True)
    assert torch.equal(reloaded, sequences) and torch.equal(reloaded_scores, scores)
