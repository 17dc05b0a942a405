"""
Model cards of APT adapters on the Hub.

PEFT writes its model card (`library_name: peft`, `base_model`, tags) in `PeftModel.save_pretrained`. But
`PeftModel.push_to_hub` is transformers' `PushToHubMixin.push_to_hub`, which calls `save_pretrained` and then
overwrites that README.md with a card of its own (`library_name: transformers`, no base model, no PEFT tags). For APT
adapters, `push_to_hub` here writes the Hub's current card first and lets `save_pretrained` update it, and the card
also gets the `apt` and `peft-apt` tags and a usage snippet that imports `peft_apt`, without which PEFT cannot load
the adapter. And since APT adapters load from safetensors only, their `save_pretrained` (and so `push_to_hub`) always
writes safetensors. Other adapter types keep PEFT's behaviour unchanged.
"""

from __future__ import annotations

import functools
import inspect
import os
import tempfile
import warnings
from typing import Optional

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from peft import PeftModel
from peft.utils import PeftType

APT_TAGS = ("apt", "peft-apt")
USAGE_HEADING = "## Load this APT adapter"


def is_apt_model(model: PeftModel) -> bool:
    return any(config.peft_type == PeftType.APT for config in model.peft_config.values())


def usage_section(model: PeftModel, adapter_id: Optional[str]) -> str:
    base_model = model.get_base_model()
    base_id = getattr(base_model, "name_or_path", None) or "<base model id or path>"
    model_class = type(base_model).__name__
    return f"""{USAGE_HEADING}

This adapter uses [Approximated Prompt Tuning](https://arxiv.org/abs/2306.15706) from `peft-apt`; import `peft_apt`
before loading it, so that PEFT knows the `APT` adapter type.

```python
import peft_apt  # registers APT with PEFT (pip install peft-apt)
from peft import PeftModel
from transformers import {model_class}

base_model = {model_class}.from_pretrained("{base_id}")
model = PeftModel.from_pretrained(base_model, "{adapter_id or "<this adapter id or path>"}")
```
"""


def add_apt_to_model_card(model: PeftModel, output_dir: str, adapter_id: Optional[str] = None, tags=()) -> None:
    """Add APT's tags and usage section to the README.md that PEFT wrote in `output_dir`, replacing an older section."""
    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path)
    card.data.tags = sorted({*(card.data.tags or []), *APT_TAGS, *tags})
    lines = card.text.splitlines()
    if USAGE_HEADING in lines:
        start = lines.index(USAGE_HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = usage_section(model, adapter_id).splitlines()
    else:
        lines += ["", *usage_section(model, adapter_id).splitlines()]
    card.text = "\n".join(lines) + "\n"
    card.save(path)


def create_or_update_model_card(peft_method, self: PeftModel, output_dir: str) -> None:
    """PEFT's update, keeping the tags the card had (PEFT replaces them with its own), plus APT's section."""
    path = os.path.join(output_dir, "README.md")
    tags = (ModelCard.load(path).data.tags or []) if os.path.exists(path) else []
    peft_method(self, output_dir)
    add_apt_to_model_card(self, output_dir, tags=tags)


def save_pretrained(peft_method, self: PeftModel, *args, **kwargs) -> None:
    """PEFT's save, in safetensors even when asked for a pickle: APT would refuse to load an `adapter_model.bin`."""
    call = inspect.signature(peft_method).bind(self, *args, **kwargs)
    if not call.arguments.get("safe_serialization", True):
        warnings.warn(
            "APT adapters are saved as safetensors only (APT never loads pickled files): `safe_serialization=False` "
            "is ignored and adapter_model.safetensors is written.",
            stacklevel=3,
        )
        call.arguments["safe_serialization"] = True
    peft_method(*call.args, **call.kwargs)


def push_to_hub(
    peft_method,
    self: PeftModel,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token=None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    **save_kwargs,
):
    """Upload the adapter and a card that updates the Hub's card (if any) instead of replacing PEFT's."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    save_kwargs.pop("max_shard_size", None)  # adapters are never sharded
    with tempfile.TemporaryDirectory() as folder:
        try:
            ModelCard.load(repo_id, token=token).save(os.path.join(folder, "README.md"))
        except EntryNotFoundError:
            pass  # a new repository: PEFT starts a card from its template
        self.save_pretrained(folder, **save_kwargs)
        add_apt_to_model_card(self, folder, adapter_id=repo_id, tags=tags or ())
        operations = [
            CommitOperationAdd(
                path_in_repo=os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"),
                path_or_fileobj=os.path.join(root, name),
            )
            for root, _, names in os.walk(folder)
            for name in names
        ]
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload APT adapter",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def for_apt_models(name: str, apt_method) -> None:
    """Make `PeftModel.<name>` call `apt_method(peft_method, ...)` for models with an APT adapter. Installing again
    (a reload of peft_apt) replaces the earlier wrapper instead of wrapping it."""
    peft_method = getattr(PeftModel, name)
    peft_method = getattr(peft_method, "__peft_method__", peft_method)

    @functools.wraps(peft_method)
    def method(self, *args, **kwargs):
        if is_apt_model(self):
            return apt_method(peft_method, self, *args, **kwargs)
        return peft_method(self, *args, **kwargs)

    method.__peft_method__ = peft_method
    setattr(PeftModel, name, method)


def install() -> None:
    for_apt_models("create_or_update_model_card", create_or_update_model_card)
    for_apt_models("push_to_hub", push_to_hub)
    for_apt_models("save_pretrained", save_pretrained)
