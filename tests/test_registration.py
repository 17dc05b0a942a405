"""Registration with PEFT: in memory only, idempotent, and a clear error on a too-old peft."""

import importlib
import subprocess
import sys
from pathlib import Path

import peft
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_apt


def test_apt_is_registered():
    assert PeftType("APT") is PeftType.APT
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.APT] is peft_apt.APTConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["APT"] is peft_apt.APTModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.APT] == "apt_"


def test_reimport_is_idempotent():
    for _ in range(2):
        module = importlib.reload(peft_apt)
    assert [t for t in PeftType if t.value == "APT"] == [PeftType.APT]
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.APT] is module.APTModel


def test_import_and_use_never_write_to_peft_files(tmp_path):
    root = Path(peft.__file__).parent
    files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files}
    script = (
        "import peft_apt, transformers as T; from peft import get_peft_model;"
        "m = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, "
        "intermediate_size=37, vocab_size=99));"
        f"get_peft_model(m, peft_apt.APTConfig(num_prompts=2)).save_pretrained({str(tmp_path)!r})"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files}
    assert after == before
    assert {p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts} == set(files)


def test_too_old_peft_gets_a_clear_error():
    script = (
        "import importlib.metadata as md; real = md.version;"
        "md.version = lambda name: '0.17.1' if name == 'peft' else real(name);"
        "import peft_apt"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "peft-apt needs peft>=0.18.0" in result.stderr and "found peft 0.17.1" in result.stderr
