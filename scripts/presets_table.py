"""Print the README's table of shipped training presets from the YAML files themselves.

    python scripts/presets_table.py            # markdown table on stdout

`tests/test_presets_doc.py` checks that the README holds exactly this table, so a new or changed preset cannot
go undocumented. The method and model come from the preset's name (`<model>_<method>[_lora|_lowvram]`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from diffalign.config import TrainConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "src" / "diffalign" / "configs"
MODELS = {"sd15": "SD1.5", "sdxl": "SDXL", "sd3": "SD3", "sd35": "SD3.5", "flux": "FLUX.1", "toy": "toy"}
METHODS = {"dpo": "dpo", "kto": "kto", "npo": "npo", "self_npo": "self-npo", "smpo": "smpo", "tdpo": "tdpo",
           "tkto": "tkto"}  # fmt: skip
UNITS = {"kto": "images", "tkto": "images", "tdpo": "images", "self-npo": "captions"}


def training_presets() -> dict[str, dict]:
    """Every shipped training preset (eval presets excluded), by name."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        if path.stem.startswith("eval_"):
            continue
        out[path.stem] = yaml.safe_load(path.read_text()) or {}
    return out


def split_name(name: str) -> tuple[str, str]:
    """`sd15_self_npo_lora` → (`SD1.5`, `self-npo`)."""
    model, _, rest = name.partition("_")
    for suffix in ("_lora", "_lowvram"):
        rest = rest.removesuffix(suffix)
    return MODELS[model], METHODS[rest]


def _default(key: str):
    return TrainConfig.model_fields[key].default


def row(name: str, preset: dict) -> str:
    model, method = split_name(name)
    keys = ("lora_rank", "batch_size", "gradient_accumulation_steps", "learning_rate", "max_steps", "resolution",
            "optimizer", "mixed_precision", "scale_lr", "base_quantization")  # fmt: skip
    cfg = {k: _default(k) for k in keys} | preset
    rank = cfg["lora_rank"]
    mode = f"LoRA r{rank}" if rank else "full"
    if cfg["base_quantization"] != "none":
        mode += f", {cfg['base_quantization']} base"
    batch, ga = cfg["batch_size"], cfg["gradient_accumulation_steps"]
    unit = UNITS.get(method, "pairs")
    per_step = f"{batch} × {ga} {unit}" if ga > 1 else f"{batch} {unit}"
    lr = f"{cfg['learning_rate']:g}" + (" × batch" if cfg["scale_lr"] else "")
    beta = f"{cfg['beta']:g}" if "beta" in cfg else "—"
    cells = [f"`{name}`", method, model, mode, per_step, str(cfg["max_steps"]), lr, beta,
             str(cfg["resolution"]), cfg["optimizer"], cfg["mixed_precision"]]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def table() -> str:
    header = ("| preset | method | model | mode | per device × accumulation | steps | lr | β | px | optimizer | "
              "precision |\n|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    return "\n".join([header, *(row(n, c) for n, c in training_presets().items())])


if __name__ == "__main__":
    print(table())
