"""`push_to_hub` of APT adapters, offline: uploads land in a local folder laid out as a Hub cache, and are loaded back
from it with the Hub in offline mode."""

import hashlib
import json
import shutil

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from peft import PeftModel, get_peft_model
from reference import randomise_adapter
from safetensors import safe_open
from transformers import ViltConfig, ViltForQuestionAnswering

from peft_apt import APTConfig

BASE_ID, ADAPTER_ID = "test-org/tiny-vilt-vqa", "test-org/tiny-vilt-vqa-apt"


class FakeHub:
    """A Hub cache that commits write into, as `hf_hub_download` would have filled it."""

    def __init__(self, cache):
        self.cache = cache
        self.commits = 0

    def snapshot(self, repo_id):
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        ref = repo / "refs" / "main"
        return repo / "snapshots" / ref.read_text() if ref.exists() else None

    def commit(self, repo_id, files: dict[str, bytes]) -> str:
        """A new snapshot: the previous files updated with `files`."""
        self.commits += 1
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        sha = hashlib.sha1(f"{repo_id}{self.commits}".encode()).hexdigest()
        snapshot = repo / "snapshots" / sha
        previous = self.snapshot(repo_id)
        if previous is not None:
            shutil.copytree(previous, snapshot)
        for path, content in files.items():
            (snapshot / path).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / path).write_bytes(content)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        return sha


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fake.cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            with operation.as_file() as f:
                files[operation.path_in_repo] = f.read()
        sha = fake.commit(repo_id, files)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{sha}",
            commit_message=kwargs.get("commit_message", ""),
            commit_description="",
            oid=sha,
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return fake


def publish_base_model(hub, tmp_path):
    torch.manual_seed(0)
    config = ViltConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        max_image_length=-1,
        vocab_size=99,
        num_labels=5,
    )
    ViltForQuestionAnswering(config).save_pretrained(tmp_path / "base")
    hub.commit(BASE_ID, {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()})


def inputs():
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(3, 99, (2, 7), generator=g),
        "pixel_values": torch.randn(2, 3, 32, 32, generator=g),
    }


def test_push_to_hub_uploads_adapter_and_peft_card_and_loads_back(hub, tmp_path):
    publish_base_model(hub, tmp_path)
    model = get_peft_model(
        ViltForQuestionAnswering.from_pretrained(BASE_ID), APTConfig(num_prompts=4, r=2, modules_to_save=["classifier"])
    )
    randomise_adapter(model)
    model.eval()
    expected = model(**inputs()).logits

    model.push_to_hub(ADAPTER_ID)

    snapshot = hub.snapshot(ADAPTER_ID)
    files = sorted(p.name for p in snapshot.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((snapshot / "adapter_config.json").read_text())["peft_type"] == "APT"
    with safe_open(snapshot / "adapter_model.safetensors", "pt") as f:
        assert all(".apt_" in key or ".classifier." in key for key in f.keys())
    card = ModelCard.load(snapshot / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == BASE_ID
    assert {"apt", "peft-apt"} <= set(card.data.tags)
    assert "import peft_apt" in card.text
    assert f'PeftModel.from_pretrained(base_model, "{ADAPTER_ID}")' in card.text
    assert f'ViltForQuestionAnswering.from_pretrained("{BASE_ID}")' in card.text

    loaded = PeftModel.from_pretrained(ViltForQuestionAnswering.from_pretrained(BASE_ID), ADAPTER_ID).eval()
    saved, restored = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(saved[name], restored[name]) for name in saved if ".apt_" in name or ".classifier." in name)
    torch.testing.assert_close(loaded(**inputs()).logits, expected)


def test_push_to_hub_updates_the_hub_card_instead_of_replacing_it(hub, tmp_path):
    publish_base_model(hub, tmp_path)
    hub.commit(ADAPTER_ID, {"README.md": b"---\nlicense: mit\ntags:\n- vqa\n---\n\n# My adapter\n\nNotes by hand.\n"})
    model = get_peft_model(ViltForQuestionAnswering.from_pretrained(BASE_ID), APTConfig(num_prompts=4, r=2))

    model.push_to_hub(ADAPTER_ID, tags=["tiny"])
    model.push_to_hub(ADAPTER_ID)

    card = ModelCard.load(hub.snapshot(ADAPTER_ID) / "README.md")
    assert card.data.license == "mit"
    assert {"vqa", "tiny", "apt", "peft-apt"} <= set(card.data.tags)
    assert card.data.library_name == "peft" and card.data.base_model == BASE_ID
    assert "Notes by hand." in card.text
    assert card.text.count("import peft_apt") == 1


def test_a_lora_models_push_and_card_are_the_same_with_and_without_peft_apt(tmp_path):
    """peft_apt's changes to PeftModel's card writer and push_to_hub reach APT adapters only: a LoRA model pushes and
    saves byte-identical files, cards included, whether or not peft_apt was imported (each case in a fresh process,
    since an import cannot be undone)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torch.manual_seed(0)
    config = ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, num_labels=5)
    ViltForQuestionAnswering(config).save_pretrained(tmp_path / "base")
    root = Path(__file__).resolve().parents[1]
    # one hash seed for both: LoraConfig keeps target_modules as a set, saved in its iteration order
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"}
    env["HF_HUB_CACHE"] = str(tmp_path / "cache")
    files = {}
    for with_apt in ("0", "1"):
        out = tmp_path / f"with_apt_{with_apt}"
        command = [sys.executable, str(root / "tests" / "push_lora.py"), str(tmp_path / "base"), str(out), with_apt]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        files[with_apt] = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert sorted(files["0"]) == [
        "pushed/README.md",
        "pushed/adapter_config.json",
        "pushed/adapter_model.safetensors",
        "saved/README.md",
        "saved/adapter_config.json",
        "saved/adapter_model.safetensors",
    ]
    assert files["1"] == files["0"]
    assert b"peft_apt" not in files["1"]["pushed/README.md"] + files["1"]["saved/README.md"]
    assert b"library_name: peft" in files["1"]["saved/README.md"]  # PEFT's card on save, transformers' on push
