"""The README's presets table is generated from the shipped YAML files: a new or changed preset must be documented."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _presets_table_module():
    spec = importlib.util.spec_from_file_location("presets_table", ROOT / "scripts" / "presets_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_holds_the_generated_presets_table():
    table = _presets_table_module().table()
    assert table in (ROOT / "README.md").read_text(), "README presets table is stale: python scripts/presets_table.py"


def test_every_training_preset_is_a_row_with_its_values():
    module = _presets_table_module()
    presets = module.training_presets()
    rows = module.table().splitlines()[2:]
    assert len(rows) == len(presets) >= 20
    sd15_lora = next(r for r in rows if r.startswith("| `sd15_dpo_lora` |"))
    assert "| dpo | SD1.5 | LoRA r8 | 16 × 2 pairs | 2000 | 1e-05 | 5000 | 512 |" in sd15_lora
    sd15_full = next(r for r in rows if r.startswith("| `sd15_dpo` |"))
    assert "| full | 1 × 128 pairs |" in sd15_full and "× batch" in sd15_full  # scale_lr shown
