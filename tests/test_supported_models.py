"""README's "Supported models" is generated from the one table, peft_apt/constants.py, so the two never drift:
`python tests/test_supported_models.py` rewrites it. Every model type with LoRA defaults in PEFT has APT defaults or
a stated reason why not."""

import re
import sys
from pathlib import Path

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

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
    projections = ", ".join(f"`{name}`" for name in OUTPUT_PROJECTION_NAMES)
    lines += ["", f"Output projections (O), relative to the attention module, the first found: {projections}."]
    lines += ["", "Model types with LoRA defaults in PEFT but none here, and why:", ""]
    lines += [f"- `{model_type}`: {why}" for model_type, why in TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES.items()]
    return BEGIN + "\n".join(lines) + "\n" + END


def readme_with_current_list(readme: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    assert len(pattern.findall(readme)) == 1, "README.md must hold the generated list once, between its markers"
    return pattern.sub(lambda _: supported_models_markdown(), readme)


def test_readme_lists_every_default_as_the_table_has_it():
    readme = README.read_text()
    assert readme == readme_with_current_list(readme), "run `python tests/test_supported_models.py`"


def test_every_lora_default_model_type_has_apt_defaults_or_a_reason():
    known = set(TRANSFORMERS_MODELS_TO_APT_TARGET_MODULES_MAPPING)
    without = set(TRANSFORMERS_MODELS_WITHOUT_APT_TARGET_MODULES)
    assert not known & without
    assert set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) <= known | without


if __name__ == "__main__":
    README.write_text(readme_with_current_list(README.read_text()))
    sys.exit(0)
