"""Python's own standard-library source as an offline text corpus, and held-out perplexity on it.

Every Python installation ships it, so causal-LM examples and benchmarks need no download. Files are split into
training and held-out ones by a hash of their name, not by position in a stream: held-out code then comes from
modules the model never saw in training, and the split does not move when another Python version adds or drops files.
The corpus does depend on the Python version, which the benchmarks record.
"""

from __future__ import annotations

import math
import sysconfig
import zlib
from pathlib import Path

import torch

HELD_OUT_EVERY = 5  # about one file in five is held out


def stdlib_sources(root: str | Path | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """({name: source} of the training files, {name: source} of the held-out files): the top-level `*.py` modules."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"No *.py files in {root}")
    train, held_out = {}, {}
    for path in files:
        split = held_out if zlib.crc32(path.name.encode()) % HELD_OUT_EVERY == 0 else train
        split[path.name] = path.read_text(encoding="utf-8", errors="replace")
    return train, held_out


def token_blocks(tokenizer, texts: list[str], block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """The texts' tokens as one stream (each text followed by end-of-sequence) cut into (n, block_size) blocks.

    Texts are tokenised one at a time and only until `max_blocks` blocks are full, so a small run reads little (and
    without the warning about texts longer than the model's context: they are cut into blocks here).
    """
    stream, needed = [], None if max_blocks is None else max_blocks * block_size
    for text in texts:
        stream += tokenizer(text, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
        if needed is not None and len(stream) >= needed:
            break
    n_blocks = len(stream) // block_size if needed is None else min(len(stream) // block_size, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"The corpus has {len(stream)} tokens, fewer than one block of {block_size}.")
    return torch.tensor(stream[: n_blocks * block_size]).view(n_blocks, block_size)


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token loss over every predicted token of the blocks (each block scored on its own)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in blocks.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, -batch.shape[1] :]  # prompt tuning prepends virtual tokens
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
        )
        total, count = total + loss.item(), count + batch[:, 1:].numel()
    return math.exp(total / count)
