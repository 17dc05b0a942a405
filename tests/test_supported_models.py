"""README's "Supported models" is generated from the one table, peft_apt/constants.py, and from what
tests/test_vlm_coverage.py measures, so they never drift: `python tests/test_supported_models.py` rewrites it. Every
model type with LoRA defaults in PEFT has APT defaults (by the table, or by the language-model rule for
image-text-to-text models) or a stated reason why not."""

import re
import sys
from pathlib import Path

import pytest
import transformers
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from test_vlm_coverage import OPTIONAL_DEPENDENCIES, UNNORMALISED_INPUTS, UNSET_FIELDS
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from peft_apt.constants import (
    OUTPUT_PROJECTION_NAMES,
    TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES,
)

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- generated from peft_apt/constants.py by `python tests/test_supported_models.py` -->\n"
END = "<!-- end of generated list -->\n"


def supported_models_markdown() -> str:
    """One row per set of default targets, with the model types that use it; then the types without defaults."""
    rows: dict[str, list[str]] = {}
    for model_type, targets in TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING.items():
        # a table cell's pipes are escaped, in code spans too
        names = (
            f"regex `{targets}`".replace("|", "\\|")
            if isinstance(targets, str)
            else ", ".join(f"`{name}`" for name in targets)
        )
        rows.setdefault(names, []).append(f"`{model_type}`")
    lines = ["| adapted modules (`target_modules`) | model types (`config.model_type`, or class) |", "|---|---|"]
    lines += [f"| {names} | {', '.join(model_types)} |" for names, model_types in rows.items()]
    lines += ["| the language model's attention modules, by a rule | other image-text-to-text models |"]
    projections = ", ".join(f"`{name}`" for name in OUTPUT_PROJECTION_NAMES)
    lines += ["", f"Output projections (O), relative to the attention module, the first found: {projections}."]
    lines += ["", *vision_language_coverage()]
    lines += ["", "Model types with LoRA defaults in PEFT but none here, and why:", ""]
    lines += [f"- `{model_type}`: {why}" for model_type, why in TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES.items()]
    return BEGIN + "\n".join(lines) + "\n" + END


def vision_language_coverage() -> list[str]:
    """What tests/test_vlm_coverage.py checks on every image-text-to-text model type, and the exceptions."""
    total = len(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    unmeasured = sorted(set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) & set(OPTIONAL_DEPENDENCIES))
    without = sorted(
        set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) & set(TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES)
    )
    lines = [
        f"Image-text-to-text models (the {total} model types of transformers {transformers.__version__}'s "
        "`AutoModelForImageTextToText`): each is built from its default config on the meta device and its default "
        "targets resolved; every resolved module is an attention of the language model, with an output projection "
        "as wide as the text embeddings, and none lies in the vision tower or the projector. "
        f"{total - len(unmeasured) - len(without)} of {total} resolve so; the others:",
        "",
    ]
    lines += [
        f"- `{model_type}`: not measured without `{OPTIONAL_DEPENDENCIES[model_type]}`, which its default config "
        "builds its vision tower with (not a dependency of peft-apt)"
        for model_type in unmeasured
    ]
    lines += [
        f"- `{model_type}`: {TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES[model_type]}" for model_type in without
    ]
    fields = ", ".join(
        f"`{model_type}` ({', '.join(f'`{field}`' for field in UNSET_FIELDS[model_type])})"
        for model_type in UNSET_FIELDS
    )
    lines += [
        "",
        f"Default configs that leave fields their model needs unset, built with those set: {fields}. Language models "
        "whose attention input is no norm's output, where the prompts are calibrated for a LayerNorm-sized X:",
        "",
    ]
    lines += [f"- `{model_type}`: {why}" for model_type, why in UNNORMALISED_INPUTS.items()]
    return lines


def readme_with_current_list(readme: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    assert len(pattern.findall(readme)) == 1, "README.md must hold the generated list once, between its markers"
    return pattern.sub(lambda _: supported_models_markdown(), readme)


def test_readme_lists_every_default_as_the_table_has_it():
    readme = README.read_text()
    # the image-text-to-text types are transformers' own list: a release that adds types changes the generated text
    generated_with = re.search(r"of transformers (\S+?)'s `AutoModelForImageTextToText`", readme)
    if generated_with is None or generated_with[1] != transformers.__version__:
        pytest.skip(
            f"README's list was generated with transformers {generated_with and generated_with[1]}, "
            f"{transformers.__version__} is installed: run `python tests/test_supported_models.py` to regenerate it"
        )
    assert readme == readme_with_current_list(readme), "run `python tests/test_supported_models.py`"


def test_every_lora_default_model_type_has_apt_defaults_or_a_reason():
    """Image-text-to-text types count as known: tests/test_vlm_coverage.py checks the rule's defaults on each."""
    without = set(TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES)
    known = (
        set(TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING)
        | set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) - without
    )
    assert not known & without
    assert set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) <= known | without


if __name__ == "__main__":
    README.write_text(readme_with_current_list(README.read_text()))
    sys.exit(0)
