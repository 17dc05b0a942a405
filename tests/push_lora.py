"""Push and save a LoRA adapter of a tiny ViLT to an offline stand-in of the Hub, with or without `import peft_apt`,
so that tests/test_hub.py can compare the files of the two cases, each run in a fresh process.

    python tests/push_lora.py BASE_MODEL_DIR OUTPUT_DIR 0|1    # 1: import peft_apt first
"""

import sys
from pathlib import Path

import torch
from huggingface_hub import HfApi
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from peft import LoraConfig, get_peft_model
from transformers import ViltForQuestionAnswering


def main(base: str, output: Path, with_apt: bool) -> None:
    if with_apt:
        import peft_apt  # noqa: F401

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            path = output / "pushed" / operation.path_in_repo
            path.parent.mkdir(parents=True, exist_ok=True)
            with operation.as_file() as f:
                path.write_bytes(f.read())
        url = f"https://huggingface.co/{repo_id}/commit/0"
        return CommitInfo(commit_url=url, commit_message="", commit_description="", oid="0")

    HfApi.create_repo = lambda self, repo_id, **kwargs: RepoUrl(f"https://huggingface.co/{repo_id}")
    HfApi.create_commit = create_commit
    torch.manual_seed(0)
    model = ViltForQuestionAnswering.from_pretrained(base)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"]))
    model.push_to_hub("test-org/tiny-vilt-lora", tags=["tiny"])
    model.save_pretrained(output / "saved")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1")
